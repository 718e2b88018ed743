"""Datamodules: SA-1B WebDataset streaming, fine-tuning datasets and shard tools."""

from __future__ import annotations

from importlib import import_module
from typing import Any

# Lazy, so `samlight data ...` and data workers do not import Lightning unless they need the datamodule.
# Add a name here as "Name": "samlight.datamodules.module".
_EXPORTS = {
    "SA1BDataModule": "samlight.datamodules.sa1b",
    "SegmentationBatch": "samlight.datamodules.batch",
    "make_demo_shards": "samlight.datamodules.demo",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'samlight.datamodules' has no attribute {name!r}")
