"""The quickstart config trains end to end through `samlight fit` (on CPU, no download), and its first run convinces.

The whole quickstart (750 steps, 174 s on 2 cores) reaches a held-out 1-click mIoU of 0.535.
`test_quickstart_recipe_learns_within_400_steps` runs the same recipe for 400 steps (its cosine lr then falls to 0 at
step 400 instead of 750) and checks the figure printed at step 400 (measured 0.454). It fails on the
cause found for issue 14: the same recipe on the old demo scenes (3-8 freely occluding shapes, 16% of the masks in
pieces) gives 0.136 at step 400 (measured with demo.py of the previous commit; docs/training.md#the-quickstart).
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

from samlight.cli.main import main
from tests._quickstart import printed_miou_curve

QUICKSTART = Path(__file__).resolve().parents[1] / "configs" / "quickstart.yaml"


def run_quickstart(tmp_path, monkeypatch, capsys, overrides: list[str]) -> str:
    """`samlight fit --config configs/quickstart.yaml OVERRIDES` in-process, as on first use; returns stdout."""
    monkeypatch.setenv("SAMLIGHT_CACHE", str(tmp_path / "cache"))  # the demo shards are written here
    monkeypatch.setattr(sys, "argv", ["samlight"])
    code = main(
        ["fit", "--config", str(QUICKSTART), f"--trainer.default_root_dir={tmp_path / 'runs'}", *overrides]
    )
    out = capsys.readouterr().out
    assert code in (0, None), out[-2000:]
    return out


@pytest.mark.slow
def test_quickstart_recipe_learns_within_400_steps(tmp_path, monkeypatch, capsys):
    out = run_quickstart(
        tmp_path,
        monkeypatch,
        capsys,
        [
            "--trainer.max_steps=400",
            "--trainer.val_check_interval=400",
            "--trainer.enable_progress_bar=false",
        ],
    )
    curve = printed_miou_curve(out)
    assert set(curve) == {0, 400}, out[-2000:]
    assert curve[0] < 0.1  # random init: prompts do not steer it yet
    assert curve[400] >= 0.40, curve  # measured 0.454; the old demo scenes: 0.136 (step decay)


@pytest.mark.slow
def test_quickstart_runs_a_few_steps(tmp_path, monkeypatch, capsys):
    out = run_quickstart(
        tmp_path,
        monkeypatch,
        capsys,
        [
            "--trainer.max_steps=3",
            "--trainer.val_check_interval=3",
            "--trainer.limit_val_batches=1",
            "--trainer.num_sanity_val_steps=1",
            "--data.init_args.batch_size=2",
            "--data.init_args.max_masks=4",
        ],
    )
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
