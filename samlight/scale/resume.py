"""`--ckpt_path last` that never restarts from zero while a checkpoint exists.

Lightning's "last" picks the newest `last*.ckpt` by modification time and, when there is none, warns and trains
from scratch; a truncated `last.ckpt` fails the load. Here "last" is the newest checkpoint that can be loaded, of
every checkpoint in the run's checkpoint directory (`last.ckpt`, the step/epoch checkpoints of `ModelCheckpoint`,
a sharded checkpoint left as `.last.ckpt.old` by an interrupted swap): an older one beats none. When checkpoints
exist but none can be loaded, the run stops and says so, unless it is told to start fresh.
"""

from __future__ import annotations

import logging
import os
import zipfile
from pathlib import Path

from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import ModelCheckpoint

log = logging.getLogger(__name__)

FILE_EXTENSION = ModelCheckpoint.FILE_EXTENSION


def checkpoint_dir(trainer: Trainer) -> str:
    """Where `ModelCheckpoint` keeps its files for this trainer: its `dirpath`, else Lightning's default,
    `<logger save_dir>/<name>/<version>/checkpoints`, else `<default_root_dir>/checkpoints`."""
    callback = next((c for c in trainer.checkpoint_callbacks if isinstance(c, ModelCheckpoint)), None)
    if callback is not None and callback.dirpath:
        return str(callback.dirpath)
    if trainer.loggers:
        logger = trainer.loggers[0]
        save_dir = logger.save_dir if logger.save_dir is not None else trainer.default_root_dir
        version = logger.version if isinstance(logger.version, str) else f"version_{logger.version}"
        return os.path.join(save_dir, str(logger.name), version, "checkpoints")
    return os.path.join(trainer.default_root_dir, "checkpoints")


def candidate_checkpoints(directory: str | os.PathLike) -> list[Path]:
    """Checkpoints in `directory`, newest first: `*.ckpt` files or sharded directories, plus `.NAME.ckpt.old`
    (the previous checkpoint kept by a sharded swap that was interrupted). Temp files and `.partial` are not."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = []
    for path in directory.iterdir():
        name = path.name
        if name.endswith(FILE_EXTENSION) and not name.startswith("."):
            found.append(path)
        elif name.startswith(".") and name.endswith(f"{FILE_EXTENSION}.old"):
            found.append(path)
    return sorted(found, key=lambda p: p.stat().st_mtime, reverse=True)


def why_not_loadable(path: Path) -> str | None:
    """None when `path` looks like a complete checkpoint, else the reason. Cheap: reads the zip directory (at the
    end of a torch.save file, so a truncated file fails) or a sharded checkpoint's metadata, not the tensors."""
    if path.is_dir():
        if not (path / ".metadata").is_file():
            return "sharded checkpoint without .metadata (incomplete)"
        if not any(path.glob("*.distcp")):
            return "sharded checkpoint without shard files"
        meta = path / "meta.pt"
        return None if not meta.exists() else why_not_loadable(meta)
    try:
        with zipfile.ZipFile(path) as archive:
            if not any(n.endswith("data.pkl") for n in archive.namelist()):
                return "not a torch.save file"
    except (zipfile.BadZipFile, OSError) as exn:
        return f"unreadable ({type(exn).__name__}: {exn}); truncated?"
    return None


def resolve_last_checkpoint(trainer: Trainer, *, allow_fresh_start: bool = False) -> str | None:
    """The newest loadable checkpoint of this run, or None when the run has none yet (a first run).

    Raises:
        SystemExit when checkpoints exist but none is loadable and `allow_fresh_start` is false.
    """
    directories = {checkpoint_dir(trainer)}
    # Callbacks that save elsewhere (e.g. PreemptionCheckpoint(dirpath=...)) name their file by checkpoint_path().
    directories |= {
        str(Path(c.checkpoint_path(trainer)).parent)
        for c in trainer.callbacks
        if callable(getattr(c, "checkpoint_path", None))
    }
    rejected = []
    for directory in sorted(directories):
        for path in candidate_checkpoints(directory):
            reason = why_not_loadable(path)
            if reason is None:
                if rejected:
                    log.warning("samlight: skipped checkpoints that cannot be loaded: %s", _listed(rejected))
                print(f"samlight: --ckpt_path last: resuming from {path}")
                return str(path)
            rejected.append((path, reason))
    if not rejected:
        print(
            f"samlight: --ckpt_path last: no checkpoint in {', '.join(sorted(directories))} yet; training from scratch"
        )
        return None
    message = (
        f"samlight: --ckpt_path last: no loadable checkpoint in {', '.join(sorted(directories))}: {_listed(rejected)}. "
        "Resume from one of them explicitly (--ckpt_path PATH), or pass --allow_fresh_start=true to train from scratch."
    )
    if not allow_fresh_start:
        raise SystemExit(message)
    log.warning("%s Starting from scratch (--allow_fresh_start).", message)
    return None


def _listed(rejected: list[tuple[Path, str]]) -> str:
    return "; ".join(f"{path} ({reason})" for path, reason in rejected)
