"""apply_fsdp: 2-process gloo FSDP2 (full and hybrid sharding, activation checkpointing) gives the same training
as one process, even when ranks decode a different number of rounds with different prompt types; bad meshes and
precisions fail clearly."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from samlight.scale.fsdp import _mixed_precision
from samlight.scale.strategy import hybrid_mesh_shape
from tests._scale import free_port

WORLD = 2
STEPS = 2


def _batch(rank: int, step: int):
    """Rank-dependent data *and* call pattern: rank 1 adds box prompts and one more decode round."""
    from samlight.prompts.types import Prompts

    g = torch.Generator().manual_seed(100 * rank + step)
    images = torch.randn(2, 3, 256, 256, generator=g)
    prompts = Prompts(
        point_coords=torch.rand(4, 1, 2, generator=g) * 256, point_labels=torch.ones(4, 1, dtype=torch.long)
    )
    boxed = Prompts(boxes=torch.tensor([[10.0, 20.0, 120.0, 200.0]] * 4)) if rank == 1 else None
    return images, torch.tensor([0, 0, 1, 1]), prompts, boxed, 2 + rank


def _loss(model, images, image_index, prompts, boxed, rounds):
    embeddings = model.encode_images(images)  # 2 x C x 16 x 16
    total = embeddings.new_zeros(())
    for r in range(rounds):
        logits, iou = model.decode(embeddings, image_index, prompts, multimask_output=r == 0)
        total = total + logits.float().sigmoid().mean() + iou.float().mean()
    if boxed is not None:
        logits, _ = model.decode(embeddings, image_index, boxed, multimask_output=False)
        total = total + logits.float().sigmoid().mean()
    return total


def _reference(initial: dict) -> dict:
    """One process: the mean of both ranks' losses per step, SGD with momentum.

    SGD, not AdamW: Adam divides by the gradient's magnitude, so the ~1e-9 rounding noise of gradients that are zero
    in exact arithmetic (attention key biases) becomes lr-sized updates that differ between any two summation
    orders. No weight decay: under FSDP a parameter no rank used gets a zero gradient (see apply_fsdp).
    """
    from samlight import build_sam

    model = build_sam("tiny")
    model.load_state_dict(initial)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for step in range(STEPS):
        loss = sum(_loss(model, *_batch(rank, step)) for rank in range(WORLD)) / WORLD
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _worker(rank: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=WORLD)
    from torch.distributed.device_mesh import init_device_mesh

    from samlight import build_sam
    from samlight.scale.fsdp import apply_fsdp

    results = {}
    for name, shape, kwargs in (
        ("full", (1, WORLD), {"activation_checkpointing": True}),
        ("hybrid", (WORLD, 1), {"hybrid": True, "reshard_after_forward": False}),
    ):
        torch.manual_seed(0)
        model = build_sam("tiny")
        initial = {k: v.clone() for k, v in model.state_dict().items()}
        mesh = init_device_mesh("cpu", shape, mesh_dim_names=("replicate", "shard"))
        apply_fsdp(model, mesh, **kwargs)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        for step in range(STEPS):
            _loss(model, *_batch(rank, step)).backward()
            optimizer.step()
            optimizer.zero_grad()
        full = {k: v.full_tensor() if hasattr(v, "full_tensor") else v for k, v in model.state_dict().items()}
        results[name] = (initial, full, type(next(model.parameters())).__name__)
    if rank == 0:
        with pytest.raises(ValueError, match="2-D"):
            apply_fsdp(build_sam("tiny"), init_device_mesh("cpu", (WORLD,)), hybrid=True)
        torch.save(results, Path(out_dir) / "results.pt")
    torch.distributed.destroy_process_group()


@pytest.mark.slow
def test_fsdp_training_matches_single_process(tmp_path: Path) -> None:
    mp.spawn(_worker, args=(free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    results = torch.load(tmp_path / "results.pt", weights_only=False)
    for name, (initial, trained, param_type) in results.items():
        assert param_type == "DTensor", f"{name}: parameters were not sharded"
        expected = _reference(initial)
        assert trained.keys() == expected.keys()
        moved = max((trained[k] - initial[k]).abs().max().item() for k in trained)
        assert moved > 1e-3, f"{name}: training did not change the weights"
        for key in expected:
            torch.testing.assert_close(trained[key], expected[key], rtol=1e-4, atol=1e-5)


def test_hybrid_shard_size_must_divide_world() -> None:
    assert hybrid_mesh_shape(8, 4) == (2, 4)
    with pytest.raises(ValueError, match="shard_size=3 does not divide the world size 8"):
        hybrid_mesh_shape(8, 3)


def test_mixed_precision_policy() -> None:
    assert _mixed_precision("auto", device_type="cuda").param_dtype == torch.bfloat16
    assert _mixed_precision("auto", device_type="cuda").reduce_dtype == torch.float32
    assert _mixed_precision("auto", device_type="cpu").param_dtype is None
    with pytest.raises(ValueError, match="mp_param_dtype='int8'"):
        _mixed_precision("int8", device_type="cuda")
