"""`Throughput`: images/s, masks/s, data-wait fraction, peak memory and MFU of a training run.

Time is taken with `time.perf_counter` at the batch start/end hooks; per step the callback only adds host-side
arithmetic and one asynchronous device add (the valid-mask count). Every `log_every_n_steps` it synchronises the
device once, so the window's wall time includes all queued GPU work, and logs:

    throughput/step_time_s         mean wall time per step over the window
    throughput/images_per_sec      all ranks (this rank's rate x world size: every rank trains the same batch size)
    throughput/masks_per_sec       valid (non-padding) masks, all ranks
    throughput/data_wait_fraction  share of the window spent outside the train-batch hooks on this rank (fetching
                                   and transferring the next batch, plus Lightning's per-step bookkeeping)
    throughput/tflops_per_device   model FLOPs (samlight.training.flops) per second per device
    throughput/mfu                 tflops_per_device / the device's peak dense bf16 FLOPS (only on known GPUs)
    throughput/peak_memory_gib     CUDA peak allocated memory (on CPU: throughput/peak_rss_gib, the process's RSS)

With asynchronous CUDA execution the split between waiting and computing inside a window is approximate; the
window totals are exact.
"""

from __future__ import annotations

import logging
import resource
import sys
import time
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from typing_extensions import override

from samlight.training.flops import SamFlops, count_sam_flops, count_variant_flops, peak_bf16_flops

log = logging.getLogger(__name__)


class Throughput(Callback):
    """Log training throughput and MFU every `log_every_n_steps` optimizer steps.

    Args:
        log_every_n_steps: window length in steps; None = the trainer's `log_every_n_steps`.
        rounds: decoder rounds per training step; None = read from `pl_module.clicks`
            (1 + num_clicks + mask_only_rounds, 11 with the paper's recipe).
        peak_flops: peak FLOP/s of one device for MFU; None = look the device up in `samlight.training.flops.PEAK_BF16_FLOPS`
            (MFU is then not logged on CPUs and unknown GPUs).
    """

    def __init__(
        self,
        *,
        log_every_n_steps: int | None = None,
        rounds: int | None = None,
        peak_flops: float | None = None,
    ) -> None:
        super().__init__()
        if log_every_n_steps is not None and log_every_n_steps < 1:
            raise ValueError(f"Throughput(log_every_n_steps={log_every_n_steps}) must be >= 1")
        self.log_every_n_steps = log_every_n_steps
        self.rounds = rounds
        self.peak_flops = peak_flops
        self.flops: SamFlops | None = None
        self.metrics: dict[str, float] = {}  # the latest logged values (also handy in benchmarks and tests)
        self._encoder_trainable = True
        self._last_logged_step = -1
        self._reset_window()

    # ------------------------------------------------------------------------------------------------ setup

    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        model = getattr(pl_module, "model", None)
        if model is None or not hasattr(model, "image_encoder"):
            log.warning(
                "samlight Throughput: %s has no SAM `.model`; MFU will not be logged",
                type(pl_module).__name__,
            )
            return
        self._encoder_trainable = any(p.requires_grad for p in model.image_encoder.parameters())
        if self.rounds is None:
            clicks = getattr(pl_module, "clicks", None)
            self.rounds = 1 + clicks.num_clicks + clicks.mask_only_rounds if clicks is not None else 1
        self.flops = _count(model, pl_module)

    @override
    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.peak_flops is None:
            self.peak_flops = peak_bf16_flops(pl_module.device)
        self._reset_window()

    # ----------------------------------------------------------------------------------------------- timing

    @override
    def on_train_batch_start(
        self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int
    ) -> None:
        now = time.perf_counter()
        if self._window_start is None:
            self._window_start = now
        elif self._last_end is not None:
            self._wait += now - self._last_end
        self._batch_start = now

    @override
    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self._steps += 1
        self._images += int(batch.images.shape[0])  # shapes are host metadata: no sync
        valid = batch.mask_valid.sum()  # queued on the device, read once per window
        self._masks = valid if self._masks is None else self._masks + valid
        every = self.log_every_n_steps or trainer.log_every_n_steps
        step = trainer.global_step
        # The step check keeps gradient-accumulation micro-batches (same global_step) from logging twice.
        if step % every == 0 and step != self._last_logged_step:
            self._log_window(trainer, pl_module)
            self._last_logged_step = step
            self._reset_window()
        self._last_end = time.perf_counter()

    # -------------------------------------------------------------------------------------------- reporting

    def _log_window(self, trainer: Trainer, pl_module: LightningModule) -> None:
        device = pl_module.device
        if device.type == "cuda":
            torch.cuda.synchronize(device)  # the one sync per window: make the wall time cover queued work
        elapsed = max(time.perf_counter() - self._window_start, 1e-9)
        masks = float(self._masks) if self._masks is not None else 0.0
        world = trainer.world_size
        metrics = {
            "throughput/step_time_s": elapsed / self._steps,
            "throughput/images_per_sec": self._images / elapsed * world,
            "throughput/masks_per_sec": masks / elapsed * world,
            "throughput/data_wait_fraction": min(self._wait / elapsed, 1.0),
        }
        if self.flops is not None:
            step_flops = self.flops.training_step(
                images=self._images,
                masks=masks,
                rounds=self.rounds or 1,
                encoder_trainable=self._encoder_trainable,
            )
            achieved = step_flops / elapsed
            metrics["throughput/tflops_per_device"] = achieved / 1e12
            if self.peak_flops:
                metrics["throughput/mfu"] = achieved / self.peak_flops
        metrics.update(_peak_memory(device))
        self.metrics = metrics
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.log_metrics(metrics, step=trainer.global_step)

    def _reset_window(self) -> None:
        self._window_start: float | None = None
        self._batch_start: float | None = None
        self._last_end: float | None = None
        self._wait = 0.0
        self._steps = 0
        self._images = 0
        self._masks: torch.Tensor | None = None


def _count(model: torch.nn.Module, pl_module: LightningModule) -> SamFlops | None:
    try:
        return count_sam_flops(model)
    except ValueError:
        hparams = getattr(pl_module, "hparams", {})
        if "variant" in hparams:  # an already sharded model: FLOPs depend only on the architecture
            return count_variant_flops(hparams["variant"], **dict(hparams.get("model_overrides") or {}))
    except Exception as e:  # a model the counter cannot trace must not stop training; MFU is just not logged
        log.warning("samlight Throughput: could not count model FLOPs (%s); MFU will not be logged", e)
    return None


def _peak_memory(device: torch.device) -> dict[str, float]:
    if device.type == "cuda":
        return {"throughput/peak_memory_gib": torch.cuda.max_memory_allocated(device) / 2**30}
    # ru_maxrss is KiB on Linux, bytes on macOS.
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)
    return {"throughput/peak_rss_gib": rss / 2**30}
