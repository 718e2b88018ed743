"""`samlight data convert --format geotiff`: multi-band scenes with label rasters -> SA-1B-format training tiles.

A scene of any size is cut into overlapping tiles; each tile that carries a label becomes one sample with one mask
per instance id (or per connected component of each class), the tile's CRS and affine transform in the json "image"
entry, and the scene-wide band stretch so `samlight segment` reproduces the same pixels.
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage

from samlight.datamodules.tools.convert import MAX_NAMES_PER_REASON, ConvertSummary, open_writer, progress
from samlight.datamodules.tools.raster import (
    Stretch,
    parse_bands,
    require_rasterio,
    same_grid,
    scene_stretch,
    stretch_to_uint8,
    tile_windows,
    valid_mask,
)
from samlight.datamodules.tools.shards import SA1BShardWriter, annotations_from_masks
from samlight.datamodules.tools.volumes import parse_percentile

log = logging.getLogger("samlight.datamodules")

RASTER_SUFFIXES = (".tif", ".tiff", ".TIF", ".TIFF")


class RasterMismatch(ValueError):
    """A scene and its label raster are not on the same grid (CRS, size or transform differ)."""


def add_arguments(parser: argparse.ArgumentParser, fmt: str) -> None:
    """Options of `--format geotiff`."""
    parser.add_argument("--images", required=True, type=Path, help="a GeoTIFF scene, or a folder of scenes")
    parser.add_argument(
        "--labels",
        required=True,
        type=Path,
        help="the label raster of the scene, or a folder of label rasters with the scenes' file names",
    )
    parser.add_argument(
        "--bands", default=None, help="1-based bands shown as R,G,B, e.g. 3,2,1 (default 1,2,3 or 1)"
    )
    parser.add_argument(
        "--percentile",
        default="2,98",
        help="per-band LOW,HIGH percentiles over the scene's valid pixels mapped to 0 and 255 (default 2,98)",
    )
    parser.add_argument("--tile-size", type=int, default=1024, help="tile side in pixels (default 1024)")
    parser.add_argument(
        "--overlap", type=int, default=128, help="overlap between neighbouring tiles (default 128)"
    )
    parser.add_argument(
        "--label-mode",
        choices=("instances", "classes"),
        default="instances",
        help="instances: each label value is one object; classes: each value is a class, split into connected "
        "components (category_id = class)",
    )
    parser.add_argument(
        "--min-area", type=int, default=1, help="drop masks smaller than this many pixels (default 1)"
    )
    parser.add_argument(
        "--strict",
        action="store_true",
        help="stop at the first bad scene instead of skipping and counting it",
    )


def count_quietly(summary: ConvertSummary, reason: str, name: str) -> None:
    """Count a routine skip (an empty tile) without a warning per tile: a large scene has thousands."""
    summary.skipped[reason] = summary.skipped.get(reason, 0) + 1
    names = summary.skipped_names.setdefault(reason, [])
    if len(names) < MAX_NAMES_PER_REASON:
        names.append(name)
    log.debug("skipped %s (%s)", name, reason)


def tile_masks(labels: np.ndarray, *, label_mode: str, min_area: int) -> tuple[np.ndarray, np.ndarray, int]:
    """Binary masks of one label tile.

    Args:
        labels: H x W integer labels (0 = background).
    Returns:
        masks M x H x W bool, category ids M (1 for instances, the class otherwise), masks dropped below min_area.
    """
    ids = np.unique(labels)
    ids = ids[ids > 0]
    if label_mode == "instances":
        masks = labels[None] == ids[:, None, None]  # M x H x W
        categories = np.ones(len(ids), dtype=np.int64)
    else:
        parts, cats = [], []
        for class_id in ids:
            components, count = ndimage.label(labels == class_id)
            parts.append(components[None] == np.arange(1, count + 1)[:, None, None])  # count x H x W
            cats.append(np.full(count, class_id, dtype=np.int64))
        masks = np.concatenate(parts) if parts else np.zeros((0, *labels.shape), dtype=bool)
        categories = np.concatenate(cats) if cats else np.zeros(0, dtype=np.int64)
    keep = masks.reshape(len(masks), -1).sum(1) >= min_area
    return masks[keep], categories[keep], int((~keep).sum())


def read_labels(label_src: Any, window: Any) -> np.ndarray:
    """H x W int64 label window; float rasters must hold integer values."""
    raw = label_src.read(1, window=window)
    if np.issubdtype(raw.dtype, np.floating):
        raw = np.nan_to_num(raw, nan=0.0)
        if not np.array_equal(raw, np.rint(raw)):
            raise RasterMismatch(
                f"{label_src.name}: label raster holds non-integer values; labels must be ids"
            )
    labels = raw.astype(np.int64)
    if label_src.nodata is not None and np.isfinite(label_src.nodata):
        labels[raw == label_src.nodata] = 0  # an unlabelled area, not an object
    return labels


def convert_scene(
    writer: SA1BShardWriter,
    summary: ConvertSummary,
    *,
    image_path: Path,
    label_path: Path,
    bands: str | None = None,
    percentile: tuple[float, float] = (2.0, 98.0),
    tile_size: int = 1024,
    overlap: int = 128,
    label_mode: str = "instances",
    min_area: int = 1,
    quality: int = 90,
) -> int:
    """Write one sample per tile of one scene that carries a label; returns the number of samples written."""
    rasterio = require_rasterio()
    from rasterio.windows import Window

    with rasterio.open(image_path) as src, rasterio.open(label_path) as label_src:
        problem = same_grid(src, label_src)
        if problem:
            raise RasterMismatch(f"scene {image_path} and label raster {label_path} differ: {problem}")
        if label_src.count != 1:
            raise RasterMismatch(f"{label_path}: label raster has {label_src.count} bands, expected 1")
        band_list = parse_bands(bands, src.count, image_path)
        stretch: Stretch = scene_stretch(src, band_list, percentile)
        windows = tile_windows(src.width, src.height, tile_size, overlap)
        stem = image_path.name.split(".")[0]
        written = 0
        for col, row, width, height in windows:
            window = Window(col, row, width, height)
            name = f"{stem}_r{row:05d}_c{col:05d}"
            labels = read_labels(label_src, window)
            if not labels.any():
                count_quietly(summary, "tile without labels", name)
                continue
            data = src.read(band_list, window=window)  # bands x H x W
            valid = valid_mask(data, src.nodata)
            if not valid.any():
                count_quietly(summary, "tile all nodata", name)
                continue
            masks, categories, dropped = tile_masks(labels, label_mode=label_mode, min_area=min_area)
            summary.drop_masks("below min area", dropped)
            if len(masks) == 0:
                count_quietly(summary, "no mask above min area", name)
                continue
            annotations = annotations_from_masks(masks)
            for ann, category in zip(annotations, categories):
                ann["category_id"] = int(category)
            info = {
                "source": str(image_path),
                "label_source": str(label_path),
                "crs": src.crs.to_wkt() if src.crs else None,
                "transform": list(src.window_transform(window))[:6],
                "scene_transform": list(src.transform)[:6],
                "window": [col, row, width, height],
                "scene_size": [src.height, src.width],
                "bands": band_list,
                "stretch": {**stretch.describe(), "percentile": list(percentile)},
                "nodata": src.nodata,
                "nodata_fraction": float(1.0 - valid.mean()),
                "label_mode": label_mode,
            }
            image = stretch_to_uint8(data, stretch, valid)
            writer.write(name, image, annotations=annotations, image_info=info, quality=quality)
            written += 1
    return written


def scene_pairs(images: Path, labels: Path, summary: ConvertSummary) -> list[tuple[Path, Path]]:
    """(scene, label raster) pairs: one file each, or folders matched by file name."""
    if images.is_file():
        if not labels.is_file():
            raise FileNotFoundError(f"{labels}: give the label raster of scene {images}")
        return [(images, labels)]
    if not images.is_dir():
        raise FileNotFoundError(f"{images}: neither a GeoTIFF file nor a folder of them")
    pairs = []
    for path in sorted(p for p in images.iterdir() if p.name.endswith(RASTER_SUFFIXES)):
        label = labels / path.name
        if not label.is_file():
            summary.skip("no label raster", path.name, f"expected {label}")
            continue
        pairs.append((path, label))
    return pairs


def convert_geotiff(
    *,
    images: Path,
    labels: Path,
    writer: SA1BShardWriter,
    summary: ConvertSummary,
    strict: bool = False,
    **options: Any,
) -> ConvertSummary:
    """Convert every scene with its label raster; `options` go to `convert_scene`."""
    pairs = scene_pairs(Path(images), Path(labels), summary)
    for image_path, label_path in progress(pairs, total=len(pairs), desc="scenes"):
        try:
            convert_scene(writer, summary, image_path=image_path, label_path=label_path, **options)
        except RasterMismatch as err:
            if strict:
                raise
            summary.skip("scene/label mismatch", image_path.name, str(err))
    return summary


def run(args: argparse.Namespace) -> ConvertSummary:
    """`samlight data convert --format geotiff`."""
    start = time.perf_counter()
    summary = ConvertSummary()
    with open_writer(args) as writer:
        try:
            convert_geotiff(
                images=args.images,
                labels=args.labels,
                writer=writer,
                summary=summary,
                strict=args.strict,
                bands=args.bands,
                percentile=parse_percentile(args.percentile),
                tile_size=args.tile_size,
                overlap=args.overlap,
                label_mode=args.label_mode,
                min_area=args.min_area,
                quality=args.quality,
            )
        except (ValueError, FileNotFoundError) as err:  # bad options or inputs: a message, not a traceback
            raise SystemExit(f"samlight data convert --format geotiff: {err}") from err
    return summary.finish(writer, start)
