"""SA1BDataModule: order-independent pairing, the SamPredictor transform, bad input, training/validation streams."""

from __future__ import annotations

import io
import json
import logging
import random
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from pycocotools import mask as mask_utils

from samlight.datamodules import SA1BDataModule, SegmentationBatch
from samlight.datamodules.decode import (
    SampleError,
    decode_image,
    decode_masks,
    decode_sa1b_sample,
    normalize_pad_image,
    rle_counts,
)
from samlight.datamodules.sa1b_reader import SkipCounter, iter_shard
from samlight.datamodules.sa1b_stream import SA1BDataset
from samlight.datamodules.tools.shards import SA1BShardWriter, annotations_from_masks, encode_jpeg, encode_rle
from samlight.datamodules.urls import expand_urls
from samlight.modeling.transforms import (
    PIXEL_MEAN,
    PIXEL_STD,
    get_preprocess_shape,
    normalize_and_pad,
    resize_longest_image,
)


def random_masks(h: int, w: int, n: int, rng: np.random.Generator) -> np.ndarray:
    """n x h x w bool ellipses of random size and place (never empty)."""
    yy, xx = np.mgrid[0:h, 0:w]
    masks = []
    for _ in range(n):
        cy, cx = rng.uniform(0, h), rng.uniform(0, w)
        ry, rx = rng.uniform(2, h / 2), rng.uniform(2, w / 2)
        m = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 < 1
        m[int(cy) % h, int(cx) % w] = True
        masks.append(m)
    return np.stack(masks)


