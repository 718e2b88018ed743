"""The first run convinces: `samlight fit` on its built-in quickstart learns visibly within its first 400 steps.

The whole quickstart (1200 steps, 169 s on 2 cores) reaches a held-out 1-click mIoU of 0.571; this test runs its
first 400 steps unchanged (the lr schedule depends only on the step, so they are the same steps) and checks the
figure printed at step 400 (measured 0.458). It fails on the cause found for issue 14: the same recipe on the old
demo scenes (3-8 freely occluding shapes, 16% of the masks in pieces) gives 0.136 at step 400 (measured with
demo.py of the previous commit; docs/training.md#the-quickstart).
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

from samlight.cli.main import main

QUICKSTART = Path(__file__).resolve().parents[1] / "configs" / "quickstart.yaml"
MIOU_LINE = re.compile(r"1-click mIoU \(point\) (?:before training|step (\d+)): ([0-9.]+)")


@pytest.mark.slow
def test_quickstart_learns_in_its_first_400_steps(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("SAMLIGHT_CACHE", str(tmp_path / "cache"))  # the demo set is written here, as on first use
    monkeypatch.setattr(sys, "argv", ["samlight"])
    code = main(
        [
            "fit",
            "--config",
            str(QUICKSTART),
            f"--trainer.default_root_dir={tmp_path / 'runs'}",
            "--trainer.max_steps=400",
            "--trainer.enable_progress_bar=false",
        ]
    )
    out = capsys.readouterr().out
    assert code in (0, None)
    curve = {int(step or 0): float(value) for step, value in MIOU_LINE.findall(out)}
    assert set(curve) == {0, 400}, out[-2000:]
    assert curve[0] < 0.1  # random init: prompts do not steer it yet
    assert curve[400] >= 0.40, curve  # measured 0.458; the old demo scenes: 0.136
