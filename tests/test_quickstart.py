"""The quickstart config trains end to end through `samlight fit` (a few steps, on CPU, no download)."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

from samlight.cli.main import main

QUICKSTART = Path(__file__).resolve().parents[1] / "configs" / "quickstart.yaml"


@pytest.mark.slow
def test_quickstart_runs_a_few_steps(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("SAMLIGHT_CACHE", str(tmp_path / "cache"))  # the demo shards are written here
    monkeypatch.setattr(sys, "argv", ["samlight"])
    code = main(
        [
            "fit",
            "--config",
            str(QUICKSTART),
            f"--trainer.default_root_dir={tmp_path / 'runs'}",
            "--trainer.max_steps=3",
            "--trainer.val_check_interval=3",
            "--trainer.limit_val_batches=1",
            "--trainer.num_sanity_val_steps=1",
            "--data.init_args.batch_size=2",
            "--data.init_args.max_masks=4",
        ]
    )
    out = capsys.readouterr().out
    assert code == 0
    before = re.search(r"1-click mIoU \(point\) before training: ([0-9.]+)", out)
    summary = re.search(r"1-click mIoU ([0-9.]+) \(step 0\) -> ([0-9.]+) \(step 3\)", out)
    assert before and summary, out[-2000:]
    assert 0.0 <= float(summary.group(2)) <= 1.0
    assert list((tmp_path / "runs").rglob("*.ckpt")), "no checkpoint written"
    # The run ends by naming the folder of its last mask panels, so a first-time user can look at the masks.
    panels = re.search(r"samlight: mask panels \((\d+) PNGs: .*\) in (\S+)\n", out)
    assert panels, out[-2000:]
    folder = Path(panels.group(2))
    assert folder.parent.name == "panels" and folder.name == "step_3", folder
    assert len(list(folder.glob("*.png"))) == int(panels.group(1)) > 0
