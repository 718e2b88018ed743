"""`ParameterSummary`: Lightning's model summary plus trainable/frozen counts per part of SAM.

When fine-tuning with a frozen image encoder or LoRA, the first thing to check is what actually trains; the
standard summary gives only totals.
"""

from __future__ import annotations

from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import ModelSummary
from lightning.pytorch.utilities import rank_zero_info
from lightning.pytorch.utilities.model_summary import get_human_readable_count
from torch import nn


def parameter_counts(module: nn.Module) -> list[tuple[str, int, int]]:
    """(part, trainable, frozen) for each child of `module`, one level deeper for a child named `model`
    (so SamModule shows model.image_encoder, model.prompt_encoder, model.mask_decoder)."""
    rows = []
    for name, child in module.named_children():
        parts = list(child.named_children()) if name == "model" else []
        for sub_name, sub in parts or [("", child)]:
            label = f"{name}.{sub_name}" if sub_name else name
            trainable = sum(p.numel() for p in sub.parameters() if p.requires_grad)
            frozen = sum(p.numel() for p in sub.parameters() if not p.requires_grad)
            rows.append((label, trainable, frozen))
    return rows


def format_counts(rows: list[tuple[str, int, int]]) -> str:
    width = max([len("part"), *(len(r[0]) for r in rows)])
    lines = [f"{'part':<{width}}  {'trainable':>9}  {'frozen':>9}"]
    for label, trainable, frozen in rows:
        t, f = get_human_readable_count(trainable), get_human_readable_count(frozen)
        lines.append(f"{label:<{width}}  {t:>9}  {f:>9}")
    return "\n".join(lines)


class ParameterSummary(ModelSummary):
    """ModelSummary (totals of trainable and non-trainable parameters) followed by a per-part table.

    Args:
        max_depth: depth of Lightning's layer table (1: SamModule's direct children).
    """

    def __init__(self, *, max_depth: int = 1) -> None:
        super().__init__(max_depth=max_depth)

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        super().on_fit_start(trainer, pl_module)
        if self._max_depth and trainer.is_global_zero:
            rank_zero_info("Parameters per part:\n" + format_counts(parameter_counts(pl_module)))
