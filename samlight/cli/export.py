"""`samlight export`: turn a training checkpoint into the official `segment_anything` file layout (default), a
Hugging Face transformers `SamModel` folder, or ONNX graphs (prompt encoder + mask decoder, or image encoder)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import torch

from samlight.modeling.build import VARIANTS, build_sam, variant_config
from samlight.modeling.checkpoint import check_state_dict, infer_variant, load_state_dict, save_state_dict
from samlight.modeling.weight_names import has_lora, merge_lora

FORMATS = ("pth", "hf", "onnx", "onnx-encoder")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="samlight export",
        description="Write SAM weights from a Lightning .ckpt, a sharded checkpoint directory, safetensors or a "
        "state dict in the official layout, loadable by segment_anything.sam_model_registry[variant](checkpoint=...).",
    )
    parser.add_argument(
        "--ckpt", required=True, help="Lightning .ckpt, sharded checkpoint directory, .pth or .safetensors"
    )
    parser.add_argument(
        "--out",
        required=True,
        help="output: a .pth or .safetensors file (pth), a folder (hf), a .onnx file (onnx, onnx-encoder)",
    )
    parser.add_argument(
        "--variant",
        choices=sorted(VARIANTS),
        default=None,
        help="expected variant (default: inferred from shapes)",
    )
    parser.add_argument(
        "--format",
        choices=FORMATS,
        default="pth",
        help="pth: official segment_anything layout; hf: transformers SamModel folder (SamModel.from_pretrained); "
        "onnx: prompt encoder + mask decoder with the official ONNX interface; onnx-encoder: the image encoder",
    )
    parser.add_argument(
        "--quantize",
        action="store_true",
        help="onnx formats: write a dynamically quantised (uint8 weights) model (onnxruntime.quantization)",
    )
    parser.add_argument(
        "--return-single-mask",
        action="store_true",
        help="onnx: output one mask per prompt (the official rule), not all four",
    )
    parser.add_argument(
        "--image-size",
        type=int,
        default=None,
        help="onnx formats: model input S (default the variant's, 1024 for vit_*); e.g. the size a model was "
        "fine-tuned at",
    )
    return parser


def export(
    ckpt: str,
    out: str,
    variant: str | None = None,
    *,
    format: str = "pth",
    quantize: bool = False,
    return_single_mask: bool = False,
    image_size: int | None = None,
) -> tuple[str, int, bool]:
    """Validate `ckpt` strictly against `variant` (or the inferred one) and write it to `out` atomically.

    Returns:
        (variant, number of tensors written, whether a text projection was included).
    """
    if format not in FORMATS:
        raise ValueError(f"Unknown export format {format!r}; choose one of {', '.join(FORMATS)}")
    if format not in ("onnx", "onnx-encoder") and (quantize or return_single_mask or image_size):
        raise ValueError("--quantize, --return-single-mask and --image-size apply to the onnx formats only")
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
    if format == "pth":
        save_state_dict(ordered, out)
    elif format == "hf":
        from samlight.inference.hf_export import save_hf

        save_hf(ordered, variant_config(variant, **extra), out)
    else:
        _export_onnx(ordered, variant, out, format, quantize, return_single_mask, image_size, extra)
    return variant, len(ordered), bool(extra)


def _export_onnx(
    state: dict,
    variant: str,
    out: str,
    format: str,
    quantize: bool,
    return_single_mask: bool,
    image_size: int | None,
    extra: dict,
) -> None:
    from samlight.inference import onnx_export

    if format == "onnx-encoder" and return_single_mask:
        raise ValueError(
            "--return-single-mask applies to the decoder (--format onnx), not to the image encoder"
        )
    overrides = dict(extra, **({"image_size": image_size} if image_size else {}))
    with torch.device("meta"):
        model = build_sam(variant, **overrides)
    model.load_state_dict(state, strict=True, assign=True)  # checked against the same variant above
    model.reset_pixel_buffers()
    if format == "onnx":
        onnx_export.export_decoder(model, out, return_single_mask=return_single_mask, quantize=quantize)
    else:
        onnx_export.export_encoder(model, out, quantize=quantize)


def _has_text(state: dict) -> bool:
    return "prompt_encoder.text_proj.weight" in state


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        variant, count, text = export(
            args.ckpt,
            args.out,
            args.variant,
            format=args.format,
            quantize=args.quantize,
            return_single_mask=args.return_single_mask,
            image_size=args.image_size,
        )
    except (ValueError, FileNotFoundError, FileExistsError, ImportError) as e:
        print(f"samlight export: {e}", file=sys.stderr)
        return 1
    what = {
        "pth": "official layout",
        "hf": "transformers SamModel folder",
        "onnx": "ONNX prompt encoder + mask decoder" + (", uint8-quantised" if args.quantize else ""),
        "onnx-encoder": "ONNX image encoder" + (", uint8-quantised" if args.quantize else ""),
    }[args.format]
    print(f"samlight export: wrote {count} tensors of SAM {variant} ({what}) from {args.ckpt} to {args.out}")
    if text:
        print(
            "samlight export: the file includes prompt_encoder.text_proj (text prompts, a samlight extension); "
            "segment_anything's strict loader rejects that key, samlight.build_sam(..., text_embed_dim=D) loads it"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
