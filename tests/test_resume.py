"""FSDP2 on CPU through the CLI: train with 2 processes, write a sharded checkpoint, resume it (same and other
world size), export it to the official layout; and a SIGTERM-killed run that resumes where it stopped."""

from __future__ import annotations

import csv
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp

from samlight import build_sam, save_official
from samlight.modeling.sharded_checkpoint import load_full_state_dict
from tests._scale import FSDP, QUICKSTART, check, checkpoint_meta, env, free_port, samlight, tiny_run_config

pytestmark = pytest.mark.slow


def _optimizer_step_count(ckpt: Path) -> float:
    """AdamW's `step` of one parameter, read from the sharded optimizer state."""
    metadata = dcp.FileSystemReader(str(ckpt)).read_metadata()
    key = next(
        k for k in metadata.state_dict_metadata if k.startswith("optimizer_0.state.") and k.endswith(".step")
    )
    state = {key: torch.zeros(())}
    dcp.load(state, storage_reader=dcp.FileSystemReader(str(ckpt)), no_dist=True)
    return float(state[key])


def _fsdp_args(config: Path, devices: int, *extra: str) -> list[str]:
    return [
        "fit",
        "--config", str(QUICKSTART),
        "--config", str(FSDP),
        "--config", str(config),
        "--trainer.accelerator=cpu",
        f"--trainer.devices={devices}",
        "--trainer.precision=32-true",
        *extra,
    ]  # fmt: skip


@pytest.fixture(scope="module")
def fsdp_run(tmp_path_factory) -> dict:
    """2-process FSDP2 run of 2 steps, then resumed with `--ckpt_path last` to step 4."""
    tmp = tmp_path_factory.mktemp("fsdp")
    ckpts = tmp / "ckpts"
    environ = env(tmp / "cache", MASTER_PORT=str(free_port()))
    check(samlight(_fsdp_args(tiny_run_config(tmp, ckpt_dir=ckpts, max_steps=2), 2), environ=environ))
    first = {
        "step": checkpoint_meta(ckpts / "last.ckpt")["global_step"],
        "adam": _optimizer_step_count(ckpts / "last.ckpt"),
    }
    first_weights = load_full_state_dict(ckpts / "last.ckpt")["state_dict"]
    environ["MASTER_PORT"] = str(free_port())
    resumed = samlight(
        _fsdp_args(tiny_run_config(tmp, ckpt_dir=ckpts, max_steps=4), 2, "--ckpt_path=last"), environ=environ
    )
    check(resumed)
    return {"tmp": tmp, "ckpts": ckpts, "first": first, "first_weights": first_weights, "environ": environ}


def test_sharded_checkpoint_resumes_at_the_right_step(fsdp_run: dict) -> None:
    ckpt = fsdp_run["ckpts"] / "last.ckpt"
    assert ckpt.is_dir() and len(list(ckpt.glob("*.distcp"))) == 2, "expected one shard file per rank"
    assert fsdp_run["first"] == {"step": 2, "adam": 2.0}
    meta = checkpoint_meta(ckpt)
    assert meta["global_step"] == 4
    # Optimizer and scheduler state came back: a fresh start would count 2 steps, not 4.
    assert _optimizer_step_count(ckpt) == 4.0
    assert meta["lr_schedulers"][0]["last_epoch"] == 4
    # No half-written leftovers from the atomic save.
    assert not list(fsdp_run["ckpts"].glob(".*"))
    # The Throughput callback logged from the FSDP run (CSV logger of the run directory).
    rows = [r for f in (fsdp_run["tmp"] / "runs").rglob("metrics.csv") for r in csv.DictReader(f.open())]
    rates = [float(r["throughput/images_per_sec"]) for r in rows if r.get("throughput/images_per_sec")]
    assert rates and all(rate > 0 for rate in rates)


