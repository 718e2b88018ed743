"""Shard tools: `samlight data convert|prepare|inspect` on small inputs written in tmp_path."""

from __future__ import annotations

import io
import json
import logging
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from pycocotools import mask as mask_utils
from scipy import ndimage

from samlight.cli.main import main as samlight_main
from samlight.datamodules.decode import decode_masks, decode_sa1b_sample
from samlight.datamodules.tools.convert import ConvertSummary
from samlight.datamodules.tools.shards import SA1BShardWriter, encode_jpeg
from samlight.modeling.transforms import get_preprocess_shape


def read_shards(folder: Path) -> dict[str, tuple[np.ndarray, dict]]:
    """key -> (image H x W x 3 uint8, json record) for every sample of every shard in `folder`."""
    members: dict[str, dict[str, bytes]] = {}
    for path in sorted(folder.glob("*.tar")):
        with tarfile.open(path) as tar:
            for member in tar.getmembers():
                key, _, ext = member.name.partition(".")
                members.setdefault(key, {})[ext] = tar.extractfile(member).read()
    out = {}
    for key, parts in members.items():
        image = np.asarray(Image.open(io.BytesIO(parts["jpg"])).convert("RGB"))
        out[key] = (image, json.loads(parts["json"]))
    return out


def shard_masks(record: dict) -> np.ndarray:
    """M x H x W bool, pycocotools decode of every annotation's RLE."""
    rles = [ann["segmentation"] for ann in record["annotations"]]
    return np.moveaxis(mask_utils.decode(rles), -1, 0).astype(bool)


def assert_same_masks(decoded: np.ndarray, expected: list[np.ndarray]) -> None:
    """Same set of masks, order-independent (compared by their bytes)."""
    got = sorted(m.tobytes() for m in decoded)
    want = sorted(np.asarray(m, dtype=bool).tobytes() for m in expected)
    assert len(got) == len(want)
    assert got == want


def label_map(height: int, width: int, ids: list[int], dtype) -> np.ndarray:
    """A label map with one rectangle per id (0 = background)."""
    labels = np.zeros((height, width), dtype=dtype)
    for n, value in enumerate(ids):
        labels[3 + 5 * n : 7 + 5 * n, 2 + 3 * n : 12 + 3 * n] = value
    return labels


def run_data(*argv: str) -> int:
    return samlight_main(["data", *map(str, argv)])


# ---------------------------------------------------------------------------------------------- convert folder


def test_convert_folder_instance_8_and_16_bit(tmp_path: Path) -> None:
    images, masks, out = tmp_path / "images", tmp_path / "masks", tmp_path / "out"
    images.mkdir(), masks.mkdir()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (24, 32, 3), dtype=np.uint8)).save(images / "rgb8.png")
    # 16-bit grayscale image: must be stretched to uint8 and turned into 3 channels.
    gray16 = (rng.random((24, 32)) * 4000 + 1000).astype(np.uint16)
    Image.fromarray(gray16).save(images / "gray16.png")
    Image.fromarray(
        np.dstack([rng.integers(0, 255, (24, 32, 3), dtype=np.uint8), np.full((24, 32), 128, np.uint8)])
    ).save(images / "rgba.png")
    labels8 = label_map(24, 32, [1, 2, 7], np.uint8)
    labels16 = label_map(24, 32, [300, 65000], np.uint16)
    labels_rgba = label_map(24, 32, [5], np.uint8)
    Image.fromarray(labels8).save(masks / "rgb8.png")
    Image.fromarray(labels16).save(masks / "gray16.png")
    Image.fromarray(labels_rgba).save(masks / "rgba.tif")

    assert (
        run_data("convert", "--format", "folder", "--images", images, "--masks", masks, "--output", out) == 0
    )

    samples = read_shards(out)
    assert sorted(samples) == ["gray16", "rgb8", "rgba"]
    for key, labels, ids in (
        ("rgb8", labels8, [1, 2, 7]),
        ("gray16", labels16, [300, 65000]),
        ("rgba", labels_rgba, [5]),
    ):
        image, record = samples[key]
        assert image.shape == (24, 32, 3) and image.dtype == np.uint8
        assert_same_masks(shard_masks(record), [labels == i for i in ids])
        assert sorted(a["instance_id"] for a in record["annotations"]) == ids
        assert record["image"]["height"] == 24 and record["image"]["width"] == 32
    gray_image = samples["gray16"][0]
    assert gray_image.std() > 20  # stretched to use the 8-bit range, not crushed to black
    assert np.abs(gray_image[..., 0].astype(int) - gray_image[..., 2]).max() <= 3  # gray -> 3 equal channels


