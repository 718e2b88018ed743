"""`samlight data prepare`: re-encode SA-1B shards at training resolution.

An SA-1B image is about 1500 x 2250 pixels and carries about 100 masks; training at 1024 needs only the longest
side 1024 and at most 64 masks. Preparing the shards once (image resized as SamPredictor does, masks re-encoded as
RLE at that size, masks covering more than 90% of the image dropped) makes every later epoch decode a fraction of
the pixels. The json keeps every field, with `original_height`/`original_width` recording the source size.

Masks are resized exactly as the datamodule resizes raw shards (`decode.decode_masks`, nearest-exact), so training
on prepared shards sees the same masks as training on the raw ones.
"""

from __future__ import annotations

import argparse
import io
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from pycocotools import mask as mask_utils

from samlight.datamodules.decode import decode_masks
from samlight.datamodules.sa1b_reader import RawSample
from samlight.datamodules.tools.convert import ConvertSummary, print_summary, progress
from samlight.datamodules.tools.samples import (
    MAX_AREA_FRACTION,
    PER_MASK_MEMBERS,
    check_sample,
    iter_samples,
    mask_area,
    parse_shard_args,
    shard_tool_parser,
)
from samlight.datamodules.tools.shards import SA1BShardWriter, annotations_from_rles, encode_jpeg
from samlight.modeling.transforms import resize_longest_image

# Masks are decoded this many at a time: 16 masks at 1024 x 1024 are 16 MB.
DECODE_CHUNK = 16


def prepare_sample(
    sample: RawSample, *, image_size: int, summary: ConvertSummary, quality: int = 90
) -> tuple[bytes, dict[str, Any], dict[str, bytes]] | None:
    """Resize one sample. Returns (JPEG bytes, json record, other members) or None when it was skipped (counted)."""
    checked = check_sample(sample, summary, pixels=True)
    if checked is None:
        return None
    name, record, image = checked.name, checked.record, checked.pixels
    height, width = checked.size
    info = dict(record.get("image") or {})
    anns, rows = _usable_annotations(record["annotations"], (height, width), name, summary)
    extras = _select_rows(
        {e: d for e, d in sample.members.items() if e in PER_MASK_MEMBERS}, rows, len(record["annotations"])
    )
    if not anns:
        summary.skip("no annotations", name, "no usable mask left")
        return None
    info.setdefault("original_height", height)
    info.setdefault("original_width", width)
    if max(height, width) <= image_size:
        # Already at (or below) training size: keep the bytes; only the mask filtering applies.
        return sample.image, {"image": info, "annotations": anns}, extras
    resized = resize_longest_image(image, image_size)  # h x w x 3, as SamPredictor
    new_h, new_w = resized.shape[:2]
    rles = []
    for begin in range(0, len(anns), DECODE_CHUNK):
        chunk = [ann["segmentation"] for ann in anns[begin : begin + DECODE_CHUNK]]
        padded = decode_masks(chunk, (height, width), (new_h, new_w), image_size)  # K x S x S
        small = padded[:, :new_h, :new_w]  # K x h x w
        rles.extend(mask_utils.encode(np.asfortranarray(small.permute(1, 2, 0).numpy().astype(np.uint8))))
    empty = mask_utils.area(rles) == 0
    summary.drop_masks("empty after resize", int(empty.sum()))
    kept = [i for i in range(len(anns)) if not empty[i]]
    if not kept:
        summary.skip("no annotations", name, "every mask vanished in the resize")
        return None
    extras = _select_rows(extras, kept, len(anns))
    sx, sy = new_w / width, new_h / height
    fresh = annotations_from_rles([rles[i] for i in kept])
    out_anns = [_rescale(anns[i], new, sx, sy) for i, new in zip(kept, fresh)]
    info.update(height=new_h, width=new_w)
    return (
        encode_jpeg(np.ascontiguousarray(resized), quality=quality),
        {"image": info, "annotations": out_anns},
        extras,
    )


def _usable_annotations(
    anns: list[Any], size: tuple[int, int], name: str, summary: ConvertSummary
) -> tuple[list[dict[str, Any]], list[int]]:
    """Annotations with a valid RLE of the image's size covering at most 90% of it, and their row indices."""
    height, width = size
    kept, rows = [], []
    for i, ann in enumerate(anns):
        try:
            area = mask_area(ann, size)
        except (TypeError, KeyError, ValueError) as err:
            summary.drop_masks("broken rle", 1)
            summary.skip("broken rle", f"{name} annotation {i}", str(err))
            continue
        if area > MAX_AREA_FRACTION * height * width:
            summary.drop_masks("covers >90% of the image", 1)
            continue
        rle = ann["segmentation"]
        counts = rle["counts"].decode("ascii") if isinstance(rle["counts"], bytes) else rle["counts"]
        if isinstance(counts, list):  # uncompressed RLE: store the compressed string form SA-1B uses
            counts = mask_utils.frPyObjects(rle, height, width)["counts"].decode("ascii")
        kept.append({**ann, "segmentation": {"size": [height, width], "counts": counts}, "area": area})
        rows.append(i)
    return kept, rows


