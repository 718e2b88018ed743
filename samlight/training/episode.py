"""The interactive episode shared by training, validation and the mask panels.

One episode: the initial prompt (round 0), then rounds that each add a corrective click from the error region of
the previous prediction (or only feed the mask back), the previous best low-res logits always going back in as
the dense prompt. Everything is vectorised over the N prompted masks of a batch; nothing waits for the device.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from samlight.prompts.clicks import CorrectiveClicks
from samlight.prompts.types import Prompts
from samlight.training.metrics import mask_iou


@dataclass
class RoundOutput:
    """Decoder output of one round.

    Attributes:
        low_res_logits: N x K x S/4 x S/4 (K = 3 for an ambiguous prompt, else 1).
        iou_predictions: N x K.
        best: N long, the output passed on (highest predicted IoU).
    """

    low_res_logits: Tensor
    iou_predictions: Tensor
    best: Tensor


@dataclass
class Episode:
    """One simulated interactive session over N masks: what the user did, what the model answered.

    The one record of an episode, read by the loss (rounds), the metrics (ious) and the mask panels
    (prompts, clicks, pred_masks).

    Attributes:
        image_index: N long, image of the batch each prompted mask belongs to.
        gt_masks: N x H x W bool, the ground truth in the click frame.
        prompts: the initial (round 0) prompts, input-pixel coordinates.
        rounds: one `RoundOutput` per round (1 + clicks + mask-only rounds).
        click_coords: N x R x 2 float, corrective clicks in order, input pixels (R may be 0).
        click_labels: N x R long.
        ious: rounds x N float, IoU of the mask passed on vs the ground truth in the click frame.
        pred_masks: per round N x H x W bool in the click frame (only when `keep_pred_masks`).
        prompt_name: short name of the prompt type of round 0 (set by the caller; "" if unknown).
    """

    image_index: Tensor
    gt_masks: Tensor
    prompts: Prompts
    rounds: list[RoundOutput]
    click_coords: Tensor
    click_labels: Tensor
    ious: Tensor
    pred_masks: list[Tensor]
    prompt_name: str = ""


def run_episode(
    model,
    image_embeddings: Tensor,
    image_index: Tensor,
    prompts: Prompts,
    click_gt: Tensor,
    clicks: CorrectiveClicks | None,
    *,
    valid_region: Tensor | None = None,
    detach_feedback: bool = True,
    checkpoint_rounds: bool = False,
    keep_pred_masks: bool = False,
    generator: torch.Generator | None = None,
    schedule_generator: torch.Generator | None = None,
) -> Episode:
    """Run the initial round and the corrective rounds.

    Clicks are computed in the frame of `click_gt`: training passes the ground truth at the low-res logit size
    (S/4, 16x fewer pixels per round; a click then lands within 2 input pixels of a full-resolution one),
    evaluation the full S x S ground truth as in the paper's protocol.

    Args:
        model: `Sam` (anything with `decode(image_embeddings, image_index, prompts, multimask_output)`).
        image_embeddings: B x C x h x w.
        image_index: N long.
        prompts: N initial prompts (input pixels).
        click_gt: N x H x W bool, ground truth in the click frame; H must divide S.
        clicks: corrective-click simulation; None runs round 0 only.
        valid_region: N x H x W bool, pixels inside the image: predictions outside do not count and clicks
            never land there.
        detach_feedback: stop gradients through the logits fed back as `mask_inputs` (see docs/training.md).
        checkpoint_rounds: recompute each decoder round in backward instead of storing its activations.
        keep_pred_masks: keep each round's mask (N x H x W bool) in `Episode.pred_masks`.
        generator: random source for click sampling (on the masks' device).
        schedule_generator: CPU random source of the mask-only rounds' position (see `CorrectiveClicks.schedule`).

    Returns:
        Episode.
    """
    size = click_gt.shape[-1]
    scale = model.image_size / size
    schedule = clicks.schedule(schedule_generator) if clicks is not None else []
    rounds: list[RoundOutput] = []
    coords, labels, ious, preds = [], [], [], []
    initial_prompts = prompts
    round_prompts, multimask = prompts, prompts.is_ambiguous()
    for r in range(1 + len(schedule)):
        if r > 0:
            if schedule[r - 1]:
                xy, lab = clicks.next_clicks(click_gt, preds[-1], generator, valid_region)  # N x 1 x 2, N x 1
                xy = (xy + 0.5) * scale - 0.5  # click-frame pixel centre -> input pixels
                coords.append(xy)
                labels.append(lab)
                prompts = prompts.with_points(xy, lab)
            feedback = select_output(rounds[-1].low_res_logits, rounds[-1].best)
            round_prompts = replace(prompts, mask_inputs=feedback.detach() if detach_feedback else feedback)
            multimask = False
        logits, iou_pred = _decode(
            model, image_embeddings, image_index, round_prompts, multimask, checkpoint_rounds
        )
        best = iou_pred.argmax(dim=1)  # N
        rounds.append(RoundOutput(low_res_logits=logits, iou_predictions=iou_pred, best=best))
        chosen = select_output(logits.detach(), best)  # N x 1 x s x s
        pred = binarize(chosen, size)  # N x H x W
        if valid_region is not None:
            pred = pred & valid_region
        preds.append(pred)
        ious.append(mask_iou(pred, click_gt))
    n = click_gt.shape[0]
    device = click_gt.device
    return Episode(
        image_index=image_index,
        gt_masks=click_gt,
        prompts=initial_prompts,
        rounds=rounds,
        click_coords=torch.cat(coords, 1) if coords else torch.zeros(n, 0, 2, device=device),
        click_labels=torch.cat(labels, 1) if labels else torch.zeros(n, 0, dtype=torch.long, device=device),
        ious=torch.stack(ious),
        pred_masks=preds if keep_pred_masks else [],
    )


def binarize(logits: Tensor, size: int) -> Tensor:
    """N x 1 x s x s logits -> N x size x size bool (bilinear upsampling when size > s, as SamPredictor)."""
    if logits.shape[-1] != size:
        logits = F.interpolate(logits.float(), size=(size, size), mode="bilinear", align_corners=False)
    return logits[:, 0] > 0.0


def select_output(outputs: Tensor, best: Tensor) -> Tensor:
    """The chosen output of each mask: N x K x h x w maps, N long indices -> N x 1 x h x w."""
    return outputs.gather(1, best[:, None, None, None].expand(-1, 1, *outputs.shape[-2:]))


def _decode(model, image_embeddings, image_index, prompts, multimask, use_checkpoint):
    if use_checkpoint and torch.is_grad_enabled():
        return checkpoint(
            model.decode, image_embeddings, image_index, prompts, multimask, use_reentrant=False
        )
    return model.decode(image_embeddings, image_index, prompts, multimask)
