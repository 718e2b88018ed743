"""Volume helpers shared by the medical converter and `samlight segment`: intensity, orientation, slicing, DICOM.

Both directions (volume -> training slices, predicted slices -> label volume) go through these functions, so the
2-D frame a box is drawn in at prediction time is exactly the frame the model was fine-tuned in.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

# CT window presets as (width, level) in Hounsfield units, the values radiology viewers ship with.
WINDOW_PRESETS: dict[str, tuple[float, float]] = {
    "soft-tissue": (400.0, 40.0),
    "lung": (1500.0, -600.0),
    "bone": (1800.0, 400.0),
    "brain": (80.0, 40.0),
}

# Slice axis name -> (axis of the RAS+ canonical array that is held fixed, letter used in sample keys).
SLICE_AXES: dict[str, tuple[int, str]] = {"sagittal": (0, "x"), "coronal": (1, "y"), "axial": (2, "z")}

NIFTI_SUFFIXES = (".nii.gz", ".nii")


def _require_nibabel() -> Any:
    try:
        import nibabel
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError(
            "NIfTI/DICOM support needs nibabel (and pydicom): pip install 'samlight[medical]'"
        ) from err
    return nibabel


@dataclass(frozen=True)
class Intensity:
    """How raw voxel values become 0-255: a CT window (width, level) or per-volume percentiles (MR).

    Exactly one of `window` or `percentile` is set.
    """

    window: tuple[float, float] | None = None
    percentile: tuple[float, float] | None = None

    def describe(self) -> dict[str, Any]:
        """JSON-friendly record of the setting (stored in every sample and accepted back by `from_record`)."""
        if self.window is not None:
            return {"window": [self.window[0], self.window[1]]}
        return {"percentile": [self.percentile[0], self.percentile[1]]}

    @staticmethod
    def from_record(record: dict[str, Any]) -> Intensity:
        if "window" in record:
            return Intensity(window=parse_window(record["window"]))
        return Intensity(percentile=parse_percentile(record.get("percentile", (0.5, 99.5))))


def intensity_from_options(
    window: str | None, percentile: str | None, record: dict[str, Any] | None = None
) -> Intensity:
    """The intensity setting of `--window` (wins when given) or `--percentile`; without either, the `record`
    stored by the converter (`Intensity.describe()`), else percentiles 0.5,99.5."""
    if window is not None:
        return Intensity(window=parse_window(window))
    if percentile is not None:
        return Intensity(percentile=parse_percentile(percentile))
    return Intensity.from_record(record or {})


def parse_window(value: str | list[float] | tuple[float, float]) -> tuple[float, float]:
    """A preset name (`soft-tissue`, `lung`, `bone`, `brain`) or `W,L` -> (width, level)."""
    if isinstance(value, (list, tuple)):
        width, level = (float(v) for v in value)
    elif value in WINDOW_PRESETS:
        width, level = WINDOW_PRESETS[value]
    else:
        try:
            width, level = (float(v) for v in str(value).split(","))
        except ValueError as err:
            raise ValueError(
                f"--window {value!r}: expected one of {sorted(WINDOW_PRESETS)} or 'WIDTH,LEVEL' such as '400,40'"
            ) from err
    if width <= 0:
        raise ValueError(f"--window {value!r}: the window width must be positive, got {width}")
    return width, level


def parse_percentile(value: str | list[float] | tuple[float, float]) -> tuple[float, float]:
    """`LOW,HIGH` percentiles (0-100, LOW < HIGH) -> (low, high)."""
    try:
        low, high = (float(v) for v in (value if isinstance(value, (list, tuple)) else str(value).split(",")))
    except ValueError as err:
        raise ValueError(f"--percentile {value!r}: expected 'LOW,HIGH' such as '0.5,99.5'") from err
    if not 0.0 <= low < high <= 100.0:
        raise ValueError(f"--percentile {value!r}: need 0 <= LOW < HIGH <= 100")
    return low, high


def intensity_range(volume: np.ndarray, intensity: Intensity) -> tuple[float, float]:
    """(lo, hi) raw values mapped to 0 and 255; percentiles are taken over the finite voxels of the whole volume."""
    if intensity.window is not None:
        width, level = intensity.window
        return level - width / 2.0, level + width / 2.0
    finite = volume[np.isfinite(volume)]
    if finite.size == 0:
        return 0.0, 1.0
    lo, hi = np.percentile(finite, intensity.percentile)
    return float(lo), float(max(hi, lo + 1e-6))


def to_uint8(plane: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """H x W raw values -> H x W x 3 uint8 (clipped linear map of [lo, hi]); NaN/inf become 0."""
    scaled = (plane.astype(np.float32) - lo) * (255.0 / (hi - lo))
    scaled = np.nan_to_num(scaled, nan=0.0, posinf=0.0, neginf=0.0)
    gray = np.clip(np.rint(scaled), 0, 255).astype(np.uint8)
    return np.repeat(gray[:, :, None], 3, axis=2)


def slice_plane(volume: np.ndarray, axis: str, index: int) -> np.ndarray:
    """One 2-D image of a RAS+ canonical volume, in the display frame used for training and prompts.

    The fixed RAS axis is `SLICE_AXES[axis]`; the plane is transposed and flipped on both axes so that rows run
    anterior->posterior (axial) or superior->inferior (coronal, sagittal) and the patient's right is on the image's
    left (radiological convention). `put_plane` is the exact inverse.

    Args:
        volume: X x Y x Z array in RAS+ orientation.
    Returns:
        rows x cols view (axial: Y x X, coronal: Z x X, sagittal: Z x Y).
    """
    fixed = SLICE_AXES[axis][0]
    plane = np.take(volume, index, axis=fixed)  # the two remaining axes, in RAS order
    return plane.T[::-1, ::-1]


def put_plane(volume: np.ndarray, axis: str, index: int, image: np.ndarray) -> None:
    """Write a 2-D image in `slice_plane`'s frame back into slice `index` of the RAS+ volume (in place)."""
    fixed = SLICE_AXES[axis][0]
    target = [slice(None)] * 3
    target[fixed] = index
    volume[tuple(target)] = image[::-1, ::-1].T


