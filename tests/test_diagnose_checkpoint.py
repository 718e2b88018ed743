"""scripts/diagnose_checkpoint.py: the boundary-patch share of the wrong pixels (docs/training.md#what-06-takes)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "diagnose_checkpoint.py"


def _load():
    spec = importlib.util.spec_from_file_location("diagnose_checkpoint", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_boundary_error_share_counts_only_patches_a_boundary_crosses():
    share = _load().boundary_error_share
    gt = torch.zeros(2, 64, 64, dtype=torch.bool)
    gt[0, :32, :32] = True  # 4 whole 16 px patches: no boundary inside a patch
    gt[1, 8:24, 8:24] = True  # 16 x 16 px off the grid: 4 patches, each covered in part
    empty = torch.zeros_like(gt)
    assert share(empty[:1], gt[:1], 16) == 0.0
    assert share(empty[1:], gt[1:], 16) == 1.0
    assert abs(share(empty, gt, 16) - 256 / (1024 + 256)) < 1e-9
    # A prediction spilling into a whole patch outside the aligned square: a wrong pixel in a pure patch.
    spill = gt.clone()
    spill[0, 32:48, :16] = True
    assert abs(share(spill, gt, 16) - 0.0) < 1e-9
    assert share(gt, gt, 16) == 0.0  # nothing wrong
