"""Shared pytest fixtures: deterministic seeds and a tiny SAM. Add fixtures here with small, surgical edits."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch


@pytest.fixture(autouse=True)
def _seed() -> None:
    """Every test starts from the same random state, so failures reproduce."""
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)


@pytest.fixture
def tiny_sam():
    """A freshly built `tiny` Sam (256 px input, ~0.2M parameters), random init, eval mode."""
    from samlight import build_sam

    return build_sam("tiny").eval()


def pytest_collection_modifyitems(config, items) -> None:
    """Tests marked `gpu` need CUDA: without it they are skipped (with the reason), never failed."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (marked gpu)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def trained_tiny_checkpoint(tmp_path_factory):
    """Official-layout weights of a `tiny` SAM whose decoder learnt synthetic shapes (tests/_trained.py), once
    per session: the automatic mask generator and data engine tests need a model that finds distinct objects."""
    from samlight import save_official
    from tests._trained import train_tiny

    return save_official(train_tiny(), tmp_path_factory.mktemp("trained") / "tiny_trained.pth")
