"""Iterable dataset over SA-1B-format shards (`SA1BDataset`) and its DataLoader (`SA1BLoader`).

Kept free of Lightning so DataLoader workers started with spawn import only torch and the decoders.
Splitting (rank and world size are passed in explicitly, so spawn-started workers split correctly); a "reader" is
one (rank, worker) pair, R*W of them, reader r * W + w:
- training: the stream is a sequence of passes. Pass p permutes the shards (the same permutation on every reader,
  from the seed and p) and reader i reads shards i, i + R*W, ... of it, so every shard is read exactly once per
  pass across all ranks and workers. With fewer shards than readers, the readers that share a shard keep every
  k-th sample of it (k = readers on that shard), so every *sample* is still read once per pass. A reader keeps up
  to `open_shards` shards open and draws each next sample from a random one of them, then through a shuffle
  buffer that is drained at the end of the pass. Each reader yields a fixed quota of whole batches per epoch
  (epochs are `batches_per_epoch` long and independent of passes), so every rank sees the same number of batches.
  All randomness of a sample (buffer, shard mixing, mask subset) is derived from (seed, pass, reader, position),
  so the stream can be resumed at an exact position: each sample carries `meta["stream"]` (its position) and
  `SA1BDataModule` saves the last trained position of every reader in the checkpoint.
- validation: one exact pass. With at least as many shards as readers, reader i reads shards i, i + R*W, ...;
  with fewer shards every reader reads every shard and keeps the samples whose index in the stream is congruent
  to its slot modulo R*W. Either way each image is used exactly once across all ranks and workers. Ranks may get
  unequal batch counts, so under torch.distributed `SA1BLoader` pads the shorter ranks with batches that hold no
  valid mask (weight 0): every rank runs the same number of validation steps (FSDP gathers in every step).
"""

from __future__ import annotations

import itertools
import signal
from collections import Counter
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from samlight.datamodules.batch import SegmentationBatch
from samlight.datamodules.collate import SegmentationSample, SkipReport, merge_counts
from samlight.datamodules.decode import SampleError, decode_sa1b_sample
from samlight.datamodules.sa1b_reader import RawSample, SkipCounter, iter_shard

CLIP_EXTENSION = "clip.npy"


