"""`DataHealth`: log the data pipeline's skipped-sample counters (`data/skipped/<reason>`) next to the loss.

A run that silently drops a third of its shards trains on less data than the user thinks; the counters make that
visible on the dashboard. Works with any datamodule that has `skip_counts() -> dict[str, int]` (SA1BDataModule).
"""

from __future__ import annotations

import re
from typing import Any

import torch.distributed as dist
from lightning.pytorch import Callback, LightningModule, Trainer


class DataHealth(Callback):
    """Log `datamodule.skip_counts()` as `data/skipped/<reason>` (summed over ranks) and their total.

    Args:
        every_n_steps: log every N training steps (default: the trainer's `log_every_n_steps`); always at the end of
            each validation.
    """

    def __init__(self, *, every_n_steps: int | None = None) -> None:
        self.every_n_steps = every_n_steps

    @staticmethod
    def counts(trainer: Trainer) -> dict[str, int] | None:
        """The datamodule's counters, or None when it keeps none."""
        datamodule = getattr(trainer, "datamodule", None)
        skip_counts = getattr(datamodule, "skip_counts", None)
        return None if skip_counts is None else dict(skip_counts())

    def _log(self, trainer: Trainer, pl_module: LightningModule) -> None:
        counts = self.counts(trainer)
        if counts is None:
            return
        counts = _sum_over_ranks(counts)
        metrics = {f"data/skipped/{_metric_name(reason)}": float(n) for reason, n in sorted(counts.items())}
        metrics["data/skipped/total"] = float(sum(counts.values()))
        for name, value in metrics.items():
            # Already summed over ranks, identical everywhere: no further reduction.
            pl_module.log(
                name, value, on_step=trainer.training, on_epoch=not trainer.training, sync_dist=False
            )

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        every = self.every_n_steps or trainer.log_every_n_steps
        if every and trainer.global_step % every == 0:
            self._log(trainer, pl_module)

    def on_validation_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not trainer.sanity_checking:
            self._log(trainer, pl_module)


def _sum_over_ranks(counts: dict[str, int]) -> dict[str, int]:
    """Sum the per-rank counters. Gathered as objects because ranks may have seen different skip reasons, and a
    per-key tensor reduction would then be a mismatched collective (a hang)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return counts
    gathered: list[dict[str, int] | None] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, counts)
    total: dict[str, int] = {}
    for rank_counts in gathered:
        for reason, n in (rank_counts or {}).items():
            total[reason] = total.get(reason, 0) + int(n)
    return total


def _metric_name(reason: str) -> str:
    """ "corrupt image" -> "corrupt_image": dashboards and CSV headers handle plain names best."""
    return re.sub(r"[^0-9A-Za-z_.-]+", "_", str(reason)).strip("_") or "unknown"
