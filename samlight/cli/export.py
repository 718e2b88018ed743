"""`samlight export`: turn a training checkpoint into the official `segment_anything` file layout."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import torch

from samlight.modeling.build import VARIANTS, build_sam
from samlight.modeling.checkpoint import check_state_dict, infer_variant, load_state_dict, save_state_dict
from samlight.modeling.weight_names import has_lora, merge_lora


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
    state = load_state_dict(ckpt)
    if has_lora(state):
        hparams = torch.load(ckpt, map_location="cpu", weights_only=True).get("hyper_parameters") or {}
        state = merge_lora(state, **(hparams.get("lora") or {}))
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
