"""SamLoss against a direct, per-pixel transcription of the paper's formulas."""

from __future__ import annotations

import math

import pytest
import torch

from samlight.training.loss import SamLoss


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def _reference(logits, iou_pred, target, weights, supervise_all_iou=True):
    """Plain-Python focal x20 + dice + IoU MSE; min mask loss over outputs; weighted mean over masks."""
    totals = {"focal": 0.0, "dice": 0.0, "iou": 0.0}
    weight_sum = 0.0
    for n in range(logits.shape[0]):
        per_output = []
        for k in range(logits.shape[1]):
            focal = dice_num = prob_sum = tgt_sum = inter = union = 0.0
            pixels = logits[n, k].flatten().tolist()
            targets = target[n].flatten().tolist()
            for x, t in zip(pixels, targets):
                p = _sigmoid(x)
                ce = -(t * math.log(p) + (1 - t) * math.log(1 - p))
                p_t = p * t + (1 - p) * (1 - t)
                alpha_t = 0.25 * t + 0.75 * (1 - t)
                focal += alpha_t * ce * (1 - p_t) ** 2
                dice_num += p * t
                prob_sum += p
                tgt_sum += t
                hard = 1.0 if x > 0 else 0.0
                inter += hard * t
                union += hard + t - hard * t
            focal /= len(pixels)
            dice = 1 - (2 * dice_num + 1) / (prob_sum + tgt_sum + 1)
            actual_iou = inter / union if union > 0 else 1.0
            iou_err = (float(iou_pred[n, k]) - actual_iou) ** 2
            per_output.append((20 * focal + dice, focal, dice, iou_err))
        best = min(range(len(per_output)), key=lambda k: per_output[k][0])
        iou_term = (
            sum(o[3] for o in per_output) / len(per_output) if supervise_all_iou else per_output[best][3]
        )
        w = float(weights[n])
        totals["focal"] += w * per_output[best][1]
        totals["dice"] += w * per_output[best][2]
        totals["iou"] += w * iou_term
        weight_sum += w
    means = {k: v / max(weight_sum, 1.0) for k, v in totals.items()}
    means["loss"] = 20 * means["focal"] + means["dice"] + means["iou"]
    return means


@pytest.mark.parametrize("outputs", [1, 3])
@pytest.mark.parametrize("supervise_all_iou", [True, False])
def test_loss_matches_formulas(outputs, supervise_all_iou):
    g = torch.Generator().manual_seed(outputs)
    logits = 3 * torch.randn(4, outputs, 6, 6, generator=g, dtype=torch.float64)
    iou_pred = torch.rand(4, outputs, generator=g, dtype=torch.float64)
    target = (torch.rand(4, 6, 6, generator=g) > 0.6).double()
    target[1] = torch.rand(6, 6, generator=g).double()  # soft (area-downsampled) targets
    weights = torch.tensor([1.0, 1.0, 0.0, 1.0])
    out = SamLoss(supervise_all_iou=supervise_all_iou)(logits, iou_pred, target, weights)
    ref = _reference(logits, iou_pred, target, weights, supervise_all_iou)
    for name in ("loss", "focal", "dice", "iou"):
        assert float(getattr(out, name)) == pytest.approx(ref[name], rel=1e-4, abs=1e-6), name


def test_min_over_outputs_backpropagates_only_the_best():
    target = torch.zeros(1, 8, 8)
    target[0, :4] = 1
    good = torch.where(target[0] > 0, 6.0, -6.0)
    logits = torch.stack([torch.zeros(8, 8), good, -good])[None].requires_grad_(True)  # 1 x 3 x 8 x 8
    out = SamLoss(iou_weight=0.0)(logits, torch.zeros(1, 3), target, torch.ones(1))
    assert out.best_output.tolist() == [1]
    out.loss.backward()
    grad_norms = logits.grad.flatten(2).norm(dim=2)[0]
    assert grad_norms[1] > 0 and grad_norms[0] == 0 and grad_norms[2] == 0


def test_float32_under_bf16_autocast_and_no_valid_mask():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 1, 16, 16, generator=g)
    iou = torch.rand(3, 1, generator=g)
    target = torch.rand(3, 16, 16, generator=g) > 0.5
    full = SamLoss()(logits, iou, target, torch.ones(3))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = SamLoss()(logits.bfloat16(), iou.bfloat16(), target, torch.ones(3))
    assert mixed.loss.dtype == torch.float32
    assert float(mixed.loss) == pytest.approx(float(full.loss), rel=2e-2)
    empty = SamLoss()(logits, iou, target, torch.zeros(3))
    assert float(empty.loss) == 0.0
    # A non-finite value in a dropped slot must not leak into the loss.
    logits[0] = float("nan")
    masked = SamLoss()(logits, iou, target, torch.tensor([0.0, 1.0, 1.0]))
    assert torch.isfinite(masked.loss)
