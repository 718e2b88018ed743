"""The synthetic demo set: SA-1B format, deterministic, written once and atomically, reachable as `demo`."""

from __future__ import annotations

import json
import tarfile
import threading
from pathlib import Path

import numpy as np
from pycocotools import mask as mask_utils

from samlight.datamodules import SA1BDataModule, make_demo_shards
from samlight.datamodules.decode import decode_image
from samlight.datamodules.demo import DEMO_VERSION, synthetic_scene

SMALL = {"num_train": 6, "num_val": 3, "image_size": (48, 64), "samples_per_shard": 4}


def members(url: str) -> dict[str, bytes]:
    with tarfile.open(url) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers()}


def test_demo_shards_are_sa1b_format_with_labelled_instance_masks(tmp_path):
    train, val = make_demo_shards(tmp_path, **SMALL)
    assert len(train) == 2 and len(val) == 1
    contents = {}
    for url in train + val:
        contents.update(members(url))
    keys = sorted(name.split(".")[0] for name in contents if name.endswith(".jpg"))
    assert keys == [f"train_{i:05d}" for i in range(6)] + [f"val_{i:05d}" for i in range(3)]
    for key in keys:
        record = json.loads(contents[f"{key}.json"])
        image, size = decode_image(contents[f"{key}.jpg"], 64)
        assert size == (record["image"]["height"], record["image"]["width"]) in ((48, 64), (64, 48))
        assert image.std() > 10  # textured, not a flat colour
        masks = mask_utils.decode([a["segmentation"] for a in record["annotations"]])  # H x W x M
        assert masks.shape[2] >= 1 and masks.shape[:2] == size
        assert masks.sum(axis=2).max() == 1  # visible instance masks never overlap
        assert all(a["category_id"] in (1, 2, 3) for a in record["annotations"])
        assert [a["area"] for a in record["annotations"]] == masks.sum(axis=(0, 1)).tolist()


def test_demo_set_is_deterministic_and_reused(tmp_path):
    first = make_demo_shards(tmp_path / "a", **SMALL)
    second = make_demo_shards(tmp_path / "b", **SMALL)
    for url_a, url_b in zip(first[0] + first[1], second[0] + second[1]):
        assert members(url_a) == members(url_b)
    stamp = Path(first[0][0]).stat().st_mtime_ns
    assert make_demo_shards(tmp_path / "a", **SMALL) == first
    assert Path(first[0][0]).stat().st_mtime_ns == stamp  # reused, not rewritten
    other = make_demo_shards(tmp_path / "a", **{**SMALL, "seed": 1})
    assert other[0] != first[0] and members(other[0][0]) != members(first[0][0])


def test_racing_writers_leave_one_complete_set(tmp_path):
    results, errors = [], []

    def build():
        try:
            results.append(make_demo_shards(tmp_path, **SMALL))
        except Exception as exn:  # surfaced below
            errors.append(exn)

    threads = [threading.Thread(target=build) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(results) == 3 and results[0] == results[1] == results[2]
    root = Path(results[0][0][0]).parents[2]
    assert [p.name for p in root.iterdir()] == [Path(results[0][0][0]).parents[1].name]  # no temp dirs left
    for url in results[0][0] + results[0][1]:
        members(url)  # every tar reads completely


def test_datamodule_resolves_demo_into_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SAMLIGHT_CACHE", str(tmp_path))
    dm = SA1BDataModule("demo", "demo", num_workers=0, image_size=64, batch_size=4, batches_per_epoch=2)
    dm.prepare_data()
    dm.setup("fit")
    train = list(dm.train_dataloader())
    val_keys = [m["key"] for b in dm.val_dataloader() for m in b.meta]
    assert len(train) == 2 and train[0].images.shape == (4, 3, 64, 64)
    assert sorted(val_keys) == [f"val_{i:05d}" for i in range(16)]
    assert len(list(tmp_path.glob(f"{DEMO_VERSION}/*/train/*.tar"))) == 4
    assert np.all([m["mask_labels"] is not None for b in train for m in b.meta])


def test_demo_scenes_are_dense_and_every_mask_is_one_whole_piece():
    """The quickstart learns from these masks: many per image, each one connected piece of a useful size."""
    from scipy import ndimage

    rng = np.random.default_rng(0)
    counts = []
    for i in range(12):
        size = (240, 320) if i % 2 == 0 else (320, 240)
        image, masks, labels = synthetic_scene(size, rng)
        assert image.shape == (*size, 3) and masks.shape[1:] == size and len(labels) == masks.shape[0]
        assert masks.sum(axis=0).max() <= 1  # visible parts never overlap
        areas = masks.sum(axis=(1, 2))
        assert areas.min() >= 0.013 * size[0] * size[1]
        assert all(ndimage.label(m)[1] == 1 for m in masks)  # none cut in two by a shape on top
        counts.append(masks.shape[0])
    assert np.mean(counts) >= 10, counts  # dense: v1 held 3-8 shapes, some of them in pieces
    # Stricter settings drop what they must: a shape covered beyond min_area is left unannotated.
    _, masks, _ = synthetic_scene((240, 320), np.random.default_rng(1), min_area=0.05)
    assert masks.shape[0] and masks.sum(axis=(1, 2)).min() >= 0.05 * 240 * 320
