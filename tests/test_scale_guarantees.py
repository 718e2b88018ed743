"""What samlight guarantees at scale, tested on the data stream in-process (fast): every shard once per pass
across ranks x workers, samples mixed across open shards, exact resume of the stream position (2 workers), code
bugs raised instead of skipped, and ranks padded to the same validation length."""

from __future__ import annotations

from collections import Counter

import pytest

from samlight.datamodules import SA1BDataModule, sa1b_reader, sa1b_stream
from samlight.datamodules.collate import collate_samples
from samlight.datamodules.decode import SampleError
from samlight.datamodules.sa1b_stream import SA1BDataset, SA1BLoader
from tests._shards import write_numbered_shards

RANKS, WORKERS = 2, 2


def write_shards(root, num_images: int, per_shard: int) -> list[str]:
    return write_numbered_shards(root, num_images, per_shard, num_masks=3)


def shard_of(key: str, per_shard: int) -> int:
    return int(key.split("_")[1]) // per_shard


def train_loader(urls, rank: int, *, batches: int, workers: int = WORKERS, **kw) -> SA1BLoader:
    dataset = SA1BDataset(
        urls=urls, training=True, image_size=32, rank=rank, world_size=RANKS, batch_size=2,
        batches_per_epoch=batches, max_masks=2, **kw,
    )  # fmt: skip
    return SA1BLoader(
        dataset, batch_size=2, num_workers=workers, collate_fn=collate_samples, persistent_workers=workers > 0
    )


def epoch_keys(loader) -> list[str]:
    return [m["key"] for batch in loader for m in batch.meta]


# ---------------------------------------------------------------------------------------- item 7: every shard once


@pytest.mark.parametrize(
    ("num_images", "per_shard"), [(32, 2), (8, 4)], ids=["16 shards > 4 readers", "2 shards < 4 readers"]
)
def test_every_image_is_read_once_per_pass_across_2_ranks_x_2_workers(tmp_path, num_images, per_shard):
    urls = write_shards(tmp_path, num_images, per_shard)
    batches = num_images // (2 * RANKS)  # one pass = all images split over the 2 ranks
    loaders = [train_loader(urls, rank, batches=batches) for rank in range(RANKS)]
    passes = [Counter(), Counter()]
    orders = [[], []]
    for p in range(2):
        for loader in loaders:
            keys = epoch_keys(loader)
            passes[p].update(keys)
            orders[p].append(keys)
    everything = Counter({f"img_{i:03d}": 1 for i in range(num_images)})
    assert passes[0] == everything, "pass 0 must read every image exactly once across ranks and workers"
    assert passes[1] == everything, "pass 1 as well"
    assert orders[0] != orders[1], "each pass is reshuffled"


def test_samples_are_mixed_across_several_open_shards(tmp_path):
    urls = write_shards(tmp_path, 32, 4)  # 8 shards, 4 readers: 2 shards per reader and pass
    loader = train_loader(urls, 0, batches=2, workers=0, shuffle_buffer=1)
    keys = epoch_keys(loader)[:4]
    # The first 4 samples of one reader: with one shard open at a time all four come from a single shard.
    assert len({shard_of(k, 4) for k in keys}) >= 2, keys


# ---------------------------------------------------------------------------------------- item 5: exact resume


class _FakeTrainer:
    global_rank, world_size = 0, 1

    def __init__(self, epoch: int) -> None:
        self.current_epoch = epoch


def _datamodule(urls, epoch: int) -> SA1BDataModule:
    dm = SA1BDataModule(
        urls, num_workers=2, image_size=32, max_masks=2, batch_size=2, batches_per_epoch=5, shuffle_buffer=4
    )
    dm.trainer = _FakeTrainer(epoch)
    dm.setup("fit")
    return dm


def _seen(batch) -> list[tuple[str, tuple]]:
    """(key, annotation ids) per image: the image and which of its masks were drawn."""
    return [(m["key"], tuple(m["annotation_ids"])) for m in batch.meta]


def _train(dm: SA1BDataModule, loader, stop: int | None = None) -> list:
    seen = []
    for batch in loader:
        batch = dm.on_before_batch_transfer(batch, 0)  # what Lightning calls before each training step
        seen.append(_seen(batch))
        if stop is not None and len(seen) == stop:
            break
    return seen


@pytest.mark.parametrize("kill_at", [3, 4], ids=["odd step (workers rotate)", "even step"])
def test_resumed_stream_sees_the_samples_of_the_uninterrupted_run(tmp_path, kill_at):
    urls = write_shards(tmp_path, 24, 3)
    full_dm = _datamodule(urls, 0)
    loader = full_dm.train_dataloader()
    uninterrupted = _train(full_dm, loader) + _train(full_dm, loader)  # epochs 0 and 1, 5 batches each

    first = _datamodule(urls, 0)
    before = _train(first, first.train_dataloader(), stop=kill_at)
    state = first.state_dict()
    resumed_dm = _datamodule(urls, 0)
    resumed_dm.load_state_dict(state)
    loader = resumed_dm.train_dataloader()
    after = _train(resumed_dm, loader)  # the rest of epoch 0
    resumed_dm.trainer.current_epoch = 1
    after += _train(resumed_dm, loader)
    assert before + after == uninterrupted


