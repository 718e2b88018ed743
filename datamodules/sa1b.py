"""`SA1BDataModule`: stream SA-1B-format tar shards into `SegmentationBatch`es for training and validation.

How shards are split over ranks and workers is described in `samlight.datamodules.sa1b_stream`.
"""

from __future__ import annotations

import logging
import os
import warnings
from collections import Counter
from typing import Any

import torch
from lightning.pytorch import LightningDataModule

from samlight.datamodules.collate import collate_samples
from samlight.datamodules.sa1b_stream import SA1BDataset, SA1BLoader
from samlight.datamodules.urls import expand_urls

__all__ = ["SA1BDataModule", "SA1BDataset", "SA1BLoader"]

log = logging.getLogger("samlight.data")

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
        open_shards: training shards each worker reads at once, drawing each next sample from a random one of
            them (mixes samples across shards; SA-1B shards hold ~11k images each).
        seed: base seed of the shard order of each pass, shuffling and mask sampling; every rank and worker
            derives its own stream from it. None (default): the run's seed (`seed_everything`), else 0.
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
        open_shards: int = 4,
        seed: int | None = None,
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
        self.open_shards = open_shards
        # The run seed is read from the environment, where `seed_everything` (LightningCLI's seed_everything)
        # leaves it, so the datamodule needs no reference to it.
        self.seed = int(os.environ.get("PL_GLOBAL_SEED", 0)) if seed is None else seed
        self.text_embeddings = text_embeddings
        self.pin_memory = torch.cuda.is_available() if pin_memory is None else pin_memory
        self.reduced_decode = reduced_decode
        self._skip_counts: Counter = Counter()
        self.rank, self.world_size = 0, 1
        self._positions: dict[int, dict[str, int]] = {}  # worker role -> last trained stream position
        self._loaded_stream: dict[str, Any] | None = None

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
        urls = expand_urls(self.train_urls, split="train")
        dataset = self._dataset(urls, training=True, start_epoch=epoch)
        if self._loaded_stream is not None:
            self._resume(dataset, self._loaded_stream, epoch)
        return self._loader(dataset)

    # ---------------------------------------------------------------------------------- exact resume

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """Remember the stream position of each training batch as Lightning hands it to the training step (the
        loader runs ahead by a prefetched batch, so the loader's own position would be one batch too far)."""
        for meta in getattr(batch, "meta", None) or []:
            position = meta.get("stream") if isinstance(meta, dict) else None
            if position is not None:
                self._positions[position["role"]] = position
        return batch

    def state_dict(self) -> dict[str, Any]:
        """The training stream's position on every rank (saved in the checkpoint by Lightning).

        Called on every rank when a checkpoint is saved; the positions of all ranks are gathered so that rank 0's
        checkpoint file holds them all.
        """
        positions = {int(role): dict(p) for role, p in self._positions.items()}
        if torch.distributed.is_available() and torch.distributed.is_initialized() and self.world_size > 1:
            gathered: list[Any] = [None] * torch.distributed.get_world_size()
            torch.distributed.all_gather_object(gathered, positions)
        else:
            gathered = [positions]
        if not any(gathered):
            return {}
        return {"stream": {"layout": self._stream_layout(), "positions": gathered}}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._loaded_stream = state_dict.get("stream")

    def _stream_layout(self) -> dict[str, Any]:
        """What the saved positions mean: the same values are needed to continue the same stream."""
        return {
            "world_size": self.world_size,
            "workers": max(1, self.num_workers),
            "batch_size": self.batch_size,
            "batches_per_epoch": self.train_batches_per_epoch(),
            "seed": self.seed,
            "shards": len(expand_urls(self.train_urls, split="train")) if self.train_urls is not None else 0,
            "open_shards": self.open_shards,
            "shuffle_buffer": self.shuffle_buffer,
        }

    def _resume(self, dataset: SA1BDataset, saved: dict[str, Any], epoch: int) -> None:
        positions = saved["positions"]
        changed = {
            k: (v, saved["layout"].get(k))
            for k, v in self._stream_layout().items()
            if saved["layout"].get(k) != v
        }
        if changed or len(positions) != self.world_size:
            # Another layout reads another stream: continue with the pass after the furthest saved one, so no
            # sample of the interrupted pass is read twice by the same reader; the order is no longer the same.
            next_pass = 1 + max((p["pass"] for rank in positions for p in rank.values()), default=-1)
            dataset.resume = {
                role: {"pass": next_pass, "index": 0} for role in range(max(1, self.num_workers))
            }
            log.warning(
                "samlight data: the checkpoint's data stream was saved with %s (saved, now); it cannot be continued "
                "exactly. Training continues with pass %d of the shards.",
                {k: (old, new) for k, (new, old) in changed.items()} or f"{len(positions)} ranks",
                next_pass,
            )
            return
        mine = {int(role): p for role, p in positions[self.rank].items()}
        done = sum(p["produced"] for p in mine.values() if p["epoch"] == epoch) // self.batch_size
        # Saved at the end of an epoch: the next one starts afresh.
        if done >= self.train_batches_per_epoch():
            mine = {role: {**p, "epoch": -1} for role, p in mine.items()}
            done = 0
        dataset.resume = mine
        dataset.role_offset = done % max(1, self.num_workers)
        self._positions = dict(mine)

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
            open_shards=self.open_shards,
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
