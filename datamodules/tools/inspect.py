"""`samlight data inspect`: what is in a set of SA-1B-format shards, and is it healthy.

Counts images and masks, reports masks per image, image sizes, the mask area distribution and every broken
sample, and writes PNG overlays (each mask in its own colour, blended on the image) of a few samples. Areas come
from the run lengths (every RLE is parsed and validated, none is decoded to pixels), so a full SA-1B shard takes
seconds; `--decode` also decodes every image in full.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from samlight.datamodules.decode import decode_masks
from samlight.datamodules.sa1b_reader import RawSample
from samlight.datamodules.tools.convert import ConvertSummary, progress, skipped_lines
from samlight.datamodules.tools.samples import (
    MAX_AREA_FRACTION,
    check_sample,
    iter_samples,
    mask_area,
    parse_shard_args,
    shard_tool_parser,
)
from samlight.modeling.transforms import get_preprocess_shape

# Mask area as a fraction of the image: the histogram's bin edges (the last bin holds what training drops).
AREA_BINS = (0.0, 0.001, 0.01, 0.1, 0.5, MAX_AREA_FRACTION, 1.0)
OVERLAY_ALPHA = 0.5


@dataclass
class ShardStats:
    """Running statistics over the inspected samples."""

    masks_per_image: list[int] = field(default_factory=list)
    sizes: Counter = field(default_factory=Counter)
    original_sizes: Counter = field(default_factory=Counter)
    area_fractions: list[np.ndarray] = field(default_factory=list)
    broken_masks: int = 0
    shards: int = 0

    def report(self, summary: ConvertSummary) -> dict[str, Any]:
        """A json-serialisable dict of everything `print_report` shows."""
        counts = np.asarray(self.masks_per_image, dtype=np.int64)
        areas = np.concatenate(self.area_fractions) if self.area_fractions else np.zeros(0)
        hist, _ = np.histogram(areas, bins=AREA_BINS)
        heights = [h for h, _ in self.sizes.elements()]
        widths = [w for _, w in self.sizes.elements()]
        return {
            "shards": self.shards,
            "images": int(counts.size),
            "masks": int(counts.sum()),
            "masks_per_image": {
                "mean": float(counts.mean()) if counts.size else 0.0,
                "median": float(np.median(counts)) if counts.size else 0.0,
                "min": int(counts.min()) if counts.size else 0,
                "max": int(counts.max()) if counts.size else 0,
            },
            "image_sizes": {
                "most_common": [[f"{h}x{w}", n] for (h, w), n in self.sizes.most_common(5)],
                "min_height": min(heights, default=0),
                "max_height": max(heights, default=0),
                "min_width": min(widths, default=0),
                "max_width": max(widths, default=0),
            },
            "original_sizes": [[f"{h}x{w}", n] for (h, w), n in self.original_sizes.most_common(5)],
            "mask_area_fraction": {
                "percentiles": {
                    f"p{q}": float(np.percentile(areas, q)) if areas.size else 0.0
                    for q in (5, 25, 50, 75, 95)
                },
                "histogram": {
                    f"{lo:g}-{hi:g}": int(n) for lo, hi, n in zip(AREA_BINS[:-1], AREA_BINS[1:], hist)
                },
                "over_90_percent": int((areas > MAX_AREA_FRACTION).sum()),
            },
            "broken_masks": self.broken_masks,
            "skipped": dict(summary.skipped),
            "skipped_names": dict(summary.skipped_names),
        }


def inspect_sample(
    sample: RawSample, stats: ShardStats, summary: ConvertSummary, *, decode: bool
) -> dict[str, Any] | None:
    """Add one sample to `stats`; returns its json record, or None when the sample is broken (counted)."""
    checked = check_sample(sample, summary, decode=decode)
    if checked is None:
        return None
    name, record, (height, width) = checked.name, checked.record, checked.size
    info = record.get("image") or {}
    areas = []
    for i, ann in enumerate(record["annotations"]):
        area = _checked_area(ann, (height, width))
        if area is None:
            stats.broken_masks += 1
            summary.skip("broken rle", f"{name} annotation {i}", "invalid segmentation RLE")
            continue
        areas.append(area)
    if not areas:
        summary.skip("no annotations", name, "no valid mask")
        return None
    stats.masks_per_image.append(len(areas))
    stats.sizes[(height, width)] += 1
    if "original_height" in info:
        stats.original_sizes[(int(info["original_height"]), int(info["original_width"]))] += 1
    stats.area_fractions.append(np.asarray(areas, dtype=np.float64) / float(height * width))
    return record


def _checked_area(ann: Any, size: tuple[int, int]) -> int | None:
    """Pixel area of an annotation's RLE, or None when it is not a valid RLE of an image of `size`."""
    try:
        return mask_area(ann, size)
    except (TypeError, KeyError, ValueError):
        return None


def overlay(image: np.ndarray, masks: np.ndarray, *, seed: int = 0) -> np.ndarray:
    """Blend M x H x W masks on an H x W x 3 uint8 image, one colour per mask, small masks on top, outlines dark.

    Returns H x W x 3 uint8.
    """
    height, width = image.shape[:2]
    order = np.argsort(-masks.reshape(masks.shape[0], -1).sum(1))  # paint large masks first
    label = np.full((height, width), -1, dtype=np.int64)
    for index in order:
        label[masks[index]] = index
    colours = (
        np.random.default_rng(seed).integers(40, 256, size=(max(masks.shape[0], 1), 3)).astype(np.float32)
    )
    covered = label >= 0
    out = image.astype(np.float32)
    out[covered] = (1 - OVERLAY_ALPHA) * out[covered] + OVERLAY_ALPHA * colours[label[covered]]
    edge = np.zeros_like(covered)
    edge[:-1] |= label[:-1] != label[1:]
    edge[:, :-1] |= label[:, :-1] != label[:, 1:]
    out[edge] *= 0.3
    return out.round().clip(0, 255).astype(np.uint8)


