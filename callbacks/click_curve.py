"""`ClickCurve`: mIoU against the number of clicks as one W&B line chart (or TensorBoard chart) per validation.

SamModule logs `val/miou@k` and `val/<prompt>/miou@k` as separate scalars (one line each over training steps);
the paper's figure is the other view: how fast the mask improves with each click, at one point of training.
"""

from __future__ import annotations

import re

from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.loggers import TensorBoardLogger, WandbLogger

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
    """Log `val/miou_vs_clicks` after each validation: on W&B a line chart (one line per prompt type); on
    TensorBoard one scalar chart per prompt and validation, `val/miou_vs_clicks/<prompt>/step_<k>`, whose x axis
    is the number of clicks, plus the same numbers as a table (text tab, `val/miou_vs_clicks`)."""

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # on_validation_end, not on_validation_epoch_end: callbacks run that hook before the module logs mIoU.
        if trainer.sanity_checking or not trainer.is_global_zero:
            return
        rows = click_curve_rows({k: float(v) for k, v in trainer.callback_metrics.items()})
        if not rows:
            return
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                _log_wandb(logger, rows, trainer.global_step)
            elif isinstance(logger, TensorBoardLogger):
                _log_tensorboard(logger, rows, trainer.global_step)


def _log_tensorboard(logger: TensorBoardLogger, rows: list[tuple[str, int, float]], step: int) -> None:
    # TensorBoard charts a tag against its step; here the step axis is the click count, so each validation gets
    # its own tag (grouped per prompt), and the table keeps every validation under one tag for the step slider.
    writer = logger.experiment
    for prompt, clicks, miou in rows:
        writer.add_scalar(f"val/miou_vs_clicks/{prompt}/step_{step}", miou, clicks)
    table = "| prompt | clicks | mIoU |\n|---|---|---|\n" + "\n".join(
        f"| {p} | {c} | {m:.4f} |" for p, c, m in rows
    )
    writer.add_text("val/miou_vs_clicks", table, step)
    writer.flush()


def _log_wandb(logger: WandbLogger, rows: list[tuple[str, int, float]], step: int) -> None:
    import wandb

    table = wandb.Table(columns=["prompt", "clicks", "miou"], data=[list(r) for r in rows])
    chart = wandb.plot.line(table, x="clicks", y="miou", stroke="prompt", title="mIoU vs. clicks")
    logger.experiment.log({"val/miou_vs_clicks": chart, "trainer/global_step": step})
