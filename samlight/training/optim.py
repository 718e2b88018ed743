"""Optimiser, schedule, freezing and LoRA for SAM (paper App. A defaults).

AdamW over parameter groups with layer-wise lr decay across the image-encoder blocks and no weight decay on
norms, biases and position embeddings; linear warmup then step (or cosine) decay; LoRA on the encoder attention via peft.
"""

from __future__ import annotations

import copy
import math
import re
from bisect import bisect_right
from collections.abc import Sequence

import torch
from torch import nn

_BLOCK = re.compile(r"(?:^|\.)blocks\.(\d+)\.")
# Encoder parameters before the first block (patch embedding, absolute position embedding) share its layer id 0.
_STEM = ("patch_embed", "pos_embed")
# Position embeddings (absolute and relative) and learned tokens act like biases: decaying them to 0 hurts.
_NO_DECAY_NAMES = ("pos_embed", "rel_pos", "iou_token.", "mask_tokens.", "positional_encoding")


def layer_id(name: str, num_blocks: int) -> int:
    """Layer of a parameter for lr decay: 0 encoder stem, i + 1 encoder block i, num_blocks + 1 the rest."""
    if name.startswith("image_encoder."):
        match = _BLOCK.search(name)
        if match:
            return int(match.group(1)) + 1
        if any(part in name for part in _STEM):
            return 0
    return num_blocks + 1


def uses_weight_decay(name: str, param: nn.Parameter) -> bool:
    """False for norms and biases (1-d) and for position embeddings and learned tokens."""
    return param.ndim > 1 and not any(part in name for part in _NO_DECAY_NAMES)


def param_groups(model: nn.Module, *, lr: float, weight_decay: float, layer_decay: float) -> list[dict]:
    """AdamW groups for the trainable parameters of a `Sam`.

    The lr of encoder layer i is `lr * layer_decay ** (num_blocks + 1 - i)`: early blocks move least, the
    neck, prompt encoder and mask decoder train at the full lr.

    Returns:
        A list of {"params", "lr", "weight_decay", "name"} dicts (empty groups left out).
    """
    num_blocks = _num_blocks(model)
    groups: dict[tuple[int, bool], dict] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        layer = layer_id(name, num_blocks)
        decay = uses_weight_decay(name, param)
        key = (layer, decay)
        if key not in groups:
            groups[key] = {
                "params": [],
                "lr": lr * layer_decay ** (num_blocks + 1 - layer),
                "weight_decay": weight_decay if decay else 0.0,
                "name": f"layer{layer}_{'decay' if decay else 'no_decay'}",
            }
        groups[key]["params"].append(param)
    return [groups[k] for k in sorted(groups)]


def linear_warmup(step: int, warmup_steps: int) -> float:
    """The warmup part of every schedule: (step + 1) / warmup_steps, 1 from the end of the warmup on."""
    return min(1.0, (step + 1) / warmup_steps) if warmup_steps > 0 else 1.0


def warmup_step_lambda(warmup_steps: int, milestones: Sequence[int], gamma: float):
    """lr factor at an optimizer step: linear warmup to 1 over `warmup_steps`, then x gamma at each milestone."""
    milestones = sorted(milestones)

    def factor(step: int) -> float:
        return linear_warmup(step, warmup_steps) * gamma ** bisect_right(milestones, step)

    return factor


def warmup_cosine_lambda(warmup_steps: int, total_steps: int, min_ratio: float = 0.0):
    """lr factor at an optimizer step: linear warmup to 1 over `warmup_steps`, then a cosine from 1 down to
    `min_ratio` at `total_steps` (and `min_ratio` after it). A run no longer than its warmup (a smoke test of a
    few steps) only warms up."""
    decay_steps = max(1, total_steps - warmup_steps)

    def factor(step: int) -> float:
        if step < warmup_steps:
            return linear_warmup(step, warmup_steps)
        progress = min(1.0, (step - warmup_steps) / decay_steps)
        return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


SAM_PARTS = ("image_encoder", "prompt_encoder", "mask_decoder")


def freeze(model: nn.Module, parts: Sequence[str]) -> None:
    """Set requires_grad False on the named parts of a `Sam` ("image_encoder", "prompt_encoder", "mask_decoder")."""
    unknown = sorted(set(parts) - set(SAM_PARTS))
    if unknown:
        raise ValueError(f"freeze: unknown part(s) {unknown}; choose from {list(SAM_PARTS)}")
    for part in parts:
        getattr(model, part).requires_grad_(False)


def apply_lora(model: nn.Module, *, r: int = 8, alpha: float = 16.0, dropout: float = 0.0) -> nn.Module:
    """Wrap `model.image_encoder` with peft LoRA on each block's attention `qkv` and `proj`.

    peft freezes the rest of the encoder; prompt encoder and mask decoder keep their own requires_grad.
    Returns the model (changed in place).
    """
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError("LoRA needs peft: pip install 'samlight[lora]'") from err
    config = LoraConfig(
        r=int(r),  # YAML/CLI `lora: {r: 8}` arrives as a float through SamModule's dict[str, float]
        lora_alpha=alpha,
        lora_dropout=dropout,
        # Attention projections only: `proj` alone would also match the patch-embedding convolution.
        target_modules=r".*blocks\.\d+\.attn\.(qkv|proj)",
    )
    model.image_encoder = get_peft_model(model.image_encoder, config)
    return model


