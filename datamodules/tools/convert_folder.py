"""`samlight data convert --format folder`: an image folder plus instance-label maps or per-object binary masks.

Images are matched to masks by file stem: `images/a.jpg` <-> `masks/a.png` (instance mode: one label map, 0 is
background, every other value one object) or `masks/a/*.png` (binary-per-object mode: one file per object).
"""

from __future__ import annotations

import argparse
import io
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from samlight.datamodules.tools.convert import ConvertSummary, FormatAdapter, Sample, SkipInput
from samlight.datamodules.tools.labels import MASK_CHUNK, label_annotations, label_masks, split_components
from samlight.datamodules.tools.volumes import parse_percentile

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp", ".webp")
MASK_SUFFIXES = (".png", ".tif", ".tiff", ".bmp")


class FolderAdapter(FormatAdapter):
    """Images matched to label maps (or to folders of binary masks) by file stem."""

    images_help = "folder of images (jpg, png, tif, ...)"
    labels_help = (
        "folder of masks matched to images by file stem: label maps masks/<stem>.png|tif, or with "
        "--mask-mode binary-per-object one folder masks/<stem>/ of binary masks per image"
    )
    desc = "convert folder"

    @staticmethod
    def add_arguments(parser: argparse.ArgumentParser) -> None:
        parser.add_argument(
            "--mask-mode",
            choices=("instance", "binary-per-object"),
            default="instance",
            help="instance: masks/<stem>.png|tif is a label map (0 = background, each other id one object; "
            "8/16 bit, or RGB colours); binary-per-object: masks/<stem>/*.png, one binary mask per object "
            "(default instance)",
        )
        parser.add_argument(
            "--mask-suffix",
            default="",
            help="text after the image stem in mask names, e.g. '_mask' for a.jpg <-> a_mask.png (default none)",
        )
        parser.add_argument(
            "--connected-components",
            action="store_true",
            help="split every object into its 8-connected components (for semantic label maps)",
        )
        parser.add_argument(
            "--ignore-value",
            type=int,
            action="append",
            default=[],
            help="label value treated as background, e.g. 255 for 'void' borders (repeatable)",
        )
        parser.add_argument("--recursive", action="store_true", help="also look for images in sub-folders")
        parser.add_argument(
            "--percentile",
            default="1,99",
            help="16-bit, integer and float images: per-image LOW,HIGH percentiles mapped to 0 and 255 "
            "(default 1,99; 8-bit images are kept as they are)",
        )

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.percentile = parse_percentile(args.percentile)  # a ValueError names the flag (convert skeleton)
        self.used_keys: set[str] = set()
        self.masks_by_stem: dict[str, Path] = {}

    def inputs(self, summary: ConvertSummary) -> list[tuple[str, Path]]:
        args = self.args
        if not args.images.is_dir():
            raise SystemExit(f"--images {args.images}: not a directory")
        if not args.labels.is_dir():
            raise SystemExit(f"--labels/--masks {args.labels}: not a directory")
        images = list_images(args.images, recursive=args.recursive)
        if not images:
            raise SystemExit(f"--images {args.images}: no image files ({', '.join(IMAGE_SUFFIXES)}) found")
        self.masks_by_stem = _index_masks(args.labels, args.mask_mode, args.mask_suffix)
        return [(str(path), path) for path in images]

    def samples(self, path: Path, summary: ConvertSummary) -> Iterator[Sample]:
        args = self.args
        stem = path.relative_to(args.images).with_suffix("").as_posix()
        source = self.masks_by_stem.pop(stem, None)
        if source is None:
            summary.skip(
                "unmatched image", str(path), f"no mask named {stem}{args.mask_suffix}.* in {args.labels}"
            )
            return
        image, annotations, info = _convert_one(path, source, args, self.percentile, summary)
        if not annotations:
            summary.skip("no masks", str(path), "no object left after --min-area / --ignore-value")
            return
        yield Sample(unique_key(stem, self.used_keys), image, annotations, info)

    def finish(self, summary: ConvertSummary) -> None:
        for stem, source in self.masks_by_stem.items():
            summary.skip("unmatched mask", str(source), f"no image with stem {stem} in {self.args.images}")


