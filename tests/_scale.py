"""Helpers for the scale-out tests (FSDP, multi-node, resume): tiny CLI runs in subprocesses on CPU."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import torch
import yaml
from lightning.pytorch import Callback

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / "configs" / "quickstart.yaml"
FSDP = Path(__file__).resolve().parents[1] / "configs" / "fsdp.yaml"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tiny_run_config(
    tmp_path: Path,
    *,
    ckpt_dir: Path,
    max_steps: int,
    preemption: bool = False,
    record: Path | None = None,
    data: dict | None = None,
    trainer: dict | None = None,
    name: str | None = None,
) -> Path:
    """Overrides on top of quickstart.yaml: 1 image x 4 masks per step, 2 rounds, no validation, a checkpoint
    (and last.ckpt) every step in `ckpt_dir`, throughput logged every step; `record`: every batch's keys are
    written there (`RecordBatches`); `data` / `trainer`: more overrides of those sections."""
    callbacks = [
        {
            "class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
            "init_args": {
                "dirpath": str(ckpt_dir),
                "save_last": True,
                "every_n_train_steps": 1,
                "save_top_k": 1,
            },
        },
        {"class_path": "samlight.callbacks.throughput.Throughput", "init_args": {"log_every_n_steps": 1}},
    ]
    if preemption:
        callbacks.append({"class_path": "samlight.callbacks.preemption.PreemptionCheckpoint"})
    if record is not None:
        callbacks.append({"class_path": "tests._scale.RecordBatches", "init_args": {"out_dir": str(record)}})
    config = {
        "model": {
            "optimizer": {
                "class_path": "samlight.training.optim.AdamWRecipe",
                "init_args": {"lr": 5e-3, "weight_decay": 0.01, "warmup_steps": 2, "lr_milestones": [1000]},
            }
        },
        "data": {
            "init_args": {
                "val_urls": None,
                "batch_size": 1,
                "max_masks": 4,
                "num_workers": 0,
                "batches_per_epoch": 1000,
                **(data or {}),
            }
        },
        "trainer": {
            "max_steps": max_steps,
            "limit_val_batches": 0,
            "num_sanity_val_steps": 0,
            "val_check_interval": None,
            "log_every_n_steps": 1,
            "enable_progress_bar": False,
            "enable_model_summary": False,
            "default_root_dir": str(tmp_path / "runs"),
            "callbacks": callbacks,
            **(trainer or {}),
        },
    }
    path = tmp_path / f"{name or 'tiny'}_{max_steps}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def env(cache: Path, **extra: str) -> dict[str, str]:
    """Subprocess environment: one thread per process (2 CPU cores), demo shards in a test cache."""
    out = {**os.environ, "OMP_NUM_THREADS": "1", "SAMLIGHT_CACHE": str(cache), "PYTHONFAULTHANDLER": "1"}
    # The runs may load test helpers (e.g. `tests._scale.RecordBatches`) from this checkout.
    out["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    out.update(extra)
    return out


def samlight(
    args: list[str], *, environ: dict[str, str], timeout: float = 240
) -> subprocess.CompletedProcess:
    """Run the `samlight` CLI in a subprocess (Lightning re-launches it for extra local ranks)."""
    cmd = [sys.executable, "-m", "samlight.cli.main", *args]
    return subprocess.run(cmd, env=environ, capture_output=True, text=True, timeout=timeout)


def check(result: subprocess.CompletedProcess) -> None:
    assert result.returncode == 0, (
        f"exit {result.returncode}\nSTDOUT:\n{result.stdout[-4000:]}\nSTDERR:\n{result.stderr[-6000:]}"
    )


def checkpoint_meta(path: Path) -> dict:
    """The Lightning metadata (global_step, loops, lr_schedulers, ...) of a .ckpt file or sharded directory."""
    file = path / "meta.pt" if path.is_dir() else path
    return torch.load(file, map_location="cpu", weights_only=True)


class RecordBatches(Callback):
    """Test callback: append `{"stage", "rank", "step", "keys"}` per batch to `<out_dir>/batches-<rank>.jsonl`
    (padding batches are recorded with `"padding": true`)."""

    def __init__(self, out_dir: str) -> None:
        super().__init__()
        self.out_dir = Path(out_dir)

    def _record(self, trainer, stage: str, batch) -> None:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        keys = [m.get("key") for m in batch.meta]
        row = {
            "stage": stage,
            "rank": trainer.global_rank,
            "step": trainer.global_step,
            "keys": keys,
            "padding": any(m.get("padding") for m in batch.meta),
            "annotations": [m.get("annotation_ids") for m in batch.meta],
        }
        with open(self.out_dir / f"batches-{trainer.global_rank}.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._record(trainer, "train", batch)

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0) -> None:
        if not trainer.sanity_checking:
            self._record(trainer, "val", batch)


def recorded(out_dir: Path) -> list[dict]:
    """All rows written by `RecordBatches` into `out_dir`, rank by rank."""
    rows = []
    for file in sorted(Path(out_dir).glob("batches-*.jsonl")):
        rows.extend(json.loads(line) for line in file.read_text().splitlines())
    return rows
