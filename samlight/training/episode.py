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
    schedule: list[bool] | None = None,
    schedule_generator: torch.Generator | None = None,
    round_fn=None,
) -> Episode:
    """Run the initial round and the corrective rounds.

    Clicks are computed in the frame of `click_gt`: training passes the ground truth at the low-res logit size
    (S/4, 16x fewer pixels per round; a click then lands within 2 input pixels of a full-resolution one),
    evaluation the full S x S ground truth as in the paper's protocol.

    Every round has the same structure whatever the prompts: one decoder call over all N masks (merged prompts
    choose one or three outputs per mask, see `Prompts.ambiguous`), then a sync-free click. With a fixed
    `schedule` the episode is one static graph (`torch.compile(run_episode, fullgraph=True)` traces it with
    no break); training compiles `episode_round` instead (`round_fn`), whose graphs do not depend on where the
    random mask-only round falls.

    Args:
        model: `Sam` (anything with `decode(image_embeddings, image_index, prompts, multimask_output)`).
        image_embeddings: B x C x h x w.
        image_index: N long.
        prompts: N initial prompts (input pixels).
        click_gt: N x H x W bool, ground truth in the click frame; H must divide S.
        clicks: corrective-click simulation; None runs round 0 only.
        valid_region: N x H x W bool, pixels inside the image (predictions outside do not count).
        detach_feedback: stop gradients through the logits fed back as `mask_inputs` (see docs/training.md).
        checkpoint_rounds: recompute each decoder round in backward instead of storing its activations.
        keep_pred_masks: keep each round's mask (N x H x W bool) in `Episode.pred_masks`.
        generator: random source for click sampling (on the masks' device).
        schedule: click (True) / mask-only (False) flag per round after the first; default
            `clicks.schedule(schedule_generator)`.
        schedule_generator: CPU random source of the mask-only rounds' position (see `CorrectiveClicks.schedule`).
        round_fn: replacement for `episode_round` with the same signature (e.g. its `torch.compile`d form).

    Returns:
        Episode.
    """
    scale = model.image_size / click_gt.shape[-1]
    if schedule is None:
        schedule = clicks.schedule(schedule_generator) if clicks is not None else []
    step = round_fn if round_fn is not None else episode_round
    n, device = click_gt.shape[0], click_gt.device
    rounds: list[RoundOutput] = []
    coords = [torch.zeros(n, 0, 2, device=device)]
    labels = [torch.zeros(n, 0, dtype=torch.long, device=device)]
    ious, preds = [], []
    pred = feedback = None
    initial_prompts = prompts
    for r in range(1 + len(schedule)):
        add_click = r > 0 and schedule[r - 1]
        # The click's random numbers are drawn here, not in the round: a compiled round cannot take a Generator.
        noise = clicks.click_noise(n, generator, device) if add_click else None
        logits, iou_pred, best, pred, iou, prompts, xy, lab = step(
            model,
            image_embeddings,
            image_index,
            prompts,
            feedback,
            click_gt,
            pred,
            clicks if add_click else None,
            valid_region,
            scale,
            checkpoint_rounds,
            noise,
        )
        rounds.append(RoundOutput(low_res_logits=logits, iou_predictions=iou_pred, best=best))
        coords.append(xy)
        labels.append(lab)
        preds.append(pred)
        ious.append(iou)
        feedback = select_output(logits, best)  # N x 1 x S/4 x S/4
        feedback = feedback.detach() if detach_feedback else feedback
    return Episode(
        image_index=image_index,
        gt_masks=click_gt,
        prompts=initial_prompts,
        rounds=rounds,
        click_coords=torch.cat(coords, 1),
        click_labels=torch.cat(labels, 1),
        ious=torch.stack(ious),
        pred_masks=preds if keep_pred_masks else [],
    )


def episode_round(
    model,
    image_embeddings: Tensor,
    image_index: Tensor,
    prompts: Prompts,
    feedback: Tensor | None,
    click_gt: Tensor,
    prev_pred: Tensor | None,
    clicks: CorrectiveClicks | None,
    valid_region: Tensor | None,
    scale: float,
    checkpoint_rounds: bool,
    click_noise: Tensor | None,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Prompts, Tensor, Tensor]:
    """One round: an optional corrective click, one decoder call over all N masks, the mask passed on.

    Args:
        feedback: N x 1 x S/4 x S/4 logits of the previous round (None in round 0: the initial prompts
            decide one or three outputs per mask; later rounds give one).
        prev_pred: N x H x W bool, the previous round's mask (needed when `clicks` is given).
        clicks: add one click from the error region of `prev_pred` (None: no new click).
        click_noise: the click's random numbers (`CorrectiveClicks.click_noise`), drawn by the caller so that
            the round has no Generator in it and `torch.compile(fullgraph=True)` traces it.
        Others as `run_episode`.

    Returns:
        logits N x K x S/4 x S/4, iou_pred N x K, best N, pred N x H x W bool, iou N, the prompts of this
        round (clicks appended, no mask input), click coords N x k x 2 and labels N x k (k = 1 or 0).
    """
    n = click_gt.shape[0]
    xy = torch.zeros(n, 0, 2, device=click_gt.device)
    lab = torch.zeros(n, 0, dtype=torch.long, device=click_gt.device)
    if clicks is not None:
        xy, lab = clicks.next_clicks(
            click_gt, prev_pred, valid=valid_region, uniform=click_noise
        )  # N x 1 x 2, N x 1
        xy = (xy + 0.5) * scale - 0.5  # click-frame pixel centre -> input pixels
        prompts = prompts.with_points(xy, lab)
    if feedback is None:
        round_prompts, multimask = prompts, prompts.ambiguous()
    else:
        round_prompts, multimask = replace(prompts, mask_inputs=feedback), False
    logits, iou_pred = _decode(
        model, image_embeddings, image_index, round_prompts, multimask, checkpoint_rounds
    )
    best = iou_pred.argmax(dim=1)  # N
    pred = binarize(select_output(logits.detach(), best), click_gt.shape[-1])  # N x H x W
    if valid_region is not None:
        pred = pred & valid_region
    return logits, iou_pred, best, pred, mask_iou(pred, click_gt), prompts, xy, lab


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
