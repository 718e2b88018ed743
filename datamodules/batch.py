"""`SegmentationBatch`: what every samlight datamodule yields and `SamModule` consumes."""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor


@dataclass
class SegmentationBatch:
    """A batch of B images with up to M masks each, in SamPredictor's frame.

    Images are resized so the longest side is S, normalised with SAM's pixel mean/std (on 0-255) and zero-padded
    bottom-right to S x S; masks are in the same frame.

    Attributes:
        images: B x 3 x S x S float.
        masks: B x M x S x S bool, or None in training batches that carry only `mask_targets`.
        mask_valid: B x M bool; False marks a padding slot.
        original_sizes: B x 2 long, (H, W) of the source image.
        input_sizes: B x 2 long, (H, W) after the resize, before padding.
        text_embeddings: optional B x M x D float, per-mask CLIP embeddings stored in the shard.
        meta: one dict per image (image id, shard, key, ...).
        mask_targets: optional B x M x S/4 x S/4 uint8, the masks in the training loss frame: how many of the
            16 pixels of each 4 x 4 cell are foreground. Training batches carry these instead of `masks`
            (16x fewer bytes); `soft_targets()` reads either.
    """

    images: Tensor
    masks: Tensor | None
    mask_valid: Tensor
    original_sizes: Tensor
    input_sizes: Tensor
    text_embeddings: Tensor | None = None
    meta: list[dict[str, Any]] = field(default_factory=list)
    mask_targets: Tensor | None = None

    def soft_targets(self) -> Tensor:
        """B x M x S/4 x S/4 float in [0, 1]: the fraction of each 4 x 4 cell covered by the mask.

        From `mask_targets` when present (a division, on the device), else area-pooled from `masks`.
        """
        if self.mask_targets is not None:
            return self.mask_targets.float() / 16.0
        if self.masks is None:
            raise ValueError("SegmentationBatch has neither masks nor mask_targets")
        return F.avg_pool2d(self.masks.float(), 4)  # B x M x S/4 x S/4

    def __len__(self) -> int:
        return self.images.shape[0]

    def to(self, device: torch.device | str, non_blocking: bool = True) -> SegmentationBatch:
        """Move every tensor to `device` (Lightning calls this through `transfer_batch_to_device`)."""
        moved = {
            f.name: getattr(self, f.name).to(device, non_blocking=non_blocking)
            for f in fields(self)
            if isinstance(getattr(self, f.name), Tensor)
        }
        return replace(self, **moved)

    def pin_memory(self) -> SegmentationBatch:
        pinned = {
            f.name: getattr(self, f.name).pin_memory()
            for f in fields(self)
            if isinstance(getattr(self, f.name), Tensor)
        }
        return replace(self, **pinned)
