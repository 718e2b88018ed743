"""`BoxPrompt`: the ground-truth box with the paper's noise (std 10% of the side, capped at 20 px)."""

from __future__ import annotations

import torch
from torch import Tensor

from samlight.prompts.base import PromptContext, PromptType
from samlight.prompts.types import Prompts


def boxes_from_masks(masks: Tensor) -> Tensor:
    """N x 4 float xyxy pixel boxes (inclusive corners) around N x H x W bool masks; zeros for empty masks."""
    n, h, w = masks.shape
    rows = masks.any(2)  # N x H
    cols = masks.any(1)  # N x W
    ys = torch.arange(h, device=masks.device)
    xs = torch.arange(w, device=masks.device)
    # Masked min/max without boolean indexing, so nothing waits for the device.
    y0 = torch.where(rows, ys, h).amin(1)
    y1 = torch.where(rows, ys, -1).amax(1)
    x0 = torch.where(cols, xs, w).amin(1)
    x1 = torch.where(cols, xs, -1).amax(1)
    boxes = torch.stack([x0, y0, x1, y1], dim=1).float()
    return torch.where(rows.any(1)[:, None], boxes, torch.zeros_like(boxes))


class BoxPrompt(PromptType):
    """The box around each mask, each coordinate moved by Gaussian noise of std `noise_std` x the box side.

    Args:
        noise_std: noise std as a fraction of the box width (x) or height (y); 0 gives the exact box (evaluation).
        max_noise: cap on that std, in input pixels (paper: 20); the offsets themselves are not clipped.
    """

    name = "box"

    def __init__(self, *, noise_std: float = 0.1, max_noise: float = 20.0) -> None:
        if noise_std < 0 or max_noise < 0:
            raise ValueError("BoxPrompt: noise_std and max_noise must be >= 0")
        self.noise_std = noise_std
        self.max_noise = max_noise

    def sample(
        self,
        gt_masks: Tensor,
        *,
        context: PromptContext | None = None,
        generator: torch.Generator | None = None,
    ) -> Prompts:
        """N x 4 noisy boxes, clamped to the image (its unpadded size when `context.input_sizes` is given)."""
        boxes = boxes_from_masks(gt_masks)  # N x 4
        n, size = gt_masks.shape[0], gt_masks.shape[-1]
        if self.noise_std > 0:
            sides = (boxes[:, 2:] - boxes[:, :2] + 1).repeat(1, 2)  # N x 4: w, h, w, h
            # The paper caps the std, not the noise: clamping the offsets instead would pile most corners
            # of a large box exactly at +-max_noise.
            std = (self.noise_std * sides).clamp(max=self.max_noise)  # N x 4
            boxes = boxes + torch.randn(boxes.shape, generator=generator, device=boxes.device) * std
        limit = torch.full((n, 2), float(size - 1), device=boxes.device)  # N x 2: x max, y max
        if context is not None and context.input_sizes is not None and context.image_index is not None:
            hw = context.input_sizes.to(boxes.device)[context.image_index]  # N x 2 (H, W)
            limit = (hw.flip(1) - 1).float()
        limit = limit.repeat(1, 2)  # N x 4
        boxes = torch.minimum(boxes.clamp(min=0), limit)
        # Noise may swap corners on thin masks; keep xyxy ordered.
        x0, x1 = torch.minimum(boxes[:, 0], boxes[:, 2]), torch.maximum(boxes[:, 0], boxes[:, 2])
        y0, y1 = torch.minimum(boxes[:, 1], boxes[:, 3]), torch.maximum(boxes[:, 1], boxes[:, 3])
        return Prompts(boxes=torch.stack([x0, y0, x1, y1], dim=1))
