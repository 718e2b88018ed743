"""Prompt plugins (point, box, mask, text) and corrective-click simulation.

Each prompt type is one small class in its own file whose `sample(gt_masks, ...)` returns `Prompts`.
"""

from samlight.prompts.base import (
    PromptContext,
    PromptType,
    available_prompt_types,
    check_prompts,
    resolve_prompt_type,
)
from samlight.prompts.box import BoxPrompt
from samlight.prompts.clicks import CorrectiveClicks
from samlight.prompts.mask import MaskPrompt
from samlight.prompts.point import PointPrompt
from samlight.prompts.text import TextPrompt
from samlight.prompts.types import Prompts

__all__ = [
    "BoxPrompt",
    "CorrectiveClicks",
    "MaskPrompt",
    "PointPrompt",
    "PromptContext",
    "PromptType",
    "Prompts",
    "TextPrompt",
    "available_prompt_types",
    "check_prompts",
    "resolve_prompt_type",
]
