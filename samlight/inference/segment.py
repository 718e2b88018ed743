"""`samlight segment`: run a (fine-tuned) SAM on a NIfTI/DICOM volume or a GeoTIFF scene with prompts from a file,
and write the result back in the source format (a NIfTI label volume with the input's affine and header, or a
GeoTIFF mask with the input's CRS and transform).

Slices and tiles are made by the same functions as the converters (`datamodules/volumes.py`, `raster.py`), so the
model sees at prediction time exactly the pixels it was fine-tuned on.

Volume prompts (JSON; coordinates are pixels of the slice image `samlight data convert --format nifti` writes, i.e.
the RAS slice in radiological display: x = column, y = row):

    {"axis": "axial",                                  # optional, default axial (or --axis)
     "intensity": {"window": "soft-tissue"},           # optional: {"window": NAME | [W, L]} or {"percentile": [lo, hi]}
     "slices": {"42": [[x0, y0, x1, y1], ...],          # a box per object, written as label 1
                "43": [{"box": [x0, y0, x1, y1], "label": 2},
                       {"points": [[x, y], ...], "point_labels": [1, 0], "label": 3}]}}

Scene prompts (GeoJSON FeatureCollection in map coordinates): a Point (or MultiPoint with
`properties.point_labels`) is a click, a Polygon/LineString gives its bounding box, a GeometryCollection combines
both; `properties.label` is the value written (default 1). Coordinates are in the scene's CRS unless the file has a
`crs` member or `--prompts-crs` is given.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

log = logging.getLogger("samlight.inference.segment")

VOLUME_SUFFIXES = (".nii", ".nii.gz")
RASTER_SUFFIXES = (".tif", ".tiff")


@dataclass(frozen=True)
class ObjectPrompt:
    """The prompts of one object, in pixel coordinates (x, y) of the image the predictor sees.

    Attributes:
        box: 4 (x0, y0, x1, y1) or None.
        points: P x 2 (x, y) or None.
        point_labels: P (1 foreground, 0 background) or None.
        label: value written where this object wins.
        where: where the prompt came from, for error messages.
    """

    box: np.ndarray | None
    points: np.ndarray | None
    point_labels: np.ndarray | None
    label: int
    where: str

    def bounds(self) -> tuple[float, float, float, float]:
        """x0, y0, x1, y1 around every coordinate of the prompt."""
        coords = [
            c
            for c in (self.box.reshape(2, 2) if self.box is not None else None, self.points)
            if c is not None
        ]
        xy = np.concatenate(coords)
        return float(xy[:, 0].min()), float(xy[:, 1].min()), float(xy[:, 0].max()), float(xy[:, 1].max())

    def shifted(self, dx: float, dy: float) -> ObjectPrompt:
        """The same prompt in a frame whose origin is at (dx, dy) of this one."""
        offset = np.array([dx, dy], dtype=np.float64)
        box = None if self.box is None else self.box - np.tile(offset, 2)
        points = None if self.points is None else self.points - offset
        return replace(self, box=box, points=points)

    def check_inside(self, width: int, height: int) -> None:
        x0, y0, x1, y1 = self.bounds()
        if x0 < 0 or y0 < 0 or x1 > width or y1 > height:
            raise ValueError(
                f"{self.where}: prompt spans x {x0:g}..{x1:g}, y {y0:g}..{y1:g}, outside the {width} x {height} image"
            )


def parse_object(entry: Any, where: str) -> ObjectPrompt:
    """One object of a volume prompt file: `[x0, y0, x1, y1]` or `{"box": ..., "points": ..., "label": ...}`."""
    if isinstance(entry, (list, tuple)):
        entry = {"box": entry}
    if not isinstance(entry, dict) or not ({"box", "points"} & entry.keys()):
        raise ValueError(
            f"{where}: expected [x0, y0, x1, y1] or an object with 'box' and/or 'points', got {entry!r}"
        )
    box = points = point_labels = None
    if entry.get("box") is not None:
        box = np.asarray(entry["box"], dtype=np.float64)
        if box.shape != (4,) or box[2] < box[0] or box[3] < box[1]:
            raise ValueError(
                f"{where}: a box is [x0, y0, x1, y1] with x0 <= x1 and y0 <= y1, got {entry['box']}"
            )
    if entry.get("points") is not None:
        points = np.asarray(entry["points"], dtype=np.float64).reshape(-1, 2)
        point_labels = np.asarray(entry.get("point_labels", [1] * len(points)), dtype=np.int64)
        if point_labels.shape != (len(points),):
            raise ValueError(f"{where}: {len(points)} points but point_labels {entry.get('point_labels')}")
    try:
        label = int(entry.get("label", 1))
    except (TypeError, ValueError) as err:
        raise ValueError(f"{where}: label must be a positive integer, got {entry.get('label')!r}") from err
    if label <= 0:
        raise ValueError(f"{where}: label must be a positive integer (0 is background), got {label}")
    return ObjectPrompt(box=box, points=points, point_labels=point_labels, label=label, where=where)


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


def predict_logits(predictor: Any, prompt: ObjectPrompt) -> np.ndarray:
    """H x W mask logits of one object on the image set in `predictor`.

    A single click is ambiguous, so it gets the three outputs and the one with the highest predicted IoU is kept
    (the paper's rule); boxes and several clicks use the single output.
    """
    multimask = prompt.box is None and prompt.points is not None and len(prompt.points) == 1
    logits, scores, _ = predictor.predict(
        point_coords=prompt.points,
        point_labels=prompt.point_labels,
        box=prompt.box,
        multimask_output=multimask,
        return_logits=True,
    )
    return np.asarray(logits[int(np.argmax(scores))], dtype=np.float32)


def mask_threshold(predictor: Any) -> float:
    """The model's logit threshold (0.0 for SAM)."""
    return float(getattr(getattr(predictor, "model", None), "mask_threshold", 0.0))


def merge(labels: np.ndarray, best: np.ndarray, logits: np.ndarray, value: int, threshold: float) -> None:
    """Paste one object into `labels` (in place) where it is foreground and more confident than what is there.

    Args:
        labels, best: H x W views of the output and of the best logit so far (-inf where empty).
        logits: H x W logits of the object.
    """
    wins = (logits > threshold) & (logits > best)
    labels[wins] = value
    best[wins] = logits[wins]


# ----------------------------------------------------------------------------------------------------- volumes


def read_volume_prompts(path: Path) -> tuple[dict[str, Any], dict[int, list[ObjectPrompt]]]:
    """The prompt file of a volume -> (its header fields, slice index -> objects)."""
    try:
        record = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"{path}: cannot read the prompt JSON: {err}") from err
    if not isinstance(record, dict) or not isinstance(record.get("slices"), dict):
        raise ValueError(f'{path}: expected {{"slices": {{"42": [[x0, y0, x1, y1], ...]}}, "axis": "axial"}}')
    slices: dict[int, list[ObjectPrompt]] = {}
    for key, entries in record["slices"].items():
        try:
            index = int(key)
        except ValueError as err:
            raise ValueError(f"{path}: slice key {key!r} is not an integer slice index") from err
        if not isinstance(entries, list):
            raise ValueError(f"{path}: slice {key} must hold a list of boxes/objects, got {entries!r}")
        slices[index] = [parse_object(e, f"{path} slice {key} object {i}") for i, e in enumerate(entries)]
    return record, slices