def random_image(h: int, w: int, rng: np.random.Generator) -> np.ndarray:
    """Smooth random RGB image (JPEG-friendly), h x w x 3 uint8."""
    small = rng.uniform(0, 255, size=(max(h // 8, 2), max(w // 8, 2), 3)).astype(np.uint8)
    return np.asarray(Image.fromarray(small).resize((w, h), Image.BILINEAR))


def sample_members(
    key: str, h: int, w: int, n: int, rng: np.random.Generator, **extra_ann
) -> dict[str, bytes]:
    """`<key>.jpg` and `<key>.json` bytes of one SA-1B sample with n masks."""
    masks = random_masks(h, w, n, rng)
    annotations = annotations_from_masks(masks, start_id=1000)
    for a in annotations:
        a.update(extra_ann)
    record = {
        "image": {"image_id": 7, "height": h, "width": w, "file_name": f"{key}.jpg"},
        "annotations": annotations,
    }
    return {f"{key}.jpg": encode_jpeg(random_image(h, w, rng)), f"{key}.json": json.dumps(record).encode()}


def write_tar(path: Path, members: dict[str, bytes], *, order: list[str] | None = None) -> str:
    """A plain tar with the members in `order` (default: as given)."""
    with tarfile.open(path, "w") as tar:
        for name in order or list(members):
            info = tarfile.TarInfo(name)
            info.size = len(members[name])
            tar.addfile(info, io.BytesIO(members[name]))
    return str(path)


def collect(loader) -> list[SegmentationBatch]:
    return list(loader)


def keys_of(batches) -> list[str]:
    return [m["key"] for b in batches for m in b.meta]


# ------------------------------------------------------------------------------------- decode: masks and image


def test_rle_counts_parse_compressed_and_list_forms_like_pycocotools():
    rng = np.random.default_rng(1)
    masks = np.concatenate(
        [random_masks(37, 53, 6, rng), rng.random((1, 37, 53)) < 0.5, np.ones((1, 37, 53), bool)]
    )
    for rle, mask in zip(encode_rle(masks), masks):
        counts = rle_counts(rle)
        decoded = np.repeat(np.arange(counts.size) % 2, counts).reshape(53, 37).T  # column-major runs
        np.testing.assert_array_equal(decoded, mask)
        np.testing.assert_array_equal(rle_counts({"size": rle["size"], "counts": counts.tolist()}), counts)
        np.testing.assert_array_equal(mask_utils.decode(rle), mask)


@pytest.mark.parametrize(
    ("h", "w", "size"),
    [(150, 225, 64), (37, 53, 64), (64, 40, 64), (100, 60, 128)],
    ids=["downsample", "upsample", "identity", "upsample-tall"],
)
def test_masks_equal_pycocotools_decode_then_nearest_resize_and_pad(h, w, size):
    rng = np.random.default_rng(2)
    rles = encode_rle(random_masks(h, w, 9, rng))
    input_size = get_preprocess_shape(h, w, size)
    ours = decode_masks(rles, (h, w), input_size, size)  # M x S x S
    full = torch.from_numpy(mask_utils.decode(rles).transpose(2, 0, 1).copy())  # M x H x W
    reference = F.interpolate(full[None].float(), size=input_size, mode="nearest-exact")[0].bool()
    reference = F.pad(reference, (0, size - input_size[1], 0, size - input_size[0]))
    assert ours.shape == (9, size, size) and ours.dtype == torch.bool
    assert torch.equal(ours, reference)


def test_broken_rles_are_rejected_before_pycocotools_sees_them():
    rle = encode_rle(np.ones((1, 10, 10), bool))[0]
    for broken in (
        {"size": [10, 10], "counts": rle["counts"] + "5"},  # runs sum past H*W (would overflow the C decoder)
        {"size": [10, 10], "counts": "\x01\x02"},  # characters outside the alphabet
        {"size": [10, 10], "counts": "o"},  # unterminated number (continuation bit set)
        {"size": [10, 10], "counts": [50, -5, 55]},
        {"size": [10], "counts": rle["counts"]},
        {"counts": rle["counts"]},
    ):
        with pytest.raises(SampleError) as info:
            rle_counts(broken)
        assert info.value.reason == "broken rle"


@pytest.mark.parametrize(("h", "w"), [(300, 450), (90, 130)], ids=["reduced-dct", "upsample"])
def test_image_follows_resize_longest_image_and_normalisation(h, w):
    rng = np.random.default_rng(3)
    image = np.clip(random_image(h, w, rng) + rng.normal(0, 8, size=(h, w, 3)), 0, 255).astype(np.uint8)
    jpg = encode_jpeg(image, quality=90)
    size = 200
    full = np.asarray(Image.open(io.BytesIO(jpg)).convert("RGB"))
    reference = resize_longest_image(full, size)  # SamPredictor's resize of the full decode
    exact, original = decode_image(jpg, size, reduced=False)
    assert original == (h, w)
    np.testing.assert_array_equal(exact, reference)
    fast, _ = decode_image(jpg, size)
    assert fast.shape == reference.shape == (*get_preprocess_shape(h, w, size), 3)
    # A 1/2-scale DCT decode differs from the full decode + resize only by a little extra smoothing.
    assert np.abs(fast.astype(float) - reference.astype(float)).mean() < 3.0
    mean, std = torch.tensor(PIXEL_MEAN).view(3, 1, 1), torch.tensor(PIXEL_STD).view(3, 1, 1)
    expected = normalize_and_pad(torch.from_numpy(exact.copy()).permute(2, 0, 1).float(), mean, std, size)
    torch.testing.assert_close(normalize_pad_image(exact, size), expected)


def test_sample_drops_large_masks_samples_max_masks_and_fills_meta():
    rng = np.random.default_rng(4)
    h, w = 60, 80
    masks = np.concatenate([np.ones((1, h, w), bool), random_masks(h, w, 12, rng)])
    annotations = annotations_from_masks(masks, start_id=10)
    for i, a in enumerate(annotations):
        a["category_id"] = i % 3
    record = {
        "image": {"image_id": 5, "height": h, "width": w, "spacing": [0.5, 0.5]},
        "annotations": annotations,
    }
    jpg = encode_jpeg(random_image(h, w, rng))
    clip = np.arange(13 * 4, dtype=np.float16).reshape(13, 4)
    buf = io.BytesIO()
    np.save(buf, clip)
    val = decode_sa1b_sample(jpg, record, image_size=64, max_masks=5, rng=None, clip=buf.getvalue())
    train = decode_sa1b_sample(
        jpg, json.dumps(record).encode(), image_size=64, max_masks=5, rng=np.random.default_rng(0)
    )
    # Training samples carry the masks in the loss frame only (S/4 counts), validation the full masks.
    assert val.masks.shape == (5, 64, 64) and train.masks is None and train.mask_targets.shape == (5, 16, 16)
    assert val.meta["annotation_ids"] == [11, 12, 13, 14, 15]  # first five after dropping the full-image mask
    assert 10 not in train.meta["annotation_ids"]
    assert len(set(train.meta["annotation_ids"])) == 5
    assert val.meta["mask_labels"] == [1, 2, 0, 1, 2]
    assert val.meta["image_id"] == 5 and val.meta["original_size"] == (60, 80)
    assert val.meta["image_info"] == {"spacing": [0.5, 0.5]}
    assert val.input_size == (48, 64)
    torch.testing.assert_close(val.text_embeddings, torch.from_numpy(clip[1:6].astype(np.float32)))
    chosen = [a["id"] - 10 for a in annotations if a["id"] in val.meta["annotation_ids"]]
    reference = decode_masks([annotations[i]["segmentation"] for i in chosen], (h, w), (48, 64), 64)
    assert torch.equal(val.masks, reference)


# ------------------------------------------------------------------------------------- reading shards


def test_pairing_does_not_depend_on_member_order(tmp_path):
    rng = np.random.default_rng(5)
    members = {}
    for i in range(6):
        members.update(sample_members(f"sa_{i}", 30, 40, 3, rng))
        buf = io.BytesIO()
        np.save(buf, np.full((3, 8), i, dtype=np.float32))
        members[f"sa_{i}.clip.npy"] = buf.getvalue()
    members["sa_99.jpg"] = members["sa_0.jpg"]  # a jpg whose json never comes
    order = list(members)
    random.Random(0).shuffle(order)
    assert order[:2] != ["sa_0.jpg", "sa_0.json"]
    url = write_tar(tmp_path / "shuffled.tar", members, order=order)
    dm = SA1BDataModule(url, url, num_workers=0, image_size=32, text_embeddings=True, batch_size=4)
    dm.setup("validate")
    batches = collect(dm.val_dataloader())
    assert sorted(keys_of(batches)) == [f"sa_{i}" for i in range(6)]
    for batch in batches:
        assert batch.text_embeddings.shape[-1] == 8
        for i, meta in enumerate(batch.meta):
            expected = float(meta["key"].split("_")[1])
            assert torch.all(batch.text_embeddings[i][batch.mask_valid[i]] == expected)
    assert dm.skip_counts() == {"jpg without json": 1}


def test_optional_members_are_kept_when_they_follow_the_pair(tmp_path):
    rng = np.random.default_rng(10)
    members = {}
    for i in range(5):
        members.update(sample_members(f"o_{i}", 20, 30, 2, rng))
        if i % 2 == 0:
            members[f"o_{i}.clip.npy"] = b"clip"  # written after the pair, as SA1BShardWriter does
    url = write_tar(tmp_path / "optional.tar", members)
    counter = SkipCounter()
    samples = list(iter_shard(url, counter, optional=("clip.npy",)))
    assert sorted(s.key for s in samples) == [f"o_{i}" for i in range(5)]
    assert sorted(s.key for s in samples if "clip.npy" in s.members) == ["o_0", "o_2", "o_4"]
    assert not counter.pending


def test_every_defect_is_skipped_counted_and_warned(tmp_path, caplog):
    rng = np.random.default_rng(6)
    good = {}
    for i in range(3):
        good.update(sample_members(f"good_{i}", 30, 40, 2, rng))
    bad = dict(good)
    corrupt = sample_members("corrupt", 30, 40, 2, rng)
    bad["corrupt.jpg"] = corrupt["corrupt.jpg"][: len(corrupt["corrupt.jpg"]) // 3]
    bad["corrupt.json"] = corrupt["corrupt.json"]
    bad["nojson.jpg"] = good["good_0.jpg"]
    bad["nojpg.json"] = good["good_0.json"]
    bad["malformed.jpg"] = good["good_0.jpg"]
    bad["malformed.json"] = b'{"image": {}, "annotations": [ {"id": '
    broken = json.loads(good["good_1.json"])
    broken["annotations"][0]["segmentation"]["counts"] += "7"
    bad["brokenrle.jpg"], bad["brokenrle.json"] = good["good_1.jpg"], json.dumps(broken).encode()
    empty = json.loads(good["good_1.json"])
    empty["annotations"] = []
    bad["empty.jpg"], bad["empty.json"] = good["good_1.jpg"], json.dumps(empty).encode()
    huge = json.loads(good["good_1.json"])
    huge["annotations"] = annotations_from_masks(np.ones((2, 30, 40), bool))
    bad["huge.jpg"], bad["huge.json"] = good["good_1.jpg"], json.dumps(huge).encode()
    mismatch = json.loads(good["good_2.json"])
    mismatch["image"]["height"] = 31
    bad["mismatch.jpg"], bad["mismatch.json"] = good["good_2.jpg"], json.dumps(mismatch).encode()
    shard = write_tar(tmp_path / "bad.tar", bad)
    cut = sample_members("cut", 30, 40, 2, rng)
    whole = Path(write_tar(tmp_path / "whole.tar", cut)).read_bytes()
    truncated = tmp_path / "truncated.tar"
    # Cut inside the second member's data: the first member is read, then the tar ends mid-file.
    jpg_blocks = -(-len(cut["cut.jpg"]) // 512) * 512
    truncated.write_bytes(whole[: 512 + jpg_blocks + 512 + len(cut["cut.json"]) // 2])
    urls = [shard, str(truncated), str(tmp_path / "missing.tar"), "pipe:exit 3"]
    dm = SA1BDataModule(urls, urls, num_workers=0, image_size=32, batch_size=2)
    dm.setup("validate")
    with caplog.at_level(logging.WARNING, logger="samlight.data"):
        batches = collect(dm.val_dataloader())
    assert sorted(keys_of(batches)) == ["good_0", "good_1", "good_2"]
    assert dm.skip_counts() == {
        "corrupt image": 1,
        "jpg without json": 1,
        "json without jpg": 1,
        "malformed json": 1,
        "broken rle": 1,
        "no annotations": 1,
        "no usable masks": 1,
        "size mismatch": 1,
        "truncated shard": 1,
        "unreadable shard": 2,
    }
    text = caplog.text
    assert f"shard {shard} key 'corrupt'" in text and "key 'nojson'" in text and str(truncated) in text
    assert "pipe:exit 3" in text


def test_an_epoch_without_any_sample_is_an_error_naming_the_urls(tmp_path):
    missing = str(tmp_path / "nowhere-000.tar")
    dm = SA1BDataModule(missing, missing, num_workers=0, image_size=32, batches_per_epoch=2)
    dm.setup("fit")
    with pytest.raises(RuntimeError, match="nowhere-000.tar"):
        collect(dm.val_dataloader())
    with pytest.raises(RuntimeError, match="nowhere-000.tar"):
        collect(dm.train_dataloader())


def test_training_yields_fixed_batches_per_epoch_with_workers(tmp_path):
    rng = np.random.default_rng(7)
    with SA1BShardWriter(tmp_path, max_samples=3) as writer:
        for i in range(9):
            masks = np.concatenate([np.ones((1, 24, 32), bool), random_masks(24, 32, 6, rng)])
            writer.write(f"s_{i}", random_image(24, 32, rng), masks=masks)
    urls = str(tmp_path / "sa-{000000..000002}.tar")
    dm = SA1BDataModule(urls, num_workers=2, image_size=32, max_masks=4, batch_size=2, batches_per_epoch=5)
    dm.setup("fit")
    loader = dm.train_dataloader()
    assert len(loader) == 5 and loader.persistent_workers
    epochs = [collect(loader), collect(loader)]
    assert [len(e) for e in epochs] == [5, 5]
    for batch in epochs[0] + epochs[1]:
        assert isinstance(batch, SegmentationBatch) and batch.images.shape == (2, 3, 32, 32)
        assert batch.masks is None and batch.mask_targets.shape[1] <= 4  # training: loss-frame targets
        area = batch.mask_targets.flatten(2).sum(-1).float() / 16  # B x M, in input pixels
        input_area = (batch.input_sizes[:, 0] * batch.input_sizes[:, 1]).float()[:, None]
        assert torch.all(area[batch.mask_valid] <= 0.9 * input_area.expand_as(area)[batch.mask_valid])
        assert not batch.mask_targets[~batch.mask_valid].any()
    assert keys_of(epochs[0]) != keys_of(epochs[1])  # the stream goes on, it is not replayed
    again = SA1BDataModule(urls, num_workers=2, image_size=32, max_masks=4, batch_size=2, batches_per_epoch=5)
    again.setup("fit")
    assert keys_of(collect(again.train_dataloader())) == keys_of(epochs[0])  # deterministic given the seed
    assert dm.skip_counts() == {}


def test_samples_per_epoch_sets_batches_per_rank(tmp_path):
    dm = SA1BDataModule("x.tar", batch_size=4, samples_per_epoch=1000)
    dm.rank, dm.world_size = 0, 2
    assert dm.train_batches_per_epoch() == 125
    with pytest.raises(ValueError, match="not both"):
        SA1BDataModule("x.tar", batches_per_epoch=1, samples_per_epoch=1)


def test_lightning_fit_moves_segmentation_batches_and_validates_every_image(tmp_path):
    import lightning.pytorch as pl

    rng = np.random.default_rng(8)
    with SA1BShardWriter(tmp_path, max_samples=4) as writer:
        for i in range(6):
            writer.write(f"v_{i}", random_image(20, 28, rng), masks=random_masks(20, 28, 3, rng))
    seen: dict[str, list] = {"train": [], "val": []}

    class Probe(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.zeros(1))

        def training_step(self, batch, batch_idx):
            seen["train"].append(batch)
            return (self.weight * batch.images.mean()).sum() + self.weight.sum() ** 2

        def validation_step(self, batch, batch_idx):
            seen["val"].extend(m["key"] for m in batch.meta)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    urls = sorted(str(p) for p in tmp_path.glob("*.tar"))
    dm = SA1BDataModule(urls, urls, num_workers=0, image_size=32, batch_size=2, batches_per_epoch=3)
    trainer = pl.Trainer(
        max_epochs=1,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    trainer.fit(Probe(), datamodule=dm)
    assert len(seen["train"]) == 3 and all(isinstance(b, SegmentationBatch) for b in seen["train"])
    assert sorted(seen["val"]) == [f"v_{i}" for i in range(6)]


def test_url_specs_expand(tmp_path):
    for i in range(3):
        (tmp_path / f"sa_{i:06d}.tar").write_bytes(b"")
    brace = str(tmp_path / "sa_{000000..000002}.tar")
    globbed = str(tmp_path / "sa_*.tar")
    expected = [str(tmp_path / f"sa_{i:06d}.tar") for i in range(3)]
    assert expand_urls(brace) == expected
    assert expand_urls(globbed) == expected
    assert expand_urls([expected[0], expected[2]]) == [expected[0], expected[2]]
    assert expand_urls(f"{expected[0]}::pipe:cat {tmp_path}/sa_{{000001..000002}}.tar") == [
        expected[0],
        f"pipe:cat {tmp_path}/sa_000001.tar",
        f"pipe:cat {tmp_path}/sa_000002.tar",
    ]
    with pytest.raises(ValueError, match="matches no file"):
        expand_urls(str(tmp_path / "nope_*.tar"))
    with pytest.raises(ValueError, match="no shard URLs"):
        expand_urls([])


def test_pipe_urls_are_read(tmp_path):
    rng = np.random.default_rng(9)
    url = write_tar(tmp_path / "p.tar", sample_members("piped", 20, 30, 2, rng))
    dm = SA1BDataModule(f"pipe:cat {url}", f"pipe:cat {url}", num_workers=0, image_size=32)
    dm.setup("validate")
    assert keys_of(collect(dm.val_dataloader())) == ["piped"]
    assert Counter(dm.skip_counts()) == Counter()


def test_dataset_rejects_a_rank_outside_the_world():
    with pytest.raises(ValueError, match="rank 2"):
        SA1BDataset(urls=["a.tar"], training=False, rank=2, world_size=2)
