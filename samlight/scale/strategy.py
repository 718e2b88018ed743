"""`FSDP2Strategy`: Lightning's ModelParallelStrategy set up for data-parallel FSDP2 training of SAM.

Lightning's `ModelParallelStrategy` builds a ("data_parallel", "tensor_parallel") mesh sized (nodes, devices per
node) and hands the sampler only the data-parallel dimension, which suits FSDP + tensor parallelism. SAM uses no
tensor parallelism: every rank sees different images. This strategy builds a ("replicate", "shard") mesh instead
(shard inside a group of `shard_size` ranks, a node by default; replicate across groups), gives every rank its own
data, makes sharded checkpoints atomic (written to a side directory, then exchanged in) and defaults to the atomic
file CheckpointIO for full checkpoints. `samlight.scale.fsdp.apply_fsdp` shards the model on this mesh.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import sys
from datetime import timedelta
from pathlib import Path
from typing import Any

from lightning.fabric.plugins.collectives.torch_collective import default_pg_timeout
from lightning.fabric.utilities.types import _PATH
from lightning.pytorch.plugins.io import CheckpointIO
from lightning.pytorch.strategies import ModelParallelStrategy
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from typing_extensions import override

from samlight.scale.checkpoint_io import AtomicCheckpointIO

MESH_DIM_NAMES = ("replicate", "shard")


def hybrid_mesh_shape(world_size: int, shard_size: int) -> tuple[int, int]:
    """(replicate, shard) sizes for `world_size` ranks sharded in groups of `shard_size`; errors if they don't divide."""
    if shard_size < 1 or world_size % shard_size != 0:
        raise ValueError(
            f"FSDP2Strategy: shard_size={shard_size} does not divide the world size {world_size} "
            "(trainer.num_nodes x trainer.devices). Hybrid sharding needs equal shard groups: choose a shard_size "
            "that divides it (usually the devices per node), or leave shard_size unset."
        )
    return world_size // shard_size, shard_size


def build_device_mesh(*, device_type: str, world_size: int, shard_size: int) -> DeviceMesh:
    """2-D ("replicate", "shard") mesh; call it on every rank after the process group is up."""
    shape = hybrid_mesh_shape(world_size, shard_size)
    return init_device_mesh(device_type, shape, mesh_dim_names=MESH_DIM_NAMES)


class FSDP2Strategy(ModelParallelStrategy):
    """Data-parallel FSDP2 (optionally hybrid-sharded) for `SamModule`, on GPUs (NCCL) or CPU (gloo).

    Args:
        shard_size: ranks per shard group of the mesh; None = devices per node. Used when `hybrid` is true
            (shard inside a group, replicate across groups); otherwise every rank holds 1/world of each parameter.
        reshard_after_forward, hybrid, mp_param_dtype, activation_checkpointing: how the model is sharded,
            passed to `samlight.scale.fsdp.apply_fsdp` (see there): ZeRO-3 vs ZeRO-2, HSDP across nodes,
            the all-gather/compute dtype ("auto": bfloat16 on CUDA), recomputing encoder blocks in backward.
        save_distributed_checkpoint: True writes one shard per rank into a checkpoint directory (fast, needed for
            ViT-H); False gathers a single full `.ckpt` on rank 0 (fine for ViT-B/L and small runs).
        process_group_backend: "nccl", "gloo", ...; None picks NCCL on GPUs and gloo on CPU.
        timeout: collective timeout (a `datetime.timedelta`); a dead rank or missing rendezvous fails after it.
    """

    def __init__(
        self,
        *,
        shard_size: int | None = None,
        reshard_after_forward: bool = True,
        hybrid: bool = False,
        mp_param_dtype: str | None = "auto",
        activation_checkpointing: bool = False,
        save_distributed_checkpoint: bool = True,
        process_group_backend: str | None = None,
        timeout: timedelta = default_pg_timeout,
    ) -> None:
        super().__init__(
            save_distributed_checkpoint=save_distributed_checkpoint,
            process_group_backend=process_group_backend,
            timeout=timeout,
        )
        self._shard_size = shard_size
        self.fsdp_options = {
            "reshard_after_forward": reshard_after_forward,
            "hybrid": hybrid,
            "mp_param_dtype": mp_param_dtype,
            "activation_checkpointing": activation_checkpointing,
        }

    @property
    @override
    def checkpoint_io(self) -> CheckpointIO:
        if self._checkpoint_io is None:
            self._checkpoint_io = AtomicCheckpointIO()
        return self._checkpoint_io

    @checkpoint_io.setter
    @override
    def checkpoint_io(self, io: CheckpointIO | None) -> None:
        self._checkpoint_io = io

    @override
    def setup_environment(self) -> None:
        world_size = self.num_nodes * self.num_processes
        # Validate before any rendezvous so a bad config fails at once on every rank, not at a collective.
        shard_size = self._shard_size or self.num_processes
        hybrid_mesh_shape(world_size, shard_size)
        self._setup_distributed()  # Strategy.setup_environment (device) + process group
        self._device_mesh = build_device_mesh(
            device_type=self.root_device.type, world_size=self.world_size, shard_size=shard_size
        )
        assert self.lightning_module is not None
        self.lightning_module._device_mesh = self._device_mesh

    @property
    @override
    def distributed_sampler_kwargs(self) -> dict[str, Any]:
        # Pure data parallelism: each rank reads its own slice of the data.
        return {"num_replicas": self.world_size, "rank": self.global_rank}

    @override
    def save_checkpoint(
        self, checkpoint: dict[str, Any], filepath: _PATH, storage_options: Any | None = None
    ) -> None:
        if not self._save_distributed_checkpoint:
            super().save_checkpoint(
                checkpoint, filepath, storage_options
            )  # rank 0, through AtomicCheckpointIO
            return
        path = Path(self.broadcast(filepath))
        partial = path.with_name(f".{path.name}.partial")
        if self.is_global_zero and partial.exists():
            shutil.rmtree(partial)  # left by a run killed mid-save
        self.barrier("samlight_ckpt_prepare")
        super().save_checkpoint(checkpoint, partial, storage_options)
        self.barrier("samlight_ckpt_written")
        if self.is_global_zero:
            _swap_in(partial, path)
        self.barrier("samlight_ckpt_swapped")


def _swap_in(new: Path, target: Path) -> None:
    """Put the complete checkpoint `new` at `target`; at every instant `target` is a complete checkpoint.

    A directory cannot be `os.replace`d over a non-empty one. On Linux, renameat2(RENAME_EXCHANGE) swaps the two
    names atomically (ext4, xfs, btrfs, tmpfs, ...). Elsewhere the old one is moved aside to `.NAME.old` first;
    a kill between the two renames then leaves `.NAME.old`, which `--ckpt_path last` resumes from
    (`samlight.scale.resume`).
    """
    old = target.with_name(f".{target.name}.old")
    _remove(old)
    if not target.exists():
        new.rename(target)
    elif _exchange(new, target):
        _remove(new)  # now holds the previous checkpoint
    else:
        target.rename(old)
        new.rename(target)
    _remove(old)


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap the paths `a` and `b` (Linux renameat2 with RENAME_EXCHANGE); False where unsupported."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):  # glibc < 2.28, musl
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    errno = ctypes.get_errno()
    if errno in (22, 38, 95):  # EINVAL, ENOSYS, EOPNOTSUPP: the filesystem cannot exchange
        return False
    raise OSError(errno, f"renameat2({a}, {b}, RENAME_EXCHANGE): {os.strerror(errno)}")


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()