class SA1BDataset(IterableDataset):
    """Iterable dataset over SA-1B-format shards yielding `SegmentationSample`s (see the module docstring).

    Args:
        urls: expanded shard URLs.
        training: True = every shard once per pass, shuffled, random masks, `batches_per_epoch` per rank;
            False = one exact pass, first `max_masks` masks.
        image_size, max_masks, max_mask_area: see `decode_sa1b_sample`.
        batch_size: samples per batch; worker quotas are whole batches.
        batches_per_epoch: batches per rank per epoch (training only).
        shuffle_buffer: samples held for shuffling (training only).
        seed: base seed; each (pass, reader, sample) derives its own randomness from it.
        rank, world_size: this process's place among all training processes.
        text_embeddings: require and load `<key>.clip.npy` per sample.
        start_epoch: the epoch this dataset starts at (a resumed run's epoch).
        reduced_decode: decode JPEGs at a reduced DCT scale when the model needs fewer pixels.
        open_shards: shards each reader keeps open and mixes samples from (training).
        resume: role -> the last used `meta["stream"]` position of that worker role ({"pass", "index",
            "epoch", "produced"}); the stream continues right after it (see `SA1BDataModule.state_dict`).
        role_offset: worker w plays role (w + role_offset) % workers, so a resumed epoch continues in the
            round-robin order of the interrupted one.
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
        open_shards: int = 4,
        resume: dict[int, dict[str, int]] | None = None,
        role_offset: int = 0,
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
        self.open_shards = open_shards
        self.resume = resume
        self.role_offset = role_offset
        self._iterations = 0  # per process: persistent workers keep counting epochs themselves
        # Training state of this process (a worker's copy of the dataset), created on first iteration.
        self._stream: Iterator[RawSample] | None = None
        self._counter: SkipCounter | None = None
        self._role = 0
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
        if self._stream is None:  # kept across epochs: open shards and the shuffle buffer carry over
            # A resumed, partly done epoch continues with the reader whose turn it was: worker w plays role w + offset.
            self._role = (worker + self.role_offset) % num_workers
            self._counter = SkipCounter()
            start = (self.resume or {}).get(self._role)
            self._stream = self._passes(self._role, num_workers, start)
        role = self._role
        batches = self.batches_per_epoch // num_workers + (role < self.batches_per_epoch % num_workers)
        done = (self.resume or {}).get(role, {})
        produced = done.get("produced", 0) if done.get("epoch") == epoch else 0
        # More workers than batches, or this role already finished the (resumed) epoch.
        if produced >= batches * self.batch_size:
            return
        for raw, position in self._stream:
            rng = np.random.default_rng(
                [self.seed, position["pass"], self._reader(role, num_workers), position["index"], 3]
            )
            sample = self._decode(raw, self._counter, rng)
            if sample is None:
                self._failures += 1
                if self._failures >= max(1000, 4 * self.shuffle_buffer):
                    raise RuntimeError(
                        self._nothing_usable(f"{self._failures} samples in a row failed to decode")
                    )
                continue
            self._failures = 0
            produced += 1
            sample.meta["stream"] = {"role": role, **position, "epoch": epoch, "produced": produced}
            yield sample
            if produced == batches * self.batch_size:
                return

    def _reader(self, role: int, num_workers: int) -> int:
        return self.rank * num_workers + role

    def _passes(
        self, role: int, num_workers: int, start: dict | None
    ) -> Iterator[tuple[RawSample, dict[str, int]]]:
        """(raw sample, {"pass": p, "index": i}) forever; `start` = the last position already used (resume)."""
        reader, readers = self._reader(role, num_workers), self.world_size * num_workers
        first_pass, skip = (start["pass"], start["index"]) if start else (0, 0)
        empty_in_a_row = 0
        for pass_index in itertools.count(first_pass):
            count = 0
            for index, raw in enumerate(self._one_pass(reader, readers, pass_index), start=1):
                count += 1
                if pass_index == first_pass and index <= skip:
                    continue  # replayed without decoding up to the resumed position
                yield raw, {"pass": pass_index, "index": index}
            empty_in_a_row = 0 if count else empty_in_a_row + 1
            if empty_in_a_row >= 8:
                raise RuntimeError(self._nothing_usable(f"{empty_in_a_row} passes in a row gave no sample"))

    def _one_pass(self, reader: int, readers: int, pass_index: int) -> Iterator[RawSample]:
        shards, every, offset = pass_plan(len(self.urls), reader, readers, self.seed, pass_index)
        # Shard-level defects of a shard read by several readers are counted by the first of them only.
        self._counter.count_shared = offset == 0
        mixing = np.random.default_rng([self.seed, pass_index, reader, 1])
        samples = _mixed((self._kept(self.urls[s], every, offset) for s in shards), self.open_shards, mixing)
        return _shuffled(
            samples, self.shuffle_buffer, np.random.default_rng([self.seed, pass_index, reader, 2])
        )

    def _kept(self, url: str, every: int, offset: int) -> Iterator[RawSample]:
        samples = iter_shard(url, self._counter, required_extra=self._required_extra())
        return samples if every == 1 else itertools.islice(samples, offset, None, every)

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
            # Only defects of the sample's bytes are skipped (counted and named). Anything else is a bug in the
            # code and propagates with its traceback: a run must not silently skip every sample.
            counter.skip(exn.reason, raw.url, raw.key, exn.detail)
            return None
        sample.meta["skipped"] = counter.take()
        return sample

    def _nothing_usable(self, why: str) -> str:
        shown = ", ".join(self.urls[:5]) + (f", ... ({len(self.urls)} in all)" if len(self.urls) > 5 else "")
        skipped = dict(self._counter.pending) if self._counter else {}
        return f"SA1BDataset: no usable sample: {why}. URLs: {shown}. Skipped so far: {skipped}"


def pass_plan(
    num_shards: int, reader: int, readers: int, seed: int, pass_index: int
) -> tuple[list[int], int, int]:
    """Which shards reader `reader` of `readers` reads in pass `pass_index`, and which of their samples.

    Returns:
        (shard indices, every, offset): the reader keeps samples offset, offset + every, ... of each shard
        (every = 1 unless there are fewer shards than readers).
    """
    order = np.random.default_rng([seed, pass_index]).permutation(num_shards).tolist()
    if num_shards >= readers:
        return order[reader::readers], 1, 0
    shard = reader % num_shards
    return [order[shard]], len(range(shard, readers, num_shards)), reader // num_shards


def _mixed(
    shards: Iterator[Iterator[RawSample]], open_shards: int, rng: np.random.Generator
) -> Iterator[RawSample]:
    """Interleave up to `open_shards` shards: each next sample comes from a random open shard (SA-1B shards hold
    ~11k images each, so a buffer alone would hold samples of one shard only)."""
    active: list[Iterator[RawSample]] = list(itertools.islice(shards, max(1, open_shards)))
    while active:
        i = int(rng.integers(len(active)))
        try:
            yield next(active[i])
        except StopIteration:
            replacement = next(shards, None)
            if replacement is None:
                active.pop(i)
            else:
                active[i] = replacement


def _shuffled(stream: Iterator[RawSample], size: int, rng: np.random.Generator) -> Iterator[RawSample]:
    """Reservoir-style shuffle: hold `size` samples, yield a random one as each new one arrives."""
    if size <= 1:
        yield from stream
        return
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
    drops batches that carry only counts, raises when a whole epoch yields no sample, pads validation so that every
    rank yields the same number of batches, and keeps a resumed training stream in the uninterrupted order.

    Args:
        dataset: an `SA1BDataset`.
        skip_counts: Counter shared with the datamodule.
        **kwargs: DataLoader arguments.
    """

    def __init__(self, dataset: SA1BDataset, *, skip_counts: Counter | None = None, **kwargs: Any) -> None:
        if kwargs.get("num_workers", 0) > 0:
            kwargs.setdefault("worker_init_fn", ignore_sigint)
        super().__init__(dataset, **kwargs)
        self.skip_counts = Counter() if skip_counts is None else skip_counts
        self.delivered: dict[int, dict[str, int]] = {}  # role -> last stream position handed out
        self._epochs = 0

    def __iter__(self) -> Iterator[Any]:
        dataset = self.dataset
        if dataset.training:
            self._restart_rotated_workers()
            self._epochs += 1
        batches = self._batches()
        if not dataset.training and _distributed():
            batches = _pad_to_longest_rank(batches, dataset.image_size)
        yield from batches

    def _restart_rotated_workers(self) -> None:
        # A resumed epoch ran with rotated worker roles; the next epoch must start with role 0 again, as an
        # uninterrupted run does. Persistent workers keep their role, so they are replaced by fresh ones that
        # continue each role's stream right after its last delivered sample.
        dataset = self.dataset
        if self._epochs == 0 or not dataset.role_offset:
            return
        dataset.role_offset = 0
        dataset.resume = {
            **(dataset.resume or {}),
            **{role: dict(pos) for role, pos in self.delivered.items()},
        }
        dataset.start_epoch += self._epochs
        dataset._iterations = 0
        self._epochs = 0
        self._iterator = None  # DataLoader starts new workers on the next iter()

    def _batches(self) -> Iterator[Any]:
        batches = 0
        for batch in super().__iter__():
            if isinstance(batch, SkipReport):
                merge_counts(self.skip_counts, batch.skipped)
                continue
            for meta in batch.meta:
                merge_counts(self.skip_counts, meta.get("skipped"))
                if "stream" in meta:
                    self.delivered[meta["stream"]["role"]] = meta["stream"]
            batches += 1
            yield batch
        if batches == 0 and (self.dataset.training or not _distributed()):
            urls = self.dataset.urls
            shown = ", ".join(urls[:5]) + (f", ... ({len(urls)} in all)" if len(urls) > 5 else "")
            raise RuntimeError(
                f"SA1BDataModule: an epoch yielded no sample from {shown} (rank {self.dataset.rank} of "
                f"{self.dataset.world_size}). Skipped: {dict(self.skip_counts) or 'nothing'}. Check the paths "
                "and the warnings above (logger 'samlight.data')."
            )


