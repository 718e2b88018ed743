"""Dashboard callbacks: skipped-sample counters, throughput in the progress bar, per-part parameter counts."""

from __future__ import annotations

import csv
from pathlib import Path

import torch
from lightning.pytorch import Trainer
from lightning.pytorch.demos.boring_classes import BoringDataModule, BoringModel
from lightning.pytorch.loggers import CSVLogger
from torch import nn

from samlight.callbacks.data_health import DataHealth
from samlight.callbacks.parameter_summary import parameter_counts
from samlight.callbacks.progress import SamlightProgressBar
from samlight.training.run_layout import run_dir


class _CountingData(BoringDataModule):
    """A datamodule whose pipeline has skipped a few samples."""

    def skip_counts(self) -> dict[str, int]:
        return {"corrupt image": 2, "missing json": 1}


def test_data_health_logs_skip_counters(tmp_path: Path) -> None:
    logger = CSVLogger(tmp_path, name="run")
    trainer = Trainer(
        max_steps=4,
        limit_val_batches=1,
        val_check_interval=4,
        num_sanity_val_steps=0,
        log_every_n_steps=2,
        logger=logger,
        callbacks=[DataHealth()],
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        accelerator="cpu",
    )
    trainer.fit(BoringModel(), datamodule=_CountingData())
    rows = list(csv.DictReader(open(Path(logger.log_dir) / "metrics.csv")))
    logged = [r for r in rows if r.get("data/skipped/corrupt_image")]
    assert logged, f"no data/skipped/* rows in {rows}"
    assert float(logged[-1]["data/skipped/corrupt_image"]) == 2.0
    assert float(logged[-1]["data/skipped/missing_json"]) == 1.0
    assert float(logged[-1]["data/skipped/total"]) == 3.0
    assert run_dir(trainer) == Path(logger.log_dir)


def test_progress_bar_reports_images_per_second() -> None:
    bar = SamlightProgressBar(window=4)
    assert bar.images_per_second() is None
    for t in range(6):
        bar._ends.append((0.5 * t, 8))  # 8 images every 0.5 s
    assert abs(bar.images_per_second() - 16.0) < 1e-9


def test_parameter_counts_split_trainable_and_frozen() -> None:
    module = nn.Module()
    module.model = nn.Module()
    module.model.image_encoder = nn.Linear(4, 4)  # 20 parameters
    module.model.mask_decoder = nn.Linear(2, 3)  # 9 parameters
    module.model.image_encoder.requires_grad_(False)
    module.loss_fn = nn.Identity()
    rows = {name: (trainable, frozen) for name, trainable, frozen in parameter_counts(module)}
    assert rows["model.image_encoder"] == (0, 20)
    assert rows["model.mask_decoder"] == (9, 0)
    assert rows["loss_fn"] == (0, 0)
    assert (
        sum(p.numel() for p in module.parameters()) == torch.tensor([t + f for t, f in rows.values()]).sum()
    )


def test_click_curve_rows_from_logged_metrics() -> None:
    from samlight.callbacks.click_curve import click_curve_rows

    metrics = {
        "val/miou@1": 0.5,
        "val/miou@3": 0.7,
        "val/box/miou@1": 0.6,
        "val/oracle@1": 0.9,
        "train/loss": 1.0,
    }
    assert click_curve_rows(metrics) == [("all", 1, 0.5), ("all", 3, 0.7), ("box", 1, 0.6)]


def test_cli_adds_dashboard_callbacks_once(tmp_path: Path, monkeypatch) -> None:
    """The always-on sections become callbacks; one also listed in trainer.callbacks is not added twice."""
    import sys

    from lightning.pytorch import LightningDataModule
    from lightning.pytorch.callbacks import LearningRateMonitor
    from lightning.pytorch.loggers import CSVLogger

    from samlight.callbacks.data_health import DataHealth
    from samlight.callbacks.mask_panels import MaskPanels
    from samlight.callbacks.parameter_summary import ParameterSummary
    from samlight.cli.train import SamlightCLI, default_config_path
    from samlight.training.module import SamModule

    monkeypatch.setattr(sys, "argv", ["samlight"])
    args = [
        "--config",
        default_config_path(),
        f"--trainer.default_root_dir={tmp_path}",
        "--trainer.callbacks+=LearningRateMonitor",
        "--panels.num_images=3",
    ]
    cli = SamlightCLI(SamModule, LightningDataModule, subclass_mode_data=True, run=False, args=args)
    kinds = [type(c) for c in cli.trainer.callbacks]
    assert kinds.count(LearningRateMonitor) == 1
    for kind in (MaskPanels, DataHealth, SamlightProgressBar, ParameterSummary):
        assert kinds.count(kind) == 1, kind
    assert next(c for c in cli.trainer.callbacks if isinstance(c, MaskPanels)).num_images == 3
    # No logger configured: a CSV logger named after the config, under the root directory.
    assert isinstance(cli.trainer.logger, CSVLogger)
    assert Path(cli.trainer.logger.log_dir) == tmp_path / "quickstart" / "version_0"
