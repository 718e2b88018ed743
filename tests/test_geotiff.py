"""GeoTIFF conversion: real scenes written in tmp_path, tiled into shards, checked pixel for pixel."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

rasterio = pytest.importorskip("rasterio")
wds = pytest.importorskip("webdataset")
from rasterio.transform import from_origin  # noqa: E402
from rasterio.windows import Window  # noqa: E402

from samlight.datamodules.tools.convert import main as convert_main  # noqa: E402
from samlight.datamodules.tools.raster import parse_bands, tile_starts, tile_windows  # noqa: E402
from tests._finetune import assert_finetune_recipe, printed_config  # noqa: E402
from tests._shards import read_shards, stream_datamodule  # noqa: E402

TRANSFORM = from_origin(500000.0, 4000000.0, 10.0, 10.0)


def make_scene(height=300, width=300, dtype="uint16") -> tuple[np.ndarray, np.ndarray]:
    """4-band scene with a nodata (0) strip, and an instance raster with 4 objects (one on a tile seam)."""
    rng = np.random.default_rng(0)
    scene = rng.integers(100, 4000, (4, height, width)).astype(dtype)
    scene[:, :, :6] = 0  # nodata strip on the west edge
    labels = np.zeros((height, width), np.uint16)
    labels[20:60, 30:80] = 1
    labels[150:200, 150:220] = 2
    labels[250:290, 10:50] = 3
    labels[100:120, 100:140] = 4  # crosses the tile seam at 128
    return scene, labels


def write_raster(path: Path, data: np.ndarray, *, crs="EPSG:32633", transform=TRANSFORM, nodata=None) -> Path:
    data = data[None] if data.ndim == 2 else data
    with rasterio.open(
        path,
        "w",
        driver="GTiff",
        width=data.shape[2],
        height=data.shape[1],
        count=data.shape[0],
        dtype=str(data.dtype),
        crs=crs,
        transform=transform,
        nodata=nodata,
    ) as dst:
        dst.write(data)
    return path


def convert(tmp_path: Path, *extra: str, scene="scene.tif", labels="labels.tif", out="shards") -> int:
    return convert_main(
        [
            "--format",
            "geotiff",
            "--images",
            str(tmp_path / scene),
            "--labels",
            str(tmp_path / labels),
            "--output",
            str(tmp_path / out),
            *extra,
        ]
    )


def test_tiles_with_labels_one_mask_per_instance_and_georeference(tmp_path, caplog):
    scene, labels = make_scene()
    write_raster(tmp_path / "scene.tif", scene, nodata=0)
    write_raster(tmp_path / "labels.tif", labels)
    with caplog.at_level("WARNING"):
        assert convert(tmp_path, "--tile-size", "128", "--overlap", "32", "--bands", "3,2,1") == 0
    samples = read_shards(tmp_path / "shards")
    windows = tile_windows(300, 300, 128, 32)
    assert len(windows) == 9
    expected_keys = {
        f"scene_r{row:05d}_c{col:05d}"
        for col, row, w, h in windows
        if labels[row : row + h, col : col + w].any()
    }
    assert set(samples) == expected_keys and len(samples) < len(windows)  # empty tiles dropped
    seen = set()
    with rasterio.open(tmp_path / "scene.tif") as src:
        wkt = src.crs.to_wkt()
        for key, sample in samples.items():
            info = sample["json"]["image"]
            col, row, w, h = info["window"]
            assert key == f"scene_r{row:05d}_c{col:05d}"
            assert info["crs"] == wkt
            assert info["transform"] == list(src.window_transform(Window(col, row, w, h)))[:6]
            assert info["bands"] == [3, 2, 1] and info["nodata"] == 0
            # the stretch ignores nodata: the low end is near the smallest real value, not 0
            assert all(low >= 100 for low in info["stretch"]["low"])
            window_labels = labels[row : row + h, col : col + w]
            ids = sorted(set(np.unique(window_labels)) - {0})
            assert len(sample["masks"]) == len(ids)  # one mask per instance in the tile
            for mask, instance in zip(sample["masks"], ids):
                np.testing.assert_array_equal(mask, window_labels == instance)
                seen.add(int(instance))
            assert all(a["category_id"] == 1 for a in sample["json"]["annotations"])
            if col == 0:
                assert sample["image"][:, :5].mean() < 12  # nodata strip black (up to JPEG ringing)
    assert seen == {1, 2, 3, 4}  # nothing lost
    # the same tiles stream through SA1BDataModule: each once, one mask per instance, georeference kept
    streamed = stream_datamodule(tmp_path / "shards", image_size=128)
    assert sorted(streamed) == sorted(samples)
    for key, sample in samples.items():
        np.testing.assert_array_equal(streamed[key]["masks"], sample["masks"])
        assert streamed[key]["info"]["transform"] == sample["json"]["image"]["transform"]
        assert streamed[key]["info"]["crs"] == wkt
    assert "tile without labels" not in caplog.text  # counted quietly, not one warning per tile


def test_class_raster_split_into_components(tmp_path):
    scene, _ = make_scene(200, 200, dtype="float32")
    scene[1, 50:60, 50:60] = np.nan  # NaN pixels of the shown band (2) are masked like nodata
    classes = np.zeros((200, 200), np.uint8)
    classes[10:30, 10:30] = 5
    classes[60:90, 120:160] = 5
    classes[150:170, 20:60] = 7
    write_raster(tmp_path / "scene.tif", scene)
    write_raster(tmp_path / "labels.tif", classes)
    assert convert(tmp_path, "--label-mode", "classes", "--tile-size", "512", "--bands", "2") == 0
    (sample,) = read_shards(tmp_path / "shards").values()
    cats = sorted(a["category_id"] for a in sample["json"]["annotations"])
    assert cats == [5, 5, 7]
    assert sample["json"]["image"]["window"] == [0, 0, 200, 200]
    assert sample["image"].shape == (200, 200, 3)
    assert sample["image"][52:58, 52:58].mean() < 12  # NaN became black (up to JPEG ringing)
    assert np.isfinite(sample["json"]["image"]["stretch"]["low"]).all()


def test_bad_inputs_named(tmp_path):
    scene, labels = make_scene()
    write_raster(tmp_path / "scene.tif", scene, nodata=0)
    write_raster(tmp_path / "other_crs.tif", labels, crs="EPSG:4326")
    write_raster(tmp_path / "other_size.tif", labels[:200])
    with pytest.raises(SystemExit) as err:
        convert(tmp_path, "--strict", labels="other_crs.tif")
    assert "scene.tif" in str(err.value) and "other_crs.tif" in str(err.value) and "CRS" in str(err.value)
    with pytest.raises(SystemExit, match=r"other_size\.tif.*size 300x300 vs 300x200"):
        convert(tmp_path, "--strict", labels="other_size.tif")
    # without --strict the scene is skipped and counted; nothing written -> exit code 1
    assert convert(tmp_path, labels="other_size.tif", out="skip") == 1
    write_raster(tmp_path / "labels.tif", labels)
    with pytest.raises(
        SystemExit, match=r"band\(s\) \[5\] out of range for .*scene\.tif, which has bands 1\.\.4"
    ):
        convert(tmp_path, "--bands", "5,2,1")
    empty = tmp_path / "empty"
    empty.mkdir()
    write_raster(empty / "scene.tif", scene)
    write_raster(tmp_path / "empty_labels.tif", np.zeros_like(labels))
    assert convert(tmp_path, scene="empty/scene.tif", labels="empty_labels.tif", out="none") == 1


def test_band_and_tile_helpers():
    assert parse_bands(None, 4, "x.tif") == [1, 2, 3]
    assert parse_bands(None, 1, "x.tif") == [1]
    assert parse_bands("4", 4, "x.tif") == [4]
    with pytest.raises(ValueError, match="band"):
        parse_bands("0,1,2", 3, "x.tif")
    with pytest.raises(ValueError, match="1 band"):
        parse_bands("1,2", 3, "x.tif")
    assert tile_starts(300, 128, 32) == [0, 96, 172]
    assert tile_starts(100, 128, 32) == [0]
    assert tile_starts(10_000, 1024, 128)[-1] == 10_000 - 1024
    covered = np.zeros(10_000, bool)
    for start in tile_starts(10_000, 1024, 128):
        covered[start : start + 1024] = True
    assert covered.all()


def test_finetune_satellite_config_builds_lora(capsys):
    """The shipped config parses (official checkpoint, LoRA, box + point prompts, the paper's loss, bf16), and its
    LoRA settings build on a tiny model as the CLI passes them (numbers as floats)."""
    from samlight import SamModule

    parsed = printed_config("finetune_satellite.yaml", capsys)
    assert_finetune_recipe(parsed)
    model = parsed["model"]
    assert model["lora"]["r"] == 8 and model["freeze"] == []
    module = SamModule(variant="tiny", lora={k: float(v) for k, v in model["lora"].items()})
    trainable = {
        n.split(".lora_")[0] for n, p in module.model.image_encoder.named_parameters() if p.requires_grad
    }
    assert trainable and all("attn" in n for n in trainable)  # only the adapters train in the encoder
