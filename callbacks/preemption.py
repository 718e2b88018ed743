"""`PreemptionCheckpoint`: on SIGTERM (scheduler preemption, `kill`, torchrun shutdown) save `last.ckpt` and exit.

Lightning already turns SIGTERM into a `SIGTERMException` at the end of the current step on every rank (rank 0's
flag is broadcast), but saves nothing. This callback saves a checkpoint then, at the path `ModelCheckpoint` uses
for `save_last`, so `samlight fit ... --ckpt_path last` resumes from the step where the job was stopped. Under SLURM
it complements Lightning's `SLURMEnvironment(auto_requeue=True)` (SIGUSR1: save an `hpc_ckpt` and requeue): the
requeue's SIGTERM then refreshes `last.ckpt`, which is what `--ckpt_path last` reads.
"""

from __future__ import annotations

import logging
from pathlib import Path

from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities.exceptions import SIGTERMException
from lightning.pytorch.utilities.rank_zero import rank_zero_info
from typing_extensions import override

log = logging.getLogger(__name__)


class PreemptionCheckpoint(Callback):
    """Save `<checkpoint dir>/last.ckpt` when the run is stopped by SIGTERM.

    Args:
        dirpath: where to save; None = the first ModelCheckpoint's directory (else `<default_root_dir>/checkpoints`).
        filename: checkpoint name without extension; "last" makes `--ckpt_path last` pick it up.
    """

    def __init__(self, *, dirpath: str | None = None, filename: str = "last") -> None:
        super().__init__()
        if not filename:
            raise ValueError("PreemptionCheckpoint(filename='') must name a file, e.g. 'last'")
        self.dirpath = dirpath
        self.filename = filename
        self.saved_path: str | None = None

    def checkpoint_path(self, trainer: Trainer) -> str:
        """The file (or, for sharded checkpoints, directory) this callback writes."""
        dirpath = self.dirpath
        if dirpath is None:
            callback = next((c for c in trainer.checkpoint_callbacks if isinstance(c, ModelCheckpoint)), None)
            dirpath = callback.dirpath if callback is not None and callback.dirpath else None
        if dirpath is None:
            dirpath = str(Path(trainer.default_root_dir) / "checkpoints")
        return str(Path(dirpath) / f"{self.filename}{ModelCheckpoint.FILE_EXTENSION}")

    @override
    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        # Only the coordinated SIGTERM stop: every rank raises it after the same step, so the collective save of a
        # sharded checkpoint cannot hang. Other errors may have left ranks out of step; they do not save here.
        if not isinstance(exception, SIGTERMException):
            return
        path = self.checkpoint_path(trainer)
        trainer.save_checkpoint(path)
        self.saved_path = path
        rank_zero_info(
            f"samlight: SIGTERM received; saved {path} at step {trainer.global_step}. "
            "Resume with `--ckpt_path last`."
        )
