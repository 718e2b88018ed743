"""`SamModule`: the LightningModule that trains SAM interactively, as in the paper (App. A).

One training loop for pre-training and fine-tuning; behaviour varies by the objects passed in (prompt types,
corrective clicks, loss) and by the optimiser settings.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from lightning.pytorch import LightningModule
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor

from samlight.datamodules.batch import SegmentationBatch
from samlight.prompts.base import PromptContext, PromptType, as_prompt_type, check_prompts
from samlight.prompts.box import BoxPrompt
from samlight.prompts.clicks import CorrectiveClicks
from samlight.prompts.point import PointPrompt
from samlight.prompts.types import Prompts, merge_prompts
from samlight.training.episode import Episode, episode_round, run_episode, select_output
from samlight.training.loss import SamLoss
from samlight.training.metrics import MeanAccumulator, mask_dice, mask_iou
from samlight.training.optim import AdamWRecipe, apply_lora, merged_copy
from samlight.training.optim import freeze as freeze_parts

CLICK_COUNTS = (1, 2, 3, 5, 9)

# Set while a module is built to be restored from a checkpoint (resume, load_from_checkpoint): its weights come
# from there, so `model.checkpoint` (the start weights) is not read; see `SamModule.setup`.
_DEFER_START_WEIGHTS: ContextVar[bool] = ContextVar("samlight_defer_start_weights", default=False)


@contextmanager
def initial_weights_deferred() -> Iterator[None]:
    """Build `SamModule`s without reading `model.checkpoint`: they are about to be restored from a checkpoint."""
    token = _DEFER_START_WEIGHTS.set(True)
    try:
        yield
    finally:
        _DEFER_START_WEIGHTS.reset(token)


class SamModule(LightningModule):
    """Trains a `Sam` with simulated interactive sessions.

    Args:
        variant: model variant for `samlight.build_sam` ("tiny", "vit_b", "vit_l", "vit_h").
        checkpoint: weights to start from (official .pth, Lightning .ckpt, safetensors); None = random init.
        encoder_checkpoint: image-encoder-only start, as SAM pre-training (MAE ViT, timm ViT state dict or an
            `image_encoder.*` subset; position embeddings resized, relative position tables zero); the rest
            random. Exclusive with `checkpoint`.
        model_overrides: extra `build_sam` overrides, e.g. {"drop_path_rate": 0.4, "grad_checkpointing": true}.
        prompts: prompt types of the first round in training (class_path objects or short names such as
            "point"); default: point and box, as in the paper.
        prompt_weights: mixture weights of `prompts` (each mask draws its type); default: equal.
        clicks: corrective clicks in training; default 8 uniform clicks + 2 mask-only rounds (11 rounds).
        val_prompts: prompt types evaluated in validation, each logged as val/<name>/...; the first one also
            gives the unprefixed val/miou@k, val/dice and per-label metrics. Default: center point, exact box.
        val_clicks: corrective clicks in validation; default 8 "center" clicks, no mask-only rounds (mIoU@1..9).
        loss: the loss; default `SamLoss()` (focal x20 + dice + IoU MSE).
        optimizer: optimiser and schedule; default `AdamWRecipe()` (the paper's AdamW, warmup, step decay).
        freeze: parts kept fixed, any of "image_encoder", "prompt_encoder", "mask_decoder".
        lora: {"r": 8, "alpha": 16, "dropout": 0.0}: LoRA (peft) on the encoder attention qkv/proj.
        detach_feedback: stop gradients through the logits fed back into the next round (default, as the paper
            feeds predictions back as prompts; gradients through 11 rounds cost memory and destabilise training).
        checkpoint_rounds: activation checkpointing per decoder round (recompute in backward).
        compile: `torch.compile(fullgraph=True)` the training step's round (click, decoder, best mask) and
            loss; the step has static shapes, so the graphs are built in the first steps and then reused.
        val_seed: seed of the validation prompts (the same prompts every validation).
    """

    def __init__(
        self,
        *,
        variant: str = "tiny",
        checkpoint: str | None = None,
        encoder_checkpoint: str | None = None,
        model_overrides: dict[str, Any] | None = None,
        prompts: list[PromptType | str] | None = None,
        prompt_weights: list[float] | None = None,
        clicks: CorrectiveClicks | None = None,
        val_prompts: list[PromptType | str] | None = None,
        val_clicks: CorrectiveClicks | None = None,
        loss: SamLoss | None = None,
        optimizer: AdamWRecipe | None = None,
        freeze: list[str] | None = None,
        lora: dict[str, float] | None = None,
        detach_feedback: bool = True,
        checkpoint_rounds: bool = False,
        compile: bool = False,
        val_seed: int = 0,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(
            ignore=["prompts", "clicks", "val_prompts", "val_clicks", "loss", "optimizer"], logger=False
        )
        self.prompt_types = [as_prompt_type(p) for p in (prompts or [PointPrompt(), BoxPrompt()])]
        weights = prompt_weights or [1.0] * len(self.prompt_types)
        if len(weights) != len(self.prompt_types) or any(w < 0 for w in weights) or sum(weights) <= 0:
            raise ValueError(
                f"prompt_weights {weights} must be {len(self.prompt_types)} non-negative numbers (one per "
                f"prompt type {[p.name for p in self.prompt_types]}) with a positive sum"
            )
        self.prompt_weights = torch.tensor(weights, dtype=torch.float)
        self.clicks = clicks if clicks is not None else CorrectiveClicks()
        val_types = [
            as_prompt_type(p) for p in (val_prompts or [PointPrompt(mode="center"), BoxPrompt(noise_std=0.0)])
        ]
        self.val_prompts = _unique_names(val_types)
        self.val_clicks = (
            val_clicks if val_clicks is not None else CorrectiveClicks(mask_only_rounds=0, mode="center")
        )
        self.loss_fn = loss if loss is not None else SamLoss()
        self._compiled_loss = torch.compile(self.loss_fn.forward, fullgraph=True) if compile else None
        self._round_fn = torch.compile(episode_round, fullgraph=True) if compile else None
        self.detach_feedback = detach_feedback
        self.checkpoint_rounds = checkpoint_rounds
        self.optimizer_recipe = optimizer if optimizer is not None else AdamWRecipe()
        if checkpoint is not None and encoder_checkpoint is not None:
            raise ValueError(
                "SamModule: give either model.checkpoint (a whole SAM) or model.encoder_checkpoint (the image "
                "encoder only, e.g. MAE weights), not both"
            )
        # The start weights are read now, unless the module is about to be restored from a checkpoint (which is
        # then self-sufficient: the .pth may have moved, and ViT-H would re-read 2.5 GB only to overwrite them).
        start = (checkpoint, encoder_checkpoint)
        defer = _DEFER_START_WEIGHTS.get() and start != (None, None)
        self._pending_start_weights = start if defer else None
        self.model = self._make_model(*((None, None) if defer else start))
        self._val_metrics = MeanAccumulator()
        self._skipped_nonfinite: Tensor | None = None
        self._rng: RankRandomness | None = None  # this rank's training-step generators (seed_rank_randomness)
        self._initial_seed: int | None = None  # torch's seed before this module first reseeded it
        self.miou_history: list[tuple[int, float]] = []
        self._scale_checked = False  # on_train_batch_start: first batch checked against the model

    def _make_model(self, checkpoint: str | None, encoder_checkpoint: str | None):
        """The `Sam` of this module's hyperparameters: built, start weights loaded, parts frozen, LoRA applied."""
        hp = self.hparams
        model = self._build_model(hp.variant, checkpoint, encoder_checkpoint, hp.model_overrides or {})
        freeze_parts(model, hp.freeze or [])
        if hp.lora:
            apply_lora(model, **hp.lora)
        return model

    def load_start_weights(self) -> None:
        """Load deferred start weights (`model.checkpoint` / `model.encoder_checkpoint`) now: the run restores
        nothing after all (e.g. a first run with `--ckpt_path last`). Call before training starts; a no-op when
        nothing is pending."""
        if self._pending_start_weights is not None:
            self.model = self._make_model(*self._pending_start_weights)
            self._pending_start_weights = None

    @classmethod
    def load_from_checkpoint(cls, *args: Any, **kwargs: Any) -> SamModule:
        """Lightning's `load_from_checkpoint`, without reading the start weights (`model.checkpoint`) first."""
        with initial_weights_deferred():
            return super().load_from_checkpoint(*args, **kwargs)

    def _build_model(
        self, variant: str, checkpoint: str | None, encoder_checkpoint: str | None, overrides: dict[str, Any]
    ):
        from samlight.modeling.build import build_sam

        text_dims = {p.text_embed_dim for p in [*self.prompt_types, *self.val_prompts.values()]} - {None}
        if len(text_dims) > 1:
            raise ValueError(f"text prompt types disagree on the CLIP embedding width: {sorted(text_dims)}")
        if text_dims and "text_embed_dim" not in overrides:
            overrides = {**overrides, "text_embed_dim": text_dims.pop()}
        return build_sam(variant, checkpoint=checkpoint, encoder_checkpoint=encoder_checkpoint, **overrides)

    # ----------------------------------------------------------------------------------------------- setup

    def configure_model(self) -> None:
        """Shard with FSDP2 when a model-parallel strategy provides a device mesh (options: the strategy's)."""
        if self.device_mesh is not None and not getattr(self, "_fsdp_applied", False):
            from samlight.scale.fsdp import apply_fsdp

            apply_fsdp(self.model, self.device_mesh, **getattr(self.trainer.strategy, "fsdp_options", {}))
            self._fsdp_applied = True

    def configure_optimizers(self) -> dict:
        trainer = self._trainer  # None when called outside a Trainer (tests)
        total = trainer.max_steps if trainer is not None and trainer.max_steps > 0 else None
        return self.optimizer_recipe.configure(self.model, total_steps=total)

    def merged_model(self):
        """A copy of the `Sam` with LoRA merged in (official parameter names), e.g. for `save_official`."""
        return merged_copy(self.model)

    # -------------------------------------------------------------------------------------------- training

    def on_train_batch_start(self, batch: SegmentationBatch, batch_idx: int) -> None:
        """Check the first training batch against the model: input size, and object size in encoder patches."""
        if self._scale_checked:
            return
        self._scale_checked = True
        size = batch.images.shape[-1]
        if size != self.model.image_size:
            raise ValueError(
                f"the training images are {size} px (data.image_size) but the model's input is "
                f"{self.model.image_size} px; set both to the same value (model.model_overrides: "
                f"{{image_size: {size}}} for a variant whose default differs)"
            )
        patch = self.model.image_size // self.model.prompt_encoder.image_embedding_size[0]
        extent = object_extent_patches(batch, patch)  # one host sync, once per fit
        if extent.numel():
            median = float(extent.median())
            if median < MIN_OBJECT_PATCHES:
                rank_zero_warn(
                    f"the median training object spans {median:.1f} encoder patches ({patch} px each at "
                    f"image_size {self.model.image_size}; {extent.numel()} masks of the first batch). SAM's "
                    f"decoder draws a mask from the patch embeddings; below ~{MIN_OBJECT_PATCHES:g} patches a "
                    "model from random init learns to predict nothing. "
                    "Raise the input size (data.image_size and the model's image_size, e.g. 512 for the "
                    "tiny variant, or a ViT config at 1024), see docs/training.md#why-small-objects-learned-nothing"
                )

    def training_step(self, batch: SegmentationBatch, batch_idx: int) -> Tensor:
        """One interactive episode over every mask slot of the batch: the same shapes every step, no host sync.

        All masks share one decoder call per round whatever their first prompt (merged token layout, see
        `samlight.prompts.types.merge_prompts`); padding slots stay in with weight 0 so N = B*M is fixed.
        """
        embeddings = self.model.encode_images(batch.images)  # B x C x h x w
        # Loss and clicks at the low-res logit size; see samlight/training/loss.py for why.
        targets, image_index, weights, text = _flatten_slots(batch)  # N x S/4 x S/4 soft, N, N, N x D | None
        click_gt = targets >= 0.5  # N x S/4 x S/4
        # Click-frame pixels wholly inside the image (floor), so that a click's centre, mapped back to input
        # pixels, never lands in the padding.
        region = _inside_image(
            torch.div(batch.input_sizes, 4, rounding_mode="floor"), image_index, click_gt.shape[-1]
        )
        context = PromptContext(
            images=batch.images, image_index=image_index, input_sizes=batch.input_sizes, text_embeddings=text
        )
        gt = _prompt_frame_masks(batch, click_gt, self.model.image_size)  # N x S x S bool
        rng = self.rank_randomness()
        prompts, type_weights = self._initial_prompts(gt, context, rng)
        episode = run_episode(
            self.model,
            embeddings,
            image_index,
            prompts,
            click_gt,
            self.clicks,
            valid_region=region,
            detach_feedback=self.detach_feedback,
            checkpoint_rounds=self.checkpoint_rounds,
            generator=rng.device,
            schedule_generator=rng.cpu,
            round_fn=self._round_fn,
        )
        means = self._episode_loss(episode, targets, weights * type_weights)  # 4
        batch_size = batch.images.shape[0]
        for name, value in zip(("loss", "loss_focal", "loss_dice", "loss_iou"), means):
            # Not prog_bar: the bar would turn the tensor into a number every step, a host sync on GPU;
            # SamlightProgressBar reads train/loss only at log_every_n_steps.
            self.log(f"train/{name}", value.detach(), batch_size=batch_size)
        return means[0]

    def _draw_prompt_types(self, n: int, rng: RankRandomness) -> Tensor:
        """N long: the prompt type of each mask, drawn by the mixture weights on the device (no host sync)."""
        cdf = (self.prompt_weights.cumsum(0) / self.prompt_weights.sum()).to(rng.device.device)  # K
        draw = torch.rand(n, device=rng.device.device, generator=rng.device)
        return torch.searchsorted(cdf, draw, right=True).clamp(max=len(self.prompt_types) - 1)

    def _initial_prompts(self, gt: Tensor, context: PromptContext, rng: RankRandomness) -> tuple[Prompts, Tensor]:
        """Round-0 prompts of N masks, each mask's type drawn by the mixture weights, and the N loss weights.

        Every configured type samples all N masks (static shapes) and `merge_prompts` keeps each mask's own;
        the draw is an inverse-CDF lookup on the device (no count leaves it).
        """
        candidates = [self._sample(p, gt, context, generator=rng.device) for p in self.prompt_types]
        type_weights = torch.stack([p.mask_weights(gt, context=context) for p in self.prompt_types])  # K x N
        if len(candidates) == 1:
            return candidates[0], type_weights[0]
        choice = self._draw_prompt_types(gt.shape[0], rng)  # N
        return merge_prompts(candidates, choice), type_weights.gather(0, choice[None])[0]

    # ------------------------------------------------------------------------------------------ randomness

    def on_fit_start(self) -> None:
        self.seed_rank_randomness()

    def seed_rank_randomness(self) -> None:
        """Give this rank its own random streams, derived from the run seed, the rank and the current step.

        `seed_everything` seeds every rank alike; at one image per GPU every GPU would then draw the same prompt
        types, clicks, mask-only rounds and drop-path pattern. Here each rank reseeds torch's global RNG (timm's
        drop path draws from it) and makes the generators of the training step's prompts and clicks
        (`rank_randomness`). The same seed gives the same streams again; a resumed run continues with streams
        of its own (the step is part of the seed), never a replay of the first steps' draws.
        """
        seed = stream_seed(self._run_seed(), self.global_rank, self.global_step)
        torch.manual_seed(seed)
        self._rng = RankRandomness.from_seed(seed, self.device)

    def rank_randomness(self) -> RankRandomness:
        """This rank's generators (made from the run seed on first use when no Trainer called `on_fit_start`)."""
        rng = self._rng
        if rng is None or rng.device.device != self.device:
            seed = stream_seed(self._run_seed(), self.global_rank, self.global_step)
            self._rng = rng = RankRandomness.from_seed(seed, self.device)
        return rng

    def _run_seed(self) -> int:
        """`run_seed()`, with torch's initial seed taken once: reseeding the global RNG here changes what
        `torch.initial_seed()` reports, which must not change the streams of a run without `seed_everything`."""
        if os.environ.get("PL_GLOBAL_SEED") is None and self._initial_seed is None:
            self._initial_seed = torch.initial_seed()
        return run_seed() if self._initial_seed is None else self._initial_seed

    def _sample(self, ptype: PromptType, gt: Tensor, context: PromptContext, generator) -> Any:
        prompts = ptype.sample(gt, context=context, generator=generator)
        return check_prompts(
            prompts, num_masks=gt.shape[0], image_size=self.model.image_size, source=repr(ptype)
        ).to(gt.device)

    def _episode_loss(self, episode: Episode, targets: Tensor, weights: Tensor) -> Tensor:
        """Mean over rounds of (loss, focal, dice, iou) -> 4."""
        loss_fn = self._compiled_loss or self.loss_fn
        parts = []
        for out in episode.rounds:
            result = loss_fn(out.low_res_logits, out.iou_predictions, targets, weights)
            parts.append(torch.stack([result.loss, result.focal, result.dice, result.iou]))
        return torch.stack(parts).mean(0)

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        """Skip a non-finite step entirely, on the device (no host sync), and count it.

        The fused AdamW that `AdamWRecipe` builds reads `optimizer.found_inf` (the flag `torch.amp.GradScaler`
        uses): when it is 1 the kernel leaves weights, both moments and the step count untouched, so weight
        decay and moment decay do not move either. Another optimizer gets zeroed gradients instead (a warning
        says its moments still decay). The flag is reduced across ranks so every replica skips together.
        """
        grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        if not grads:
            return
        local = [g.to_local() if hasattr(g, "to_local") else g for g in grads]
        norms = torch._foreach_norm(local)
        finite = torch.isfinite(torch.stack([n.float() for n in norms]).sum())
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            flag = finite.float()
            dist.all_reduce(flag, op=dist.ReduceOp.MIN)
            finite = flag > 0
        if optimizer.defaults.get("fused"):
            optimizer.found_inf = (~finite).float()
        else:
            if not getattr(self, "_warned_unfused", False):
                rank_zero_warn(
                    f"{type(optimizer).__name__} is not a fused AdamW: a non-finite step zeroes the gradients, "
                    "but weight decay and moment decay still apply (AdamWRecipe's optimizer skips exactly)"
                )
                self._warned_unfused = True
            for g in local:
                g.copy_(torch.where(finite, g, torch.zeros((), dtype=g.dtype, device=g.device)))
        count = self._skipped_nonfinite
        count = torch.zeros((), device=finite.device) if count is None else count.to(finite.device)
        self._skipped_nonfinite = count + (~finite).float()
        self.log("train/skipped_nonfinite", self._skipped_nonfinite, reduce_fx="max")

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Keep the count of skipped non-finite steps with the run (read back by `on_load_checkpoint`)."""
        count = self._skipped_nonfinite
        checkpoint["samlight_skipped_nonfinite"] = 0 if count is None else int(count)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self._pending_start_weights = None  # every weight comes from the checkpoint
        if "samlight_skipped_nonfinite" in checkpoint:
            self._skipped_nonfinite = torch.tensor(float(checkpoint["samlight_skipped_nonfinite"]))

    # ------------------------------------------------------------------------------------------ validation

    def validation_step(self, batch: SegmentationBatch, batch_idx: int) -> None:
        embeddings = self.model.encode_images(batch.images)
        gt, image_index, slots = _valid_slots(batch)
        if gt.shape[0] == 0:
            return
        region = _inside_image(batch.input_sizes, image_index, gt.shape[-1])  # N x S x S
        for i, (name, ptype) in enumerate(self.val_prompts.items()):
            generator = torch.Generator(device=gt.device).manual_seed(self.hparams.val_seed + batch_idx)
            episode, weights, _ = self._evaluate(
                batch, embeddings, ptype, self.val_clicks, gt, image_index, slots, region, generator
            )
            metrics = self._episode_metrics(episode, gt, region)
            prefixes = [f"val/{name}/"] + (["val/"] if i == 0 else [])
            for prefix in prefixes:
                for key, values in metrics.items():
                    self._val_metrics.update(prefix + key, values, weights)
            if name == "box":
                self._val_metrics.update("val/box/miou", episode.ious[0], weights)
            if i == 0:
                self._per_label_metrics(batch, slots, metrics, weights)

    def _evaluate(
        self, batch, embeddings, ptype, clicks, gt, image_index, slots, region, generator, keep=False
    ):
        context = PromptContext(
            images=batch.images,
            image_index=image_index,
            input_sizes=batch.input_sizes,
            text_embeddings=None
            if batch.text_embeddings is None
            else batch.text_embeddings.flatten(0, 1)[slots],
        )
        prompts = self._sample(ptype, gt, context, generator)
        weights = ptype.mask_weights(gt, context=context)
        episode = run_episode(
            self.model,
            embeddings,
            image_index,
            prompts,
            gt,
            clicks,
            valid_region=region,
            keep_pred_masks=keep,
            generator=generator,
        )
        return episode, weights, prompts

    def _episode_metrics(self, episode: Episode, gt: Tensor, region: Tensor) -> dict[str, Tensor]:
        """Per-mask values: miou@k, oracle@1 (best of the first round's outputs), IoU-head error, Dice."""
        metrics = {f"miou@{k}": episode.ious[k - 1] for k in CLICK_COUNTS if k <= episode.ious.shape[0]}
        first = episode.rounds[0]
        outputs = F.interpolate(first.low_res_logits.float(), size=gt.shape[-2:], mode="bilinear")
        all_ious = mask_iou((outputs > 0) & region[:, None], gt[:, None])  # N x K
        metrics["oracle@1"] = all_ious.amax(1)
        chosen_pred = first.iou_predictions.gather(1, first.best[:, None]).squeeze(1).float()
        metrics["iou_calibration_error"] = (chosen_pred - episode.ious[0]).abs()
        best_mask = (select_output(outputs, first.best) > 0)[:, 0] & region
        metrics["dice"] = mask_dice(best_mask, gt)
        metrics["iou"] = episode.ious[0]
        return metrics

    def _per_label_metrics(self, batch, slots: Tensor, metrics: dict[str, Tensor], weights: Tensor) -> None:
        """val/dice/label_<id> and val/iou/label_<id> from `meta[i]["mask_labels"]` (aligned with mask slots)."""
        num_slots = batch.masks.shape[1]
        labels = []
        for slot in slots.tolist():
            meta = batch.meta[slot // num_slots] if slot // num_slots < len(batch.meta) else {}
            ids = meta.get("mask_labels") if isinstance(meta, dict) else None
            labels.append(ids[slot % num_slots] if ids is not None and slot % num_slots < len(ids) else None)
        for label in sorted({x for x in labels if x is not None}, key=str):
            sel = torch.tensor([x == label for x in labels], device=weights.device)
            w = weights * sel.float()
            self._val_metrics.update(f"val/dice/label_{label}", metrics["dice"], w)
            self._val_metrics.update(f"val/iou/label_{label}", metrics["iou"], w)

    def on_validation_epoch_start(self) -> None:
        self._val_metrics.reset()

    def on_validation_epoch_end(self) -> None:
        results = {k: v for k, v in self._val_metrics.compute(self.device).items() if not k.endswith("/iou")}
        self._val_metrics.reset()
        if not results:
            return
        self.log_dict(results)
        if "val/miou@1" in results:
            value = float(results["val/miou@1"])
            self.miou_history.append((self.global_step, value))
            when = "before training" if self.global_step == 0 else f"step {self.global_step}"
            self.print(f"samlight: 1-click mIoU ({next(iter(self.val_prompts))}) {when}: {value:.3f}")

    def on_fit_end(self) -> None:
        if len(self.miou_history) >= 2:
            (s0, first), (s1, last) = self.miou_history[0], self.miou_history[-1]
            self.print(f"samlight: 1-click mIoU {first:.3f} (step {s0}) -> {last:.3f} (step {s1})")

    # ------------------------------------------------------------------------------------------- interact

    def interact(
        self,
        batch: SegmentationBatch,
        prompt: str = "point",
        num_clicks: int = 8,
        mode: str = "center",
        max_masks_per_image: int | None = None,
        generator: torch.Generator | None = None,
    ) -> Episode:
        """Simulate an interactive session on `batch` (the validation code path), e.g. for mask panels.

        Args:
            batch: a SegmentationBatch on the module's device.
            prompt: short name of a configured prompt type (validation types first, then training types).
            num_clicks: corrective clicks after the initial prompt.
            mode: click placement, "center" (evaluation) or "uniform".
            max_masks_per_image: use at most the first k valid masks of each image.
            generator: random source (prompt noise, uniform clicks).

        Returns:
            Episode with N = the selected masks, its predicted masks kept and `prompt_name` set.
        """
        ptype = self._prompt_by_name(prompt)
        embeddings = self.model.encode_images(batch.images)
        gt, image_index, slots = _valid_slots(batch, max_masks_per_image)
        region = _inside_image(batch.input_sizes, image_index, gt.shape[-1])
        clicks = CorrectiveClicks(num_clicks=num_clicks, mask_only_rounds=0, mode=mode)
        episode, _, _ = self._evaluate(
            batch, embeddings, ptype, clicks, gt, image_index, slots, region, generator, keep=True
        )
        episode.prompt_name = prompt
        return episode

    def _prompt_by_name(self, name: str) -> PromptType:
        if name in self.val_prompts:
            return self.val_prompts[name]
        for ptype in self.prompt_types:
            if ptype.name == name:
                return ptype
        known = sorted(set(self.val_prompts) | {p.name for p in self.prompt_types})
        raise KeyError(f"SamModule.interact: no prompt type named {name!r}; configured: {known}")


@dataclass
class RankRandomness:
    """The random streams of one rank's training steps.

    Attributes:
        cpu: CPU generator (prompt-type counts, mask-only round positions: drawn without waiting for the device).
        device: generator on the module's device (prompt noise and points, the prompt-type assignment, clicks).
    """

    cpu: torch.Generator
    device: torch.Generator

    @classmethod
    def from_seed(cls, seed: int, device: torch.device) -> RankRandomness:
        seeds = np.random.SeedSequence(seed).generate_state(2, dtype=np.uint64)
        cpu = torch.Generator().manual_seed(int(seeds[0]))
        return cls(cpu=cpu, device=torch.Generator(device=device).manual_seed(int(seeds[1])))


def run_seed() -> int:
    """The run's seed: `seed_everything`'s (PL_GLOBAL_SEED), else the seed torch's global RNG started from."""
    seed = os.environ.get("PL_GLOBAL_SEED")
    return int(seed) if seed is not None else torch.initial_seed()


def stream_seed(seed: int, rank: int, step: int) -> int:
    """A 63-bit seed for (run seed, rank, step): numpy's SeedSequence keeps the streams statistically apart."""
    return int(np.random.SeedSequence([seed, rank, step]).generate_state(1, dtype=np.uint64)[0] >> 1)


def _flatten_slots(batch: SegmentationBatch) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
    """All B*M mask slots with static shapes: soft targets N x S/4 x S/4, image_index N, weights N, text N x D.

    Padding slots are kept with weight 0. The targets come from the batch's `mask_targets` when the loader
    sent masks in the loss frame (training), else they are area-pooled from its S x S masks.
    """
    b, m = batch.mask_valid.shape
    targets = batch.soft_targets().flatten(0, 1)  # (B*M) x S/4 x S/4
    image_index = torch.arange(b, device=targets.device).repeat_interleave(m)
    weights = batch.mask_valid.flatten().float()
    text = None if batch.text_embeddings is None else batch.text_embeddings.flatten(0, 1)
    return targets, image_index, weights, text


def _prompt_frame_masks(batch: SegmentationBatch, click_gt: Tensor, size: int) -> Tensor:
    """N x S x S bool masks for the prompt plugins (their contract is the input frame).

    The batch's own masks when it has them; otherwise the S/4 loss-frame masks repeated 4 x 4 on the device,
    which is all a training batch carries (a box or point is then placed within a 4-pixel cell of the exact
    mask's; the loss still sees the exact soft targets).
    """
    if batch.masks is not None:
        return batch.masks.flatten(0, 1)
    factor = size // click_gt.shape[-1]
    return click_gt.repeat_interleave(factor, 1).repeat_interleave(factor, 2)


MIN_OBJECT_PATCHES = 2.0  # measured on nuclei: ~1.1 patches across learn nothing, ~1.6 slowly, ~2.2 well


def object_extent_patches(batch: SegmentationBatch, patch_size: int) -> Tensor:
    """Equivalent diameter, in encoder patches, of every valid mask of a batch: 2 sqrt(area / pi) / patch.

    Areas come from the loss-frame targets (S/4 cells, 16 input pixels each), so no full-size mask is read.
    """
    areas = batch.soft_targets().flatten(2).sum(-1) * 16.0  # B x M input pixels
    areas = areas[batch.mask_valid]
    return 2.0 * torch.sqrt(areas / np.pi) / patch_size


def _valid_slots(batch: SegmentationBatch, max_per_image: int | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """The valid masks only (evaluation; this syncs with the host): gt N x S x S, image_index N, slots N."""
    valid = batch.mask_valid
    if max_per_image is not None:
        valid = valid & (valid.long().cumsum(1) <= max_per_image)
    slots = valid.flatten().nonzero().squeeze(1)  # N flat slot indices
    m = valid.shape[1]
    if batch.masks is not None:
        masks = batch.masks.flatten(0, 1)  # (B*M) x S x S
    else:  # a training batch (loss-frame targets only), e.g. the mask panels' stand-in before validation
        click_gt = batch.soft_targets().flatten(0, 1) >= 0.5  # (B*M) x S/4 x S/4
        masks = _prompt_frame_masks(batch, click_gt, batch.images.shape[-1])
    return masks[slots], torch.div(slots, m, rounding_mode="floor"), slots


def _inside_image(input_sizes: Tensor, image_index: Tensor, size: int) -> Tensor:
    """N x S x S bool: pixels inside each mask's image (before the bottom-right padding)."""
    hw = input_sizes.to(image_index.device)[image_index]  # N x 2
    ys = torch.arange(size, device=image_index.device)
    return (ys[None, :, None] < hw[:, 0, None, None]) & (ys[None, None, :] < hw[:, 1, None, None])


def _unique_names(types: list[PromptType]) -> dict[str, PromptType]:
    named: dict[str, PromptType] = {}
    for ptype in types:
        name, k = ptype.name, 1
        while name in named:
            k += 1
            name = f"{ptype.name}{k}"
        named[name] = ptype
    return named
