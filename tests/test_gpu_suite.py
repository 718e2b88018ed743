"""bench/gpu_suite.py runs end to end in its CPU smoke mode (the GPU run uses the same code)."""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path

import pytest

SUITE = Path(__file__).resolve().parents[1] / "bench" / "gpu_suite.py"


@pytest.mark.filterwarnings("ignore:.*self.trainer", "ignore:You are trying to `self.log")
def test_smoke_mode_prints_a_measured_row_per_configuration(capsys, monkeypatch):
    spec = importlib.util.spec_from_file_location("gpu_suite", SUITE)
    suite = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "gpu_suite", suite)  # its dataclasses look their module up there
    spec.loader.exec_module(suite)
    assert suite.main(["--smoke"]) == 0
    out = capsys.readouterr().out
    rows = {m.group(1): float(m.group(2)) for m in re.finditer(r"^(tiny .*?ckpt=o\w+)\s+([\d.]+)\s", out, re.M)}
    assert set(rows) == {"tiny compile=off ckpt=off", "tiny compile=off ckpt=on"}
    assert all(v > 0 for v in rows.values())  # images/s actually measured
    assert re.search(r"^AMG \(tiny\): ", out, re.M)
