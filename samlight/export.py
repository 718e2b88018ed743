"""`samlight export`: turn a training checkpoint into the official `segment_anything` file layout."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import torch

from samlight.build import VARIANTS, build_sam
from samlight.checkpoint import check_state_dict, infer_variant, load_state_dict, save_state_dict


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="samlight export",
        description="Write SAM weights from a Lightning .ckpt, a sharded checkpoint directory, safetensors or a "
        "state dict in the official layout, loadable by segment_anything.sam_model_registry[variant](checkpoint=...).",
    )
    parser.add_argument(
        "--ckpt", required=True, help="Lightning .ckpt, sharded checkpoint directory, .pth or .safetensors"
    )
    parser.add_argument("--out", required=True, help="output file (.pth, or .safetensors)")
    parser.add_argument(
        "--variant",
        choices=sorted(VARIANTS),
        default=None,
        help="expected variant (default: inferred from shapes)",
    )
    return parser


def export(ckpt: str, out: str, variant: str | None = None) -> tuple[str, int, bool]:
    """Validate `ckpt` strictly against `variant` (or the inferred one) and write it to `out` atomically.

    Returns:
        (variant, number of tensors written, whether a text projection was included).
    """
    state = _merge_lora(load_state_dict(ckpt), ckpt)
    variant = variant or infer_variant(state)
    if variant is None:
        raise ValueError(
            f"Could not infer the SAM variant of {ckpt}; pass --variant ({', '.join(sorted(VARIANTS))})"
        )
    extra = {"text_embed_dim": state["prompt_encoder.text_proj.weight"].shape[1]} if _has_text(state) else {}
    # Built on the meta device: only names and shapes are compared, nothing is allocated (vit_h included).
    with torch.device("meta"):
        reference = build_sam(variant, **extra)
    check_state_dict(reference, state, source=ckpt)
    ordered = {k: state[k].contiguous() for k in reference.state_dict()}
    save_state_dict(ordered, out)
    return variant, len(ordered), bool(extra)


def _merge_lora(state: dict, ckpt: str) -> dict:
    """Fold peft LoRA adapters of a run's .ckpt into plain encoder weights (W + alpha / r * B @ A), official names.

    r and alpha come from the run's `lora` hyper-parameter (SamModule / apply_lora defaults r=8, alpha=16).
    """
    if not any(".lora_A." in key for key in state):
        return state
    hparams = torch.load(ckpt, map_location="cpu", weights_only=True).get("hyper_parameters") or {}
    lora = hparams.get("lora") or {}
    scale = float(lora.get("alpha", 16.0)) / float(lora.get("r", 8))
    merged = {}
    for key, value in state.items():
        if ".lora_A." in key or ".lora_B." in key:
            continue
        if key.endswith(".base_layer.weight"):
            prefix = key[: -len(".base_layer.weight")]
            down, up = state[f"{prefix}.lora_A.default.weight"], state[f"{prefix}.lora_B.default.weight"]
            value = value + (scale * up.float() @ down.float()).to(value.dtype)
        name = key.replace("image_encoder.base_model.model.", "image_encoder.").replace(".base_layer.", ".")
        merged[name] = value
    return merged


def _has_text(state: dict) -> bool:
    return "prompt_encoder.text_proj.weight" in state


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        variant, count, text = export(args.ckpt, args.out, args.variant)
    except (ValueError, FileNotFoundError) as e:
        print(f"samlight export: {e}", file=sys.stderr)
        return 1
    print(
        f"samlight export: wrote {count} tensors of SAM {variant} (official layout) from {args.ckpt} to {args.out}"
    )
    if text:
        print(
            "samlight export: the file includes prompt_encoder.text_proj (text prompts, a samlight extension); "
            "segment_anything's strict loader rejects that key, samlight.build_sam(..., text_embed_dim=D) loads it"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
