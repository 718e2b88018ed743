"""Prompt plugins (point, box, mask, text) and corrective-click simulation.

Each prompt type is one small class in its own file whose `sample(gt_masks, ...)` returns `Prompts`.
"""

from samlight.prompts.types import Prompts

__all__ = ["Prompts"]