# ---------------------------------------------------------------------------------------- item 11: errors


def _raising_decode(error: Exception, key: str):
    real = sa1b_stream.decode_sa1b_sample

    def decode(jpg, record, **kw):
        if kw["meta"]["key"] == key:
            raise error
        return real(jpg, record, **kw)

    return decode


def test_a_code_bug_in_decoding_propagates_with_its_traceback(tmp_path, monkeypatch):
    urls = write_shards(tmp_path, 4, 4)
    monkeypatch.setattr(
        sa1b_stream, "decode_sa1b_sample", _raising_decode(TypeError("bug in user code"), "img_001")
    )
    for training in (True, False):
        dataset = SA1BDataset(urls=urls, training=training, image_size=32, batch_size=1, batches_per_epoch=4)
        with pytest.raises(TypeError, match="bug in user code"):
            list(dataset)


def test_a_data_error_is_skipped_and_counted(tmp_path, monkeypatch):
    urls = write_shards(tmp_path, 4, 4)
    error = SampleError("broken rle", "counts do not add up")
    monkeypatch.setattr(sa1b_stream, "decode_sa1b_sample", _raising_decode(error, "img_001"))
    dm = SA1BDataModule(urls, urls, num_workers=0, image_size=32, batch_size=1, batches_per_epoch=3)
    dm.setup("fit")
    keys = [m["key"] for b in dm.val_dataloader() for m in b.meta]
    assert keys == ["img_000", "img_002", "img_003"]
    assert dm.skip_counts() == {"broken rle": 1}


def test_a_code_bug_in_the_shard_reader_propagates_but_a_read_error_is_counted(tmp_path, monkeypatch):
    urls = write_shards(tmp_path, 4, 4)

    def members(url):
        raise TypeError("bug in a reader")
        yield  # pragma: no cover

    monkeypatch.setattr(sa1b_reader, "iter_members", members)
    with pytest.raises(TypeError, match="bug in a reader"):
        list(SA1BDataset(urls=urls, training=False, image_size=32))

    def unreadable(url):
        raise OSError("connection reset")
        yield  # pragma: no cover

    monkeypatch.setattr(sa1b_reader, "iter_members", unreadable)
    counter = sa1b_reader.SkipCounter()
    assert list(sa1b_reader.iter_shard(urls[0], counter)) == []
    assert counter.pending == Counter({"unreadable shard": 1})


# ---------------------------------------------------------------------------------------- item 1: padding


def test_validation_pads_ranks_to_the_same_number_of_batches(tmp_path, monkeypatch):
    """Rank 0 holds 2 batches and rank 1 one. With the other rank's flag simulated (any rank has a batch for 2
    steps), both yield 2 batches; the extra one has no valid mask (weight 0), so every image counts once."""
    urls = write_shards(tmp_path, 3, 1)  # 3 shards, 2 ranks: rank 0 reads 2 images, rank 1 one
    monkeypatch.setattr(sa1b_stream, "_distributed", lambda: True)
    for rank, real_batches in ((0, 2), (1, 1)):
        flags = iter([True, True, False])  # the all-reduced "some rank still has a batch" flags
        monkeypatch.setattr(sa1b_stream, "_any_rank", lambda has_batch, flags=flags: next(flags))
        dataset = SA1BDataset(urls=urls, training=False, image_size=32, rank=rank, world_size=RANKS)
        batches = list(SA1BLoader(dataset, batch_size=1, num_workers=0, collate_fn=collate_samples))
        assert len(batches) == 2
        real = [b for b in batches if b.mask_valid.any()]
        assert len(real) == real_batches
        for pad in batches[real_batches:]:
            assert pad.meta[0].get("padding") is True and not pad.mask_valid.any()
            assert pad.images.shape == (1, 3, 32, 32)


def test_the_data_seed_defaults_to_the_run_seed_and_changes_the_stream(tmp_path, monkeypatch):
    urls = write_shards(tmp_path, 16, 2)
    monkeypatch.setenv("PL_GLOBAL_SEED", "7")  # what seed_everything(7) leaves for the workers
    assert SA1BDataModule(urls).seed == 7
    assert SA1BDataModule(urls, seed=3).seed == 3
    orders = {}
    for seed in (7, 8, 7):
        dm = SA1BDataModule(urls, seed=seed, num_workers=0, image_size=32, batch_size=2, batches_per_epoch=4)
        dm.setup("fit")
        orders.setdefault(seed, []).append(epoch_keys(dm.train_dataloader()))
    assert orders[7][0] == orders[7][1], "the same seed reproduces the stream"
    assert orders[7][0] != orders[8][0], "another seed reads another order"
