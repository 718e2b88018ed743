"""Every run that ends leaves a loadable last.ckpt; `--ckpt_path last` never restarts from zero while a checkpoint
exists; a checkpoint is enough to resume (the start weights may be gone); a resumed run trains on the same images
as an uninterrupted one (2 workers); the progress bar of a step-based run."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from samlight import build_sam, save_official
from tests._quickstart import own_demo_shards
from tests._scale import QUICKSTART, check, checkpoint_meta, env, recorded, samlight, tiny_run_config

FAST = [
    "--trainer.num_sanity_val_steps=0",
    "--trainer.enable_progress_bar=false",
    "--trainer.enable_model_summary=false",
    "--data.init_args.num_workers=0",
]


@pytest.mark.slow
def test_a_max_steps_run_leaves_a_loadable_last_ckpt(tmp_path: Path) -> None:
    """The issue's command: the quickstart with --trainer.max_steps=4 (no validation or epoch end lands on it)."""
    args = [
        "fit",
        "--config",
        str(QUICKSTART),
        "--trainer.max_steps=4",
        f"--trainer.default_root_dir={tmp_path}",
    ]
    check(samlight(args + FAST + own_demo_shards(tmp_path), environ=env(tmp_path / "cache")))
    last = tmp_path / "quickstart" / "version_0" / "checkpoints" / "last.ckpt"
    assert last.is_file(), sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*.ckpt"))
    assert checkpoint_meta(last)["global_step"] == 4
    from samlight.training.module import SamModule

    module = SamModule.load_from_checkpoint(last, map_location="cpu", weights_only=True)
    saved = torch.load(last, map_location="cpu", weights_only=True)["state_dict"]
    assert torch.equal(
        module.state_dict()["model.mask_decoder.iou_token.weight"],
        saved["model.mask_decoder.iou_token.weight"],
    )
    assert not list(last.parent.glob(".*")), "no temp files left"


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGUSR1], ids=["Ctrl-C", "SIGUSR1"])
def test_a_signalled_run_saves_its_final_step(tmp_path: Path, signum: int) -> None:
    ckpts = tmp_path / "ckpts"
    config = tiny_run_config(tmp_path, ckpt_dir=ckpts, max_steps=500)  # no PreemptionCheckpoint in the config
    cmd = [
        sys.executable,
        "-m",
        "samlight.cli.main",
        "fit",
        "--config",
        str(QUICKSTART),
        "--config",
        str(config),
    ]
    proc = subprocess.Popen(
        cmd, env=env(tmp_path / "cache"), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    try:
        deadline = time.monotonic() + 180
        while not (ckpts / "last.ckpt").exists():
            assert proc.poll() is None, f"training exited early:\n{proc.stdout.read()[-4000:]}"
            assert time.monotonic() < deadline, "no checkpoint within 180 s"
            time.sleep(0.5)
        proc.send_signal(signum)
        output, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    name = signal.Signals(signum).name
    assert f"{name} received; saved" in output, output[-4000:]
    step = int(output.split(f"{name} received; saved")[1].split("at step ")[1].split(".")[0])
    assert checkpoint_meta(ckpts / "last.ckpt")["global_step"] == step >= 1


@pytest.mark.slow
def test_resume_needs_only_the_checkpoint_and_falls_back_to_an_older_one(tmp_path: Path) -> None:
    start = tmp_path / "start.pth"
    save_official(build_sam("tiny"), start)
    ckpts = tmp_path / "ckpts"
    environ = env(tmp_path / "cache")

    def fit(max_steps: int, *extra: str) -> subprocess.CompletedProcess:
        config = tiny_run_config(tmp_path, ckpt_dir=ckpts, max_steps=max_steps)
        args = ["fit", "--config", str(QUICKSTART), "--config", str(config), f"--model.checkpoint={start}"]
        return samlight(args + list(extra), environ=environ)

    check(fit(2))
    start.unlink()  # item 4: the weights the run started from are gone
    check(fit(3, "--ckpt_path=last"))
    assert checkpoint_meta(ckpts / "last.ckpt")["global_step"] == 3

    # item 3: a truncated last.ckpt; the older step checkpoint is used, not a fresh start
    older = next(p for p in ckpts.glob("*.ckpt") if p.name != "last.ckpt")
    data = (ckpts / "last.ckpt").read_bytes()
    (ckpts / "last.ckpt").write_bytes(data[: len(data) // 2])
    result = fit(4, "--ckpt_path=last")
    check(result)
    assert f"resuming from {older}" in result.stdout + result.stderr
    assert checkpoint_meta(ckpts / "last.ckpt")["global_step"] == 4

    # nothing loadable: stop and say so, unless a fresh start is asked for
    for ckpt in ckpts.glob("*.ckpt"):
        ckpt.write_bytes(b"not a checkpoint")
    refused = fit(5, "--ckpt_path=last")
    assert refused.returncode != 0
    assert "no loadable checkpoint" in refused.stderr and "--allow_fresh_start" in refused.stderr
    save_official(build_sam("tiny"), start)  # a fresh start begins from the start weights again
    check(fit(1, "--ckpt_path=last", "--allow_fresh_start=true"))
    assert checkpoint_meta(ckpts / "last.ckpt")["global_step"] == 1


@pytest.mark.slow
def test_a_resumed_run_trains_on_the_images_of_the_uninterrupted_run(tmp_path: Path) -> None:
    """Kill (here: stop) at step 3 of 4-step epochs with 2 workers, resume to step 7: the same images, in the same
    order and with the same masks drawn, as one run of 7 steps."""
    environ = env(tmp_path / "cache")
    data = {"num_workers": 2, "batches_per_epoch": 4, "batch_size": 2}

    def fit(name: str, max_steps: int, *extra: str) -> None:
        config = tiny_run_config(
            tmp_path,
            ckpt_dir=tmp_path / name,
            max_steps=max_steps,
            record=tmp_path / f"rec-{name}",
            data=data,
            name=name,
        )
        check(
            samlight(
                [
                    "fit",
                    "--config",
                    str(QUICKSTART),
                    "--config",
                    str(config),
                    *extra,
                    *own_demo_shards(tmp_path),
                ],
                environ=environ,
            )
        )

    fit("full", 7)
    fit("cut", 3)
    fit("cut", 7, "--ckpt_path=last")
    full = [(r["keys"], r["annotations"]) for r in recorded(tmp_path / "rec-full") if r["stage"] == "train"]
    cut = [(r["keys"], r["annotations"]) for r in recorded(tmp_path / "rec-cut") if r["stage"] == "train"]
    assert len(full) == 7 and len(cut) == 7
    assert cut == full


def test_progress_bar_of_a_step_based_run_names_no_negative_epoch() -> None:
    from samlight.callbacks.progress import SamlightProgressBar

    class FakeTrainer:
        max_epochs, max_steps, global_step = -1, 600, 550

    bar = SamlightProgressBar()
    bar._trainer = FakeTrainer()
    description = bar._get_train_description(11)
    assert "-" not in description and "/-" not in description
    assert description.startswith("Epoch 11")
    FakeTrainer.max_epochs = 3
    assert bar._get_train_description(1).startswith("Epoch 1/2")


@pytest.mark.slow
def test_the_loss_reaches_the_progress_bar_only_at_logging_steps(tmp_path: Path) -> None:
    """`prog_bar=True` on a per-step tensor makes Lightning call `.item()` on it every step (a host sync on GPU);
    the bar must read the loss only at `log_every_n_steps`."""
    import lightning.pytorch as pl

    from samlight.callbacks.progress import SamlightProgressBar
    from samlight.datamodules import SA1BDataModule
    from samlight.datamodules.demo import make_demo_shards
    from samlight.training.module import SamModule

    train, _ = make_demo_shards(tmp_path / "demo", num_train=4, num_val=2, samples_per_shard=2)
    dm = SA1BDataModule(train, batch_size=1, num_workers=0, image_size=256, max_masks=2, batches_per_epoch=6)
    bar = SamlightProgressBar()
    reads = []
    original = bar.get_metrics

    def spy(trainer, pl_module):
        items = original(trainer, pl_module)
        reads.append((trainer.global_step, items.get("loss")))
        return items

    bar.get_metrics = spy
    trainer = pl.Trainer(
        max_steps=6, log_every_n_steps=3, callbacks=[bar], logger=False, enable_checkpointing=False,
        num_sanity_val_steps=0, limit_val_batches=0, accelerator="cpu", enable_model_summary=False,
    )  # fmt: skip
    trainer.fit(SamModule(variant="tiny"), datamodule=dm)
    assert not any(key.startswith("train/") for key in trainer.progress_bar_metrics), (
        trainer.progress_bar_metrics
    )
    shown = {step: loss for step, loss in reads if loss is not None}
    values = sorted(set(shown.values()))
    assert 1 <= len(values) <= 2, shown  # updated at steps 3 and 6 only, not at every step
    assert all(isinstance(v, str) for v in values)


@pytest.mark.parametrize("config", ["quickstart.yaml", "sa1b_vit_b.yaml", "finetune_medical.yaml"])
def test_every_config_writes_atomically_and_saves_when_the_run_ends(config: str, tmp_path: Path) -> None:
    from lightning.pytorch import LightningDataModule

    from samlight.callbacks.preemption import PreemptionCheckpoint
    from samlight.cli.train import SamlightCLI
    from samlight.scale.checkpoint_io import AtomicCheckpointIO
    from samlight.training.module import SamModule

    args = [
        "--config", str(QUICKSTART.parent / config),
        "--model.variant=tiny", "--model.checkpoint=null", "--model.model_overrides={}",
        "--trainer.accelerator=cpu", "--trainer.devices=1", "--trainer.precision=32-true",
        f"--trainer.default_root_dir={tmp_path}", "--trainer.logger=false",
    ]  # fmt: skip
    cli = SamlightCLI(SamModule, LightningDataModule, subclass_mode_data=True, args=args, run=False)
    assert isinstance(cli.trainer.strategy.checkpoint_io, AtomicCheckpointIO)
    assert sum(isinstance(c, PreemptionCheckpoint) for c in cli.trainer.callbacks) == 1


def test_start_weights_are_deferred_while_restoring_and_loaded_when_nothing_is_restored(
    tmp_path: Path,
) -> None:
    from samlight.training.module import SamModule, initial_weights_deferred

    start = tmp_path / "start.pth"
    reference = build_sam("tiny")
    save_official(reference, start)
    key = "mask_decoder.iou_token.weight"
    with initial_weights_deferred():
        module = SamModule(variant="tiny", checkpoint=str(start))
    assert not torch.equal(module.model.state_dict()[key], reference.state_dict()[key])
    module.load_start_weights()  # e.g. `--ckpt_path last` on a first run: nothing to restore
    assert torch.equal(module.model.state_dict()[key], reference.state_dict()[key])
    assert torch.equal(
        SamModule(variant="tiny", checkpoint=str(start)).model.state_dict()[key], reference.state_dict()[key]
    )
