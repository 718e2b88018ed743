"""On a CUDA device: the device distance transform, device random generators, and a bf16 training step.

Marked `gpu`: skipped without CUDA (tests/conftest.py), run on any machine with one (`pytest -m gpu`)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.gpu


def _masks(n: int = 6, size: int = 64, seed: int = 0) -> torch.Tensor:
    """n x size x size bool ellipses (never empty)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size]
    out = []
    for _ in range(n):
        cy, cx = rng.uniform(8, size - 8, 2)
        ry, rx = rng.uniform(3, size / 3, 2)
        out.append(((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 < 1)
    return torch.from_numpy(np.stack(out))


def test_cuda_distance_transform_matches_scipy_and_places_the_same_center_clicks() -> None:
    from samlight.prompts.clicks import CorrectiveClicks, distance_to_boundary

    masks = _masks()
    reference = distance_to_boundary(masks)  # CPU: scipy's exact transform
    on_gpu = distance_to_boundary(masks.cuda())
    assert on_gpu.device.type == "cuda"
    torch.testing.assert_close(on_gpu.cpu(), reference, atol=0.5, rtol=0)
    empty = torch.zeros_like(masks)
    clicks = CorrectiveClicks(mode="center")
    cpu_coords, cpu_labels = clicks.next_clicks(masks, empty)
    gpu_coords, gpu_labels = clicks.next_clicks(masks.cuda(), empty.cuda())
    assert torch.equal(gpu_labels.cpu(), cpu_labels) and bool((gpu_labels == 1).all())
    # Jump flooding can differ from the exact transform by < 0.5 px, so ties may resolve to a neighbour.
    assert (gpu_coords.cpu() - cpu_coords).abs().max() <= 2.0


def test_device_generators_reproduce_prompts_and_clicks_on_the_device() -> None:
    from samlight.prompts.box import BoxPrompt
    from samlight.prompts.clicks import CorrectiveClicks
    from samlight.prompts.point import PointPrompt

    gt = _masks().cuda()
    pred = torch.zeros_like(gt)
    pred[:, :32] = True  # errors of both kinds

    def draw(seed: int):
        g = torch.Generator(device="cuda").manual_seed(seed)
        points = PointPrompt().sample(gt, generator=g)
        boxes = BoxPrompt(noise_std=0.1, max_noise=20.0).sample(gt, generator=g)
        coords, labels = CorrectiveClicks(mode="uniform").next_clicks(gt, pred, generator=g)
        return points.point_coords, boxes.boxes, coords, labels

    first, again, other = draw(0), draw(0), draw(1)
    for a, b in zip(first, again):
        assert a.device.type == "cuda" and torch.equal(a, b)
    assert not torch.equal(first[0], other[0]) or not torch.equal(first[2], other[2])
    coords, labels = first[2], first[3]
    x, y = coords[:, 0, 0].long(), coords[:, 0, 1].long()
    n = torch.arange(gt.shape[0], device="cuda")
    error = gt ^ pred
    assert bool(error[n, y, x].all()), "uniform clicks lie in the error region"
    assert torch.equal(labels[:, 0].bool(), gt[n, y, x]), "label 1 on missed foreground, 0 on false positives"


def test_bf16_training_steps_are_finite_and_move_the_weights(tmp_path) -> None:
    import lightning.pytorch as pl

    from samlight.datamodules import SA1BDataModule
    from samlight.datamodules.demo import make_demo_shards
    from samlight.training.module import SamModule

    train, _ = make_demo_shards(tmp_path / "demo", num_train=4, num_val=2, samples_per_shard=2)
    dm = SA1BDataModule(train, batch_size=2, num_workers=0, image_size=256, max_masks=4, batches_per_epoch=3)
    module = SamModule(variant="tiny")
    before = {k: v.detach().clone() for k, v in module.state_dict().items()}
    trainer = pl.Trainer(
        accelerator="gpu", devices=1, precision="bf16-mixed", max_steps=3, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, limit_val_batches=0, num_sanity_val_steps=0,
    )  # fmt: skip
    trainer.fit(module, datamodule=dm)
    loss = trainer.callback_metrics["train/loss"]
    assert torch.isfinite(loss)
    after = module.state_dict()
    assert all(torch.isfinite(v).all() for v in after.values() if v.is_floating_point())
    moved = max(
        (after[k].float().cpu() - before[k].float()).abs().max().item()
        for k in before
        if before[k].is_floating_point()
    )
    assert moved > 0
