"""`SamlightProgressBar`: Lightning's rich progress bar plus end-to-end throughput (images/s) and the training loss,
read from the device only every `log_every_n_steps` (a per-step read is a host sync on GPU)."""

from __future__ import annotations

import time
from collections import deque
from typing import Any

from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import RichProgressBar


class SamlightProgressBar(RichProgressBar):
    """Rich progress bar that shows `img/s` (this rank) over the last `window` training steps.

    The rate is measured between consecutive batch ends, so it includes data loading: it is what the run really
    achieves, not only the model's speed. It needs no device synchronisation (batch sizes are host-side).

    Args:
        refresh_rate: redraw every N batches.
        window: number of recent steps averaged.
        leave: keep finished epoch bars on screen.
    """

    def __init__(self, *, refresh_rate: int = 1, window: int = 20, leave: bool = False) -> None:
        super().__init__(refresh_rate=refresh_rate, leave=leave)
        self._ends: deque[tuple[float, int]] = deque(maxlen=window + 1)
        self._loss: str | None = None
        self._loss_step = -1

    def _get_train_description(self, current_epoch: int) -> str:
        # Lightning writes "Epoch 11/-2" for step-based runs (max_epochs -1): show the step budget instead.
        trainer = self.trainer
        if trainer.max_epochs is not None and trainer.max_epochs >= 0:
            return super()._get_train_description(current_epoch)
        description = f"Epoch {current_epoch}"
        if trainer.max_steps is not None and trainer.max_steps >= 0:
            description += f" (max {trainer.max_steps} steps)"
        if len(self.validation_description) > len(description):
            description = f"{description:{len(self.validation_description)}}"
        return description

    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        super().on_train_epoch_start(trainer, pl_module)
        # Validation and epoch boundaries are not training time; restart the window.
        self._ends.clear()

    def on_validation_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        super().on_validation_start(trainer, pl_module)
        self._ends.clear()

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self._ends.append((time.perf_counter(), _batch_size(batch)))
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)

    def images_per_second(self) -> float | None:
        """Images per second over the window, or None before two batches have ended."""
        if len(self._ends) < 2:
            return None
        elapsed = self._ends[-1][0] - self._ends[0][0]
        images = sum(n for _, n in list(self._ends)[1:])
        return images / elapsed if elapsed > 0 else None

    def get_metrics(self, trainer: Trainer, pl_module: LightningModule) -> dict[str, Any]:
        items = super().get_metrics(trainer, pl_module)
        loss = self._loss_for_display(trainer)
        if loss is not None:
            items["loss"] = loss
        rate = self.images_per_second()
        if rate is not None:
            items["img/s"] = f"{rate:.1f}"
        return items

    def _loss_for_display(self, trainer: Trainer) -> str | None:
        """`train/loss` as text, read from the device only on logging steps (cached in between)."""
        step = trainer.global_step
        if step != self._loss_step and step % max(1, trainer.log_every_n_steps) == 0:
            value = trainer.callback_metrics.get("train/loss")
            if value is not None:
                self._loss = f"{float(value):.3g}"
                self._loss_step = step
        return self._loss


def _batch_size(batch: Any) -> int:
    """Images in a batch: a SegmentationBatch, a tensor, or a tuple/list whose first item is the images."""
    images = getattr(batch, "images", batch)
    if isinstance(images, (list, tuple)) and images:
        images = images[0]
    shape = getattr(images, "shape", None)
    return int(shape[0]) if shape else 1