def test_convert_folder_percentile_sets_the_16_bit_stretch(tmp_path: Path) -> None:
    """`--percentile LOW,HIGH` (the flag of the NIfTI/DICOM/GeoTIFF converters) picks the values mapped to 0 and
    255: a 12-bit ramp with one hot pixel, stretched 0,100 (the hot pixel is white, the ramp dark) and 1,99."""
    images, masks = tmp_path / "images", tmp_path / "masks"
    images.mkdir(), masks.mkdir()
    ramp = np.tile(np.linspace(100, 1100, 64), (48, 1)).astype(np.uint16)  # 48 x 64, 100 .. 1100
    ramp[0, 0] = 4095  # a hot pixel
    Image.fromarray(ramp).save(images / "field.png")
    Image.fromarray(label_map(48, 64, [1], np.uint8)).save(masks / "field.png")
    means = {}
    for spec in ("0,100", "1,99"):
        out = tmp_path / spec.replace(",", "_")
        args = ("convert", "--format", "folder", "--images", images, "--labels", masks, "--output", out)
        assert run_data(*args, "--percentile", spec) == 0
        image = read_shards(out)["field"][0][..., 0].astype(float)
        assert image.shape == (48, 64)
        means[spec] = image[1:, :].mean()
        lo, hi = np.percentile(ramp.astype(np.float32), [float(v) for v in spec.split(",")])
        expected = np.clip((ramp.astype(np.float32) - lo) * 255.0 / (hi - lo), 0, 255)
        assert np.abs(image - expected)[1:].mean() < 3.0, spec  # JPEG error only
    assert means["0,100"] < 80 < 110 < means["1,99"]  # one hot pixel darkens the whole 0,100 stretch
    with pytest.raises(SystemExit, match="LOW < HIGH"):
        run_data(
            "convert",
            "--format",
            "folder",
            "--images",
            images,
            "--labels",
            masks,
            "--output",
            tmp_path / "x",
            "--percentile",
            "99,1",
        )


def test_convert_folder_binary_per_object_and_components(tmp_path: Path) -> None:
    images, masks, out = tmp_path / "images", tmp_path / "masks", tmp_path / "out"
    (masks / "a").mkdir(parents=True), images.mkdir()
    Image.fromarray(np.full((20, 30, 3), 90, np.uint8)).save(images / "a.jpg")
    first = np.zeros((20, 30), bool)
    first[2:6, 2:8] = True
    first[12:18, 20:28] = True  # a second blob: split with --connected-components
    second = np.zeros((20, 30), bool)
    second[8:10, 5:25] = True
    Image.fromarray(first.astype(np.uint8) * 255).save(masks / "a" / "obj0.png")
    Image.fromarray(second.astype(np.uint8)).save(masks / "a" / "obj1.png")

    argv = [
        "convert",
        "--format",
        "folder",
        "--images",
        images,
        "--masks",
        masks,
        "--mask-mode",
        "binary-per-object",
    ]
    assert run_data(*argv, "--output", out) == 0
    assert_same_masks(shard_masks(read_shards(out)["a"][1]), [first, second])

    assert run_data(*argv, "--output", tmp_path / "cc", "--connected-components") == 0
    blob_a, blob_b = first.copy(), first.copy()
    blob_a[10:], blob_b[:10] = False, False
    assert_same_masks(shard_masks(read_shards(tmp_path / "cc")["a"][1]), [blob_a, blob_b, second])