def canonical(image: Any) -> Any:
    """The image reoriented to the closest RAS+ array layout (nibabel's `as_closest_canonical`)."""
    return _require_nibabel().as_closest_canonical(image)


def from_canonical(data: np.ndarray, reference: Any) -> np.ndarray:
    """Reorder a RAS+ canonical array back into the array layout of `reference` (the original image)."""
    _require_nibabel()
    from nibabel.orientations import apply_orientation, axcodes2ornt, io_orientation, ornt_transform

    transform = ornt_transform(axcodes2ornt(("R", "A", "S")), io_orientation(reference.affine))
    return apply_orientation(data, transform)


def geometry_record(image: Any, canon: Any, axis: str) -> dict[str, Any]:
    """Spacing, orientation and affines of a volume, as stored in each sample's json "image" entry."""
    nib = _require_nibabel()
    fixed = SLICE_AXES[axis][0]
    zooms = [float(z) for z in canon.header.get_zooms()[:3]]
    in_plane = [zooms[i] for i in range(3) if i != fixed]
    return {
        "affine": np.asarray(image.affine, dtype=float).round(8).tolist(),
        "canonical_affine": np.asarray(canon.affine, dtype=float).round(8).tolist(),
        "orientation": "".join(nib.aff2axcodes(image.affine)),
        "volume_shape": [int(s) for s in image.shape[:3]],
        "spacing": zooms,
        # rows x cols of the slice image: the transposed in-plane axes
        "pixel_spacing": [in_plane[1], in_plane[0]],
        "slice_thickness": zooms[fixed],
        "axis": axis,
    }


def _stem(path: str | os.PathLike) -> str:
    """The file name without its NIfTI suffix."""
    name = Path(path).name
    for suffix in NIFTI_SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def case_id(path: str | os.PathLike) -> str:
    """`case_001_0000.nii.gz` -> `case_001`: the name without NIfTI suffix and nnU-Net channel suffix."""
    return re.sub(r"_\d{4}$", "", _stem(path))


