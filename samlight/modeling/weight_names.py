"""The one weight-name filter: every translation of foreign state-dict names into the official SAM layout.

samlight's modules carry the official parameter names, so official checkpoints load with no renaming. The
filters here handle the other sources: a `model.` / `module.` / `_orig_mod.` prefix, timm-named image-encoder
keys (timm's `samvit_*` weights), Hugging Face transformers `SamModel` keys (both directions), and peft LoRA
adapters folded back into plain weights.
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


# -- Hugging Face transformers SamModel ---------------------------------------------------------------------
# (official prefix, HF prefix) pairs; `#` stands for a block index. The first pair whose prefix matches a key
# renames it, so the specific pairs come before the catch-all part renames. Each side is unique, which makes
# the table its own inverse. Facts from transformers' modeling_sam.py (module names) and the SAM conversion.
_HF_PAIRS = [
    ("image_encoder.patch_embed.proj.", "vision_encoder.patch_embed.projection."),
    ("image_encoder.blocks.#.norm", "vision_encoder.layers.#.layer_norm"),
    ("image_encoder.blocks.#.", "vision_encoder.layers.#."),
    ("image_encoder.neck.0.", "vision_encoder.neck.conv1."),
    ("image_encoder.neck.1.", "vision_encoder.neck.layer_norm1."),
    ("image_encoder.neck.2.", "vision_encoder.neck.conv2."),
    ("image_encoder.neck.3.", "vision_encoder.neck.layer_norm2."),
    ("image_encoder.pos_embed", "vision_encoder.pos_embed"),
    ("prompt_encoder.pe_layer.positional_encoding_gaussian_matrix", "shared_image_embedding.positional_embedding"),
    ("prompt_encoder.point_embeddings.", "prompt_encoder.point_embed."),
    ("prompt_encoder.mask_downscaling.0.", "prompt_encoder.mask_embed.conv1."),
    ("prompt_encoder.mask_downscaling.1.", "prompt_encoder.mask_embed.layer_norm1."),
    ("prompt_encoder.mask_downscaling.3.", "prompt_encoder.mask_embed.conv2."),
    ("prompt_encoder.mask_downscaling.4.", "prompt_encoder.mask_embed.layer_norm2."),
    ("prompt_encoder.mask_downscaling.6.", "prompt_encoder.mask_embed.conv3."),
    ("prompt_encoder.no_mask_embed.", "prompt_encoder.no_mask_embed."),
    ("prompt_encoder.not_a_point_embed.", "prompt_encoder.not_a_point_embed."),
    ("mask_decoder.transformer.layers.#.norm", "mask_decoder.transformer.layers.#.layer_norm"),
    ("mask_decoder.transformer.norm_final_attn.", "mask_decoder.transformer.layer_norm_final_attn."),
    ("mask_decoder.transformer.", "mask_decoder.transformer."),
    ("mask_decoder.output_upscaling.0.", "mask_decoder.upscale_conv1."),
    ("mask_decoder.output_upscaling.1.", "mask_decoder.upscale_layer_norm."),
    ("mask_decoder.output_upscaling.3.", "mask_decoder.upscale_conv2."),
    # The 3-layer head MLPs: HF names the first and last layer proj_in / proj_out, the middle one layers.0.
    ("mask_decoder.output_hypernetworks_mlps.#.layers.0.", "mask_decoder.output_hypernetworks_mlps.#.proj_in."),
    ("mask_decoder.output_hypernetworks_mlps.#.layers.1.", "mask_decoder.output_hypernetworks_mlps.#.layers.0."),
    ("mask_decoder.output_hypernetworks_mlps.#.layers.2.", "mask_decoder.output_hypernetworks_mlps.#.proj_out."),
    ("mask_decoder.iou_prediction_head.layers.0.", "mask_decoder.iou_prediction_head.proj_in."),
    ("mask_decoder.iou_prediction_head.layers.1.", "mask_decoder.iou_prediction_head.layers.0."),
    ("mask_decoder.iou_prediction_head.layers.2.", "mask_decoder.iou_prediction_head.proj_out."),
    ("mask_decoder.iou_token.", "mask_decoder.iou_token."),
    ("mask_decoder.mask_tokens.", "mask_decoder.mask_tokens."),
]
# SamModel ties the prompt encoder's copy of the Fourier matrix to `shared_image_embedding`; files written by
# the conversion script carry both names, `save_pretrained` only the shared one.
_HF_TIED_PE = "prompt_encoder.shared_embedding.positional_embedding"
HF_PREFIXES = ("vision_encoder.", "prompt_encoder.", "mask_decoder.", "shared_image_embedding.")


def _compile_prefix(template: str) -> re.Pattern[str]:
    # re.escape turns "#" into "\#"; that escaped placeholder becomes a captured block index.
    return re.compile("^" + re.escape(template).replace(r"\#", r"(\d+)"))


def _prefix_rules(direction: int) -> list[tuple[re.Pattern[str], str]]:
    """(pattern, replacement template) for official->HF (direction 0) or HF->official (direction 1)."""
    return [(_compile_prefix(pair[direction]), pair[1 - direction]) for pair in _HF_PAIRS]


_TO_HF, _FROM_HF = _prefix_rules(0), _prefix_rules(1)


def _rename_prefix(key: str, rules: list[tuple[re.Pattern[str], str]]) -> str | None:
    """The key renamed by the first rule whose prefix matches it, or None when no rule does."""
    for pattern, template in rules:
        match = pattern.match(key)
        if match:
            head = template
            for index in match.groups():
                head = head.replace("#", index, 1)
            return head + key[match.end() :]
    return None


def _rename_all(
    state_dict: Mapping[str, Tensor], rules: list[tuple[re.Pattern[str], str]]
) -> tuple[dict[str, Tensor], list[str]]:
    """Every key renamed by `rules`; returns (renamed state dict, the keys no rule matched)."""
    out: dict[str, Tensor] = {}
    unknown = []
    for key, value in state_dict.items():
        name = _rename_prefix(key, rules)
        if name is None:
            unknown.append(key)
        else:
            out[name] = value
    return out, unknown


def is_hf_sam(state_dict: Mapping[str, Tensor]) -> bool:
    """True for a transformers `SamModel` state dict (its encoder is `vision_encoder`, not `image_encoder`)."""
    return any(k.startswith(("vision_encoder.", "shared_image_embedding.")) for k in state_dict)


def hf_to_official(state_dict: Mapping[str, Tensor], *, source: str = "<state dict>") -> dict[str, Tensor]:
    """Rename a transformers `SamModel` state dict to the official SAM names, every key accounted for.

    The tied copy `prompt_encoder.shared_embedding.positional_embedding` must equal
    `shared_image_embedding.positional_embedding` when both are present. Raises a ValueError naming any key that
    has no official counterpart (e.g. a head added on top of SamModel) instead of dropping it.
    """
    out, unknown = _rename_all({k: v for k, v in state_dict.items() if k != _HF_TIED_PE}, _FROM_HF)
    if unknown:
        raise ValueError(
            f"Checkpoint {source} (Hugging Face SamModel layout) has {len(unknown)} keys with no SAM counterpart: "
            f"{unknown[:10]}{' ...' if len(unknown) > 10 else ''}; save the SamModel itself "
            "(model.save_pretrained(dir)), not a model built around it"
        )
    tied = state_dict.get(_HF_TIED_PE)
    official_pe = "prompt_encoder.pe_layer.positional_encoding_gaussian_matrix"
    if tied is not None:
        shared = out.get(official_pe)
        if shared is None:
            out[official_pe] = tied
        elif shared.shape != tied.shape or not bool((shared == tied).all()):
            raise ValueError(
                f"Checkpoint {source}: {_HF_TIED_PE} and shared_image_embedding.positional_embedding differ; "
                "SamModel ties them, so the file is inconsistent"
            )
    return out


def official_to_hf(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Rename official SAM keys to transformers `SamModel` names (the tied prompt-encoder copy included).

    Raises a ValueError naming keys with no SamModel counterpart (e.g. samlight's `prompt_encoder.text_proj`).
    """
    out, unknown = _rename_all(state_dict, _TO_HF)
    if unknown:
        raise ValueError(
            f"{len(unknown)} keys have no transformers SamModel counterpart: {unknown[:10]}"
            f"{' ...' if len(unknown) > 10 else ''} (SamModel has no text prompts: export without text_proj)"
        )
    if "shared_image_embedding.positional_embedding" in out:
        out[_HF_TIED_PE] = out["shared_image_embedding.positional_embedding"]
    return out


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
