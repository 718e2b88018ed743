"""`SamLoss`: the SAM paper's training loss for one interactive round (App. A).

focal (alpha 0.25, gamma 2) x 20 + dice x 1 on the mask logits, + MSE between each output's predicted IoU and its
actual IoU x 1; with several outputs (an ambiguous single-point prompt) only the lowest mask loss counts.

Resolution: the loss is computed at the decoder's low-res logits (S/4, 256 x 256 for a 1024 input) against the
ground truth area-downsampled to that size (soft targets in [0, 1]). Upsampling the logits instead would hold
64 masks x 11 rounds x 3 outputs x 1024^2 float32 activations plus their gradients (~25 GB per image) for no gain
in supervision: the decoder cannot express detail finer than its S/4 output, which is bilinearly upsampled.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@dataclass
class LossOutput:
    """Weighted means over masks (0-d tensors) and the per-mask choice of output.

    Attributes:
        loss: total = focal_weight * focal + dice_weight * dice + iou_weight * iou.
        focal, dice, iou: the unweighted parts, averaged over masks with weight > 0.
        best_output: N long, the output whose mask loss was back-propagated.
    """

    loss: Tensor
    focal: Tensor
    dice: Tensor
    iou: Tensor
    best_output: Tensor


class SamLoss(nn.Module):
    """Focal + dice + IoU-head MSE, min over outputs (see the module docstring for the resolution).

    Args:
        focal_weight, dice_weight, iou_weight: the paper's 20 : 1 : 1.
        alpha, gamma: focal loss parameters (paper: 0.25, 2).
        supervise_all_iou: True trains the IoU head on every output (so it can rank the three masks of an
            ambiguous prompt, which picks the mask passed to the next round); False only on the chosen output.
    """

    def __init__(
        self,
        *,
        focal_weight: float = 20.0,
        dice_weight: float = 1.0,
        iou_weight: float = 1.0,
        alpha: float = 0.25,
        gamma: float = 2.0,
        supervise_all_iou: bool = True,
    ) -> None:
        super().__init__()
        self.focal_weight = focal_weight
        self.dice_weight = dice_weight
        self.iou_weight = iou_weight
        self.alpha = alpha
        self.gamma = gamma
        self.supervise_all_iou = supervise_all_iou

    def forward(
        self, logits: Tensor, iou_predictions: Tensor, targets: Tensor, weights: Tensor
    ) -> LossOutput:
        """Loss of one round.

        Args:
            logits: N x K x h x w mask logits (K = 1 or 3).
            iou_predictions: N x K.
            targets: N x h x w float in [0, 1] (area-downsampled ground truth) or bool.
            weights: N float; 0 drops a mask (padding slot, a mask the prompt type skips).

        Returns:
            LossOutput.
        """
        # float32 whatever the autocast dtype: bf16 sigmoid/log over 65k pixels loses the small per-pixel terms.
        with torch.autocast(device_type=logits.device.type, enabled=False):
            logits, iou_predictions = logits.float(), iou_predictions.float()
            targets = targets.float()[:, None].expand_as(logits)  # N x K x h x w
            focal = sigmoid_focal_loss(logits, targets, alpha=self.alpha, gamma=self.gamma)  # N x K
            dice = dice_loss(logits, targets)  # N x K
            mask_loss = self.focal_weight * focal + self.dice_weight * dice  # N x K
            best = mask_loss.argmin(dim=1)  # N
            iou_target = soft_iou(logits.detach() > 0, targets)  # N x K
            iou_err = (iou_predictions - iou_target) ** 2  # N x K

            def pick(t: Tensor) -> Tensor:
                return t.gather(1, best[:, None]).squeeze(1)

            iou_part = iou_err.mean(dim=1) if self.supervise_all_iou else pick(iou_err)
            parts = torch.stack([pick(focal), pick(dice), iou_part])  # 3 x N
            weights = weights.float()
            # where() rather than a product, so a non-finite value in a dropped slot cannot leak into the sum.
            parts = torch.where(weights > 0, parts * weights, parts.new_zeros(()))
            means = parts.sum(dim=1) / weights.sum().clamp(min=1.0)  # 3
            total = self.focal_weight * means[0] + self.dice_weight * means[1] + self.iou_weight * means[2]
        return LossOutput(loss=total, focal=means[0], dice=means[1], iou=means[2], best_output=best)


def sigmoid_focal_loss(logits: Tensor, targets: Tensor, *, alpha: float = 0.25, gamma: float = 2.0) -> Tensor:
    """Focal loss (Lin et al.) averaged over the pixels: ... x h x w -> ...."""
    prob = logits.sigmoid()
    ce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    p_t = prob * targets + (1 - prob) * (1 - targets)
    alpha_t = alpha * targets + (1 - alpha) * (1 - targets)
    return (alpha_t * ce * (1 - p_t) ** gamma).flatten(-2).mean(-1)


def dice_loss(logits: Tensor, targets: Tensor, *, smooth: float = 1.0) -> Tensor:
    """1 - soft Dice of sigmoid(logits) vs targets: ... x h x w -> ...."""
    prob = logits.sigmoid().flatten(-2)
    targets = targets.flatten(-2)
    inter = (prob * targets).sum(-1)
    return 1 - (2 * inter + smooth) / (prob.sum(-1) + targets.sum(-1) + smooth)


def soft_iou(pred: Tensor, targets: Tensor) -> Tensor:
    """IoU of binary predictions with soft targets: ... x h x w -> ...; 1 when both are empty."""
    pred = pred.float().flatten(-2)
    targets = targets.float().flatten(-2)
    inter = (pred * targets).sum(-1)
    union = (pred + targets - pred * targets).sum(-1)
    return torch.where(union > 0, inter / union.clamp(min=1e-6), torch.ones_like(union))