def test_convert_folder_bad_inputs_are_skipped_counted_and_named(tmp_path: Path, caplog) -> None:
    from argparse import Namespace

    from samlight.datamodules.tools import convert

    images, masks = tmp_path / "images", tmp_path / "masks"
    images.mkdir(), masks.mkdir()
    good = label_map(16, 16, [1, 2], np.uint8)
    for stem in ("good", "mismatch", "broken", "alone", "empty", "tiny"):
        Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(images / f"{stem}.png")
    (images / "broken.png").write_bytes(b"not a png")
    Image.fromarray(good).save(masks / "good.png")
    Image.fromarray(good).save(masks / "broken.png")
    Image.fromarray(np.ones((8, 8), np.uint8)).save(masks / "mismatch.png")
    Image.fromarray(np.zeros((16, 16), np.uint8)).save(masks / "empty.png")
    tiny = np.zeros((16, 16), np.uint8)
    tiny[0, 0] = 3
    Image.fromarray(tiny).save(masks / "tiny.png")
    Image.fromarray(good).save(masks / "orphan.png")

    args = Namespace(format="folder", images=images, labels=masks, output=tmp_path / "out", shard_size=2,
                     max_shard_bytes=1 << 30, prefix="sa", quality=90, mask_mode="instance", mask_suffix="",
                     connected_components=False, min_area=2, ignore_value=[], recursive=False,
                     percentile="1,99", strict=False)  # fmt: skip
    with caplog.at_level(logging.WARNING, logger="samlight.datamodules"):
        summary: ConvertSummary = convert.run(args)
    assert summary.images_written == 1 and summary.masks_written == 2
    assert summary.skipped == {
        "unmatched image": 1,
        "size mismatch": 1,
        "unreadable": 1,
        "no masks": 2,
        "unmatched mask": 1,
    }
    assert summary.masks_dropped == {"below --min-area": 1}
    for name in ("alone.png", "mismatch.png", "broken.png", "orphan.png"):
        assert name in caplog.text


@pytest.mark.parametrize("flag", ["--labels", "--masks"])
def test_convert_folder_takes_labels_or_its_alias_masks(tmp_path: Path, flag: str) -> None:
    images, masks = tmp_path / "images", tmp_path / "masks"
    images.mkdir(), masks.mkdir()
    Image.fromarray(np.full((16, 20, 3), 70, np.uint8)).save(images / "a.png")
    labels = label_map(16, 20, [4, 9], np.uint8)
    Image.fromarray(labels).save(masks / "a.png")
    argv = ["convert", "--format", "folder", "--images", images, flag, masks, "--output", tmp_path / "out"]
    assert run_data(*argv) == 0
    record = read_shards(tmp_path / "out")["a"][1]
    assert_same_masks(shard_masks(record), [labels == 4, labels == 9])


def test_convert_folder_strict_stops_at_the_first_unreadable_image(tmp_path: Path) -> None:
    images, masks = tmp_path / "images", tmp_path / "masks"
    images.mkdir(), masks.mkdir()
    (images / "broken.png").write_bytes(b"not a png")
    Image.fromarray(label_map(16, 16, [1], np.uint8)).save(masks / "broken.png")
    argv = ["convert", "--format", "folder", "--images", images, "--labels", masks]
    assert run_data(*argv, "--output", tmp_path / "lenient") == 1  # skipped and counted: nothing written
    with pytest.raises(SystemExit, match=r"--format folder: .*broken\.png"):
        run_data(*argv, "--output", tmp_path / "strict", "--strict")