def write_overlay(
    sample: RawSample, record: dict[str, Any], folder: Path, *, index: int = 0, max_side: int = 1024
) -> Path:
    """Write `<folder>/<index>_<shard>_<key>.png`: the sample's masks (those training keeps) over its image,
    longest side at most `max_side`."""
    with Image.open(io.BytesIO(sample.image)) as img:
        width, height = img.size
        size = (
            get_preprocess_shape(height, width, max_side)
            if max(height, width) > max_side
            else (height, width)
        )
        img.draft("RGB", (size[1], size[0]))  # JPEG DCT scaling: decode near the overlay size
        image = np.asarray(img.convert("RGB").resize((size[1], size[0]), Image.Resampling.BILINEAR))
    limit = MAX_AREA_FRACTION * height * width
    # Masks training drops (>90% of the image) would only tint the whole overlay.
    rles = [
        ann["segmentation"]
        for ann in record["annotations"]
        if (area := _checked_area(ann, (height, width))) is not None and area <= limit
    ]
    masks = decode_masks(rles, (height, width), size, max(size))[:, : size[0], : size[1]]  # M x h x w
    stem = Path(sample.url.split()[-1]).name.removesuffix(".tar")
    path = folder / f"{index:03d}_{stem}_{sample.key.replace('/', '_')}.png"
    Image.fromarray(overlay(image, masks.numpy())).save(path)
    return path


def print_report(report: dict[str, Any], file=None) -> None:
    """Print the inspection report in a few lines."""
    out = file or sys.stdout
    mpi, sizes, areas = report["masks_per_image"], report["image_sizes"], report["mask_area_fraction"]
    lines = [
        f"samlight data inspect: {report['shards']} shard(s), {report['images']} images, {report['masks']} masks",
        f"  masks per image: mean {mpi['mean']:.1f}, median {mpi['median']:.0f}, min {mpi['min']}, max {mpi['max']}",
        f"  image sizes (HxW): height {sizes['min_height']}..{sizes['max_height']}, "
        f"width {sizes['min_width']}..{sizes['max_width']}; most common "
        + ", ".join(f"{s} ({n})" for s, n in sizes["most_common"]),
    ]
    if report["original_sizes"]:
        lines.append(
            "  original sizes (prepared shards): "
            + ", ".join(f"{s} ({n})" for s, n in report["original_sizes"])
        )
    lines.append("  mask area / image: " + ", ".join(f"{k} {v:.4f}" for k, v in areas["percentiles"].items()))
    lines.append("  mask area histogram: " + ", ".join(f"{k}: {v}" for k, v in areas["histogram"].items()))
    lines.append(f"  masks covering >90% (dropped in training): {areas['over_90_percent']}")
    lines.append(f"  broken masks: {report['broken_masks']}")
    lines += skipped_lines(report["skipped"], report["skipped_names"])
    if report.get("overlays"):
        lines.append(f"  overlays: {len(report['overlays'])} PNG(s) in {Path(report['overlays'][0]).parent}")
    print("\n".join(lines), file=out)


def build_parser() -> argparse.ArgumentParser:
    parser = shard_tool_parser(
        "inspect",
        "Counts, image sizes, mask statistics and broken samples of SA-1B-format shards, "
        "and PNG overlays of a few samples.",
    )
    parser.add_argument(
        "--overlays", type=Path, default=None, help="write PNG overlays of the first samples here"
    )
    parser.add_argument("--num", type=int, default=8, help="number of overlays (default 8)")
    parser.add_argument("--max-samples", type=int, default=None, help="stop after this many samples")
    parser.add_argument(
        "--decode",
        action="store_true",
        help="also decode every image fully (slower); masks are always validated",
    )
    parser.add_argument("--json", type=Path, default=None, help="also write the statistics to this json file")
    return parser


def main(argv: Sequence[str]) -> int:
    """Entry point of `samlight data inspect`; returns the exit code (1 when no readable sample was found)."""
    args = parse_shard_args(build_parser(), argv)
    if args.overlays is not None:
        args.overlays.mkdir(parents=True, exist_ok=True)
    stats, summary, overlays = ShardStats(), ConvertSummary(), []
    seen = 0
    bar = progress((s for url in args.urls for s in _counted(url, stats, summary)), desc="inspect")
    for sample in bar:
        record = inspect_sample(sample, stats, summary, decode=args.decode)
        if record is not None and args.overlays is not None and len(overlays) < args.num:
            overlays.append(str(write_overlay(sample, record, args.overlays, index=len(overlays))))
        seen += 1
        if args.max_samples is not None and seen >= args.max_samples:
            break
    report = stats.report(summary)
    report["overlays"] = overlays
    print_report(report)
    if args.json is not None:
        args.json.write_text(json.dumps(report, indent=2))
    if report["images"] == 0:
        print(f"samlight data inspect: no readable sample in {', '.join(args.urls[:5])}", file=sys.stderr)
        return 1
    return 0


def _counted(url: str, stats: ShardStats, summary: ConvertSummary):
    stats.shards += 1
    yield from iter_samples(url, summary)
