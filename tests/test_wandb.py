"""The quickstart with configs/wandb.yaml runs offline (no account, no network) and its W&B run holds scalar
metrics, the config, and mask panels with ground-truth and prediction layers."""

from __future__ import annotations

import json
import struct
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

wandb = pytest.importorskip("wandb")

from samlight.cli.train import default_config_path, run_cli  # noqa: E402
from tests._quickstart import SHORT_RUN, own_demo_shards  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def wandb_records(path: Path) -> Iterator:
    """Records of a `.wandb` transaction log: W&B's LevelDB-style log (7-byte file header, 32 KiB blocks, each
    chunk `crc32 u32, length u16, type u8`; types 1 full, 2 first, 3 middle, 4 last) of `Record` protobufs."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a W&B transaction log"
    block, pos, pending = 32768, 7, b""
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:  # a block's tail too short for a header is zero padding
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if kind == 0:
            pos += left
            continue
        if pos + 7 + length > len(data):  # the writer has not finished this chunk yet
            return
        pending += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            pending = b""
            yield record


def history(path: Path) -> list[dict]:
    """Each `run.log` call as a nested dict {key: value, "panels/x": {"all_masks": ..., ...}}."""
    rows = []
    for record in wandb_records(path):
        if record.WhichOneof("record_type") != "history":
            continue
        row: dict = {}
        for item in record.history.item:
            keys = list(item.nested_key) or [item.key]
            node = row
            for k in keys[:-1]:
                node = node.setdefault(k, {})
            node[keys[-1]] = json.loads(item.value_json)
        rows.append(row)
    return rows


def _wait_for_exit_record(path: Path, timeout: float = 60.0) -> None:
    """`wandb.finish()` can return before W&B's service process has written the log's last (partial) block;
    the run is complete once its `exit` record is readable."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if any(r.WhichOneof("record_type") == "exit" for r in wandb_records(path)):
            return
        time.sleep(0.5)
    raise AssertionError(f"{path}: no exit record after {timeout} s; the W&B run was not finished")


@pytest.mark.slow
def test_quickstart_logs_metrics_and_mask_panels_offline(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb-dir"))
    monkeypatch.setattr(sys, "argv", ["samlight"])
    monkeypatch.chdir(tmp_path)
    args = ["fit", "--config", default_config_path(), "--config", str(REPO / "configs" / "wandb.yaml")]
    try:
        run_cli(
            [
                *args,
                *SHORT_RUN,
                *own_demo_shards(tmp_path),
                f"--trainer.default_root_dir={tmp_path / 'runs'}",
            ]
        )
    finally:
        wandb.finish()  # flush the transaction log

    runs = sorted((tmp_path / "runs" / "wandb").glob("offline-run-*"))
    assert len(runs) == 1, f"expected one offline run under {tmp_path / 'runs' / 'wandb'}, found {runs}"
    run = runs[0]
    log = next(run.glob("run-*.wandb"))
    _wait_for_exit_record(log)
    rows = history(log)

    scalars = {k for row in rows for k, v in row.items() if isinstance(v, (int, float))}
    for key in (
        "train/loss",
        "train/loss_focal",
        "train/loss_dice",
        "train/loss_iou",
        "val/miou@1",
        "trainer/global_step",
    ):
        assert key in scalars, f"{key} not logged; scalars: {sorted(scalars)}"
    assert any(k.startswith("lr-") for k in scalars), "learning rate (LearningRateMonitor) not logged"
    assert "data/skipped/total" in scalars  # the data pipeline's counters (DataHealth)
    curves = [k for row in rows for k in row if k.startswith("val/miou_vs_clicks")]
    assert curves, f"no mIoU-vs-clicks chart; keys: {sorted({k for row in rows for k in row})}"

    for prompt in ("point", "box"):
        for stage in ("first_prompt", "last_click"):
            key = f"panels/{prompt}/{stage}"
            logged = [row[key] for row in rows if key in row]
            assert logged, f"{key} not logged"
            panel = logged[-1]
            assert panel["_type"] == "images/separated" and panel["count"] == 2
            assert all((run / "files" / name).is_file() for name in panel["filenames"])
            for masks in panel["all_masks"]:
                assert set(masks) == {"ground_truth", "prediction"}
                for layer in masks.values():
                    assert layer["_type"] == "mask" and (run / "files" / layer["path"]).is_file()
                labels = np.unique(np.asarray(Image.open(run / "files" / masks["ground_truth"]["path"])))
                assert labels[0] == 0 and 1 <= labels[-1] <= 3  # background + up to max_masks_per_image masks

    # The run's config is on W&B (config record) and as a file; the run directory sits beside it.
    config_keys = {
        item.key
        for r in wandb_records(next(run.glob("run-*.wandb")))
        if r.HasField("config")
        for item in r.config.update
    }
    assert {"trainer", "model", "data", "panels"} <= config_keys
    assert (run / "files" / "samlight-config.yaml").is_file()
    run_id = run.name.rsplit("-", 1)[1]
    run_dir = tmp_path / "runs" / "samlight" / run_id
    assert (run_dir / "config.yaml").is_file() and list((run_dir / "checkpoints").glob("*.ckpt"))
    assert not (run_dir / "panels").exists()  # with W&B the panels go to W&B, not to PNG files
