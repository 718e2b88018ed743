"""The one weight-name filter: every translation of foreign state-dict names into the official SAM layout.

samlight's modules carry the official parameter names, so official checkpoints load with no renaming. The
filters here handle the other sources: a `model.` / `module.` / `_orig_mod.` prefix, timm-named image-encoder
keys (timm's `samvit_*` weights), and peft LoRA adapters folded back into plain weights.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

from torch import Tensor

SAM_PARTS = ("image_encoder.", "prompt_encoder.", "mask_decoder.")

# (timm pattern, official replacement) for image-encoder keys: timm names the block MLP fc1/fc2.
_TIMM_TO_OFFICIAL = [(re.compile(r"(blocks\.\d+\.mlp\.)fc([12])\."), r"\1lin\2.")]
_OFFICIAL_TO_TIMM = [(re.compile(r"(blocks\.\d+\.mlp\.)lin([12])\."), r"\1fc\2.")]


def _rename(key: str, rules: list[tuple[re.Pattern[str], str]]) -> str:
    for pattern, replacement in rules:
        key = pattern.sub(replacement, key)
    return key


def timm_to_official(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Rename timm `VisionTransformerSAM` keys (`blocks.N.mlp.fc1.weight`) to official ones (`...mlp.lin1...`).

    Works with or without the `image_encoder.` prefix; keys that need no renaming pass through.
    """
    return {_rename(k, _TIMM_TO_OFFICIAL): v for k, v in state_dict.items()}


def official_to_timm(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Inverse of `timm_to_official`: official image-encoder keys to timm's names."""
    return {_rename(k, _OFFICIAL_TO_TIMM): v for k, v in state_dict.items()}


def strip_sam_prefix(state_dict: Mapping[str, Tensor], *, source: str) -> dict[str, Tensor]:
    """Drop the common prefix in front of the SAM parts (`model.`, `module.`, `_orig_mod.` ...) and any key
    outside them (e.g. a loss buffer of a training checkpoint); a state dict with no prefix passes unchanged.
    """
    pattern = re.compile(r"^(.*?)(?:" + "|".join(re.escape(p) for p in SAM_PARTS) + ")")
    prefixes = {m.group(1) for k in state_dict if (m := pattern.match(k))}
    if len(prefixes) > 1 and "" not in prefixes:
        raise ValueError(
            f"Checkpoint {source} holds several SAM models under the prefixes {sorted(prefixes)}; keep the keys "
            "of one of them, with that prefix removed, and save those"
        )
    prefix = prefixes.pop() if len(prefixes) == 1 else ""
    if not prefix:
        return dict(state_dict)
    return {k[len(prefix) :]: v for k, v in state_dict.items() if k.startswith(prefix)}


def has_lora(state_dict: Mapping[str, Tensor]) -> bool:
    return any(".lora_A." in key for key in state_dict)


def merge_lora(state_dict: Mapping[str, Tensor], *, r: int = 8, alpha: float = 16.0, **_) -> dict[str, Tensor]:
    """Fold peft LoRA adapters into plain encoder weights (W + alpha / r * B @ A) under the official names.

    `r` and `alpha` are the run's `lora` settings (SamModule / apply_lora defaults r=8, alpha=16); other keys
    of that setting (target modules, dropout) do not change the merged weights.
    """
    scale = float(alpha) / float(r)
    merged = {}
    for key, value in state_dict.items():
        if ".lora_A." in key or ".lora_B." in key:
            continue
        if key.endswith(".base_layer.weight"):
            prefix = key[: -len(".base_layer.weight")]
            down, up = state_dict[f"{prefix}.lora_A.default.weight"], state_dict[f"{prefix}.lora_B.default.weight"]
            value = value + (scale * up.float() @ down.float()).to(value.dtype)
        name = key.replace("image_encoder.base_model.model.", "image_encoder.").replace(".base_layer.", ".")
        merged[name] = value
    return merged
