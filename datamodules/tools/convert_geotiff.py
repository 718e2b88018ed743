"""`samlight data convert --format geotiff`: multi-band scenes with label rasters -> SA-1B-format training tiles.

A scene of any size is cut into overlapping tiles; each tile that carries a label becomes one sample with one mask
per instance id (or per connected component of each class), the tile's CRS and affine transform in the json "image"
entry, and the scene-wide band stretch so `samlight segment` reproduces the same pixels.
"""

from __future__ import annotations

import argparse
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from samlight.datamodules.tools.convert import ConvertSummary, FormatAdapter, Sample, SkipInput
from samlight.datamodules.tools.labels import label_annotations, label_masks
from samlight.datamodules.tools.raster import (
    parse_bands,
    require_rasterio,
    same_grid,
    scene_stretch,
    stretch_to_uint8,
    tile_windows,
    valid_mask,
)
from samlight.datamodules.tools.volumes import parse_percentile

RASTER_SUFFIXES = (".tif", ".tiff", ".TIF", ".TIFF")


class RasterMismatch(SkipInput):
    """A scene and its label raster are not on the same grid (CRS, size or transform differ)."""

    def __init__(self, detail: str) -> None:
        super().__init__("scene/label mismatch", detail)


class GeoTiffAdapter(FormatAdapter):
    """`--format geotiff`: scenes with label rasters on the same grid, cut into overlapping tiles."""

    images_help = "a GeoTIFF scene, or a folder of scenes"
    labels_help = "the label raster of the scene, or a folder of label rasters with the scenes' file names"
    desc = "scenes"

    @staticmethod
    def add_arguments(parser: argparse.ArgumentParser) -> None:
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
            help="instances: each label value is one object; classes: each value is a class, split into "
            "4-connected components (category_id = class)",
        )

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.percentile = parse_percentile(args.percentile)

    def inputs(self, summary: ConvertSummary) -> list[tuple[str, tuple[Path, Path]]]:
        return [
            (image.name, (image, label))
            for image, label in scene_pairs(self.args.images, self.args.labels, summary)
        ]

    def samples(self, item: tuple[Path, Path], summary: ConvertSummary) -> Iterator[Sample]:
        """One sample per tile of one scene that carries a label; empty tiles are counted quietly (a large scene
        has thousands). A scene whose label raster is on another grid raises RasterMismatch before the first
        sample."""
        rasterio = require_rasterio()
        from rasterio.windows import Window

        image_path, label_path = item
        args = self.args
        with rasterio.open(image_path) as src, rasterio.open(label_path) as label_src:
            problem = same_grid(src, label_src)
            if problem:
                raise RasterMismatch(f"scene {image_path} and label raster {label_path} differ: {problem}")
            if label_src.count != 1:
                raise RasterMismatch(f"{label_path}: label raster has {label_src.count} bands, expected 1")
            bands = parse_bands(args.bands, src.count, image_path)
            stretch = scene_stretch(src, bands, self.percentile)
            scene = {
                "source": str(image_path),
                "label_source": str(label_path),
                "crs": src.crs.to_wkt() if src.crs else None,
            }
            stem = image_path.name.split(".")[0]
            for col, row, width, height in tile_windows(src.width, src.height, args.tile_size, args.overlap):
                window = Window(col, row, width, height)
                name = f"{stem}_r{row:05d}_c{col:05d}"
                labels = read_labels(label_src, window)
                if not labels.any():
                    summary.skip("tile without labels", name, quiet=True)
                    continue
                data = src.read(bands, window=window)  # bands x H x W
                valid = valid_mask(data, src.nodata)
                if not valid.any():
                    summary.skip("tile all nodata", name, quiet=True)
                    continue
                annotations = _tile_annotations(labels, args.label_mode, args.min_area, summary)
                if not annotations:
                    summary.skip("no mask above min area", name, quiet=True)
                    continue
                info = {
                    **scene,
                    "transform": list(src.window_transform(window))[:6],
                    "scene_transform": list(src.transform)[:6],
                    "window": [col, row, width, height],
                    "scene_size": [src.height, src.width],
                    "bands": bands,
                    "stretch": {**stretch.describe(), "percentile": list(self.percentile)},
                    "nodata": src.nodata,
                    "nodata_fraction": float(1.0 - valid.mean()),
                    "label_mode": args.label_mode,
                }
                yield Sample(name, stretch_to_uint8(data, stretch, valid), annotations, info)


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


def _tile_annotations(
    labels: np.ndarray, label_mode: str, min_area: int, summary: ConvertSummary
) -> list[dict[str, Any]]:
    """Annotations of one H x W label tile: one mask per instance id (category_id 1), or one per 4-connected
    component of each class (category_id = the class). Negative values are not ids: background."""
    labels = np.where(labels > 0, labels, 0)
    if label_mode == "instances":
        chunks = ((masks, [1] * len(ids)) for masks, ids in label_masks(labels))
    else:
        chunks = label_masks(labels, components=4)
    return label_annotations(
        chunks, min_area=min_area, field="category_id", summary=summary, drop_reason="below min area"
    )


def scene_pairs(images: Path, labels: Path, summary: ConvertSummary) -> list[tuple[Path, Path]]:
    """(scene, label raster) pairs: one file each, or folders matched by file name."""
    images, labels = Path(images), Path(labels)
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
