"""`samlight segment` on a GeoTIFF scene: GeoJSON prompts in map coordinates -> a GeoTIFF label raster with the
scene's CRS and transform.

Tiles are read and stretched by the converter's own functions (`datamodules/tools/raster.py`), so the model sees the
pixels it was fine-tuned on. Prompts (a GeoJSON FeatureCollection): a Point (or MultiPoint with
`properties.point_labels`) is a click, a Polygon/LineString gives its bounding box, a GeometryCollection combines
both; `properties.label` is the value written (default 1). Coordinates are in the scene's CRS unless the file has a
`crs` member or `--prompts-crs` is given.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import numpy as np

from samlight.inference.segment_prompts import ObjectPrompt, parse_object, paste_objects, read_prompt_file

SUFFIXES = (".tif", ".tiff")


def _geometry_prompt(geometry: dict[str, Any], properties: dict[str, Any], where: str) -> dict[str, Any]:
    """Map-coordinate box/points of one GeoJSON geometry: {"box": [x0, y0, x1, y1]?, "points": [...], ...}."""
    kind = geometry.get("type")
    if kind == "GeometryCollection":
        parts = [_geometry_prompt(g, properties, where) for g in geometry.get("geometries", [])]
        merged: dict[str, Any] = {"points": [], "point_labels": []}
        for part in parts:
            merged["points"] += part.get("points", [])
            merged["point_labels"] += part.get("point_labels", [])
            if "box" in part:
                merged["box"] = part["box"]
        return merged
    if kind == "Point":
        return {
            "points": [geometry["coordinates"][:2]],
            "point_labels": [int(properties.get("point_label", 1))],
        }
    if kind == "MultiPoint":
        points = [c[:2] for c in geometry["coordinates"]]
        return {"points": points, "point_labels": list(properties.get("point_labels", [1] * len(points)))}
    if kind in ("Polygon", "MultiPolygon", "LineString", "MultiLineString"):
        xy = np.asarray(_flatten(geometry["coordinates"]), dtype=np.float64).reshape(-1, 2)
        return {"box": [xy[:, 0].min(), xy[:, 1].min(), xy[:, 0].max(), xy[:, 1].max()]}
    raise ValueError(
        f"{where}: unsupported geometry type {kind!r}; use Point, MultiPoint, Polygon or LineString"
    )


def _flatten(coords: Any) -> list[float]:
    if isinstance(coords[0], (int, float)):
        return list(coords[:2])
    return [v for c in coords for v in _flatten(c)]


def read_scene_prompts(path: Path, src: Any, prompts_crs: str | None) -> list[ObjectPrompt]:
    """GeoJSON features -> objects in scene pixel coordinates (x = column, y = row) via the raster transform."""
    from rasterio.crs import CRS
    from rasterio.warp import transform as warp

    record = read_prompt_file(path, "the GeoJSON prompts")
    features = record.get("features") if record.get("type") == "FeatureCollection" else [record]
    if not features:
        raise ValueError(f"{path}: no features; expected a GeoJSON FeatureCollection of points/polygons")
    crs_name = prompts_crs or (record.get("crs") or {}).get("properties", {}).get("name")
    source_crs = CRS.from_user_input(crs_name) if crs_name else src.crs
    inverse = ~src.transform
    objects = []
    for i, feature in enumerate(features):
        where = f"{path} feature {i}"
        properties = feature.get("properties") or {}
        entry = _geometry_prompt(feature.get("geometry") or {}, properties, where)
        if not entry.get("points"):
            entry.pop("points", None)
            entry.pop("point_labels", None)
        for key in ("box", "points"):
            if key not in entry:
                continue
            xy = np.asarray(entry[key], dtype=np.float64).reshape(-1, 2)
            if source_crs is not None and src.crs is not None and source_crs != src.crs:
                xs, ys = warp(source_crs, src.crs, xy[:, 0].tolist(), xy[:, 1].tolist())
                xy = np.stack([xs, ys], axis=1)
            # the inverse affine by its coefficients: works with every affine/rasterio version
            cols = inverse.a * xy[:, 0] + inverse.b * xy[:, 1] + inverse.c
            rows = inverse.d * xy[:, 0] + inverse.e * xy[:, 1] + inverse.f
            pixel = np.stack([np.asarray(cols), np.asarray(rows)], axis=1)
            if key == "box":  # map y usually points up: take min/max again in pixel space
                pixel = np.array([pixel[:, 0].min(), pixel[:, 1].min(), pixel[:, 0].max(), pixel[:, 1].max()])
            entry[key] = pixel.tolist()
        entry["label"] = properties.get("label", 1)
        obj = parse_object(entry, where)
        obj.check_inside(src.width, src.height)
        objects.append(obj)
    return objects


def prompt_window(
    obj: ObjectPrompt, grid: list[tuple[int, int, int, int]], width: int, height: int, tile: int, margin: int
) -> tuple[int, int, int, int]:
    """The tile (col, row, w, h) an object is predicted in: the grid tile holding it with the widest margin, or,
    for an object too large for any tile, a window around it (tile-sized at least, clamped to the scene)."""
    x0, y0, x1, y1 = obj.bounds()
    best, best_margin = None, -np.inf
    for col, row, w, h in grid:
        if x0 < col or y0 < row or x1 > col + w or y1 > row + h:
            continue
        # a tile side on the scene border needs no margin: there is no context beyond it anyway
        sides = (
            x0 - col if col > 0 else np.inf,
            y0 - row if row > 0 else np.inf,
            col + w - x1 if col + w < width else np.inf,
            row + h - y1 if row + h < height else np.inf,
        )
        if min(sides) > best_margin:
            best, best_margin = (col, row, w, h), min(sides)
    if best is not None and best_margin >= margin:
        return best
    size_w = min(width, max(tile, int(np.ceil(x1 - x0)) + 2 * margin))
    size_h = min(height, max(tile, int(np.ceil(y1 - y0)) + 2 * margin))
    col = int(np.clip((x0 + x1) / 2 - size_w / 2, 0, width - size_w))
    row = int(np.clip((y0 + y1) / 2 - size_h / 2, 0, height - size_h))
    return col, row, size_w, size_h


def segment_scene(
    predictor: Any,
    src: Any,
    objects: list[ObjectPrompt],
    *,
    bands: list[int],
    stretch: Any,
    tile: int = 1024,
    overlap: int = 128,
) -> np.ndarray:
    """H x W label raster of a scene: each object predicted in a tile around it and pasted back.

    Objects sharing a tile share one image embedding; where objects overlap (also across tiles) the more confident
    logit wins.
    """
    from rasterio.windows import Window

    from samlight.datamodules.tools.raster import stretch_to_uint8, tile_windows, valid_mask

    grid = tile_windows(src.width, src.height, tile, overlap)
    groups: dict[tuple[int, int, int, int], list[ObjectPrompt]] = {}
    for obj in objects:
        groups.setdefault(prompt_window(obj, grid, src.width, src.height, tile, overlap // 2), []).append(obj)
    labels = np.zeros((src.height, src.width), dtype=np.uint16)
    # float16 halves the memory of the confidence map on 10,000 px scenes; it only ranks overlapping objects
    best = np.full((src.height, src.width), -np.inf, dtype=np.float16)
    for (col, row, w, h), members in groups.items():
        data = src.read(bands, window=Window(col, row, w, h))  # bands x h x w
        paste_objects(
            predictor,
            stretch_to_uint8(data, stretch, valid_mask(data, src.nodata)),
            [obj.shifted(col, row) for obj in members],
            labels[row : row + h, col : col + w],
            best[row : row + h, col : col + w],
        )
    return labels


def write_label_raster(labels: np.ndarray, src: Any, out: Path) -> None:
    """Save `labels` as a one-band GeoTIFF with the scene's CRS and transform (0 = background)."""
    import rasterio

    dtype = "uint8" if labels.max(initial=0) < 256 else "uint16"
    profile = {
        "driver": "GTiff",
        "width": src.width,
        "height": src.height,
        "count": 1,
        "dtype": dtype,
        "crs": src.crs,
        "transform": src.transform,
        "compress": "deflate",
    }
    if src.width >= 512 and src.height >= 512:
        profile.update(tiled=True, blockxsize=256, blockysize=256)
    with rasterio.open(out, "w", **profile) as dst:
        dst.write(labels.astype(dtype), 1)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The scene options of `samlight segment` (use the converter's settings)."""
    scene = parser.add_argument_group("scenes (use the converter's settings)")
    scene.add_argument("--bands", default=None, help="1-based bands as R,G,B (default 1,2,3 or 1)")
    scene.add_argument("--tile-size", type=int, default=1024, help="tile side around prompts (default 1024)")
    scene.add_argument("--overlap", type=int, default=128, help="overlap of the tile grid (default 128)")
    scene.add_argument(
        "--prompts-crs", default=None, help="CRS of the GeoJSON coordinates (default: the scene's)"
    )


def run(args: argparse.Namespace, predictor: Any) -> str:
    """Segment the scene `args.input` with the GeoJSON prompts of `args.prompts` and write `args.out`; returns what
    was written, in words."""
    import rasterio

    from samlight.datamodules.tools.raster import parse_bands, scene_stretch
    from samlight.datamodules.tools.volumes import parse_percentile

    with rasterio.open(args.input) as src:
        bands = parse_bands(args.bands, src.count, args.input)
        stretch = scene_stretch(src, bands, parse_percentile(args.percentile or "2,98"))
        objects = read_scene_prompts(args.prompts, src, args.prompts_crs)
        labels = segment_scene(
            predictor,
            src,
            objects,
            bands=bands,
            stretch=stretch,
            tile=args.tile_size,
            overlap=args.overlap,
        )
        write_label_raster(labels, src, args.out)
    return f"{int((labels > 0).sum())} labelled pixels from {len(objects)} object(s)"
