"""`ClickCurve`: mIoU against the number of clicks as one W&B line chart per validation.

SamModule logs `val/miou@k` and `val/<prompt>/miou@k` as separate scalars (one line each over training steps);
the paper's figure is the other view: how fast the mask improves with each click, at one point of training.
"""

from __future__ import annotations

import re

from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.loggers import WandbLogger

_MIOU_AT = re.compile(r"^val/(?:(?P<prompt>[^/]+)/)?miou@(?P<clicks>\d+)$")


def click_curve_rows(metrics: dict[str, float]) -> list[tuple[str, int, float]]:
    """(prompt, clicks, mIoU) rows from logged metrics; the unprefixed `val/miou@k` is the prompt "all"."""
    rows = []
    for key, value in metrics.items():
        match = _MIOU_AT.match(key)
        if match:
            rows.append((match["prompt"] or "all", int(match["clicks"]), float(value)))
    return sorted(rows)


class ClickCurve(Callback):
    """Log `val/miou_vs_clicks` (a W&B line chart, one line per prompt type) after each validation."""

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # on_validation_end, not on_validation_epoch_end: callbacks run that hook before the module logs mIoU.
        logger = next((lg for lg in trainer.loggers if isinstance(lg, WandbLogger)), None)
        if logger is None or trainer.sanity_checking or not trainer.is_global_zero:
            return
        rows = click_curve_rows({k: float(v) for k, v in trainer.callback_metrics.items()})
        if not rows:
            return
        import wandb

        table = wandb.Table(columns=["prompt", "clicks", "miou"], data=[list(r) for r in rows])
        chart = wandb.plot.line(table, x="clicks", y="miou", stroke="prompt", title="mIoU vs. clicks")
        logger.experiment.log({"val/miou_vs_clicks": chart, "trainer/global_step": trainer.global_step})
