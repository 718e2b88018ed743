"""NIfTI/DICOM conversion: real files written in tmp_path, converted to shards, checked voxel for voxel."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

nib = pytest.importorskip("nibabel")
pydicom = pytest.importorskip("pydicom")
wds = pytest.importorskip("webdataset")

from samlight.datamodules.tools.convert import main as convert_main  # noqa: E402
from samlight.datamodules.tools.volumes import (  # noqa: E402
    Intensity,
    intensity_range,
    parse_window,
    put_plane,
    read_dicom_series,
    slice_plane,
    to_uint8,
)
from tests._finetune import assert_finetune_recipe, printed_config  # noqa: E402
from tests._shards import read_shards, stream_datamodule  # noqa: E402

# An LPS-style affine (x and y flipped against RAS) so the converter has to reorient.
AFFINE = np.array([[-0.8, 0, 0, 10.0], [0, -0.8, 0, 20.0], [0, 0, 2.5, -30.0], [0, 0, 0, 1]])


def make_case(shape=(64, 64, 8)) -> tuple[np.ndarray, np.ndarray]:
    """A CT-like volume in HU and a label volume: label 1 a block, label 2 two separate blobs on slice 3."""
    rng = np.random.default_rng(0)
    volume = rng.normal(40, 30, shape).astype(np.float32)
    labels = np.zeros(shape, np.uint8)
    labels[10:30, 10:30, 2:6] = 1
    labels[40:50, 35:60, 3:5] = 2
    labels[40:44, 5:9, 3] = 2
    return volume, labels


def write_nifti(path: Path, data: np.ndarray, affine: np.ndarray = AFFINE) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(data, affine), path)
    return path


def convert(
    tmp_path: Path, *extra: str, fmt: str = "nifti", images=None, labels=None, out="shards", flag="--labels"
) -> int:
    return convert_main(
        [
            "--format",
            fmt,
            "--images",
            str(images or tmp_path / "images"),
            flag,
            str(labels or tmp_path / "labels"),
            "--output",
            str(tmp_path / out),
            *extra,
        ]
    )


def test_nifti_one_sample_per_labelled_slice_and_mask_per_component(tmp_path):
    volume, labels = make_case()
    write_nifti(tmp_path / "images" / "case_001_0000.nii.gz", volume)  # nnU-Net channel suffix
    write_nifti(tmp_path / "labels" / "case_001.nii.gz", labels)
    assert convert(tmp_path, "--window", "soft-tissue", "--connected-components") == 0
    samples = read_shards(tmp_path / "shards")
    assert sorted(samples) == [f"case_001_z{k:03d}" for k in (2, 3, 4, 5)]
    for k in (2, 3, 4, 5):
        sample = samples[f"case_001_z{k:03d}"]
        # With x and y flipped in the file, the RAS slice in radiological display is the stored slice transposed.
        expected = labels[:, :, k].T
        union = np.zeros_like(expected)
        for mask, ann in zip(sample["masks"], sample["json"]["annotations"]):
            assert np.all(expected[mask] == ann["category_id"])
            union[mask] = ann["category_id"]
        np.testing.assert_array_equal(union, expected)
        info = sample["json"]["image"]
        assert info["slice_index"] == k and info["axis"] == "axial" and info["orientation"] == "LPS"
        np.testing.assert_allclose(info["affine"], AFFINE, atol=1e-6)
        assert info["spacing"] == pytest.approx([0.8, 0.8, 2.5])
        assert info["intensity"]["window"] == [400.0, 40.0]
        assert info["source"].endswith("case_001_0000.nii.gz")
    counts = {k: len(s["masks"]) for k, s in samples.items()}
    assert counts == {"case_001_z002": 1, "case_001_z003": 3, "case_001_z004": 2, "case_001_z005": 1}
    assert {a["category_id"] for a in samples["case_001_z003"]["json"]["annotations"]} == {1, 2}
    # the same samples stream through SA1BDataModule: every slice once, every mask with its label id
    streamed = stream_datamodule(tmp_path / "shards", image_size=64)
    assert sorted(streamed) == sorted(samples)
    for key, sample in samples.items():
        np.testing.assert_array_equal(streamed[key]["masks"], sample["masks"])
        assert streamed[key]["labels"] == [a["category_id"] for a in sample["json"]["annotations"]]
        assert streamed[key]["info"]["slice_index"] == sample["json"]["image"]["slice_index"]


@pytest.mark.parametrize("flag", ["--labels", "--masks"])
def test_without_connected_components_one_mask_per_label_id(tmp_path, flag):
    """One mask per label id; `--masks` (the folder format's word) is accepted as an alias of `--labels`."""
    volume, labels = make_case()
    write_nifti(tmp_path / "images" / "case_001.nii.gz", volume)
    write_nifti(tmp_path / "labels" / "case_001.nii.gz", labels)
    assert convert(tmp_path, "--percentile", "1,99", flag=flag) == 0
    sample = read_shards(tmp_path / "shards")["case_001_z003"]
    assert [a["category_id"] for a in sample["json"]["annotations"]] == [1, 2]
    assert sample["json"]["image"]["intensity"]["percentile"] == [1.0, 99.0]


def test_slice_axis_is_anatomical_not_array_order(tmp_path):
    """The same anatomy stored with permuted array axes gives the same axial samples."""
    volume, labels = make_case()
    write_nifti(tmp_path / "a" / "images" / "case.nii.gz", volume)
    write_nifti(tmp_path / "a" / "labels" / "case.nii.gz", labels)
    permuted = np.eye(4)
    permuted[:, :3] = AFFINE[:, [2, 0, 1]]  # array axes (z, x, y): world position of each voxel unchanged
    write_nifti(tmp_path / "b" / "images" / "case.nii.gz", volume.transpose(2, 0, 1), permuted)
    write_nifti(tmp_path / "b" / "labels" / "case.nii.gz", labels.transpose(2, 0, 1), permuted)
    for name in ("a", "b"):
        base = tmp_path / name
        assert (
            convert(tmp_path, "--window", "40,40", images=base / "images", labels=base / "labels", out=name)
            == 0
        )
    a, b = read_shards(tmp_path / "a"), read_shards(tmp_path / "b")
    assert sorted(a) == sorted(b) == [f"case_z{k:03d}" for k in (2, 3, 4, 5)]
    for key in a:
        np.testing.assert_array_equal(a[key]["masks"], b[key]["masks"])
    # coronal slices hold the fixed RAS y axis: 20 rows of label 1 -> y in 10..29 flipped
    with pytest.raises(SystemExit, match="not a directory of NIfTI files"):
        convert(tmp_path, "--axis", "coronal", "--window", "bone", out="cor")
    write_nifti(tmp_path / "images" / "case.nii.gz", volume)
    write_nifti(tmp_path / "labels" / "case.nii.gz", labels)
    assert convert(tmp_path, "--axis", "coronal", "--window", "bone", out="cor") == 0
    coronal = read_shards(tmp_path / "cor")
    labelled_y = np.flatnonzero(labels.any(axis=(0, 2)))
    assert sorted(int(k.rsplit("_y", 1)[1]) for k in coronal) == sorted(
        63 - labelled_y
    )  # RAS y = 63 - array y


def test_window_presets_and_percentile():
    assert parse_window("soft-tissue") == (400, 40)
    assert parse_window("lung") == (1500, -600)
    assert parse_window("bone") == (1800, 400)
    assert parse_window("brain") == (80, 40)
    assert parse_window("350,50") == (350, 50)
    with pytest.raises(ValueError, match="WIDTH,LEVEL"):
        parse_window("liver")
    lo, hi = intensity_range(np.zeros(3), Intensity(window=(400, 40)))
    assert (lo, hi) == (-160, 240)
    rgb = to_uint8(np.array([[-1000.0, -160.0, 40.0, 240.0, np.nan]]), lo, hi)
    assert rgb.shape == (1, 5, 3) and rgb[0, :, 0].tolist() == [0, 0, 128, 255, 0]
    ramp = np.arange(1001, dtype=np.float32)
    lo, hi = intensity_range(ramp, Intensity(percentile=(1, 99)))
    assert (lo, hi) == pytest.approx((10, 990))


def test_plane_round_trip():
    volume = np.arange(4 * 5 * 6).reshape(4, 5, 6)
    for axis in ("axial", "coronal", "sagittal"):
        out = np.zeros_like(volume)
        for k in range(volume.shape[{"sagittal": 0, "coronal": 1, "axial": 2}[axis]]):
            put_plane(out, axis, k, slice_plane(volume, axis, k).copy())
        np.testing.assert_array_equal(out, volume)


def test_bad_inputs_are_skipped_counted_and_named(tmp_path, caplog):
    volume, labels = make_case()
    images, label_dir = tmp_path / "images", tmp_path / "labels"
    write_nifti(images / "good.nii.gz", volume)
    write_nifti(label_dir / "good.nii.gz", labels)
    write_nifti(images / "shape.nii.gz", volume)
    write_nifti(label_dir / "shape.nii.gz", labels[:, :, :6])
    write_nifti(images / "affine.nii.gz", volume)
    write_nifti(label_dir / "affine.nii.gz", labels, AFFINE * np.array([[1], [1], [2], [1]]))
    write_nifti(images / "empty.nii.gz", volume)
    write_nifti(label_dir / "empty.nii.gz", np.zeros_like(labels))
    write_nifti(images / "nolabel.nii.gz", volume)
    nan_volume = volume.copy()
    nan_volume[:, :, 3] = np.nan
    write_nifti(images / "nan.nii.gz", nan_volume)
    write_nifti(label_dir / "nan.nii.gz", labels)
    with caplog.at_level("WARNING"):
        assert convert(tmp_path, "--window", "soft-tissue") == 0
    samples = read_shards(tmp_path / "shards")
    assert sorted({s["json"]["image"]["case"] for s in samples.values()}) == ["good", "nan"]
    assert len(samples) == 8
    text = caplog.text
    assert "shape.nii.gz" in text and "(64, 64, 6)" in text and str(images / "shape.nii.gz") in text
    assert "different affines" in text and str(label_dir / "affine.nii.gz") in text
    assert "empty label volume" in text and "no label volume" in text and "nolabel.nii.gz" in text
    # --strict stops at the first bad case with the same message naming both files
    with pytest.raises(SystemExit, match=r"label .*affine\.nii\.gz"):
        convert(tmp_path, "--strict", out="strict")


def test_nan_voxels_become_black(tmp_path):
    volume, labels = make_case()
    volume[:, :, 3] = np.nan
    write_nifti(tmp_path / "images" / "c.nii.gz", volume)
    write_nifti(tmp_path / "labels" / "c.nii.gz", labels)
    assert convert(tmp_path, "--percentile", "0.5,99.5") == 0

    image = read_shards(tmp_path / "shards")["c_z003"]["image"]
    assert image.max() <= 8  # JPEG ringing only; no NaN made it into the percentile range or the pixels


def write_dicom_series(folder: Path, volume: np.ndarray, *, spacing=(0.7, 0.9), thickness=2.0) -> np.ndarray:
    """Write volume (X x Y x Z, stored values) as an axial DICOM series in scrambled file order.

    Returns the RAS affine the series describes.
    """
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    folder.mkdir(parents=True)
    series_uid = generate_uid()
    origin = np.array([-100.0, -120.0, 50.0])
    order = np.random.default_rng(1).permutation(volume.shape[2])
    for file_index, k in enumerate(order):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID = meta.MediaStorageSOPClassUID
        ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
        ds.SeriesInstanceUID = series_uid
        ds.Modality = "CT"
        ds.InstanceNumber = int(file_index)  # deliberately unrelated to the position
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.ImagePositionPatient = [float(v) for v in origin + np.array([0, 0, k * thickness])]
        ds.PixelSpacing = [spacing[0], spacing[1]]  # row spacing, column spacing
        ds.SliceThickness = thickness
        ds.Rows, ds.Columns = volume.shape[1], volume.shape[0]
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
        ds.RescaleSlope, ds.RescaleIntercept = 1, -1024
        ds.PixelData = np.ascontiguousarray(volume[:, :, k].T.astype(np.uint16)).tobytes()  # rows x cols
        ds.save_as(folder / f"IM{file_index:04d}.dcm", enforce_file_format=True)
    lps = np.eye(4)
    lps[:3, 0] = [spacing[1], 0, 0]
    lps[:3, 1] = [0, spacing[0], 0]
    lps[:3, 2] = [0, 0, thickness]
    lps[:3, 3] = origin
    return np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps


def test_dicom_series_sorted_by_position_with_lps_to_ras(tmp_path):
    _, labels = make_case((48, 40, 6))
    stored = (np.arange(6)[None, None, :] * 100 + 1000 + np.zeros((48, 40, 6))).astype(np.uint16)
    affine = write_dicom_series(tmp_path / "series", stored)
    image = read_dicom_series(tmp_path / "series")
    np.testing.assert_allclose(image.affine, affine, atol=1e-6)
    data = image.get_fdata()
    np.testing.assert_allclose(data[0, 0, :], np.arange(6) * 100 - 24)  # position order, rescaled to HU
    write_nifti(tmp_path / "label.nii.gz", labels, affine)
    assert (
        convert(
            tmp_path,
            "--window",
            "400,300",
            fmt="dicom",
            images=tmp_path / "series",
            labels=tmp_path / "label.nii.gz",
        )
        == 0
    )
    samples = read_shards(tmp_path / "shards")
    assert sorted(samples) == [f"series_z{k:03d}" for k in (2, 3, 4, 5)]
    np.testing.assert_allclose(samples["series_z003"]["json"]["image"]["affine"], affine, atol=1e-5)
    # a label volume on another grid is named with the series
    write_nifti(tmp_path / "bad.nii.gz", labels, AFFINE)
    with pytest.raises(SystemExit, match="different affines"):
        convert(
            tmp_path,
            "--strict",
            fmt="dicom",
            images=tmp_path / "series",
            labels=tmp_path / "bad.nii.gz",
            out="bad",
        )


def test_finetune_medical_config(capsys):
    """The shipped config starts from the official checkpoint with a frozen encoder, box + point prompts and the
    paper's loss in bf16."""
    parsed = printed_config("finetune_medical.yaml", capsys)
    assert_finetune_recipe(parsed)
    model = parsed["model"]
    assert model["freeze"] == ["image_encoder"] and model["lora"] is None
    assert parsed["data"]["class_path"].endswith("SA1BDataModule")