def test_export_of_sharded_checkpoint_matches_single_process_layout(fsdp_run: dict, tmp_path: Path) -> None:
    out = tmp_path / "sam_tiny.pth"
    result = subprocess.run(
        [sys.executable, "-m", "samlight.cli.main", "export", "--ckpt", str(fsdp_run["ckpts"] / "last.ckpt"), "--out", str(out)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    check(result)
    exported = torch.load(out, map_location="cpu", weights_only=True)
    reference_file = tmp_path / "single_process.pth"
    save_official(build_sam("tiny"), reference_file)
    reference = torch.load(reference_file, map_location="cpu", weights_only=True)
    assert {k: v.shape for k, v in exported.items()} == {k: v.shape for k, v in reference.items()}
    # Full tensors with trained values: they moved away from the weights saved after step 2.
    before = fsdp_run["first_weights"]["model.mask_decoder.iou_token.weight"]
    assert not torch.equal(exported["mask_decoder.iou_token.weight"], before)


def test_resume_at_another_world_size_reshards(fsdp_run: dict) -> None:
    """The 2-rank sharded checkpoint resumes in 1 process (DCP reshards model and optimizer state)."""
    tmp, ckpts = fsdp_run["tmp"], fsdp_run["ckpts"]
    config = tiny_run_config(tmp, ckpt_dir=ckpts, max_steps=5)
    check(samlight(_fsdp_args(config, 1, "--ckpt_path=last"), environ=fsdp_run["environ"]))
    assert checkpoint_meta(ckpts / "last.ckpt")["global_step"] == 5
    assert _optimizer_step_count(ckpts / "last.ckpt") == 5.0


def test_sigterm_saves_and_resume_continues(tmp_path: Path) -> None:
    """Kill a single-process run with SIGTERM after a checkpoint; it saves last.ckpt and resumes from there."""
    ckpts = tmp_path / "ckpts"
    environ = env(tmp_path / "cache")
    long_run = tiny_run_config(tmp_path, ckpt_dir=ckpts, max_steps=500, preemption=True)
    cmd = [
        sys.executable,
        "-m",
        "samlight.cli.main",
        "fit",
        "--config",
        str(QUICKSTART),
        "--config",
        str(long_run),
    ]
    proc = subprocess.Popen(cmd, env=environ, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 180
        while not (ckpts / "last.ckpt").exists():
            assert proc.poll() is None, f"training exited early:\n{proc.stdout.read()[-4000:]}"
            assert time.monotonic() < deadline, "no checkpoint within 180 s"
            time.sleep(0.5)
        proc.send_signal(signal.SIGTERM)
        output, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert "SIGTERM received; saved" in output, output[-4000:]
    stopped_at = checkpoint_meta(ckpts / "last.ckpt")["global_step"]
    assert 1 <= stopped_at < 500
    resume = tiny_run_config(tmp_path, ckpt_dir=ckpts, max_steps=stopped_at + 2, preemption=True)
    result = samlight(
        ["fit", "--config", str(QUICKSTART), "--config", str(resume), "--ckpt_path=last"], environ=environ
    )
    check(result)
    meta = checkpoint_meta(ckpts / "last.ckpt")
    assert meta["global_step"] == stopped_at + 2
    assert meta["lr_schedulers"][0]["last_epoch"] == stopped_at + 2


def test_atomic_save_keeps_the_old_checkpoint_when_a_write_fails(tmp_path: Path, monkeypatch) -> None:
    from samlight.scale import checkpoint_io
    from samlight.scale.checkpoint_io import AtomicCheckpointIO

    path = tmp_path / "last.ckpt"
    io = AtomicCheckpointIO()
    io.save_checkpoint({"global_step": 1}, path)

    def crash(obj, handle):
        handle.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(checkpoint_io.torch, "save", crash)
    with pytest.raises(OSError, match="disk full"):
        io.save_checkpoint({"global_step": 2}, path)
    assert torch.load(path, weights_only=True) == {"global_step": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]  # no temp file left


def test_sharded_swap_replaces_a_directory(tmp_path: Path) -> None:
    from samlight.scale.strategy import _swap_in

    target, new = tmp_path / "last.ckpt", tmp_path / ".last.ckpt.partial"
    target.mkdir()
    (target / "old").write_text("1")
    new.mkdir()
    (new / "fresh").write_text("2")
    _swap_in(new, target)
    assert [p.name for p in target.iterdir()] == ["fresh"]
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]


def test_fsdp_validation_over_an_odd_number_of_images_finishes_and_counts_each_once(tmp_path: Path) -> None:
    """3 validation images on 2 FSDP ranks: rank 0 holds 2 batches, rank 1 one. Every validation step all-gathers
    the encoder, so unequal step counts hang; rank 1 must run a weight-0 padding step instead."""
    import numpy as np

    from samlight.datamodules.tools.shards import SA1BShardWriter
    from tests._scale import recorded

    rng = np.random.default_rng(0)
    with SA1BShardWriter(tmp_path / "val", max_samples=1) as writer:
        for i in range(3):
            masks = np.zeros((2, 48, 64), bool)
            masks[0, :20], masks[1, :, :30] = True, True
            writer.write(f"val_{i}", rng.integers(0, 255, size=(48, 64, 3), dtype=np.uint8), masks=masks)
    record = tmp_path / "record"
    config = tiny_run_config(
        tmp_path,
        ckpt_dir=tmp_path / "ckpts",
        max_steps=1,
        record=record,
        data={"val_urls": [str(p) for p in writer.shards]},
        trainer={"limit_val_batches": 1.0, "val_check_interval": 1},
    )
    environ = env(tmp_path / "cache", MASTER_PORT=str(free_port()))
    try:
        result = samlight(_fsdp_args(config, 2), environ=environ, timeout=240)
    except subprocess.TimeoutExpired as exn:
        pytest.fail(f"FSDP validation hung (no exit within {exn.timeout:.0f} s)")
    check(result)
    val = [r for r in recorded(record) if r["stage"] == "val"]
    steps = {rank: sum(1 for r in val if r["rank"] == rank) for rank in (0, 1)}
    assert steps == {0: 2, 1: 2}, steps
    real = sorted(k for r in val if not r["padding"] for k in r["keys"])
    assert real == ["val_0", "val_1", "val_2"]
    assert sum(r["padding"] for r in val) == 1


def test_sharded_swap_has_no_moment_without_a_checkpoint(tmp_path: Path, monkeypatch) -> None:
    """A kill between the renames of a sharded swap must still leave a complete `last.ckpt`."""
    from samlight.scale.strategy import _swap_in

    target, new = tmp_path / "last.ckpt", tmp_path / ".last.ckpt.partial"
    target.mkdir()
    (target / "old").write_text("1")
    new.mkdir()
    (new / "fresh").write_text("2")
    real_rename = Path.rename
    renames = []

    def rename_then_die(self: Path, destination):
        renames.append((self.name, Path(destination).name))
        if len(renames) == 2:
            raise KeyboardInterrupt("killed between the two renames")
        return real_rename(self, destination)

    monkeypatch.setattr(Path, "rename", rename_then_die)
    try:
        _swap_in(new, target)
    except KeyboardInterrupt:
        pass
    assert target.is_dir() and ((target / "fresh").exists() or (target / "old").exists()), renames
