"""Iterable dataset over SA-1B-format shards (`SA1BDataset`) and its DataLoader (`SA1BLoader`).

Kept free of Lightning so DataLoader workers started with spawn import only torch and the decoders.
Splitting (rank and world size are passed in explicitly, so spawn-started workers split correctly):
- training: every (rank, worker) draws shards with replacement from its own seeded generator, shuffles samples in
  a buffer and yields a fixed quota of whole batches, so every rank sees exactly `batches_per_epoch` batches;
- validation: one exact pass. With at least as many shards as (ranks x workers) slots, slot r * W + w reads shards
  slot, slot + R*W, ...; with fewer shards every slot reads every shard and keeps the samples whose index in the
  stream is congruent to its slot modulo R*W. Either way each image is used exactly once across all ranks and
  workers (ranks may get unequal batch counts: metrics must sync at epoch end, not per step).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from samlight.datamodules.collate import SegmentationSample, SkipReport, merge_counts
from samlight.datamodules.decode import SampleError, decode_sa1b_sample
from samlight.datamodules.sa1b_reader import RawSample, SkipCounter, iter_shard

CLIP_EXTENSION = "clip.npy"


class SA1BDataset(IterableDataset):
    """Iterable dataset over SA-1B-format shards yielding `SegmentationSample`s (see the module docstring).

    Args:
        urls: expanded shard URLs.
        training: True = resampled shards, shuffled, random masks, `batches_per_epoch` per rank;
            False = one exact pass, first `max_masks` masks.
        image_size, max_masks, max_mask_area: see `decode_sa1b_sample`.
        batch_size: samples per batch; worker quotas are whole batches.
        batches_per_epoch: batches per rank per epoch (training only).
        shuffle_buffer: samples held for shuffling (training only).
        seed: base seed; each (epoch, rank, worker) derives its own stream.
        rank, world_size: this process's place among all training processes.
        text_embeddings: require and load `<key>.clip.npy` per sample.
        start_epoch: epoch this dataset starts at (resumed runs do not replay epoch 0's stream).
        reduced_decode: decode JPEGs at a reduced DCT scale when the model needs fewer pixels.
    """

    def __init__(
        self,
        *,
        urls: Sequence[str],
        training: bool,
        image_size: int = 1024,
        max_masks: int = 64,
        max_mask_area: float = 0.9,
        batch_size: int = 1,
        batches_per_epoch: int = 1000,
        shuffle_buffer: int = 64,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        text_embeddings: bool = False,
        start_epoch: int = 0,
        reduced_decode: bool = True,
    ) -> None:
        super().__init__()
        if not urls:
            raise ValueError("SA1BDataset needs at least one shard URL")
        if not 0 <= rank < world_size:
            raise ValueError(f"SA1BDataset: rank {rank} is outside world_size {world_size}")
        self.urls = list(urls)
        self.training = training
        self.image_size = image_size
        self.max_masks = max_masks
        self.max_mask_area = max_mask_area
        self.batch_size = batch_size
        self.batches_per_epoch = batches_per_epoch
        self.shuffle_buffer = shuffle_buffer
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.text_embeddings = text_embeddings
        self.start_epoch = start_epoch
        self.reduced_decode = reduced_decode
        self._iterations = 0  # per process: persistent workers keep counting epochs themselves
        # Training state of this process (a worker's copy of the dataset), created on first iteration.
        self._stream: Iterator[RawSample] | None = None
        self._counter: SkipCounter | None = None
        self._rng: np.random.Generator | None = None
        self._failures = 0  # decode failures in a row

    def __len__(self) -> int:
        if not self.training:
            raise TypeError(
                "the SA-1B validation stream has no known length (it is one pass over the shards)"
            )
        return self.batches_per_epoch * self.batch_size

    def __iter__(self) -> Iterator[SegmentationSample | SkipReport]:
        info = get_worker_info()
        worker, num_workers = (0, 1) if info is None else (info.id, info.num_workers)
        epoch = self.start_epoch + self._iterations
        self._iterations += 1
        if self.training:
            return self._train(worker, num_workers, epoch)
        return self._validate(worker, num_workers)

    # ------------------------------------------------------------------------------------------ training

    def _train(self, worker: int, num_workers: int, epoch: int) -> Iterator[SegmentationSample]:
        if self._stream is None:  # kept across epochs: a half-read shard and the shuffle buffer carry over
            self._counter = SkipCounter()
            self._rng = np.random.default_rng([self.seed, epoch, self.rank, worker])
            self._stream = _shuffled(
                self._resampled(self._rng, self._counter), self.shuffle_buffer, self._rng
            )
        batches = self.batches_per_epoch // num_workers + (worker < self.batches_per_epoch % num_workers)
        if batches == 0:  # more workers than batches: this one idles this epoch
            return
        produced = 0
        for raw in self._stream:
            sample = self._decode(raw, self._counter, self._rng)
            if sample is None:
                self._failures += 1
                if self._failures >= max(1000, 4 * self.shuffle_buffer):
                    raise RuntimeError(
                        self._nothing_usable(f"{self._failures} samples in a row failed to decode")
                    )
                continue
            self._failures = 0
            yield sample
            produced += 1
            if produced == batches * self.batch_size:
                return

    def _resampled(self, rng: np.random.Generator, counter: SkipCounter) -> Iterator[RawSample]:
        empty_in_a_row = 0
        while True:
            url = self.urls[rng.integers(len(self.urls))]
            count = 0
            for raw in iter_shard(url, counter, required_extra=self._required_extra()):
                count += 1
                yield raw
            empty_in_a_row = 0 if count else empty_in_a_row + 1
            if empty_in_a_row >= max(8, 2 * len(self.urls)):
                raise RuntimeError(self._nothing_usable(f"{empty_in_a_row} shards in a row gave no sample"))

    # ------------------------------------------------------------------------------------------ validation

    def _validate(self, worker: int, num_workers: int) -> Iterator[SegmentationSample | SkipReport]:
        slots = self.world_size * num_workers
        slot = self.rank * num_workers + worker
        by_shard = len(self.urls) >= slots
        counter = SkipCounter(count_shared=by_shard or slot == 0)
        urls = self.urls[slot::slots] if by_shard else self.urls
        index = 0
        for url in urls:
            for raw in iter_shard(url, counter, required_extra=self._required_extra()):
                mine = by_shard or index % slots == slot
                index += 1
                if mine:
                    sample = self._decode(raw, counter, None)
                    if sample is not None:
                        yield sample
        if counter.pending:
            yield SkipReport(counter.take())

    # ------------------------------------------------------------------------------------------ shared

    def _required_extra(self) -> tuple[str, ...]:
        return (CLIP_EXTENSION,) if self.text_embeddings else ()

    def _decode(
        self, raw: RawSample, counter: SkipCounter, rng: np.random.Generator | None
    ) -> SegmentationSample | None:
        try:
            sample = decode_sa1b_sample(
                raw.image,
                raw.members["json"],
                image_size=self.image_size,
                max_masks=self.max_masks,
                max_mask_area=self.max_mask_area,
                rng=rng,
                clip=raw.members.get(CLIP_EXTENSION) if self.text_embeddings else None,
                meta={"shard": raw.url, "key": raw.key},
                reduced_decode=self.reduced_decode,
            )
        except SampleError as exn:
            counter.skip(exn.reason, raw.url, raw.key, exn.detail)
            return None
        except Exception as exn:  # one bad sample must never end a run; counted and named instead
            counter.skip("decode error", raw.url, raw.key, f"{type(exn).__name__}: {exn}")
            return None
        sample.meta["skipped"] = counter.take()
        return sample

    def _nothing_usable(self, why: str) -> str:
        shown = ", ".join(self.urls[:5]) + (f", ... ({len(self.urls)} in all)" if len(self.urls) > 5 else "")
        skipped = dict(self._counter.pending) if self._counter else {}
        return f"SA1BDataset: no usable sample: {why}. URLs: {shown}. Skipped so far: {skipped}"


def _shuffled(stream: Iterator[RawSample], size: int, rng: np.random.Generator) -> Iterator[RawSample]:
    """Reservoir-style shuffle: hold `size` samples, yield a random one as each new one arrives."""
    buffer: list[RawSample] = []
    for item in stream:
        if len(buffer) < size:
            buffer.append(item)
            continue
        i = int(rng.integers(size))
        buffer[i], item = item, buffer[i]
        yield item
    rng.shuffle(buffer)
    yield from buffer


class SA1BLoader(DataLoader):
    """DataLoader that adds the skip counts carried by each batch into `skip_counts` (in the main process),
    drops batches that carry only counts, and raises when a whole epoch yields no sample.

    Args:
        dataset: an `SA1BDataset`.
        skip_counts: Counter shared with the datamodule.
        **kwargs: DataLoader arguments.
    """

    def __init__(self, dataset: SA1BDataset, *, skip_counts: Counter | None = None, **kwargs: Any) -> None:
        super().__init__(dataset, **kwargs)
        self.skip_counts = Counter() if skip_counts is None else skip_counts

    def __iter__(self) -> Iterator[Any]:
        batches = 0
        for batch in super().__iter__():
            if isinstance(batch, SkipReport):
                merge_counts(self.skip_counts, batch.skipped)
                continue
            for meta in batch.meta:
                merge_counts(self.skip_counts, meta.get("skipped"))
            batches += 1
            yield batch
        if batches == 0:
            urls = self.dataset.urls
            shown = ", ".join(urls[:5]) + (f", ... ({len(urls)} in all)" if len(urls) > 5 else "")
            raise RuntimeError(
                f"SA1BDataModule: an epoch yielded no sample from {shown} (rank {self.dataset.rank} of "
                f"{self.dataset.world_size}). Skipped: {dict(self.skip_counts) or 'nothing'}. Check the paths "
                "and the warnings above (logger 'samlight.data')."
            )
