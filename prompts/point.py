"""`PointPrompt`: k foreground points inside the ground-truth mask (uniform, or the mask's centre for evaluation)."""

from __future__ import annotations

import torch
from torch import Tensor

from samlight.prompts.base import PromptContext, PromptType
from samlight.prompts.clicks import distance_to_boundary, pixel_coords, random_pixels
from samlight.prompts.types import Prompts


class PointPrompt(PromptType):
    """Foreground points drawn inside each mask.

    Args:
        num_points: points per mask; one point is the paper's ambiguous prompt (three outputs).
        mode: "uniform" draws points uniformly inside the mask (training, paper App. A); "center" puts one
            point on the mask pixel farthest from its boundary (evaluation, paper D.1), whatever `num_points`.
    """

    name = "point"

    def __init__(self, *, num_points: int = 1, mode: str = "uniform") -> None:
        if num_points < 1:
            raise ValueError(f"PointPrompt: num_points must be >= 1, got {num_points}")
        if mode not in ("uniform", "center"):
            raise ValueError(f"PointPrompt: mode must be 'uniform' or 'center', got {mode!r}")
        self.num_points = num_points
        self.mode = mode

    def sample(
        self,
        gt_masks: Tensor,
        *,
        context: PromptContext | None = None,
        generator: torch.Generator | None = None,
    ) -> Prompts:
        """N x P points; labels are 1, or -1 (padding) where a mask has fewer than P pixels or is empty."""
        flat_masks = gt_masks.flatten(1)  # N x HW
        if self.mode == "center":
            flat = distance_to_boundary(gt_masks).flatten(1).argmax(1)[:, None]  # N x 1
            inside = flat_masks.gather(1, flat)  # N x 1
        else:
            # N x P random numbers (not N x S^2): independent uniform draws, so with P > 1 two points of a
            # small mask may coincide; a repeated point is labelled padding, as are points of an empty mask.
            flat = random_pixels(gt_masks, self.num_points, generator)  # N x P
            first = torch.arange(self.num_points, device=flat.device)
            repeated = ((flat[:, :, None] == flat[:, None, :]) & (first[None, :] < first[:, None])).any(2)
            inside = flat_masks.gather(1, flat) & ~repeated  # N x P
        coords = pixel_coords(flat.flatten(), gt_masks.shape[-1]).view(*flat.shape, 2)  # N x P x 2
        labels = torch.where(inside, 1, -1).long()
        return Prompts(point_coords=coords, point_labels=labels)