def ignore_sigint(worker_id: int) -> None:
    """DataLoader `worker_init_fn`: Ctrl-C in a terminal reaches the workers too; the main process handles it
    (a graceful stop that saves a checkpoint), so a worker must not die of it and break the last step."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _any_rank(has_batch: bool) -> bool:
    """True when any rank still has a batch (one all-reduce of a flag; on the GPU under NCCL)."""
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else None
    flag = torch.tensor([float(has_batch)], device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return bool(flag.item())


def _pad_to_longest_rank(batches: Iterator[Any], image_size: int) -> Iterator[Any]:
    """Yield `batches`, then padding batches until every rank is done, so all ranks run the same number of steps.

    A padding batch is one zero image with no valid mask: the model runs on it (FSDP's gathers match on every
    rank) and it adds weight 0 to every metric, so each real image is still counted once.
    """
    while True:
        batch = next(batches, None)
        if not _any_rank(batch is not None):
            return
        yield batch if batch is not None else padding_batch(image_size)


def padding_batch(image_size: int) -> SegmentationBatch:
    """One zero image of S x S without any valid mask (meta marks it {"padding": True})."""
    size = image_size
    return SegmentationBatch(
        images=torch.zeros(1, 3, size, size),
        masks=torch.zeros(1, 1, size, size, dtype=torch.bool),
        mask_valid=torch.zeros(1, 1, dtype=torch.bool),
        original_sizes=torch.tensor([[size, size]]),
        input_sizes=torch.tensor([[size, size]]),
        meta=[{"padding": True}],
    )
