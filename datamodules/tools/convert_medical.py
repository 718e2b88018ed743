"""`samlight data convert --format nifti|dicom`: CT/MR volumes with label volumes -> SA-1B-format slice samples.

One sample per slice that carries a label, one mask per label id (or per connected component of it), the label id as
each annotation's `category_id`, and the volume's geometry in the json "image" entry so `samlight segment` and users
can put predictions back into the volume.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage

from samlight.datamodules.tools.convert import ConvertSummary, open_writer, progress
from samlight.datamodules.tools.shards import SA1BShardWriter, annotations_from_masks
from samlight.datamodules.tools.volumes import (
    SLICE_AXES,
    WINDOW_PRESETS,
    Intensity,
    canonical,
    case_id,
    find_label,
    geometry_record,
    intensity_range,
    list_nifti,
    nnunet_channel,
    parse_percentile,
    parse_window,
    read_dicom_series,
    slice_plane,
    to_uint8,
)


class VolumeMismatch(ValueError):
    """An image volume and its label volume do not describe the same voxels (shape or affine differ)."""


def add_arguments(parser: argparse.ArgumentParser, fmt: str) -> None:
    """Options of `--format nifti` and `--format dicom`."""
    if fmt == "dicom":
        parser.add_argument(
            "--images",
            required=True,
            type=Path,
            help="a DICOM series folder, or a folder whose sub-folders are series (one series per folder)",
        )
        parser.add_argument(
            "--labels",
            required=True,
            type=Path,
            help="NIfTI label volume of the series, or a folder of `<series folder name>.nii.gz` label volumes",
        )
    else:
        parser.add_argument(
            "--images", required=True, type=Path, help="folder of image volumes (.nii / .nii.gz)"
        )
        parser.add_argument(
            "--labels",
            required=True,
            type=Path,
            help="folder of label volumes with the same file names (nnU-Net `_0000` channel suffixes tolerated)",
        )
    parser.add_argument(
        "--axis",
        choices=sorted(SLICE_AXES),
        default="axial",
        help="slice direction in patient (RAS) terms, whatever the file's array order (default axial)",
    )
    intensity = parser.add_mutually_exclusive_group()
    intensity.add_argument(
        "--window",
        help=f"CT window: a preset ({', '.join(f'{k} W{w:g} L{lv:g}' for k, (w, lv) in WINDOW_PRESETS.items())}) "
        "or WIDTH,LEVEL in HU",
    )
    intensity.add_argument(
        "--percentile",
        default=None,
        help="MR normalisation: LOW,HIGH percentiles of the volume mapped to 0 and 255 (default 0.5,99.5)",
    )
    parser.add_argument(
        "--connected-components",
        action="store_true",
        help="one mask per connected component of each label id (default: one mask per label id)",
    )
    parser.add_argument(
        "--min-area", type=int, default=1, help="drop masks smaller than this many pixels (default 1)"
    )
    parser.add_argument(
        "--strict", action="store_true", help="stop at the first bad case instead of skipping and counting it"
    )


def intensity_from_args(window: str | None, percentile: str | None) -> Intensity:
    """`--window` wins when given; otherwise percentiles (default 0.5,99.5)."""
    if window is not None:
        return Intensity(window=parse_window(window))
    return Intensity(percentile=parse_percentile(percentile or "0.5,99.5"))


def load_labels(label_image: Any, path: Path) -> np.ndarray:
    """Integer label array of a (canonical) NIfTI label image; non-integer or negative values are an error."""
    raw = np.asanyarray(label_image.dataobj)
    if raw.ndim == 4 and raw.shape[3] == 1:
        raw = raw[..., 0]
    labels = np.rint(raw).astype(np.int64)
    if not np.allclose(labels, raw, atol=1e-3):
        raise VolumeMismatch(f"{path}: label volume holds non-integer values; labels must be integer ids")
    if labels.min() < 0:
        raise VolumeMismatch(
            f"{path}: label volume holds negative values ({labels.min()}); labels must be >= 0"
        )
    return labels


def check_pair(image: Any, label: Any, image_path: Path, label_path: Path) -> None:
    """Raise VolumeMismatch naming both files when shapes or affines differ."""
    if image.ndim == 4 and image.shape[3] != 1:
        raise VolumeMismatch(
            f"{image_path}: 4-D volume {image.shape}; give one channel per file (nnU-Net style case_0000.nii.gz)"
        )
    if tuple(image.shape[:3]) != tuple(label.shape[:3]):
        raise VolumeMismatch(
            f"image {image_path} has shape {tuple(image.shape[:3])} but label {label_path} has "
            f"{tuple(label.shape[:3])}; they must cover the same voxels"
        )
    if not np.allclose(image.affine, label.affine, atol=1e-3, rtol=1e-5):
        raise VolumeMismatch(
            f"image {image_path} and label {label_path} have different affines "
            f"(max difference {np.abs(image.affine - label.affine).max():.4g}); resample the label onto the image grid"
        )


def slice_masks(
    labels2d: np.ndarray, *, connected_components: bool, min_area: int
) -> tuple[np.ndarray, np.ndarray, int]:
    """Binary masks of one label slice.

    Args:
        labels2d: H x W integer labels (0 = background).
    Returns:
        masks M x H x W bool, category ids M, and the number of masks dropped below `min_area`.
    """
    ids = np.unique(labels2d)
    ids = ids[ids > 0]
    if connected_components:
        masks, categories = [], []
        for label_id in ids:
            components, count = ndimage.label(labels2d == label_id)
            if count:
                masks.append(components[None] == np.arange(1, count + 1)[:, None, None])  # count x H x W
                categories.append(np.full(count, label_id))
        masks_arr = np.concatenate(masks) if masks else np.zeros((0, *labels2d.shape), dtype=bool)
        cats = np.concatenate(categories) if categories else np.zeros(0, dtype=np.int64)
    else:
        masks_arr = labels2d[None] == ids[:, None, None]  # M x H x W
        cats = ids
    keep = masks_arr.reshape(len(masks_arr), -1).sum(1) >= min_area
    return masks_arr[keep], cats[keep], int((~keep).sum())


def convert_volume(
    writer: SA1BShardWriter,
    summary: ConvertSummary,
    *,
    image: Any,
    label: Any,
    case: str,
    image_path: Path,
    label_path: Path,
    axis: str = "axial",
    intensity: Intensity,
    connected_components: bool = False,
    min_area: int = 1,
    quality: int = 90,
) -> int:
    """Write one sample per labelled slice of one volume; returns the number of samples written.

    Args:
        image, label: nibabel images on the same voxel grid (any orientation; sliced in RAS terms).
    """
    check_pair(image, label, image_path, label_path)
    canon_image, canon_label = canonical(image), canonical(label)
    labels = load_labels(canon_label, label_path)  # X x Y x Z
    if not labels.any():
        summary.skip("empty label volume", str(label_path), "no voxel carries a label")
        return 0
    volume = canon_image.get_fdata(dtype=np.float32)
    if volume.ndim == 4:
        volume = volume[..., 0]
    lo, hi = intensity_range(volume, intensity)
    fixed, letter = SLICE_AXES[axis]
    other = tuple(i for i in range(3) if i != fixed)
    labelled = np.flatnonzero(labels.any(axis=other))
    geometry = geometry_record(image, canon_image, axis)
    key_case = case.replace(".", "-")
    written = 0
    for index in labelled:
        masks, categories, dropped = slice_masks(
            slice_plane(labels, axis, int(index)),
            connected_components=connected_components,
            min_area=min_area,
        )
        summary.drop_masks("below min area", dropped)
        if len(masks) == 0:
            summary.skip("no mask above min area", f"{case} slice {index}")
            continue
        annotations = annotations_from_masks(masks)
        for ann, category in zip(annotations, categories):
            ann["category_id"] = int(category)
        info = {
            "source": str(image_path),
            "label_source": str(label_path),
            "case": case,
            "slice_index": int(index),
            **geometry,
            "intensity": {**intensity.describe(), "range": [lo, hi]},
        }
        image_rgb = to_uint8(slice_plane(volume, axis, int(index)), lo, hi)
        writer.write(
            f"{key_case}_{letter}{int(index):03d}",
            image_rgb,
            annotations=annotations,
            image_info=info,
            quality=quality,
        )
        written += 1
    return written


def _nifti_pairs(images: Path, labels: Path, summary: ConvertSummary) -> list[tuple[str, Path, Path]]:
    pairs = []
    for path in list_nifti(images):
        channel = nnunet_channel(path)
        if channel not in (None, 0):
            summary.skip("extra nnU-Net channel", path.name, "only channel _0000 is converted")
            continue
        case = case_id(path)
        label = find_label(labels, case)
        if label is None:
            summary.skip("no label volume", path.name, f"expected {labels}/{case}.nii.gz")
            continue
        pairs.append((case, path, label))
    return pairs


def convert_nifti(
    *,
    images: Path,
    labels: Path,
    writer: SA1BShardWriter,
    summary: ConvertSummary,
    strict: bool = False,
    **options: Any,
) -> ConvertSummary:
    """Convert every image volume in `images` with its label volume in `labels`; `options` go to `convert_volume`."""
    import nibabel as nib

    pairs = _nifti_pairs(Path(images), Path(labels), summary)
    for case, image_path, label_path in progress(pairs, total=len(pairs), desc="volumes"):
        try:
            convert_volume(
                writer,
                summary,
                image=nib.load(image_path),
                label=nib.load(label_path),
                case=case,
                image_path=image_path,
                label_path=label_path,
                **options,
            )
        except VolumeMismatch as err:
            if strict:
                raise
            summary.skip("image/label mismatch", case, str(err))
    return summary


def _dicom_pairs(images: Path, labels: Path) -> list[tuple[str, Path, Path]]:
    subdirs = sorted(p for p in images.iterdir() if p.is_dir()) if images.is_dir() else []
    if not images.is_dir():
        raise FileNotFoundError(f"{images}: not a DICOM series folder")
    if not subdirs or any(p.is_file() for p in images.iterdir()):
        if not labels.is_file():
            raise FileNotFoundError(f"{labels}: give the NIfTI label volume of series {images}")
        return [(images.name, images, labels)]
    pairs = []
    for series in subdirs:
        label = find_label(labels, series.name)
        pairs.append((series.name, series, label))
    return pairs


def convert_dicom(
    *,
    images: Path,
    labels: Path,
    writer: SA1BShardWriter,
    summary: ConvertSummary,
    strict: bool = False,
    **options: Any,
) -> ConvertSummary:
    """Convert DICOM series (one folder each) with NIfTI label volumes; `options` go to `convert_volume`."""
    import nibabel as nib

    pairs = _dicom_pairs(Path(images), Path(labels))
    for case, series, label_path in progress(pairs, total=len(pairs), desc="series"):
        if label_path is None:
            summary.skip("no label volume", case, f"expected {labels}/{case}.nii.gz")
            continue
        try:
            image = read_dicom_series(series)
            convert_volume(
                writer,
                summary,
                image=image,
                label=nib.load(label_path),
                case=case,
                image_path=series,
                label_path=label_path,
                **options,
            )
        except VolumeMismatch as err:
            if strict:
                raise
            summary.skip("image/label mismatch", case, str(err))
        except ValueError as err:  # a folder without readable DICOM images
            if strict:
                raise
            summary.skip("unreadable series", case, str(err))
    return summary


def run(args: argparse.Namespace) -> ConvertSummary:
    """`samlight data convert --format nifti|dicom`."""
    start = time.perf_counter()
    summary = ConvertSummary()
    convert = convert_dicom if args.format == "dicom" else convert_nifti
    with open_writer(args) as writer:
        try:
            convert(
                images=args.images,
                labels=args.labels,
                writer=writer,
                summary=summary,
                strict=args.strict,
                axis=args.axis,
                intensity=intensity_from_args(args.window, args.percentile),
                connected_components=args.connected_components,
                min_area=args.min_area,
                quality=args.quality,
            )
        except (ValueError, FileNotFoundError) as err:  # bad options or inputs: a message, not a traceback
            raise SystemExit(f"samlight data convert --format {args.format}: {err}") from err
    return summary.finish(writer, start)
