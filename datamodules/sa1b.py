"""`SA1BDataModule`: stream SA-1B-format tar shards into `SegmentationBatch`es for training and validation.

How shards are split over ranks and workers is described in `samlight.datamodules.sa1b_stream`.
"""

from __future__ import annotations

import os
import warnings
from collections import Counter

import torch
from lightning.pytorch import LightningDataModule

from samlight.datamodules.collate import collate_samples
from samlight.datamodules.sa1b_stream import SA1BDataset, SA1BLoader
from samlight.datamodules.urls import expand_urls

__all__ = ["SA1BDataModule", "SA1BDataset", "SA1BLoader"]

# Lightning warns about any IterableDataset with __len__; ours is exact by construction (whole-batch quotas per
# worker, see SA1BDataset._train), and the length is what lets Lightning plan epochs and schedules.
warnings.filterwarnings("ignore", message="Your `IterableDataset` has `__len__` defined")


class SA1BDataModule(LightningDataModule):
    """Stream SA-1B-format shards (`sa_N.jpg` + `sa_N.json` with COCO RLE masks, any member order).

    Args:
        train_urls: training shards: a list, a brace pattern (`/data/sa_{000000..000999}.tar`), a glob,
            `pipe:` commands (e.g. `pipe:aws s3 cp s3://bucket/sa_000000.tar -`), several joined by `::`,
            or `demo` for the synthetic demo set written on first use.
        val_urls: validation shards, same forms (None: no validation).
        batch_size: images per batch on each device.
        num_workers: DataLoader worker processes per device (0 decodes in the main process).
        image_size: S: the longest side is resized to S and the image zero-padded to S x S (SamPredictor frame).
        max_masks: at most this many masks per image (the paper's per-GPU cap is 64); random in training,
            the first ones in validation.
        max_mask_area: masks covering more than this fraction of the image are dropped (paper: 0.9).
        batches_per_epoch: training batches per rank per epoch (identical on every rank).
        samples_per_epoch: alternative to `batches_per_epoch`: images per epoch over all ranks; the batches per
            rank are samples_per_epoch // (batch_size * world_size). Default when neither is given: 1000 batches.
        shuffle_buffer: training samples held in each worker for shuffling (as encoded bytes).
        seed: base seed of shard resampling, shuffling and mask sampling.
        text_embeddings: load per-mask CLIP embeddings from `<key>.clip.npy` (A x D, aligned with the
            annotations) as `batch.text_embeddings`; samples without the member are skipped.
        pin_memory: pin batches for faster host-to-GPU copies (default: when CUDA is available).
        reduced_decode: decode JPEGs at a reduced DCT scale (1/2, 1/4, 1/8) when the model needs fewer pixels
            (faster; pixels differ from SamPredictor's full decode by about 2/255 on average at 1500 x 2250 ->
            1024); False decodes in full and matches SamPredictor's preprocessing exactly.
    """

    def __init__(
        self,
        train_urls: str | list[str] | None = "demo",
        val_urls: str | list[str] | None = None,
        *,
        batch_size: int = 1,
        num_workers: int = 4,
        image_size: int = 1024,
        max_masks: int = 64,
        max_mask_area: float = 0.9,
        batches_per_epoch: int | None = None,
        samples_per_epoch: int | None = None,
        shuffle_buffer: int = 64,
        seed: int = 0,
        text_embeddings: bool = False,
        pin_memory: bool | None = None,
        reduced_decode: bool = True,
    ) -> None:
        super().__init__()
        if batches_per_epoch is not None and samples_per_epoch is not None:
            raise ValueError("SA1BDataModule: give batches_per_epoch or samples_per_epoch, not both")
        if batch_size < 1 or num_workers < 0 or max_masks < 1:
            raise ValueError(
                f"SA1BDataModule: batch_size ({batch_size}) and max_masks ({max_masks}) must be >= 1, "
                f"num_workers ({num_workers}) >= 0"
            )
        self.train_urls = train_urls
        self.val_urls = val_urls
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.image_size = image_size
        self.max_masks = max_masks
        self.max_mask_area = max_mask_area
        self.batches_per_epoch = batches_per_epoch
        self.samples_per_epoch = samples_per_epoch
        self.shuffle_buffer = shuffle_buffer
        self.seed = seed
        self.text_embeddings = text_embeddings
        self.pin_memory = torch.cuda.is_available() if pin_memory is None else pin_memory
        self.reduced_decode = reduced_decode
        self._skip_counts: Counter = Counter()
        self.rank, self.world_size = 0, 1

    def prepare_data(self) -> None:
        # Runs once per node before setup: write the demo set here so ranks do not all generate it.
        for spec, split in ((self.train_urls, "train"), (self.val_urls, "val")):
            if spec is not None:
                expand_urls(spec, split=split)

    def setup(self, stage: str | None = None) -> None:
        self.rank, self.world_size = self._rank_and_world_size()

    def _rank_and_world_size(self) -> tuple[int, int]:
        trainer = self.trainer
        if trainer is not None:
            return trainer.global_rank, trainer.world_size
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            return torch.distributed.get_rank(), torch.distributed.get_world_size()
        env = os.environ
        return int(env.get("RANK", env.get("SLURM_PROCID", 0))), int(
            env.get("WORLD_SIZE", env.get("SLURM_NTASKS", 1))
        )

    def train_batches_per_epoch(self) -> int:
        """Training batches per rank per epoch."""
        if self.batches_per_epoch is not None:
            return self.batches_per_epoch
        if self.samples_per_epoch is not None:
            return max(1, self.samples_per_epoch // (self.batch_size * self.world_size))
        return 1000

    def train_dataloader(self) -> SA1BLoader:
        if self.train_urls is None:
            raise ValueError("SA1BDataModule: train_urls is not set; give shard paths or 'demo'")
        epoch = self.trainer.current_epoch if self.trainer is not None else 0
        dataset = self._dataset(expand_urls(self.train_urls, split="train"), training=True, start_epoch=epoch)
        return self._loader(dataset)

    def val_dataloader(self) -> SA1BLoader | list:
        if self.val_urls is None:
            return []
        return self._loader(self._dataset(expand_urls(self.val_urls, split="val"), training=False))

    def test_dataloader(self) -> SA1BLoader | list:
        return self.val_dataloader()

    def skip_counts(self) -> dict[str, int]:
        """Samples and shards skipped so far on this rank, by reason (e.g. {"corrupt image": 2})."""
        return dict(self._skip_counts)

    def _dataset(self, urls: list[str], *, training: bool, start_epoch: int = 0) -> SA1BDataset:
        return SA1BDataset(
            urls=urls,
            training=training,
            image_size=self.image_size,
            max_masks=self.max_masks,
            max_mask_area=self.max_mask_area,
            batch_size=self.batch_size,
            batches_per_epoch=self.train_batches_per_epoch(),
            shuffle_buffer=self.shuffle_buffer,
            seed=self.seed,
            rank=self.rank,
            world_size=self.world_size,
            text_embeddings=self.text_embeddings,
            start_epoch=start_epoch,
            reduced_decode=self.reduced_decode,
        )

    def _loader(self, dataset: SA1BDataset) -> SA1BLoader:
        return SA1BLoader(
            dataset,
            skip_counts=self._skip_counts,
            batch_size=self.batch_size,
            num_workers=self.num_workers,
            collate_fn=collate_samples,
            pin_memory=self.pin_memory,
            persistent_workers=self.num_workers > 0,
        )