def nnunet_channel(path: str | os.PathLike) -> int | None:
    """The nnU-Net channel number of `case_0001.nii.gz` (1), or None when the name has no `_NNNN` suffix."""
    match = re.search(r"_(\d{4})$", _stem(path))
    return int(match.group(1)) if match else None


def list_nifti(folder: str | os.PathLike) -> list[Path]:
    """Sorted `.nii` / `.nii.gz` files directly inside `folder`."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: not a directory of NIfTI files")
    return sorted(p for p in folder.iterdir() if p.is_file() and p.name.endswith(NIFTI_SUFFIXES))


def find_label(label_dir: str | os.PathLike, case: str) -> Path | None:
    """The label volume for `case` in `label_dir` (`case.nii.gz`, `case.nii`, or with a `_0000` suffix)."""
    for name in (f"{case}.nii.gz", f"{case}.nii", f"{case}_0000.nii.gz", f"{case}_0000.nii"):
        candidate = Path(label_dir) / name
        if candidate.is_file():
            return candidate
    return None


def read_dicom_series(folder: str | os.PathLike) -> Any:
    """Read a DICOM series folder into a NIfTI image (RAS affine built from the DICOM geometry tags).

    Slices are ordered by their position along the slice normal (ImagePositionPatient projected on the cross product
    of the ImageOrientationPatient row and column directions), not by file name or InstanceNumber; stored values
    are mapped with RescaleSlope/RescaleIntercept (Hounsfield units for CT).

    Returns:
        nibabel Nifti1Image with float32 data X x Y x Z (X along the DICOM row direction, Y along the columns).
    """
    nib = _require_nibabel()
    try:
        import pydicom
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError("DICOM support needs pydicom: pip install 'samlight[medical]'") from err
    folder = Path(folder)
    slices = []
    for path in sorted(p for p in folder.iterdir() if p.is_file()):
        try:
            ds = pydicom.dcmread(path)
        except pydicom.errors.InvalidDicomError:
            continue  # DICOMDIR companions, text notes: not part of the pixel series
        if "PixelData" in ds and "ImagePositionPatient" in ds:
            slices.append(ds)
    if not slices:
        raise ValueError(f"{folder}: no DICOM image files with ImagePositionPatient found")
    orientation = np.asarray(slices[0].ImageOrientationPatient, dtype=float)
    row_dir, col_dir = orientation[:3], orientation[3:]
    normal = np.cross(row_dir, col_dir)
    uids = {getattr(ds, "SeriesInstanceUID", None) for ds in slices}
    if len(uids) > 1:
        raise ValueError(
            f"{folder}: holds {len(uids)} series (SeriesInstanceUID); put each series in its own folder"
        )
    slices.sort(key=lambda ds: float(np.dot(np.asarray(ds.ImagePositionPatient, dtype=float), normal)))
    positions = np.asarray([ds.ImagePositionPatient for ds in slices], dtype=float)
    planes = []
    for ds in slices:
        slope = float(getattr(ds, "RescaleSlope", 1.0))
        intercept = float(getattr(ds, "RescaleIntercept", 0.0))
        planes.append(ds.pixel_array.astype(np.float32) * slope + intercept)  # rows x cols
    volume = np.stack(planes, axis=-1).transpose(1, 0, 2)  # cols x rows x slices = X x Y x Z
    row_spacing, col_spacing = (float(v) for v in slices[0].PixelSpacing)
    if len(slices) > 1:
        step = (positions[-1] - positions[0]) / (len(slices) - 1)
    else:
        step = normal * float(getattr(slices[0], "SliceThickness", 1.0))
    lps = np.eye(4)
    lps[:3, 0] = row_dir * col_spacing  # index i walks along a row: spacing between columns
    lps[:3, 1] = col_dir * row_spacing  # index j walks down a column: spacing between rows
    lps[:3, 2] = step
    lps[:3, 3] = positions[0]
    ras = np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps  # DICOM patient space is LPS, NIfTI world space is RAS
    return nib.Nifti1Image(volume, ras)