def has_lora(model: nn.Module) -> bool:
    return hasattr(model.image_encoder, "merge_and_unload")


def merged_copy(model: nn.Module) -> nn.Module:
    """A copy of `model` whose LoRA weights are merged into the encoder (official parameter names again)."""
    model = copy.deepcopy(model)
    if has_lora(model):
        model.image_encoder = model.image_encoder.merge_and_unload()
    return model


def _num_blocks(model: nn.Module) -> int:
    names = [name for name, _ in model.named_parameters() if name.startswith("image_encoder.")]
    ids = [int(m.group(1)) for m in map(_BLOCK.search, names) if m]
    return max(ids) + 1 if ids else 0


def build_adamw(
    groups: list[dict], *, lr: float, betas: tuple[float, float] = (0.9, 0.999)
) -> torch.optim.AdamW:
    if not groups:
        raise ValueError(
            "no trainable parameters: every part of the model is frozen (model.freeze lists all three parts) "
            "and no LoRA is configured"
        )
    # Fused: one kernel per step, and it honours `optimizer.found_inf`, which SamModule sets to skip a
    # non-finite step without touching weights, moments or step counts (see SamModule.on_before_optimizer_step).
    return torch.optim.AdamW(groups, lr=lr, betas=betas, fused=True)


class AdamWRecipe:
    """The optimiser and schedule of a run: AdamW over layer-wise-decayed groups, warmup, step or cosine decay.

    The defaults are the paper's (App. A): lr 8e-4, betas (0.9, 0.999), weight decay 0.1, layer decay 0.8,
    250 warmup steps, lr / 10 at 60k and 86,666 of 90k steps. Select it in YAML as
    `model.optimizer: {class_path: samlight.training.optim.AdamWRecipe, init_args: {...}}`.

    Args:
        lr: peak learning rate.
        betas: AdamW betas.
        weight_decay: AdamW weight decay (not on norms, biases, position embeddings, learned tokens).
        layer_decay: layer-wise lr decay over the image-encoder blocks (paper: 0.8; ViT-B 0.6); 1.0 = none.
        warmup_steps: linear warmup length in optimizer steps.
        lr_milestones: optimizer steps at which the lr is multiplied by `lr_gamma`.
        lr_gamma: step decay factor.
        schedule: "step" (the paper's: x `lr_gamma` at each milestone) or "cosine" (from the peak after warmup
            down to `min_lr_ratio` x lr at the run's last step, `trainer.max_steps`; milestones unused). A short
            run from random init gains most from the lr falling over its whole length (docs/training.md).
        min_lr_ratio: the cosine's end value as a fraction of the peak lr.
    """

    def __init__(
        self,
        *,
        lr: float = 8e-4,
        betas: tuple[float, float] = (0.9, 0.999),
        weight_decay: float = 0.1,
        layer_decay: float = 0.8,
        warmup_steps: int = 250,
        lr_milestones: Sequence[int] = (60000, 86666),
        lr_gamma: float = 0.1,
        schedule: str = "step",
        min_lr_ratio: float = 0.0,
    ) -> None:
        if schedule not in ("step", "cosine"):
            raise ValueError(f"AdamWRecipe: schedule must be 'step' or 'cosine', got {schedule!r}")
        self.lr = lr
        self.betas = tuple(betas)
        self.weight_decay = weight_decay
        self.layer_decay = layer_decay
        self.warmup_steps = warmup_steps
        self.lr_milestones = list(lr_milestones)
        self.lr_gamma = lr_gamma
        self.schedule = schedule
        self.min_lr_ratio = min_lr_ratio

    def __repr__(self) -> str:
        return f"AdamWRecipe({', '.join(f'{k}={v!r}' for k, v in vars(self).items())})"

    def configure(self, model: nn.Module, total_steps: int | None = None) -> dict:
        """Lightning's `configure_optimizers` result for the trainable parameters of `model` (a `Sam`).

        `total_steps` (the run's optimizer steps, `trainer.max_steps`) is needed by the cosine schedule only.
        """
        groups = param_groups(model, lr=self.lr, weight_decay=self.weight_decay, layer_decay=self.layer_decay)
        optimizer = build_adamw(groups, lr=self.lr, betas=self.betas)
        if self.schedule == "cosine":
            if total_steps is None or total_steps <= 0:
                raise ValueError(
                    "AdamWRecipe(schedule='cosine') decays over the whole run and needs its length: set "
                    f"trainer.max_steps (got {total_steps})"
                )
            factor = warmup_cosine_lambda(self.warmup_steps, total_steps, self.min_lr_ratio)
        else:
            factor = warmup_step_lambda(self.warmup_steps, self.lr_milestones, self.lr_gamma)
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}
