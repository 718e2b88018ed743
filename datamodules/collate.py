"""One decoded image (`SegmentationSample`) and the collate function that pads them into a `SegmentationBatch`."""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from samlight.datamodules.batch import SegmentationBatch


@dataclass
class SegmentationSample:
    """One image with its M masks, already in SamPredictor's frame (S x S, resized and padded).

    Attributes:
        image: 3 x S x S float, normalised with SAM's pixel mean/std, zero-padded bottom-right.
        masks: M x S x S bool, same frame (None when the sample carries only `mask_targets`).
        mask_targets: optional M x S/4 x S/4 uint8, the training loss frame: how many of the 16 pixels of each
            4 x 4 cell of `masks` are foreground (see `decode_mask_targets`).
        original_size: (H, W) of the source image.
        input_size: (h, w) after the resize, before padding.
        text_embeddings: optional M x D float, one CLIP embedding per mask.
        meta: image id, shard, key, annotation ids, labels, skip counts, ...
    """

    image: Tensor
    masks: Tensor | None
    original_size: tuple[int, int]
    input_size: tuple[int, int]
    text_embeddings: Tensor | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    mask_targets: Tensor | None = None

    def __post_init__(self) -> None:
        if self.masks is None and self.mask_targets is None:
            raise ValueError("SegmentationSample needs masks (M x S x S) or mask_targets (M x S/4 x S/4)")

    @property
    def num_masks(self) -> int:
        return (self.masks if self.masks is not None else self.mask_targets).shape[0]


@dataclass
class SkipReport:
    """Skip counts a data worker still holds when its stream ends (no sample left to carry them)."""

    skipped: dict[str, int]


def merge_counts(total: Counter, counts: Mapping[str, int] | None) -> Counter:
    """Add `counts` (reason -> n) into `total` in place and return it."""
    if counts:
        total.update(counts)
    return total


def collate_samples(items: Sequence[SegmentationSample | SkipReport]) -> SegmentationBatch | SkipReport:
    """Pad B samples with varying mask counts into one batch.

    Args:
        items: samples (B of them) and possibly `SkipReport`s from the end of a worker's stream.
    Returns:
        `SegmentationBatch` with images B x 3 x S x S, masks B x M x S x S (M = max masks in the batch) when
        every sample has them, mask_targets B x M x S/4 x S/4 uint8 when every sample has them, mask_valid B x M, original_sizes / input_sizes B x 2 long, text_embeddings B x M x D (when every sample
        has them, zeros in padding slots). Skip counts of `SkipReport`s are merged into `meta[0]["skipped"]`.
        When `items` holds only `SkipReport`s the merged `SkipReport` is returned instead.
    """
    samples = [s for s in items if isinstance(s, SegmentationSample)]
    reports = [s for s in items if isinstance(s, SkipReport)]
    extra: Counter = Counter()
    for report in reports:
        merge_counts(extra, report.skipped)
    if not samples:
        return SkipReport(dict(extra))
    num_masks = max(s.num_masks for s in samples)
    batch_size = len(samples)
    images = torch.stack([s.image for s in samples])  # B x 3 x S x S
    masks = _pad_stack([s.masks for s in samples], num_masks)  # B x M x S x S bool | None
    mask_targets = _pad_stack([s.mask_targets for s in samples], num_masks)  # B x M x S/4 x S/4 | None
    if masks is None and mask_targets is None:
        raise ValueError(
            "collate_samples: some samples carry only masks, others only mask_targets; decode every sample of "
            "a loader in the same mask_frame"
        )
    mask_valid = torch.zeros(batch_size, num_masks, dtype=torch.bool)  # B x M
    for i, s in enumerate(samples):
        mask_valid[i, : s.num_masks] = True
    text_embeddings = None
    if all(s.text_embeddings is not None for s in samples):
        dim = samples[0].text_embeddings.shape[-1]
        text_embeddings = torch.zeros(batch_size, num_masks, dim, dtype=torch.float32)  # B x M x D
        for i, s in enumerate(samples):
            text_embeddings[i, : s.text_embeddings.shape[0]] = s.text_embeddings
    meta = [dict(s.meta) for s in samples]
    if extra:
        meta[0]["skipped"] = dict(merge_counts(Counter(meta[0].get("skipped", {})), extra))
    return SegmentationBatch(
        images=images,
        masks=masks,
        mask_targets=mask_targets,
        mask_valid=mask_valid,
        original_sizes=torch.tensor([s.original_size for s in samples], dtype=torch.long),
        input_sizes=torch.tensor([s.input_size for s in samples], dtype=torch.long),
        text_embeddings=text_embeddings,
        meta=meta,
    )


def _pad_stack(tensors: list[Tensor | None], num_masks: int) -> Tensor | None:
    """B tensors of k_i x ... -> B x num_masks x ... zero-padded; None unless every tensor is given."""
    if any(t is None for t in tensors):
        return None
    out = tensors[0].new_zeros(len(tensors), num_masks, *tensors[0].shape[1:])
    for i, t in enumerate(tensors):
        out[i, : t.shape[0]] = t
    return out