def load_volume(path: Path) -> Any:
    """A nibabel image from a NIfTI file or a DICOM series folder."""
    import nibabel as nib

    from samlight.datamodules.tools.volumes import read_dicom_series

    if path.is_dir():
        return read_dicom_series(path)
    return nib.load(path)


def segment_volume(
    predictor: Any,
    image: Any,
    slices: dict[int, list[ObjectPrompt]],
    *,
    axis: str,
    intensity: Any,
    threshold: float = 0.0,
) -> np.ndarray:
    """Label volume in the array layout of `image` (same shape), from prompts per slice.

    Args:
        image: nibabel image X x Y x Z (any orientation).
        intensity: `Intensity` used to render the slices (the converter's setting).
    """
    from samlight.datamodules.tools.volumes import (
        SLICE_AXES,
        canonical,
        from_canonical,
        intensity_range,
        put_plane,
        slice_plane,
        to_uint8,
    )

    canon = canonical(image)
    volume = canon.get_fdata(dtype=np.float32)
    if volume.ndim == 4:
        volume = volume[..., 0]
    lo, hi = intensity_range(volume, intensity)
    depth = volume.shape[SLICE_AXES[axis][0]]
    labels = np.zeros(volume.shape, dtype=np.uint16)
    for index, objects in sorted(slices.items()):
        if not 0 <= index < depth:
            raise ValueError(f"slice {index} is outside the volume: {axis} slices run 0..{depth - 1}")
        plane = to_uint8(slice_plane(volume, axis, index), lo, hi)  # H x W x 3
        for obj in objects:
            obj.check_inside(plane.shape[1], plane.shape[0])
        predictor.set_image(plane)
        plane_labels = np.zeros(plane.shape[:2], dtype=np.uint16)
        best = np.full(plane.shape[:2], -np.inf, dtype=np.float32)
        for obj in objects:
            merge(plane_labels, best, predict_logits(predictor, obj), obj.label, threshold)
        put_plane(labels, axis, index, plane_labels)
    return from_canonical(labels, image)


