"""`samlight segment`: run a (fine-tuned) SAM on a NIfTI/DICOM volume or a GeoTIFF scene with prompts from a file,
and write the result back in the source format: a NIfTI label volume with the input's affine and header
(`segment_medical`), or a GeoTIFF mask with the input's CRS and transform (`segment_satellite`). Both paste one
object at a time with the prompting of `segment_prompts`.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from samlight.inference import segment_medical, segment_satellite

log = logging.getLogger("samlight.inference.segment")


def load_predictor(ckpt: str, variant: str, device: str) -> Any:
    """SamPredictor around `build_sam(variant, checkpoint=ckpt)` (official .pth, Lightning .ckpt or safetensors)."""
    from samlight import SamPredictor, build_sam

    try:
        model = build_sam(variant, checkpoint=ckpt)
    except ValueError as err:
        if "lora_" in str(err):
            raise ValueError(
                f"{err}\n{ckpt} holds LoRA adapters: merge them first with "
                f"`samlight export --ckpt {ckpt} --out model.pth` and pass model.pth"
            ) from err
        raise
    return SamPredictor(model.to(device).eval())


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """The options `load_predictor` takes: which checkpoint, which variant, which device."""
    parser.add_argument(
        "--ckpt", required=True, help="checkpoint: official .pth, samlight .ckpt or safetensors"
    )
    parser.add_argument("--variant", default="vit_b", help="model variant of the checkpoint (default vit_b)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="samlight segment",
        description="Segment a NIfTI/DICOM volume or a GeoTIFF scene with prompts from a file and write the result "
        "in the source format (NIfTI label volume with the input's affine; GeoTIFF mask with its CRS and transform).",
    )
    add_model_arguments(parser)
    parser.add_argument(
        "--input",
        required=True,
        type=Path,
        help="volume (.nii/.nii.gz or a DICOM series folder) or scene (.tif)",
    )
    parser.add_argument(
        "--prompts", required=True, type=Path, help="JSON boxes per slice (volumes) or GeoJSON (scenes)"
    )
    parser.add_argument("--out", required=True, type=Path, help="output .nii.gz (volumes) or .tif (scenes)")
    segment_medical.add_arguments(parser)
    segment_satellite.add_arguments(parser)
    parser.add_argument(
        "--percentile",
        default=None,
        help="LOW,HIGH stretch percentiles (default: 0.5,99.5 volumes, 2,98 scenes)",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `samlight segment`; returns the exit code."""
    args = build_parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    name = args.input.name.lower()
    is_volume = name.endswith(segment_medical.SUFFIXES) or args.input.is_dir()
    if not is_volume and not name.endswith(segment_satellite.SUFFIXES):
        print(
            f"samlight segment: {args.input}: expected .nii/.nii.gz, a DICOM folder or .tif/.tiff",
            file=sys.stderr,
        )
        return 2
    if not args.input.exists():
        print(f"samlight segment: {args.input} does not exist", file=sys.stderr)
        return 2
    try:
        predictor = load_predictor(args.ckpt, args.variant, args.device)
        with torch.inference_mode():
            written = (segment_medical if is_volume else segment_satellite).run(args, predictor)
    except (ValueError, FileNotFoundError) as err:
        print(f"samlight segment: {err}", file=sys.stderr)
        return 1
    log.info("wrote %s: %s", args.out, written)
    print(f"samlight segment: wrote {args.out}")
    return 0
