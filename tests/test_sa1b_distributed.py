"""Splitting SA-1B shards across ranks and DataLoader workers: validation covers every image exactly once,
training gives every rank the same number of batches. Ranks are simulated by building the dataset with
rank=0/1, world_size=2, each read through a real DataLoader with 2 worker processes."""

from __future__ import annotations

from collections import Counter

import pytest
from torch.utils.data import DataLoader

from samlight.datamodules import SA1BDataModule
from samlight.datamodules.collate import collate_samples
from samlight.datamodules.sa1b_stream import SA1BDataset, SA1BLoader
from tests._shards import write_numbered_shards

RANKS, WORKERS = 2, 2


def write_shards(root, num_images: int, per_shard: int) -> list[str]:
    return write_numbered_shards(root, num_images, per_shard, num_masks=2)


def read_rank(urls: list[str], rank: int, *, training: bool, context: str | None = None, **kw) -> list:
    dataset = SA1BDataset(
        urls=urls, training=training, image_size=32, rank=rank, world_size=RANKS, batch_size=2, **kw
    )
    loader = SA1BLoader(
        dataset,
        batch_size=2,
        num_workers=WORKERS,
        collate_fn=collate_samples,
        multiprocessing_context=context,
    )
    return list(loader)


@pytest.mark.parametrize(
    ("num_images", "per_shard"),
    [(22, 3), (11, 4)],
    ids=["split-by-shard (8 shards >= 4 slots)", "split-by-sample-index (3 shards < 4 slots)"],
)
def test_validation_reads_every_image_exactly_once_across_2_ranks_x_2_workers(
    tmp_path, num_images, per_shard
):
    urls = write_shards(tmp_path, num_images, per_shard)
    keys = Counter()
    for rank in range(RANKS):
        for batch in read_rank(urls, rank, training=False):
            keys.update(m["key"] for m in batch.meta)
    assert keys == Counter({f"img_{i:03d}": 1 for i in range(num_images)})


def test_training_gives_every_rank_the_same_number_of_batches(tmp_path):
    urls = write_shards(tmp_path, 6, 2)
    per_rank = [read_rank(urls, rank, training=True, batches_per_epoch=5) for rank in range(RANKS)]
    assert [len(b) for b in per_rank] == [5, 5]
    assert all(len(batch) == 2 for batches in per_rank for batch in batches)
    first = [[m["key"] for b in batches for m in b.meta] for batches in per_rank]
    assert first[0] != first[1]  # ranks draw their own shards and order


def test_skip_counts_from_split_workers_are_exact(tmp_path):
    urls = write_shards(tmp_path, 5, 2) + [str(tmp_path / "missing.tar")]  # 4 readable shards + 1 missing
    loaders_counts = Counter()
    for rank in range(RANKS):
        dataset = SA1BDataset(urls=urls[-3:], training=False, image_size=32, rank=rank, world_size=RANKS)
        loader = SA1BLoader(dataset, batch_size=2, num_workers=WORKERS, collate_fn=collate_samples)
        list(loader)
        loaders_counts.update(loader.skip_counts)
    # 3 shards < 4 slots: every worker opens the missing shard, but only one counts it.
    assert loaders_counts == Counter({"unreadable shard": 1})


@pytest.mark.slow
def test_spawned_workers_split_by_the_rank_passed_in(tmp_path, monkeypatch):
    # Spawned workers re-import everything and see no RANK env: the split must come from the dataset's arguments.
    monkeypatch.delenv("RANK", raising=False)
    urls = write_shards(tmp_path, 10, 1)
    keys = [m["key"] for b in read_rank(urls, 1, training=False, context="spawn") for m in b.meta]
    # rank 1 owns slots 2 and 3 of 4: shards 2, 3, 6, 7 (one image each)
    assert sorted(keys) == ["img_002", "img_003", "img_006", "img_007"]


def test_datamodule_takes_rank_and_world_size_from_the_trainer(tmp_path):
    class FakeTrainer:
        global_rank, world_size, current_epoch = 1, 2, 3

    urls = write_shards(tmp_path, 4, 1)
    dm = SA1BDataModule(urls, urls, num_workers=0, image_size=32, batches_per_epoch=2)
    dm.trainer = FakeTrainer()
    dm.setup("fit")
    assert (dm.rank, dm.world_size) == (1, 2)
    train = dm.train_dataloader().dataset
    assert (train.rank, train.world_size, train.start_epoch) == (1, 2, 3)
    keys = [m["key"] for b in dm.val_dataloader() for m in b.meta]
    assert sorted(keys) == ["img_001", "img_003"]
    assert isinstance(dm.val_dataloader(), DataLoader)
