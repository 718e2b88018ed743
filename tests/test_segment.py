"""`samlight segment`: prompts from files -> NIfTI label volumes / GeoTIFF masks on the input's grid.

Geometry (slice frames, map -> pixel, tile crop and paste) is checked exactly with a stub predictor whose mask is
the prompt's box; the command line runs end to end with a random-weight `tiny` model.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

nib = pytest.importorskip("nibabel")
rasterio = pytest.importorskip("rasterio")
from rasterio.transform import from_origin  # noqa: E402
from rasterio.transform import xy as xy_of  # noqa: E402
from rasterio.warp import transform as warp  # noqa: E402

from samlight.cli.main import main as samlight_main  # noqa: E402
from samlight.datamodules.tools.raster import Stretch  # noqa: E402
from samlight.datamodules.tools.volumes import Intensity  # noqa: E402
from samlight.inference.segment_medical import read_volume_prompts, segment_volume, write_label_volume  # noqa: E402
from samlight.inference.segment_prompts import parse_object  # noqa: E402
from samlight.inference.segment_satellite import read_scene_prompts, segment_scene  # noqa: E402

AFFINE = np.array([[-0.8, 0, 0, 10.0], [0, -0.8, 0, 20.0], [0, 0, 2.5, -30.0], [0, 0, 0, 1]])
TRANSFORM = from_origin(500000.0, 4000000.0, 10.0, 10.0)


class BoxPredictor:
    """Stands in for SamPredictor: logits +1 inside the prompt's box (or a 5 px square around each point)."""

    def __init__(self) -> None:
        self.images: list[tuple[int, int]] = []

    def set_image(self, image: np.ndarray) -> None:
        assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3
        self.shape = image.shape[:2]
        self.images.append(self.shape)

    def predict(
        self, point_coords=None, point_labels=None, box=None, multimask_output=True, return_logits=False
    ):
        rows, cols = np.mgrid[0 : self.shape[0], 0 : self.shape[1]]
        inside = np.zeros(self.shape, bool)
        if box is not None:
            x0, y0, x1, y1 = np.rint(box).astype(int)
            inside |= (cols >= x0) & (cols < x1) & (rows >= y0) & (rows < y1)
        for x, y in np.rint(point_coords if point_coords is not None else []).astype(int):
            inside |= (abs(cols - x) <= 2) & (abs(rows - y) <= 2)
        logits = np.where(inside, 1.0, -1.0)[None].repeat(3 if multimask_output else 1, axis=0)
        return logits, np.linspace(0.9, 0.5, len(logits)), None


def write_volume(tmp_path: Path, permute: bool = False) -> Path:
    """A 64 x 48 x 8 volume with AFFINE, or the same anatomy stored with array axes (z, x, y) when `permute`."""
    volume = np.random.default_rng(0).normal(40, 30, (64, 48, 8)).astype(np.float32)
    affine = AFFINE
    if permute:
        volume = volume.transpose(2, 0, 1)
        affine = np.eye(4)
        affine[:, :3] = AFFINE[:, [2, 0, 1]]
    image = nib.Nifti1Image(volume, affine)
    image.header.set_qform(affine, code=1)
    nib.save(image, tmp_path / "ct.nii.gz")
    return tmp_path / "ct.nii.gz"


def write_scene(tmp_path: Path, size=(300, 300)) -> Path:
    data = np.random.default_rng(0).integers(100, 4000, (3, *size)).astype(np.uint16)
    with rasterio.open(
        tmp_path / "scene.tif",
        "w",
        driver="GTiff",
        height=size[0],
        width=size[1],
        count=3,
        dtype="uint16",
        crs="EPSG:32633",
        transform=TRANSFORM,
        nodata=0,
    ) as dst:
        dst.write(data)
    return tmp_path / "scene.tif"


