"""The `Prompts` container every prompt plugin returns and the model's prompt encoder consumes."""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

import torch
from torch import Tensor


@dataclass
class Prompts:
    """Prompts for N masks being segmented at once; every field is optional.

    Coordinates are in input pixels (the resized, padded frame the model sees), x before y.

    Attributes:
        point_coords: N x P x 2 float (x, y).
        point_labels: N x P int (1 foreground, 0 background, -1 padding).
        boxes: N x 4 float, xyxy.
        mask_inputs: N x 1 x S/4 x S/4 float logits (the dense prompt).
        text_embeddings: N x D float, l2-normalised CLIP embeddings.
    """

    point_coords: Tensor | None = None
    point_labels: Tensor | None = None
    boxes: Tensor | None = None
    mask_inputs: Tensor | None = None
    text_embeddings: Tensor | None = None

    def __post_init__(self) -> None:
        if (self.point_coords is None) != (self.point_labels is None):
            raise ValueError("Prompts: point_coords and point_labels must be given together")

    @property
    def num_prompts(self) -> int:
        """N, the number of masks these prompts address (0 when every field is empty)."""
        for f in fields(self):
            value = getattr(self, f.name)
            if value is not None:
                return value.shape[0]
        return 0

    @property
    def num_sparse(self) -> int:
        """Number of sparse prompt entries per mask: points + 2 box corners + 1 text token."""
        n = 0 if self.point_coords is None else self.point_coords.shape[1]
        n += 0 if self.boxes is None else 2
        n += 0 if self.text_embeddings is None else 1
        return n

    def is_ambiguous(self) -> bool:
        """True for a single point and nothing else: the paper's case for three outputs."""
        return self.num_sparse == 1 and self.point_coords is not None and self.mask_inputs is None

    def to(self, device: torch.device | str) -> Prompts:
        return replace(self, **{f.name: _to(getattr(self, f.name), device) for f in fields(self)})

    def with_points(self, coords: Tensor, labels: Tensor) -> Prompts:
        """Append points (N x k x 2, N x k) to the existing ones, e.g. a corrective click."""
        if self.point_coords is None:
            return replace(self, point_coords=coords, point_labels=labels)
        return replace(
            self,
            point_coords=torch.cat([self.point_coords, coords.to(self.point_coords.dtype)], dim=1),
            point_labels=torch.cat([self.point_labels, labels.to(self.point_labels.dtype)], dim=1),
        )


def _to(t: Tensor | None, device: torch.device | str) -> Tensor | None:
    return None if t is None else t.to(device, non_blocking=True)
