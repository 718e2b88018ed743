"""Atomic checkpoint writing: a checkpoint file is either the complete old one or the complete new one.

Lightning's `TorchCheckpointIO` streams `torch.save` output straight into the target path, so a job killed mid-write
(preemption, node failure, full disk) leaves a truncated `last.ckpt` that `--ckpt_path last` then fails to load. This
plugin writes to a temporary file in the same directory, fsyncs it and renames it over the target (`os.replace` is
atomic on POSIX filesystems). Use it from YAML as `trainer.plugins: [{class_path: samlight.scale.checkpoint_io.AtomicCheckpointIO}]`.
Sharded (FSDP2) checkpoints do not go through a CheckpointIO; `samlight.scale.strategy.FSDP2Strategy` makes those atomic.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from fsspec.implementations.local import LocalFileSystem
from lightning.fabric.utilities.cloud_io import get_filesystem
from lightning.pytorch.plugins.io import TorchCheckpointIO
from typing_extensions import override


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    """`torch.save(obj, path)` that never leaves a partial file at `path` (local filesystems)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Same directory as the target, so the final rename never crosses a filesystem boundary.
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            torch.save(obj, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        # BaseException: a SIGTERM-triggered SystemExit mid-write must not leave the temp file behind either.
        Path(tmp_name).unlink(missing_ok=True)
        raise
    _fsync_directory(path.parent)


def _fsync_directory(directory: Path) -> None:
    # Persist the rename itself; without it a power loss can undo the rename on some filesystems.
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class AtomicCheckpointIO(TorchCheckpointIO):
    """`TorchCheckpointIO` whose local writes are atomic (temp file + fsync + `os.replace`).

    Remote URLs (`s3://`, `gs://`, ...) go through fsspec as before: object stores publish an object only when its
    upload completes, which is already atomic.
    """

    @override
    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None
    ) -> None:
        if storage_options is not None:
            raise TypeError(
                f"AtomicCheckpointIO.save_checkpoint(..., storage_options={storage_options!r}) is not supported:"
                " it writes plain torch.save files. Remove the storage options or use a custom CheckpointIO."
            )
        if not isinstance(get_filesystem(path), LocalFileSystem):
            super().save_checkpoint(checkpoint, path, storage_options)
            return
        atomic_torch_save(checkpoint, os.fspath(path))