def list_images(root: Path, *, recursive: bool = False) -> list[Path]:
    """Image files under `root`, sorted (deterministic shard contents)."""
    files = root.rglob("*") if recursive else root.iterdir()
    return sorted(p for p in files if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def unique_key(stem: str, used: set[str]) -> str:
    """A WebDataset-safe sample key for `stem` (no dots or slashes), unique among `used` (which it joins)."""
    base = re.sub(r"[^A-Za-z0-9_-]", "_", stem) or "sample"
    key, n = base, 1
    while key in used:
        key, n = f"{base}_{n}", n + 1
    used.add(key)
    return key


def _index_masks(root: Path, mode: str, suffix: str) -> dict[str, Path]:
    """Image stem (relative to the mask root, posix) -> mask file (instance) or folder (binary-per-object)."""
    index: dict[str, Path] = {}
    for path in sorted(root.rglob("*")):
        if mode == "instance" and not (path.is_file() and path.suffix.lower() in MASK_SUFFIXES):
            continue
        if mode == "binary-per-object" and not path.is_dir():
            continue
        stem = (
            path.relative_to(root).with_suffix("").as_posix()
            if path.is_file()
            else path.relative_to(root).as_posix()
        )
        if suffix:
            if not stem.endswith(suffix):
                continue
            stem = stem[: -len(suffix)]
        index.setdefault(stem, path)
    return index


def _convert_one(
    image_path: Path,
    source: Path,
    args: argparse.Namespace,
    percentile: tuple[float, float],
    summary: ConvertSummary,
) -> tuple[np.ndarray | bytes, list[dict[str, Any]], dict[str, Any]]:
    """Read one image and its masks. Returns (original JPEG bytes, or H x W x 3 uint8 pixels when the image must
    be re-encoded; SA-1B annotations, each with the `instance_id` it came from; json image info)."""
    image, jpeg = read_image(image_path, percentile=percentile)
    height, width = image.shape[:2]
    components = 8 if args.connected_components else None
    if args.mask_mode == "instance":
        labels = read_array(source)
        if labels.shape[:2] != (height, width):
            raise SkipInput(
                "size mismatch", f"mask {source} is {labels.shape[:2]}, image is {(height, width)}"
            )
        chunks = label_masks(
            _flatten_label_colours(labels), components=components, ignore=tuple(args.ignore_value)
        )
    else:
        chunks = _iter_binary_masks(source, (height, width), summary, components)
    annotations = label_annotations(
        chunks, min_area=args.min_area, field="instance_id", summary=summary, drop_reason="below --min-area"
    )
    info = {"source_file": image_path.name, "height": height, "width": width}
    return (jpeg if jpeg is not None else image), annotations, info


def read_image(
    path: Path, *, percentile: tuple[float, float] = (1.0, 99.0)
) -> tuple[np.ndarray, bytes | None]:
    """Read an image as H x W x 3 uint8 RGB (non-8-bit data stretched between the `percentile`s, `to_rgb_uint8`).
    Returns (pixels, the file's bytes when it is already an RGB JPEG that can go into the shard unchanged, else
    None)."""
    try:
        raw = path.read_bytes()
        with Image.open(io.BytesIO(raw)) as img:
            is_rgb_jpeg = img.format == "JPEG" and img.mode == "RGB"
            array = read_array(path, opened=img)
    except SkipInput:
        raise
    except Exception as err:  # any decoder error means the file is unusable
        raise SkipInput("unreadable", f"{path}: {err}") from err
    rgb = to_rgb_uint8(array, low=percentile[0], high=percentile[1])
    return rgb, (raw if is_rgb_jpeg else None)


def read_array(path: Path, opened: Image.Image | None = None) -> np.ndarray:
    """Pixels of an image or label file as a numpy array, keeping 16-bit and multi-channel data (tifffile for
    TIFFs Pillow cannot read)."""
    try:
        if opened is not None:
            return np.asarray(opened)
        with Image.open(path) as img:
            return np.asarray(img)
    except Exception as pil_err:
        if path.suffix.lower() in (".tif", ".tiff"):
            try:
                import tifffile

                return np.asarray(tifffile.imread(path))
            except Exception as tif_err:
                raise SkipInput("unreadable", f"{path}: {tif_err}") from tif_err
        raise SkipInput("unreadable", f"{path}: {pil_err}") from pil_err


def to_rgb_uint8(array: np.ndarray, *, low: float = 1.0, high: float = 99.0) -> np.ndarray:
    """H x W x 3 uint8 RGB from gray, gray+alpha, RGB, RGBA or more channels, of any dtype.

    8-bit data is kept as is; 16-bit, integer and float data are stretched between the `low` and `high`
    percentiles (over all channels together, so colours keep their balance). Alpha is dropped.
    """
    if array.ndim == 3 and array.shape[0] in (1, 3, 4) and array.shape[2] > 4:
        array = np.moveaxis(array, 0, -1)  # C x H x W (TIFF planar) -> H x W x C
    if array.ndim == 2:
        array = array[..., None]
    if array.ndim != 3:
        raise SkipInput("unsupported image", f"image array has shape {array.shape}, expected H x W [x C]")
    channels = array.shape[2]
    array = array[..., :1] if channels in (1, 2) else array[..., :3]  # drop alpha / extra bands
    if array.dtype == np.bool_:
        array = array.astype(np.uint8) * 255
    elif array.dtype != np.uint8:
        values = array.astype(np.float32)
        finite = np.isfinite(values)
        lo, hi = np.percentile(values[finite], (low, high)) if finite.any() else (0.0, 1.0)
        scale = 255.0 / (hi - lo) if hi > lo else 0.0
        array = np.clip((np.nan_to_num(values, nan=lo) - lo) * scale, 0, 255).round().astype(np.uint8)
    if array.shape[2] == 1:
        array = np.repeat(array, 3, axis=2)
    return np.ascontiguousarray(array)


def _flatten_label_colours(labels: np.ndarray) -> np.ndarray:
    """H x W x C colour labels -> H x W int64 ids (one per colour; black stays 0); H x W passes through."""
    if labels.ndim == 2:
        return labels
    if labels.ndim == 3 and labels.shape[2] in (1, 2, 3, 4):
        rgb = labels[..., : min(3, labels.shape[2])].astype(np.int64)
        if rgb.shape[2] == 1 or labels.shape[2] == 2:
            return rgb[..., 0]
        return (rgb[..., 0] << 32) | (rgb[..., 1] << 16) | rgb[..., 2]
    raise SkipInput("unsupported mask", f"label array has shape {labels.shape}, expected H x W or H x W x 3")


def _iter_binary_masks(
    folder: Path, size: tuple[int, int], summary: ConvertSummary, components: int | None
) -> Iterator[tuple[np.ndarray, list[int]]]:
    """One mask per file in `folder` (nonzero = object), in chunks: yields (K x H x W bool, K file indices), each
    split into its `components`-connected parts when given. Unreadable or mis-sized files are skipped and counted
    on their own."""
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in MASK_SUFFIXES)
    masks, ids = [], []
    for index, path in enumerate(files):
        try:
            array = read_array(path)
        except SkipInput as err:
            summary.skip("unreadable mask", str(path), str(err))
            continue
        if array.shape[:2] != size:
            summary.skip("size mismatch", str(path), f"mask is {array.shape[:2]}, image is {size}")
            continue
        # Nonzero in any colour channel is object; an alpha channel is ignored (it is often all opaque).
        colour = array if array.ndim == 2 else array[..., : 1 if array.shape[2] in (1, 2) else 3].max(-1)
        masks.append(colour > 0)
        ids.append(index)
        if len(masks) == MASK_CHUNK or index == len(files) - 1:
            yield _split(np.stack(masks), ids, components)
            masks, ids = [], []
    if masks:
        yield _split(np.stack(masks), ids, components)


def _split(masks: np.ndarray, ids: list[int], components: int | None) -> tuple[np.ndarray, list[int]]:
    if not components:
        return masks, ids
    parts, owners = split_components(masks, components)
    return parts, [ids[i] for i in owners]
