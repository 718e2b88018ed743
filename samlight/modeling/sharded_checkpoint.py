"""Read a sharded (torch.distributed.checkpoint) Lightning checkpoint directory in one process, offline.

`FSDP2Strategy` / `ModelParallelStrategy` with `save_distributed_checkpoint=True` write a directory: `.metadata` and
one `__N_0.distcp` file per rank (model and optimizer shards, keys `state_dict.<param>` and `optimizer_0.<...>`),
plus Lightning's `meta.pt` (step, epoch, loops, callbacks, hyper-parameters). `load_full_state_dict` reassembles the
full model tensors from all shards on the CPU, with no process group and whatever the world size that wrote them,
and returns a dict shaped like a Lightning `.ckpt`, so `samlight.load_state_dict` and `samlight export` treat both
the same way.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.metadata import Metadata, TensorStorageMetadata

log = logging.getLogger(__name__)

METADATA_FILE = "meta.pt"  # Lightning's non-tensor part of a sharded checkpoint
MODEL_KEY = "state_dict"


def is_sharded_checkpoint(path: str | os.PathLike) -> bool:
    """True for a directory written by torch.distributed.checkpoint (it has a `.metadata` file)."""
    path = Path(path)
    return path.is_dir() and (path / ".metadata").is_file()


def load_full_state_dict(path: str | os.PathLike) -> dict[str, Any]:
    """Consolidate a sharded checkpoint directory into {"state_dict": {name: full CPU tensor}, **lightning_meta}.

    Args:
        path: checkpoint directory (e.g. `runs/x/checkpoints/last.ckpt/`).

    Returns:
        A Lightning-like checkpoint dict: "state_dict" holds the full (unsharded) model tensors under the names
        the LightningModule used (e.g. `model.image_encoder.blocks.0.attn.qkv.weight`); the other keys
        (global_step, epoch, ...) come from `meta.pt` when it loads with weights_only=True. Optimizer shards are
        not read.
    """
    path = Path(path)
    if not is_sharded_checkpoint(path):
        raise ValueError(
            f"{path} is not a sharded checkpoint directory (no {path / '.metadata'}): expected the folder that "
            "ModelParallelStrategy/FSDP2Strategy(save_distributed_checkpoint=True) writes. Was the save interrupted? "
            f"Look for a complete sibling such as {path.parent / ('.' + path.name + '.old')}."
        )
    reader = dcp.FileSystemReader(str(path))
    metadata = reader.read_metadata()
    model_state = _empty_model_state(metadata, source=path)
    # no_dist: read every shard in this process, even inside a job whose process group is up.
    dcp.load({MODEL_KEY: model_state}, storage_reader=reader, no_dist=True)
    checkpoint = _lightning_metadata(path)
    checkpoint[MODEL_KEY] = model_state
    return checkpoint


def _empty_model_state(metadata: Metadata, *, source: Path) -> dict[str, torch.Tensor]:
    """Full-size CPU tensors for every model entry; `dcp.load` fills them from the shards (any world size)."""
    state: dict[str, torch.Tensor] = {}
    for flat_key, item in metadata.state_dict_metadata.items():
        inner = _model_key(metadata, flat_key)
        if inner is None:
            continue
        if not isinstance(item, TensorStorageMetadata):
            raise ValueError(
                f"{source}: model entry {flat_key!r} is not a tensor; not a samlight checkpoint?"
            )
        state[inner] = torch.empty(item.size, dtype=item.properties.dtype)
    if not state:
        raise ValueError(
            f"{source} holds no '{MODEL_KEY}.*' tensors (found e.g. {list(metadata.state_dict_metadata)[:3]}); "
            "it is a distributed checkpoint but not one written by a Lightning strategy."
        )
    return state


def _model_key(metadata: Metadata, flat_key: str) -> str | None:
    # planner_data maps each flattened key to its path in the nested dict that was saved, e.g.
    # ("state_dict", "model.image_encoder.pos_embed"); parameter names themselves contain dots.
    path = (metadata.planner_data or {}).get(flat_key)
    if path is not None:
        return path[1] if len(path) == 2 and path[0] == MODEL_KEY else None
    prefix = MODEL_KEY + "."
    return flat_key[len(prefix) :] if flat_key.startswith(prefix) else None


def _lightning_metadata(path: Path) -> dict[str, Any]:
    meta_file = path / METADATA_FILE
    if not meta_file.is_file():
        return {}
    try:
        return dict(torch.load(meta_file, map_location="cpu", weights_only=True))
    except Exception as e:  # objects the weights-only unpickler refuses; the weights are still complete
        log.warning(
            "samlight: %s not read with weights_only=True (%s); returning the weights only", meta_file, e
        )
        return {}