def test_convert_help_lists_every_format_with_an_example(capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        run_data("convert", "--help")
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for fmt in ("folder", "coco", "nifti", "dicom", "geotiff"):
        examples = [line for line in text.splitlines() if f"samlight data convert --format {fmt} " in line]
        assert len(examples) == 1, f"--help shows no (or several) example for --format {fmt}"
        assert "--output" in examples[0]
    with pytest.raises(SystemExit):
        run_data("convert", "--format", "folder", "--help")
    assert "--labels LABELS, --masks LABELS" in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------- convert coco


def test_convert_coco_polygons_and_rle(tmp_path: Path, caplog) -> None:
    height, width = 30, 40
    images = tmp_path / "images"
    images.mkdir()
    Image.fromarray(np.full((height, width, 3), 50, np.uint8)).save(images / "one.jpg")
    Image.fromarray(np.full((height, width, 3), 80, np.uint8)).save(images / "two.png")
    polygon = [[2.0, 2.0, 20.0, 2.0, 20.0, 12.0, 2.0, 12.0], [25.0, 20.0, 35.0, 20.0, 30.0, 28.0]]
    crowd_mask = np.zeros((height, width), np.uint8)
    crowd_mask[15:25, 3:18] = 1
    flat = crowd_mask.flatten(order="F")
    change = np.flatnonzero(np.diff(flat)) + 1
    runs = np.diff(np.concatenate([[0], change, [flat.size]])).tolist()  # starts with a 0-run (flat[0] == 0)
    compressed_mask = np.zeros((height, width), np.uint8)
    compressed_mask[5:9, 30:38] = 1
    compressed = mask_utils.encode(np.asfortranarray(compressed_mask))
    coco = {
        "images": [
            {"id": 1, "file_name": "one.jpg", "height": height, "width": width},
            {"id": 2, "file_name": "two.png", "height": height, "width": width},
            {"id": 3, "file_name": "missing.jpg", "height": height, "width": width},
        ],
        "annotations": [
            {"id": 10, "image_id": 1, "category_id": 3, "iscrowd": 0, "segmentation": polygon},
            {"id": 11, "image_id": 1, "category_id": 4, "iscrowd": 1,
             "segmentation": {"size": [height, width], "counts": runs}},
            {"id": 12, "image_id": 2, "category_id": 5, "iscrowd": 0,
             "segmentation": {"size": [height, width], "counts": compressed["counts"].decode()}},
            {"id": 13, "image_id": 2, "category_id": 5, "iscrowd": 0,
             "segmentation": {"size": [height, width], "counts": "garbage!"}},
            {"id": 14, "image_id": 3, "category_id": 1, "iscrowd": 0, "segmentation": polygon},
        ],
        "categories": [{"id": i, "name": str(i)} for i in (1, 3, 4, 5)],
    }  # fmt: skip
    ann_file = tmp_path / "instances.json"
    ann_file.write_text(json.dumps(coco))

    with caplog.at_level(logging.WARNING, logger="samlight.datamodules"):
        rc = run_data(
            "convert",
            "--format",
            "coco",
            "--annotations",
            ann_file,
            "--images",
            images,
            "--output",
            tmp_path / "out",
        )
    assert rc == 0
    samples = read_shards(tmp_path / "out")
    assert sorted(samples) == ["one", "two"]
    reference_polygon = mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects(polygon, height, width)))
    one = samples["one"][1]
    assert [(a["category_id"], a["iscrowd"], a["coco_id"]) for a in one["annotations"]] == [
        (3, 0, 10),
        (4, 1, 11),
    ]
    decoded = shard_masks(one)
    np.testing.assert_array_equal(decoded[0], reference_polygon.astype(bool))
    np.testing.assert_array_equal(decoded[1], crowd_mask.astype(bool))
    two = samples["two"][1]
    assert [a["coco_id"] for a in two["annotations"]] == [12]  # the garbage RLE was skipped
    np.testing.assert_array_equal(shard_masks(two)[0], compressed_mask.astype(bool))
    assert "missing.jpg" in caplog.text and "annotation 13" in caplog.text

    rc = run_data("convert", "--format", "coco", "--annotations", ann_file, "--images", images,
                  "--output", tmp_path / "nocrowd", "--crowd", "drop")  # fmt: skip
    assert rc == 0
    assert [a["coco_id"] for a in read_shards(tmp_path / "nocrowd")["one"][1]["annotations"]] == [10]


