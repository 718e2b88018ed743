"""`samlight segment` on a NIfTI volume or DICOM series: boxes and clicks per slice -> a NIfTI label volume with
the input's affine and header.

Slices are rendered by the converter's own functions (`datamodules/tools/volumes.py`), so the model sees the pixels
it was fine-tuned on. Prompt file (JSON; coordinates are pixels of the slice image `samlight data convert --format
nifti` writes, i.e. the RAS slice in radiological display: x = column, y = row):

    {"axis": "axial",                                  # optional, default axial (or --axis)
     "intensity": {"window": "soft-tissue"},           # optional: {"window": NAME | [W, L]} or {"percentile": [lo, hi]}
     "slices": {"42": [[x0, y0, x1, y1], ...],          # a box per object, written as label 1
                "43": [{"box": [x0, y0, x1, y1], "label": 2},
                       {"points": [[x, y], ...], "point_labels": [1, 0], "label": 3}]}}
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import numpy as np

from samlight.inference.segment_prompts import ObjectPrompt, parse_object, paste_objects, read_prompt_file

SUFFIXES = (".nii", ".nii.gz")


def read_volume_prompts(path: Path) -> tuple[dict[str, Any], dict[int, list[ObjectPrompt]]]:
    """The prompt file of a volume -> (its header fields, slice index -> objects)."""
    record = read_prompt_file(path, "the prompt JSON")
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
        plane_labels = np.zeros(plane.shape[:2], dtype=np.uint16)
        best = np.full(plane.shape[:2], -np.inf, dtype=np.float32)
        paste_objects(predictor, plane, objects, plane_labels, best)
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


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The volume options of `samlight segment` (use the converter's settings)."""
    volume = parser.add_argument_group("volumes (use the converter's settings)")
    volume.add_argument(
        "--axis", choices=("axial", "coronal", "sagittal"), default=None, help="default: prompt file"
    )
    volume.add_argument("--window", default=None, help="CT window preset or W,L (default: prompt file)")


def run(args: argparse.Namespace, predictor: Any) -> str:
    """Segment the volume `args.input` with the prompts of `args.prompts` and write `args.out`; returns what was
    written, in words."""
    from samlight.datamodules.tools.volumes import intensity_from_options

    record, slices = read_volume_prompts(args.prompts)
    axis = args.axis or record.get("axis", "axial")
    intensity = intensity_from_options(args.window, args.percentile, record.get("intensity"))
    image = load_volume(args.input)
    labels = segment_volume(predictor, image, slices, axis=axis, intensity=intensity)
    write_label_volume(labels, image, args.out)
    return f"{int((labels > 0).sum())} labelled voxels over {len(slices)} slice(s)"
