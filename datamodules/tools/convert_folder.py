"""`samlight data convert --format folder`: an image folder plus instance-label maps or per-object binary masks.

Images are matched to masks by file stem: `images/a.jpg` <-> `masks/a.png` (instance mode: one label map, 0 is
background, every other value one object) or `masks/a/*.png` (binary-per-object mode: one file per object).
"""

from __future__ import annotations

import argparse
import io
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from samlight.datamodules.tools.convert import ConvertSummary, open_writer, progress
from samlight.datamodules.tools.shards import annotations_from_masks

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp", ".webp")
MASK_SUFFIXES = (".png", ".tif", ".tiff", ".bmp")
# Label ids are turned into masks this many at a time, so a 16-bit map with thousands of objects never
# materialises thousands of full-size masks at once.
MASK_CHUNK = 64


class SkipInput(Exception):
    """An input that cannot be converted; `reason` is the summary's bucket."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason


def add_arguments(parser: argparse.ArgumentParser, fmt: str) -> None:
    parser.add_argument("--images", required=True, type=Path, help="folder of images (jpg, png, tif, ...)")
    parser.add_argument(
        "--masks", required=True, type=Path, help="folder of masks, matched to images by file stem"
    )
    parser.add_argument(
        "--mask-mode",
        choices=("instance", "binary-per-object"),
        default="instance",
        help="instance: masks/<stem>.png|tif is a label map (0 = background, each other id one object; 8/16 bit, "
        "or RGB colours); binary-per-object: masks/<stem>/*.png, one binary mask per object (default instance)",
    )
    parser.add_argument(
        "--mask-suffix",
        default="",
        help="text after the image stem in mask names, e.g. '_mask' for a.jpg <-> a_mask.png (default none)",
    )
    parser.add_argument(
        "--connected-components",
        action="store_true",
        help="split every object into its connected components (for semantic label maps)",
    )
    parser.add_argument(
        "--min-area", type=int, default=1, help="drop masks smaller than this many pixels (default 1)"
    )
    parser.add_argument(
        "--ignore-value",
        type=int,
        action="append",
        default=[],
        help="label value treated as background, e.g. 255 for 'void' borders (repeatable)",
    )
    parser.add_argument("--recursive", action="store_true", help="also look for images in sub-folders")


def run(args: argparse.Namespace) -> ConvertSummary:
    """Convert the folder pair; see `add_arguments` for the options."""
    start = time.perf_counter()
    summary = ConvertSummary()
    if not args.images.is_dir():
        raise SystemExit(f"--images {args.images}: not a directory")
    if not args.masks.is_dir():
        raise SystemExit(f"--masks {args.masks}: not a directory")
    images = list_images(args.images, recursive=args.recursive)
    if not images:
        raise SystemExit(f"--images {args.images}: no image files ({', '.join(IMAGE_SUFFIXES)}) found")
    masks_by_stem = _index_masks(args.masks, args.mask_mode, args.mask_suffix)
    used_keys: set[str] = set()
    with open_writer(args) as writer:
        for path in progress(images, total=len(images), desc="convert folder"):
            stem = path.relative_to(args.images).with_suffix("").as_posix()
            source = masks_by_stem.pop(stem, None)
            if source is None:
                summary.skip(
                    "unmatched image", str(path), f"no mask named {stem}{args.mask_suffix}.* in {args.masks}"
                )
                continue
            try:
                pixels, annotations, info = _convert_one(path, source, args, summary)
            except SkipInput as err:
                summary.skip(err.reason, str(path), str(err))
                continue
            if not annotations:
                summary.skip("no masks", str(path), "no object left after --min-area / --ignore-value")
                continue
            key = unique_key(stem, used_keys)
            writer.write(key, pixels, annotations=annotations, image_info=info, quality=args.quality)
    for stem, source in masks_by_stem.items():
        summary.skip("unmatched mask", str(source), f"no image with stem {stem} in {args.images}")
    return summary.finish(writer, start)


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
    image_path: Path, source: Path, args: argparse.Namespace, summary: ConvertSummary
) -> tuple[np.ndarray | bytes, list[dict[str, Any]], dict[str, Any]]:
    """Read one image and its masks. Returns (original JPEG bytes, or H x W x 3 uint8 pixels when the image must
    be re-encoded; SA-1B annotations, each with the `instance_id` it came from; json image info)."""
    image, jpeg = read_image(image_path)
    height, width = image.shape[:2]
    if args.mask_mode == "instance":
        labels = read_array(source)
        if labels.shape[:2] != (height, width):
            raise SkipInput(
                "size mismatch", f"mask {source} is {labels.shape[:2]}, image is {(height, width)}"
            )
        chunks = iter_instance_masks(
            labels, connected_components=args.connected_components, ignore=tuple(args.ignore_value)
        )
    else:
        chunks = _iter_binary_masks(source, (height, width), summary, args.connected_components)
    annotations: list[dict[str, Any]] = []
    # Chunk by chunk, so an image with thousands of objects never holds all its masks at full size.
    for masks, ids in chunks:  # K x H x W bool, K label ids
        keep = np.flatnonzero(masks.sum(axis=(1, 2)) >= args.min_area)
        summary.drop_masks("below --min-area", masks.shape[0] - keep.size)
        if keep.size:
            chunk_annotations = annotations_from_masks(masks[keep], start_id=len(annotations))
            for ann, index in zip(chunk_annotations, keep):
                ann["instance_id"] = ids[index]
            annotations.extend(chunk_annotations)
    info = {"source_file": image_path.name, "height": height, "width": width}
    return (jpeg if jpeg is not None else image), annotations, info


def read_image(path: Path) -> tuple[np.ndarray, bytes | None]:
    """Read an image as H x W x 3 uint8 RGB. Returns (pixels, the file's bytes when it is already an RGB JPEG that
    can go into the shard unchanged, else None)."""
    try:
        raw = path.read_bytes()
        with Image.open(io.BytesIO(raw)) as img:
            is_rgb_jpeg = img.format == "JPEG" and img.mode == "RGB"
            array = read_array(path, opened=img)
    except SkipInput:
        raise
    except Exception as err:  # any decoder error means the file is unusable
        raise SkipInput("unreadable", f"{path}: {err}") from err
    rgb = to_rgb_uint8(array)
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


def instance_masks(
    labels: np.ndarray, *, connected_components: bool = False, ignore: tuple[int, ...] = ()
) -> tuple[np.ndarray, list[int]]:
    """Binary masks from an instance label map.

    Args:
        labels: H x W integer labels (0 = background), or H x W x C colour-coded labels (black = background).
        connected_components: split each label into its 8-connected components.
        ignore: label values treated as background.
    Returns:
        masks M x H x W bool, and the M label ids they came from (in increasing order).
    """
    chunks = list(iter_instance_masks(labels, connected_components=connected_components, ignore=ignore))
    if not chunks:
        flat = _flatten_label_colours(labels)
        return np.zeros((0, *flat.shape), dtype=bool), []
    return np.concatenate([m for m, _ in chunks]), [i for _, ids in chunks for i in ids]


def iter_instance_masks(
    labels: np.ndarray, *, connected_components: bool = False, ignore: tuple[int, ...] = ()
) -> Iterator[tuple[np.ndarray, list[int]]]:
    """`instance_masks` in chunks of at most `MASK_CHUNK` labels: yields (K x H x W bool, K label ids)."""
    labels = _flatten_label_colours(labels)
    ids = [int(v) for v in np.unique(labels) if v != 0 and int(v) not in ignore]
    for begin in range(0, len(ids), MASK_CHUNK):
        block = np.asarray(ids[begin : begin + MASK_CHUNK], dtype=labels.dtype)
        masks = labels[None] == block[:, None, None]  # K x H x W
        if connected_components:
            masks, owners = split_components(masks)
            yield masks, [int(block[i]) for i in owners]
        else:
            yield masks, [int(v) for v in block]


def split_components(masks: np.ndarray) -> tuple[np.ndarray, list[int]]:
    """Split each of M x H x W masks into 8-connected components. Returns (K x H x W, owner index per component)."""
    from scipy import ndimage

    parts, owners = [], []
    structure = np.ones((3, 3), dtype=bool)
    for i, mask in enumerate(masks):
        components, count = ndimage.label(mask, structure=structure)
        if count:
            parts.append(components[None] == np.arange(1, count + 1, dtype=components.dtype)[:, None, None])
            owners.extend([i] * count)
    if not parts:
        return np.zeros((0, *masks.shape[1:]), dtype=bool), []
    return np.concatenate(parts), owners


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
    folder: Path, size: tuple[int, int], summary: ConvertSummary, connected_components: bool
) -> Iterator[tuple[np.ndarray, list[int]]]:
    """One mask per file in `folder` (nonzero = object), in chunks: yields (K x H x W bool, K file indices).
    Unreadable or mis-sized files are skipped and counted on their own."""
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
            yield _components(np.stack(masks), ids, connected_components)
            masks, ids = [], []
    if masks:
        yield _components(np.stack(masks), ids, connected_components)


def _components(masks: np.ndarray, ids: list[int], split: bool) -> tuple[np.ndarray, list[int]]:
    if not split:
        return masks, ids
    parts, owners = split_components(masks)
    return parts, [ids[i] for i in owners]