@pytest.mark.parametrize("permute", [False, True], ids=["LPS", "axes-permuted"])
def test_volume_boxes_land_on_the_right_voxels(tmp_path, permute):
    path = write_volume(tmp_path, permute)
    prompts = tmp_path / "prompts.json"
    prompts.write_text(
        json.dumps(
            {
                "axis": "axial",
                "slices": {
                    "3": [[5, 10, 20, 30], {"box": [30, 20, 40, 45], "label": 2}],
                    "6": [{"points": [[10, 10]]}],
                },
            }
        )
    )
    record, slices = read_volume_prompts(prompts)
    image = nib.load(path)
    predictor = BoxPredictor()
    labels = segment_volume(predictor, image, slices, axis="axial", intensity=Intensity(window=(400, 40)))
    assert labels.shape == image.shape and predictor.images == [(48, 64), (48, 64)]  # rows = y, cols = x
    expected = np.zeros((64, 48, 8), np.uint16)
    # x and y are flipped in the LPS file, so the axial display slice is the stored slice transposed: x = i, y = j
    expected[5:20, 10:30, 3] = 1
    expected[30:40, 20:45, 3] = 2
    expected[8:13, 8:13, 6] = 1
    if permute:
        expected = expected.transpose(2, 0, 1)
    np.testing.assert_array_equal(labels, expected)
    write_label_volume(labels, image, tmp_path / "out.nii.gz")
    out = nib.load(tmp_path / "out.nii.gz")
    np.testing.assert_array_equal(out.affine, image.affine)
    assert out.header.get_zooms() == image.header.get_zooms() and int(out.header["qform_code"]) == 1
    np.testing.assert_array_equal(np.asarray(out.dataobj), expected)


def test_scene_prompts_in_map_coordinates_tiled_and_pasted_back(tmp_path):
    path = write_scene(tmp_path)

    def xy(col, row):  # pixel corner -> map coordinates
        return list(xy_of(TRANSFORM, row, col, offset="ul"))

    box = [xy(150, 100), xy(220, 100), xy(220, 140), xy(150, 140), xy(150, 100)]
    big = [xy(20, 150), xy(260, 150), xy(260, 290), xy(20, 290), xy(20, 150)]  # larger than a 128 px tile
    lon, lat = warp("EPSG:32633", "EPSG:4326", [xy(40.2, 40.2)[0]], [xy(40.2, 40.2)[1]])
    geojson = {
        "type": "FeatureCollection",
        "features": [
            {
                "type": "Feature",
                "properties": {"label": 3},
                "geometry": {"type": "Polygon", "coordinates": [box]},
            },
            {
                "type": "Feature",
                "properties": {},
                "geometry": {"type": "Point", "coordinates": xy(60.2, 30.2)},
            },
            {
                "type": "Feature",
                "properties": {"label": 4},
                "geometry": {"type": "Polygon", "coordinates": [big]},
            },
        ],
    }
    (tmp_path / "prompts.geojson").write_text(json.dumps(geojson))
    lonlat = {
        "type": "FeatureCollection",
        "crs": {"type": "name", "properties": {"name": "EPSG:4326"}},
        "features": [
            {
                "type": "Feature",
                "properties": {"label": 5},
                "geometry": {"type": "Point", "coordinates": [lon[0], lat[0]]},
            }
        ],
    }
    (tmp_path / "lonlat.geojson").write_text(json.dumps(lonlat))
    stretch = Stretch(low=(100.0,) * 3, high=(4000.0,) * 3)
    with rasterio.open(path) as src:
        objects = read_scene_prompts(tmp_path / "prompts.geojson", src, None)
        objects += read_scene_prompts(tmp_path / "lonlat.geojson", src, None)
        predictor = BoxPredictor()
        labels = segment_scene(
            predictor, src, objects, bands=[1, 2, 3], stretch=stretch, tile=128, overlap=32
        )
    expected = np.zeros((300, 300), np.uint16)
    expected[100:140, 150:220] = 3
    expected[150:290, 20:260] = 4
    expected[28:33, 58:63] = 1
    expected[38:43, 38:43] = 5
    np.testing.assert_array_equal(labels, expected)
    # the two small prompts share a tile; the big box gets a window of its own, larger than a tile
    assert len(predictor.images) == 3 and max(predictor.images) > (128, 128)


def test_overlapping_objects_keep_the_more_confident(tmp_path):
    path = write_scene(tmp_path)

    class Confident(BoxPredictor):
        def predict(self, box=None, **kwargs):
            logits, scores, _ = super().predict(box=box, **kwargs)
            return logits * (5.0 if box[0] > 60 else 1.0), scores, None  # the second box is more confident

    with rasterio.open(path) as src:
        objects = [
            parse_object({"box": b, "label": i + 1}, "test")
            for i, b in enumerate([[20, 20, 90, 90], [70, 70, 110, 110]])
        ]
        labels = segment_scene(
            Confident(),
            src,
            objects,
            bands=[1, 2, 3],
            stretch=Stretch(low=(0.0,) * 3, high=(1.0,) * 3),
            tile=128,
            overlap=32,
        )
    assert (labels[75:90, 75:90] == 2).all() and (labels[20:70, 20:70] == 1).all()


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory) -> Path:
    import torch

    from samlight import build_sam, save_official

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("ckpt") / "tiny.pth"
    save_official(build_sam("tiny"), path)
    return path