def test_convert_help_shows_the_format_options(capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        run_data("convert", "--format", "coco", "--help")
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert "--annotations" in text and "--crowd" in text and "--mask-mode" not in text


# ---------------------------------------------------------------------------------------------- prepare


def write_raw_shard(
    path: Path, samples: list[tuple[str, np.ndarray, np.ndarray]], broken: bool = True
) -> None:
    """An SA-1B-style shard with each sample's json before its jpg and the broken samples' members interleaved
    with the good ones (pairing must not depend on member order). Per-mask `clip.npy` rows come first."""
    folder = path.parent / "tmp_raw"
    with SA1BShardWriter(folder, prefix="x", max_samples=10_000) as writer:
        for key, image, masks in samples:
            writer.write(
                key,
                image,
                masks=masks,
                extra={"clip.npy": _npy(np.arange(masks.shape[0] * 2).reshape(-1, 2))},
            )
    members = []
    with tarfile.open(writer.shards[0]) as tar:
        for member in tar.getmembers():
            members.append((member.name, tar.extractfile(member).read()))
    if broken:
        some_json = next(data for name, data in members if name.endswith(".json"))
        some_jpeg = next(data for name, data in members if name.endswith(".jpg"))
        members += [
            ("bad_jpeg.jpg", b"\xff\xd8 not a jpeg"),
            ("bad_jpeg.json", some_json),
            ("lonely.jpg", some_jpeg),
        ]
    with tarfile.open(path, "w") as tar:
        rank = {"clip.npy": 0, "json": 1, "jpg": 2}
        members.sort(key=lambda item: (rank[item[0].partition(".")[2]], item[0]))
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def _npy(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array)
    return buf.getvalue()


def blobs(height: int, width: int, count: int, rng: np.random.Generator) -> np.ndarray:
    """count x H x W random discs."""
    yy, xx = np.mgrid[:height, :width]
    centres = rng.integers(0, [height, width], size=(count, 2))
    radii = rng.integers(6, max(7, min(height, width) // 4), size=count)
    return (yy[None] - centres[:, :1, None]) ** 2 + (xx[None] - centres[:, 1:, None]) ** 2 < radii[
        :, None, None
    ] ** 2


def test_prepare_resizes_drops_large_masks_and_keeps_fields(tmp_path: Path, caplog) -> None:
    rng = np.random.default_rng(1)
    height, width, size = 90, 150, 64
    masks = blobs(height, width, 5, rng)
    full = np.ones((1, height, width), bool)  # covers 100%: dropped
    image = rng.integers(0, 255, (height, width, 3), dtype=np.uint8)
    raw = tmp_path / "raw" / "sa_000001.tar"
    raw.parent.mkdir()
    write_raw_shard(raw, [("sa_1", image, np.concatenate([masks[:2], full, masks[2:]]))])
    out = tmp_path / "prepared"

    with caplog.at_level(logging.WARNING, logger="samlight.data"):
        rc = run_data("prepare", "--input", f"pipe:cat {raw}", "--output", out, "--image-size", size)
    assert rc == 0
    assert (out / "sa_000001.tar").exists()  # same shard name as the input
    samples = read_shards(out)
    assert sorted(samples) == ["sa_1"]
    prepared, record = samples["sa_1"]
    new_h, new_w = get_preprocess_shape(height, width, size)
    assert prepared.shape == (new_h, new_w, 3) == (38, 64, 3)
    info = record["image"]
    assert (info["height"], info["width"], info["original_height"], info["original_width"]) == (
        38,
        64,
        90,
        150,
    )
    # Masks equal the datamodule's own resize of the raw RLEs (nearest-exact), the >90% mask gone.
    raw_rles = [mask_utils.encode(np.asfortranarray(m.astype(np.uint8))) for m in masks]
    expected = decode_masks(raw_rles, (height, width), (new_h, new_w), size)[:, :new_h, :new_w].numpy()
    np.testing.assert_array_equal(shard_masks(record), expected)
    # ... which is a full pycocotools decode followed by torch's nearest-exact resize.
    reference = F.interpolate(
        torch.from_numpy(masks)[None].float(), size=(new_h, new_w), mode="nearest-exact"
    )[0]
    np.testing.assert_array_equal(expected, reference.numpy() > 0.5)
    assert [a["area"] for a in record["annotations"]] == [int(m.sum()) for m in expected]
    assert all("point_coords" in a and "predicted_iou" in a for a in record["annotations"])
    with tarfile.open(out / "sa_000001.tar") as tar:  # per-mask rows follow the kept masks
        clip = np.load(io.BytesIO(tar.extractfile("sa_1.clip.npy").read()))
    np.testing.assert_array_equal(clip, np.arange(12).reshape(6, 2)[[0, 1, 3, 4, 5]])
    # The datamodule reads the prepared sample at training size and still reports the original size.
    decoded = decode_sa1b_sample(*_pair(out / "sa_000001.tar", "sa_1"), image_size=size)
    assert decoded.original_size == (90, 150) and decoded.input_size == (38, 64)
    assert "bad_jpeg" in caplog.text and "lonely" in caplog.text


def _pair(shard: Path, key: str) -> tuple[bytes, bytes]:
    with tarfile.open(shard) as tar:
        return tar.extractfile(f"{key}.jpg").read(), tar.extractfile(f"{key}.json").read()


# ---------------------------------------------------------------------------------------------- inspect


def test_inspect_reports_stats_broken_samples_and_writes_overlays(tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    samples = []
    for i, count in enumerate((3, 5, 10)):
        image = rng.integers(0, 255, (40, 60, 3), dtype=np.uint8)
        samples.append((f"sa_{i}", image, blobs(40, 60, count, rng)))
    shard = tmp_path / "shards" / "sa_000000.tar"
    shard.parent.mkdir()
    write_raw_shard(shard, samples)
    stats_file = tmp_path / "stats.json"

    rc = run_data("inspect", shard.parent, "--overlays", tmp_path / "ov", "--num", 2, "--json", stats_file)
    assert rc == 0
    report = json.loads(stats_file.read_text())
    assert report["images"] == 3 and report["masks"] == 18
    assert report["masks_per_image"] == {"mean": 6.0, "median": 5.0, "min": 3, "max": 10}
    assert report["image_sizes"]["most_common"] == [["40x60", 3]]
    assert report["skipped"] == {"corrupt image": 1, "jpg without json": 1}
    assert sum(report["mask_area_fraction"]["histogram"].values()) == 18
    overlays = sorted((tmp_path / "ov").glob("*.png"))
    assert len(overlays) == 2
    first = np.asarray(Image.open(overlays[0]).convert("RGB"))
    assert first.shape == (40, 60, 3)
    original = samples[0][1]
    decoded_original = np.asarray(Image.open(io.BytesIO(encode_jpeg(original))).convert("RGB"))
    tinted = samples[0][2].any(0)
    far = ~ndimage.binary_dilation(tinted, iterations=2)
    # Inside a mask the overlay differs from the image; away from the masks and their outlines it is the image.
    assert np.abs(first[tinted].astype(int) - decoded_original[tinted]).mean() > 10
    np.testing.assert_array_equal(first[far], decoded_original[far])


def test_inspect_fails_clearly_when_nothing_is_readable(tmp_path: Path, capsys) -> None:
    bad = tmp_path / "bad.tar"
    bad.write_bytes(b"this is not a tar file")
    assert run_data("inspect", bad) == 1
    assert "no readable sample" in capsys.readouterr().err


@pytest.mark.slow
def test_prepare_with_workers_matches_one_process(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    raw = tmp_path / "raw"
    raw.mkdir()
    for shard in range(2):
        image = rng.integers(0, 255, (50, 80, 3), dtype=np.uint8)
        write_raw_shard(
            raw / f"sa_{shard:06d}.tar", [(f"sa_{shard}", image, blobs(50, 80, 4, rng))], broken=False
        )
    pattern = str(raw / "sa_{000000..000001}.tar")
    assert run_data("prepare", "--input", pattern, "--output", tmp_path / "one", "--image-size", 32) == 0
    assert (
        run_data(
            "prepare", "--input", pattern, "--output", tmp_path / "two", "--image-size", 32, "--workers", 2
        )
        == 0
    )
    names = sorted(p.name for p in (tmp_path / "two").glob("*.tar"))
    assert names == ["sa_000000.tar", "sa_000001.tar"]
    one, two = read_shards(tmp_path / "one"), read_shards(tmp_path / "two")
    assert sorted(one) == sorted(two) == ["sa_0", "sa_1"]
    for key in one:
        assert one[key][1] == two[key][1]
        np.testing.assert_array_equal(one[key][0], two[key][0])


def test_converted_and_prepared_shards_stream_through_the_datamodule(tmp_path: Path) -> None:
    from samlight.datamodules.sa1b import SA1BDataModule

    images, masks = tmp_path / "images", tmp_path / "masks"
    images.mkdir(), masks.mkdir()
    rng = np.random.default_rng(4)
    labels = {}
    for stem in ("a", "b"):
        Image.fromarray(rng.integers(0, 255, (40, 64, 3), dtype=np.uint8)).save(images / f"{stem}.png")
        labels[stem] = label_map(40, 64, [1, 2, 3], np.uint8)
        Image.fromarray(labels[stem]).save(masks / f"{stem}.png")
    assert (
        run_data(
            "convert", "--format", "folder", "--images", images, "--masks", masks, "--output", tmp_path / "c"
        )
        == 0
    )
    assert run_data("prepare", "--input", tmp_path / "c", "--output", tmp_path / "p", "--image-size", 32) == 0
    for folder in ("c", "p"):
        urls = sorted(str(p) for p in (tmp_path / folder).glob("*.tar"))
        dm = SA1BDataModule(urls, urls, num_workers=0, image_size=32, batch_size=2)
        dm.setup("validate")
        batches = list(dm.val_dataloader())
        assert sum(len(b) for b in batches) == 2
        batch = batches[0]
        assert batch.original_sizes.tolist() == [
            [40, 64],
            [40, 64],
        ]  # prepared shards still report the source size
        assert batch.input_sizes.tolist() == [[20, 32], [20, 32]]
        assert batch.mask_valid.sum().item() == 6 and batch.masks.shape[-2:] == (32, 32)
