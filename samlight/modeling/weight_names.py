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


# ---------------------------------------------------------------------------------- encoder-only weights
# Keys of an MAE / timm ViT that SAM's image encoder has no place for: the class, distillation and register
# tokens, the final norm and the classifier, and MAE's pre-training decoder (`decoder_*`, `mask_token`).
_VIT_ONLY = re.compile(
    r"^(cls_token|dist_token|reg_token|mask_token|norm\.|fc_norm\.|head\.|head_drop\.|decoder_)"
)


def vit_prefix_tokens(state_dict: Mapping[str, Tensor]) -> int:
    """How many prefix tokens (class, distillation, register) a ViT's 1 x L x D `pos_embed` starts with.

    Only tokens that have a position embedding of their own count: timm's `no_embed_class` models keep
    the class token out of `pos_embed`, and then L is a square without it (the caller checks).
    """
    count = int("cls_token" in state_dict) + int("dist_token" in state_dict)
    if "reg_token" in state_dict:
        count += int(state_dict["reg_token"].shape[1])
    return count


def encoder_only_to_official(
    state_dict: Mapping[str, Tensor], *, source: str
) -> tuple[dict[str, Tensor], list[str]]:
    """Image-encoder weights from an encoder-only file, under the official `image_encoder.*` names.

    Accepts an `image_encoder.*` subset of a SAM checkpoint, a timm `samvit_*` state dict, or a plain ViT
    (MAE pre-training, timm `vit_*`) whose blocks share SAM's names (`blocks.N.attn.qkv`, `mlp.fc1` ...).
    Shapes are left as they are (`load_encoder_weights` resizes position embeddings).

    Returns:
        (state dict with `image_encoder.` keys, the ViT-only keys left out, e.g. `cls_token`, `norm.weight`).
    """
    others = sorted(
        {k.split(".", 1)[0] for k in state_dict if k.startswith(("prompt_encoder.", "mask_decoder."))}
    )
    if others:
        raise ValueError(
            f"{source} is a full SAM checkpoint (it has {', '.join(others)} weights): load it with "
            "model.checkpoint, not model.encoder_checkpoint, which initialises the image encoder only"
        )
    if any(k.startswith("image_encoder.") for k in state_dict):
        outside = [k for k in state_dict if not k.startswith("image_encoder.")]
        if outside:
            raise ValueError(f"{source} mixes image_encoder.* keys with others: {outside[:10]}")
        return dict(state_dict), []
    dropped = sorted(k for k in state_dict if _VIT_ONLY.match(k))
    kept = {f"image_encoder.{k}": v for k, v in state_dict.items() if not _VIT_ONLY.match(k)}
    return timm_to_official(kept), dropped
