"""`PreemptionCheckpoint`: every run that ends leaves a loadable `last.ckpt` of its final state.

- The run ends normally (max_steps, max_epochs, early stopping): `last.ckpt` is saved in `on_train_end` unless a
  `ModelCheckpoint` already saved it at this very step.
- SIGTERM (scheduler preemption, `kill`, torchrun shutdown): Lightning turns it into a `SIGTERMException` at the end
  of the current step on every rank (rank 0's flag is broadcast); this callback saves `last.ckpt` then.
- Ctrl-C (SIGINT) and, outside SLURM's auto-requeue, SIGUSR1 are turned into that same coordinated stop, so they
  save too. A second Ctrl-C stops at once without saving.

`samlight fit` adds this callback to every run (see `samlight.cli.train`). The file is written where
`ModelCheckpoint` keeps `last.ckpt`, so `samlight fit ... --ckpt_path last` resumes from the step where the run
stopped. Under SLURM it complements Lightning's `SLURMEnvironment(auto_requeue=True)` (SIGUSR1: save an `hpc_ckpt`
and requeue): the requeue's SIGTERM then refreshes `last.ckpt`.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from pathlib import Path
from typing import Any

from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities.exceptions import SIGTERMException
from lightning.pytorch.utilities.rank_zero import rank_zero_info
from typing_extensions import override

from samlight.scale.resume import checkpoint_dir

log = logging.getLogger(__name__)


class PreemptionCheckpoint(Callback):
    """Save `<checkpoint dir>/last.ckpt` when the run ends: normally, on SIGTERM, SIGINT (Ctrl-C) or SIGUSR1.

    Args:
        dirpath: where to save; None = the ModelCheckpoint directory (see `checkpoint_dir`).
        filename: checkpoint name without extension; "last" makes `--ckpt_path last` pick it up.
        on_train_end: also save when training ends normally (the final state of every run).
        signals: turn Ctrl-C and SIGUSR1 into a coordinated stop that saves (SIGUSR1 is left to Lightning when
            SLURM auto-requeue owns it).
    """

    def __init__(
        self,
        *,
        dirpath: str | None = None,
        filename: str = "last",
        on_train_end: bool = True,
        signals: bool = True,
    ) -> None:
        super().__init__()
        if not filename:
            raise ValueError("PreemptionCheckpoint(filename='') must name a file, e.g. 'last'")
        self.dirpath = dirpath
        self.filename = filename
        self.save_on_train_end = on_train_end
        self.signals = signals
        self.saved_path: str | None = None
        self._stop_signal: str | None = None
        self._previous_handlers: dict[int, Any] = {}

    def checkpoint_path(self, trainer: Trainer) -> str:
        """The file (or, for sharded checkpoints, directory) this callback writes."""
        directory = self.dirpath if self.dirpath is not None else checkpoint_dir(trainer)
        return str(Path(directory) / f"{self.filename}{ModelCheckpoint.FILE_EXTENSION}")

    # ------------------------------------------------------------------------------------------ signals

    @override
    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not self.signals or threading.current_thread() is not threading.main_thread():
            return
        wanted = [signal.SIGINT]
        if hasattr(signal, "SIGUSR1") and signal.getsignal(signal.SIGUSR1) in (signal.SIG_DFL, None):
            wanted.append(signal.SIGUSR1)  # not SLURM's requeue signal: Lightning has no handler for it then
        for signum in wanted:
            self._previous_handlers[signum] = signal.signal(signum, self._stop_gracefully)

    def _stop_gracefully(self, signum: int, frame: Any) -> None:
        # Re-deliver as SIGTERM: Lightning's handler then stops every rank after the same step (rank 0's flag is
        # broadcast), which is when a collective (sharded) save is safe. A second Ctrl-C interrupts at once.
        self._stop_signal = signal.Signals(signum).name
        log.warning(
            "samlight: %s received; stopping after this step and saving (Ctrl-C again: stop now, no save)",
            self._stop_signal,
        )
        if signum == signal.SIGINT:
            signal.signal(signal.SIGINT, signal.default_int_handler)
        os.kill(os.getpid(), signal.SIGTERM)

    def _restore_handlers(self) -> None:
        for signum, handler in self._previous_handlers.items():
            if threading.current_thread() is threading.main_thread():
                signal.signal(signum, handler if handler is not None else signal.SIG_DFL)
        self._previous_handlers.clear()

    # ------------------------------------------------------------------------------------------ saving

    @override
    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._restore_handlers()
        if not self.save_on_train_end or trainer.sanity_checking:
            return
        path = self.checkpoint_path(trainer)
        if self._saved_at_this_step(trainer, path):
            return
        trainer.save_checkpoint(path, weights_only=False)  # a full checkpoint (resumable), said explicitly
        self.saved_path = path
        rank_zero_info(f"samlight: training ended; saved {path} at step {trainer.global_step}.")

    @override
    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        self._restore_handlers()
        # Only the coordinated stop: every rank raises it after the same step, so the collective save of a
        # sharded checkpoint cannot hang. Other errors may have left ranks out of step, or a step half done.
        if not isinstance(exception, SIGTERMException):
            return
        path = self.checkpoint_path(trainer)
        trainer.save_checkpoint(path, weights_only=False)  # a full checkpoint (resumable), said explicitly
        self.saved_path = path
        rank_zero_info(
            f"samlight: {self._stop_signal or 'SIGTERM'} received; saved {path} at step {trainer.global_step}. "
            "Resume with `--ckpt_path last`."
        )

    @staticmethod
    def _saved_at_this_step(trainer: Trainer, path: str) -> bool:
        for callback in trainer.checkpoint_callbacks:
            if not isinstance(callback, ModelCheckpoint) or not callback.last_model_path:
                continue
            same_file = os.path.abspath(callback.last_model_path) == os.path.abspath(path)
            # `_last_global_step_saved` is ModelCheckpoint's own record of the step it last wrote.
            if same_file and getattr(callback, "_last_global_step_saved", None) == trainer.global_step:
                return True
        return False