def write_label_volume(labels: np.ndarray, reference: Any, out: Path) -> None:
    """Save `labels` as NIfTI with the reference's affine and header (dtype uint8/uint16, no intensity scaling)."""
    import nibabel as nib

    dtype = np.uint8 if labels.max(initial=0) < 256 else np.uint16
    header = reference.header.copy() if isinstance(reference, nib.Nifti1Image) else None
    result = nib.Nifti1Image(labels.astype(dtype), reference.affine, header=header)
    result.set_data_dtype(dtype)
    result.header.set_slope_inter(1.0, 0.0)
    if header is not None:
        # keep the input's qform/sform codes, so viewers place the labels exactly on the scan
        result.set_qform(reference.affine, code=int(reference.header["qform_code"]) or 1)
        result.set_sform(reference.affine, code=int(reference.header["sform_code"]) or 1)
    nib.save(result, out)


def run_volume(args: argparse.Namespace, predictor: Any) -> None:
    from samlight.datamodules.tools.volumes import Intensity, parse_percentile, parse_window

    record, slices = read_volume_prompts(args.prompts)
    axis = args.axis or record.get("axis", "axial")
    if args.window is not None:
        intensity = Intensity(window=parse_window(args.window))
    elif args.percentile is not None:
        intensity = Intensity(percentile=parse_percentile(args.percentile))
    else:
        intensity = Intensity.from_record(record.get("intensity", {}))
    image = load_volume(args.input)
    labels = segment_volume(
        predictor, image, slices, axis=axis, intensity=intensity, threshold=mask_threshold(predictor)
    )
    write_label_volume(labels, image, args.out)
    log.info("wrote %s: %d labelled voxels over %d slice(s)", args.out, int((labels > 0).sum()), len(slices))


# ------------------------------------------------------------------------------------------------------ scenes


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

    try:
        record = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"{path}: cannot read the GeoJSON prompts: {err}") from err
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
    threshold: float = 0.0,
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
        predictor.set_image(stretch_to_uint8(data, stretch, valid_mask(data, src.nodata)))
        tile_labels = labels[row : row + h, col : col + w]
        tile_best = best[row : row + h, col : col + w]
        for obj in members:
            logits = predict_logits(predictor, obj.shifted(col, row)).astype(np.float16)
            merge(tile_labels, tile_best, logits, obj.label, threshold)
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


def run_scene(args: argparse.Namespace, predictor: Any) -> None:
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
            threshold=mask_threshold(predictor),
        )
        write_label_raster(labels, src, args.out)
    log.info(
        "wrote %s: %d labelled pixels from %d object(s)", args.out, int((labels > 0).sum()), len(objects)
    )


# ---------------------------------------------------------------------------------------------------------- CLI


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="samlight segment",
        description="Segment a NIfTI/DICOM volume or a GeoTIFF scene with prompts from a file and write the result "
        "in the source format (NIfTI label volume with the input's affine; GeoTIFF mask with its CRS and transform).",
    )
    parser.add_argument(
        "--ckpt", required=True, help="checkpoint: official .pth, samlight .ckpt or safetensors"
    )
    parser.add_argument("--variant", default="vit_b", help="model variant of the checkpoint (default vit_b)")
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
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    volume = parser.add_argument_group("volumes (use the converter's settings)")
    volume.add_argument(
        "--axis", choices=("axial", "coronal", "sagittal"), default=None, help="default: prompt file"
    )
    volume.add_argument("--window", default=None, help="CT window preset or W,L (default: prompt file)")
    scene = parser.add_argument_group("scenes (use the converter's settings)")
    scene.add_argument("--bands", default=None, help="1-based bands as R,G,B (default 1,2,3 or 1)")
    scene.add_argument("--tile-size", type=int, default=1024, help="tile side around prompts (default 1024)")
    scene.add_argument("--overlap", type=int, default=128, help="overlap of the tile grid (default 128)")
    scene.add_argument(
        "--prompts-crs", default=None, help="CRS of the GeoJSON coordinates (default: the scene's)"
    )
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
    is_volume = name.endswith(VOLUME_SUFFIXES) or args.input.is_dir()
    if not is_volume and not name.endswith(RASTER_SUFFIXES):
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
            (run_volume if is_volume else run_scene)(args, predictor)
    except (ValueError, FileNotFoundError) as err:
        print(f"samlight segment: {err}", file=sys.stderr)
        return 1
    print(f"samlight segment: wrote {args.out}")
    return 0