def segment_args(ckpt: Path, source: Path, prompts: Path, out: Path) -> list[str]:
    """`samlight segment` arguments for the tiny test model on CPU."""
    return [
        "segment", "--ckpt", str(ckpt), "--variant", "tiny", "--device", "cpu",
        "--input", str(source), "--prompts", str(prompts), "--out", str(out),
    ]  # fmt: skip


def test_cli_volume_end_to_end_with_tiny_model(tmp_path, tiny_checkpoint):
    path = write_volume(tmp_path)
    prompts = tmp_path / "prompts.json"
    prompts.write_text(
        json.dumps(
            {
                "axis": "axial",
                "intensity": {"window": "soft-tissue"},
                "slices": {"2": [[5, 5, 40, 40]], "4": [{"box": [10, 10, 30, 30], "label": 7}]},
            }
        )
    )
    out = tmp_path / "pred.nii.gz"
    args = segment_args(tiny_checkpoint, path, prompts, out)
    assert samlight_main(args) == 0
    image, pred = nib.load(path), nib.load(out)
    np.testing.assert_array_equal(pred.affine, image.affine)
    assert pred.shape == image.shape and pred.get_data_dtype() == np.uint8
    data = np.asarray(pred.dataobj)
    assert set(np.unique(data)) <= {0, 1, 7}
    assert not data[:, :, [0, 1, 3, 5, 6, 7]].any()  # only prompted slices carry labels
    # a slice outside the volume is an error naming the range
    prompts.write_text(json.dumps({"slices": {"8": [[1, 1, 5, 5]]}}))
    assert samlight_main(args) == 1


def test_cli_scene_end_to_end_with_tiny_model(tmp_path, tiny_checkpoint, capsys):
    path = write_scene(tmp_path)
    x, y = xy_of(TRANSFORM, 100, 100, offset="ul")
    geojson = {
        "type": "FeatureCollection",
        "features": [
            {
                "type": "Feature",
                "properties": {"label": 2},
                "geometry": {"type": "Point", "coordinates": [x, y]},
            }
        ],
    }
    (tmp_path / "p.geojson").write_text(json.dumps(geojson))
    out = tmp_path / "mask.tif"
    args = segment_args(tiny_checkpoint, path, tmp_path / "p.geojson", out)
    assert samlight_main(args) == 0
    with rasterio.open(path) as src, rasterio.open(out) as dst:
        assert dst.crs == src.crs and dst.transform == src.transform
        assert (dst.width, dst.height, dst.count) == (src.width, src.height, 1)
        assert set(np.unique(dst.read(1))) <= {0, 2}
    # a point outside the scene is named
    geojson["features"][0]["geometry"]["coordinates"] = [x - 5000, y]
    (tmp_path / "p.geojson").write_text(json.dumps(geojson))
    assert samlight_main(args) == 1
    assert "feature 0" in capsys.readouterr().err
    bad = tmp_path / "scene.png"
    bad.write_bytes(b"")
    assert samlight_main([*args[:8], str(bad), *args[9:]]) == 2


def test_export_merges_lora_of_a_run_checkpoint(tmp_path):
    """A LoRA run's .ckpt (peft key names) exports to official weights with the adapters folded in, equal to
    peft's own merge, so `samlight segment` can load it."""
    import torch

    from samlight import SamModule, build_sam, save_official

    torch.manual_seed(0)
    module = SamModule(variant="tiny", lora={"r": 4.0, "alpha": 8.0})
    with torch.no_grad():
        for name, param in module.model.image_encoder.named_parameters():
            if "lora_B" in name:
                param.normal_()  # trained adapters are non-zero
    ckpt = tmp_path / "run.ckpt"
    state = {f"model.{k}": v for k, v in module.model.state_dict().items()}
    torch.save({"state_dict": state, "hyper_parameters": {"lora": {"r": 4.0, "alpha": 8.0}}}, ckpt)
    assert samlight_main(["export", "--ckpt", str(ckpt), "--out", str(tmp_path / "out.pth")]) == 0
    save_official(module, tmp_path / "reference.pth")
    exported = torch.load(tmp_path / "out.pth", map_location="cpu", weights_only=True)
    reference = torch.load(tmp_path / "reference.pth", map_location="cpu", weights_only=True)
    assert sorted(exported) == sorted(reference)
    for key in reference:
        torch.testing.assert_close(exported[key], reference[key])
    qkv = "image_encoder.blocks.0.attn.qkv.weight"
    assert not torch.equal(
        exported[qkv], module.model.image_encoder.base_model.model.blocks[0].attn.qkv.base_layer.weight
    )
    build_sam("tiny", checkpoint=tmp_path / "out.pth")  # loads strictly
