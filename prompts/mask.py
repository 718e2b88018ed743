"""`MaskPrompt`: a coarse, noisy version of the ground truth as the dense prompt (logits at S/4)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from samlight.prompts.base import PromptContext, PromptType
from samlight.prompts.types import Prompts


class MaskPrompt(PromptType):
    """The ground truth, coarsened and perturbed, as `mask_inputs` logits at S/4 (the decoder's feedback size).

    Args:
        coarse_factor: extra downsampling before upsampling back to S/4, so the prompt has blocky edges.
        noise_std: std of smooth random noise added to the logits, relative to `logit_scale`.
        logit_scale: magnitude of the logits inside (+) and outside (-) the coarse mask.
    """

    name = "mask"

    def __init__(self, *, coarse_factor: int = 4, noise_std: float = 0.5, logit_scale: float = 8.0) -> None:
        if coarse_factor < 1:
            raise ValueError(f"MaskPrompt: coarse_factor must be >= 1, got {coarse_factor}")
        self.coarse_factor = coarse_factor
        self.noise_std = noise_std
        self.logit_scale = logit_scale

    def sample(
        self,
        gt_masks: Tensor,
        *,
        context: PromptContext | None = None,
        generator: torch.Generator | None = None,
    ) -> Prompts:
        """N x 1 x S/4 x S/4 logits."""
        size = gt_masks.shape[-1] // 4
        coarse_size = max(size // self.coarse_factor, 1)
        masks = gt_masks[:, None].float()  # N x 1 x S x S
        coarse = F.adaptive_avg_pool2d(masks, coarse_size)  # N x 1 x s' x s'
        coarse = F.interpolate(coarse, size=(size, size), mode="nearest")  # N x 1 x S/4 x S/4
        logits = self.logit_scale * (2.0 * coarse - 1.0)
        if self.noise_std > 0:
            # Smooth noise (drawn at 1/8 of the prompt size) moves the edges instead of salting pixels.
            noise = torch.randn(
                (masks.shape[0], 1, max(size // 8, 1), max(size // 8, 1)),
                generator=generator,
                device=gt_masks.device,
            )
            noise = F.interpolate(noise, size=(size, size), mode="bilinear", align_corners=False)
            logits = logits + self.noise_std * self.logit_scale * noise
        return Prompts(mask_inputs=logits)
