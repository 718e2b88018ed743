"""samlight: train and fine-tune the Segment Anything Model with PyTorch Lightning."""

from __future__ import annotations

from importlib import import_module
from typing import Any

__version__ = "0.1.0"

# Public names resolve lazily so `import samlight` stays cheap (the CLI and data workers import it)
# and optional heavy parts load only when used.
_EXPORTS = {
    "Sam": "samlight.modeling.sam",
    "build_sam": "samlight.modeling.build",
    "save_official": "samlight.modeling.checkpoint",
    "load_state_dict": "samlight.modeling.checkpoint",
    "SamPredictor": "samlight.inference.predictor",
    "SamAutomaticMaskGenerator": "samlight.inference.automatic_mask_generator",
    "SamModule": "samlight.training.module",
    "SamLoss": "samlight.training.loss",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'samlight' has no attribute {name!r}")
