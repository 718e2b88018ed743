"""Throughput callback: rates, data-wait fraction and MFU from timed hooks; no device sync per step."""

from __future__ import annotations

import time
from types import SimpleNamespace

import pytest
import torch

from samlight import build_sam
from samlight.callbacks.throughput import Throughput
from samlight.training.flops import SamFlops


class _Logger:
    def __init__(self) -> None:
        self.logged: list[tuple[int, dict]] = []

    def log_metrics(self, metrics: dict, step: int) -> None:
        self.logged.append((step, dict(metrics)))


def _trainer(logger: _Logger, world_size: int = 2):
    return SimpleNamespace(
        global_step=0, log_every_n_steps=2, world_size=world_size, is_global_zero=True, loggers=[logger]
    )


def _batch(valid: list[list[bool]]):
    mask_valid = torch.tensor(valid)
    return SimpleNamespace(images=torch.zeros(mask_valid.shape[0], 3, 8, 8), mask_valid=mask_valid)


def test_rates_wait_fraction_and_mfu() -> None:
    logger = _Logger()
    trainer = _trainer(logger)
    module = SimpleNamespace(device=torch.device("cpu"))
    callback = Throughput(peak_flops=1e9, rounds=3)
    callback.flops = SamFlops(encoder_per_image=1_000_000, decoder_per_mask=10_000)
    batch = _batch([[True, True, False], [True, False, False]])  # 2 images, 3 valid masks
    for step in range(1, 5):
        callback.on_train_batch_start(trainer, module, batch, step)
        time.sleep(0.03)  # "compute"
        trainer.global_step = step
        callback.on_train_batch_end(trainer, module, None, batch, step)
        time.sleep(0.01)  # "waiting for data"
    assert [step for step, _ in logger.logged] == [2, 4]
    metrics = logger.logged[-1][1]
    # Window 2 = steps 3-4: 2 x 30 ms compute + 10 ms wait in between (the wait after the last step is not in it).
    # Sleeps only overshoot, and a busy CI machine overshoots more: bounds, not exact values.
    assert 0.035 <= metrics["throughput/step_time_s"] < 0.2
    assert 0.03 < metrics["throughput/data_wait_fraction"] < 0.6
    elapsed = 2 * metrics["throughput/step_time_s"]
    assert metrics["throughput/images_per_sec"] == pytest.approx(4 / elapsed * 2, rel=1e-6)  # x world size
    assert metrics["throughput/masks_per_sec"] == pytest.approx(6 / elapsed * 2, rel=1e-6)
    step_flops = 3 * 4 * 1_000_000 + 3 * 3 * 6 * 10_000
    assert metrics["throughput/mfu"] == pytest.approx(step_flops / elapsed / 1e9, rel=1e-6)
    assert metrics["throughput/peak_rss_gib"] > 0
    assert callback.metrics == metrics


def test_setup_counts_flops_and_rounds_from_the_module() -> None:
    model = build_sam("tiny")
    for p in model.image_encoder.parameters():
        p.requires_grad_(False)
    module = SimpleNamespace(
        model=model, clicks=SimpleNamespace(num_clicks=8, mask_only_rounds=2), hparams={}
    )
    callback = Throughput()
    callback.setup(_trainer(_Logger()), module, "fit")
    assert callback.rounds == 11
    assert callback.flops is not None and callback.flops.encoder_per_image > 0
    assert callback._encoder_trainable is False  # a frozen encoder is counted forward-only


def test_unknown_device_logs_no_mfu() -> None:
    logger = _Logger()
    trainer = _trainer(logger, world_size=1)
    trainer.log_every_n_steps = 1
    callback = Throughput(rounds=1)
    callback.flops = SamFlops(encoder_per_image=1, decoder_per_mask=1)
    module = SimpleNamespace(device=torch.device("cpu"))
    callback.on_train_start(trainer, module)  # CPU: no peak FLOPS known
    batch = _batch([[True]])
    callback.on_train_batch_start(trainer, module, batch, 0)
    trainer.global_step = 1
    callback.on_train_batch_end(trainer, module, None, batch, 0)
    assert "throughput/mfu" not in callback.metrics
    assert callback.metrics["throughput/tflops_per_device"] > 0