def _rescale(ann: dict[str, Any], new: dict[str, Any], sx: float, sy: float) -> dict[str, Any]:
    """`ann` with the resized mask's segmentation, area and bbox, and its points and crop box scaled."""
    out = {**ann, "segmentation": new["segmentation"], "area": new["area"], "bbox": new["bbox"]}
    if isinstance(out.get("point_coords"), list):
        out["point_coords"] = [[p[0] * sx, p[1] * sy] for p in out["point_coords"]]
    if isinstance(out.get("crop_box"), list) and len(out["crop_box"]) == 4:
        x, y, w, h = out["crop_box"]
        out["crop_box"] = [x * sx, y * sy, w * sx, h * sy]
    return out


def _select_rows(extras: dict[str, bytes], rows: list[int], total: int) -> dict[str, bytes]:
    """Keep the rows of per-mask `.npy` members (first dimension == number of annotations) that match `rows`."""
    if len(rows) == total:
        return extras
    out = {}
    for ext, data in extras.items():
        if ext.endswith("npy"):
            array = np.load(io.BytesIO(data), allow_pickle=False)
            if array.ndim >= 1 and array.shape[0] == total:
                buf = io.BytesIO()
                np.save(buf, array[rows])
                data = buf.getvalue()
        out[ext] = data
    return out


def prepare_shard(
    url: str, output: Path, *, image_size: int, quality: int, name: str, bar: bool
) -> ConvertSummary:
    """Prepare one input shard into `output/name`; returns its summary (picklable, for worker processes)."""
    start = time.perf_counter()
    summary = ConvertSummary()
    # One output shard per input shard, under the input's name: URLs and shard counts stay the same.
    with SA1BShardWriter(
        output, prefix=name, pattern="{prefix}", max_samples=1 << 62, max_bytes=1 << 62
    ) as writer:
        samples = iter_samples(url, summary)
        if bar:
            samples = progress(samples, desc=f"prepare {name}")
        for sample in samples:
            prepared = prepare_sample(sample, image_size=image_size, summary=summary, quality=quality)
            if prepared is None:
                continue
            jpeg, record, extras = prepared
            key = sample.key.replace("/", "_")
            writer.write(
                key, jpeg, annotations=record["annotations"], image_info=record["image"], extra=extras
            )
    return summary.finish(writer, start)


def _output_names(urls: list[str]) -> list[str]:
    """A distinct `.tar` file name per input URL (its base name; numbered when two inputs share one)."""
    names, seen = [], set()
    for i, url in enumerate(urls):
        base = os.path.basename(url.split()[-1]) if url.startswith("pipe:") else os.path.basename(url)
        base = base if base.endswith(".tar") else f"shard-{i:06d}.tar"
        if base in seen:
            base = f"{base[:-4]}-{i:06d}.tar"
        seen.add(base)
        names.append(base)
    return names


def _prepare_star(job: tuple) -> ConvertSummary:
    url, output, image_size, quality, name = job
    return prepare_shard(url, output, image_size=image_size, quality=quality, name=name, bar=False)


def build_parser() -> argparse.ArgumentParser:
    parser = shard_tool_parser(
        "prepare",
        "Re-encode SA-1B-format shards at training resolution: longest side resized to --image-size (as "
        "SamPredictor does), masks re-encoded as RLE at that size, masks covering >90% of the image dropped. "
        "One output shard per input shard, with the same name.",
        "--input",
    )
    parser.add_argument("--output", required=True, type=Path, help="directory for the prepared shards")
    parser.add_argument(
        "--image-size", type=int, default=1024, help="longest side after resizing (default 1024)"
    )
    parser.add_argument(
        "--workers", type=int, default=1, help="shards prepared in parallel processes (default 1)"
    )
    parser.add_argument(
        "--quality", type=int, default=90, help="JPEG quality of the resized images (default 90)"
    )
    return parser


def main(argv: Sequence[str]) -> int:
    """Entry point of `samlight data prepare`; returns the exit code (1 when nothing was written)."""
    args = parse_shard_args(build_parser(), argv)
    args.output.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    jobs = [
        (url, args.output, args.image_size, args.quality, name)
        for url, name in zip(args.urls, _output_names(args.urls))
    ]
    total = ConvertSummary()
    if args.workers <= 1:
        for url, output, image_size, quality, name in jobs:
            total.merge(
                prepare_shard(url, output, image_size=image_size, quality=quality, name=name, bar=True)
            )
    else:
        import multiprocessing as mp

        # Each worker owns whole shards, so output shards are written by exactly one process.
        with mp.get_context("spawn").Pool(args.workers) as pool:
            for part in progress(
                pool.imap_unordered(_prepare_star, jobs), total=len(jobs), desc="prepare", unit="shard"
            ):
                total.merge(part)
    total.elapsed = time.perf_counter() - start
    total.shards = [s for s in total.shards if s.exists()]
    print_summary(total, title="prepare")
    if total.images_written == 0:
        print(f"samlight data prepare: no sample was written from {len(args.urls)} shard(s)", file=sys.stderr)
        return 1
    return 0
