"""`samlight data convert --format nifti|dicom`: CT/MR volumes with label volumes -> SA-1B-format slice samples.

One sample per slice that carries a label, one mask per label id (or per connected component of it), the label id as
each annotation's `category_id`, and the volume's geometry in the json "image" entry so `samlight segment` and users
can put predictions back into the volume.
"""

from __future__ import annotations

import argparse
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from samlight.datamodules.tools.convert import ConvertSummary, FormatAdapter, Sample, SkipInput
from samlight.datamodules.tools.labels import label_annotations, label_masks
from samlight.datamodules.tools.volumes import (
    SLICE_AXES,
    WINDOW_PRESETS,
    canonical,
    case_id,
    find_label,
    geometry_record,
    intensity_from_options,
    intensity_range,
    list_nifti,
    nnunet_channel,
    read_dicom_series,
    slice_plane,
    to_uint8,
)


class VolumeMismatch(SkipInput):
    """An image volume and its label volume do not describe the same voxels (shape or affine differ)."""

    def __init__(self, detail: str) -> None:
        super().__init__("image/label mismatch", detail)


class VolumeAdapter(FormatAdapter):
    """Image volumes with label volumes on the same voxel grid: one sample per labelled slice."""

    desc = "volumes"

    @staticmethod
    def add_arguments(parser: argparse.ArgumentParser) -> None:
        parser.add_argument(
            "--axis",
            choices=sorted(SLICE_AXES),
            default="axial",
            help="slice direction in patient (RAS) terms, whatever the file's array order (default axial)",
        )
        presets = ", ".join(f"{k} W{w:g} L{lv:g}" for k, (w, lv) in WINDOW_PRESETS.items())
        intensity = parser.add_mutually_exclusive_group()
        intensity.add_argument("--window", help=f"CT window: a preset ({presets}) or WIDTH,LEVEL in HU")
        intensity.add_argument(
            "--percentile",
            default=None,
            help="MR normalisation: LOW,HIGH percentiles of the volume mapped to 0 and 255 (default 0.5,99.5)",
        )
        parser.add_argument(
            "--connected-components",
            action="store_true",
            help="one mask per 4-connected component of each label id (default: one mask per label id)",
        )

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.intensity = intensity_from_options(args.window, args.percentile)

    def samples(self, item: tuple[str, Path, Path], summary: ConvertSummary) -> Iterator[Sample]:
        """One sample per labelled slice of one volume (sliced in RAS terms, whatever the file's orientation);
        slices without a mask above --min-area are counted. A volume pair that does not cover the same voxels
        raises VolumeMismatch before the first sample."""
        import nibabel as nib

        case, image_path, label_path = item
        image, label = self.load_image(image_path), nib.load(label_path)
        check_pair(image, label, image_path, label_path)
        canon_image = canonical(image)
        labels = load_labels(canonical(label), label_path)  # X x Y x Z
        if not labels.any():
            summary.skip("empty label volume", str(label_path), "no voxel carries a label")
            return
        volume = canon_image.get_fdata(dtype=np.float32)
        if volume.ndim == 4:
            volume = volume[..., 0]
        lo, hi = intensity_range(volume, self.intensity)
        axis = self.args.axis
        fixed, letter = SLICE_AXES[axis]
        info = {
            "source": str(image_path),
            "label_source": str(label_path),
            "case": case,
            "slice_index": None,
            **geometry_record(image, canon_image, axis),
            "intensity": {**self.intensity.describe(), "range": [lo, hi]},
        }
        components = 4 if self.args.connected_components else None
        for index in np.flatnonzero(labels.any(axis=tuple(i for i in range(3) if i != fixed))):
            chunks = label_masks(slice_plane(labels, axis, int(index)), components=components)
            annotations = label_annotations(chunks, min_area=self.args.min_area, field="category_id",
                                            summary=summary, drop_reason="below min area")  # fmt: skip
            if not annotations:
                summary.skip("no mask above min area", f"{case} slice {index}")
                continue
            image_rgb = to_uint8(slice_plane(volume, axis, int(index)), lo, hi)
            key = f"{case.replace('.', '-')}_{letter}{int(index):03d}"
            yield Sample(key, image_rgb, annotations, {**info, "slice_index": int(index)})

    def load_image(self, path: Path) -> Any:
        import nibabel as nib

        return nib.load(path)


class NiftiAdapter(VolumeAdapter):
    """`--format nifti`: a folder of image volumes and a folder of label volumes with the same names."""

    images_help = "folder of image volumes (.nii / .nii.gz)"
    labels_help = (
        "folder of label volumes with the same file names (nnU-Net `_0000` channel suffixes tolerated)"
    )

    def inputs(self, summary: ConvertSummary) -> list[tuple[str, tuple[str, Path, Path]]]:
        images, labels = Path(self.args.images), Path(self.args.labels)
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
            pairs.append((case, (case, path, label)))
        return pairs


class DicomAdapter(VolumeAdapter):
    """`--format dicom`: one DICOM series folder (or a folder of them) with NIfTI label volumes."""

    images_help = "a DICOM series folder, or a folder whose sub-folders are series (one series per folder)"
    labels_help = (
        "NIfTI label volume of the series, or a folder of `<series folder name>.nii.gz` label volumes"
    )
    desc = "series"

    def inputs(self, summary: ConvertSummary) -> list[tuple[str, tuple[str, Path, Path]]]:
        images, labels = Path(self.args.images), Path(self.args.labels)
        if not images.is_dir():
            raise FileNotFoundError(f"{images}: not a DICOM series folder")
        subdirs = sorted(p for p in images.iterdir() if p.is_dir())
        if not subdirs or any(p.is_file() for p in images.iterdir()):
            if not labels.is_file():
                raise FileNotFoundError(f"{labels}: give the NIfTI label volume of series {images}")
            return [(images.name, (images.name, images, labels))]
        pairs = []
        for series in subdirs:
            label = find_label(labels, series.name)
            if label is None:
                summary.skip("no label volume", series.name, f"expected {labels}/{series.name}.nii.gz")
                continue
            pairs.append((series.name, (series.name, series, label)))
        return pairs

    def load_image(self, path: Path) -> Any:
        try:
            return read_dicom_series(path)
        except ValueError as err:  # a folder without readable DICOM images
            raise SkipInput("unreadable series", str(err)) from err


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
