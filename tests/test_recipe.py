"""The paper's training recipe, tested on behaviour: box noise, clicks inside the image, the mask fed back,
per-rank randomness, the non-finite step and the encoder-only initialisation.

Each test here was written against a wrong implementation first (see docs/training.md, "What is guaranteed").
"""

from __future__ import annotations

import torch

from samlight.prompts import BoxPrompt

# ------------------------------------------------------------------------------------------- box noise


def _square_masks(n: int, size: int, side: int) -> torch.Tensor:
    """n identical masks holding one side x side square in the middle of a size x size frame (no copy)."""
    mask = torch.zeros(1, size, size, dtype=torch.bool)
    start = (size - side) // 2
    mask[0, start : start + side, start : start + side] = True
    return mask.expand(n, size, size)


def _box_noise(side: int, *, n: int = 1000, size: int = 512) -> torch.Tensor:
    gt = _square_masks(n, size, side)
    exact = BoxPrompt(noise_std=0.0).sample(gt[:1]).boxes
    noisy = BoxPrompt().sample(gt, generator=torch.Generator().manual_seed(0)).boxes
    return (noisy - exact).flatten()  # 4n coordinate offsets


def test_box_noise_std_is_ten_percent_of_the_side_capped_at_20px():
    # A 100 px box: std 10 px, Gaussian (about 32% of the offsets beyond one std, none piled up anywhere).
    small = _box_noise(100)
    assert 9.0 < small.std() < 11.0
    assert 0.27 < (small.abs() > 10.0).float().mean() < 0.37
    # A 400 px box: 10% would be 40 px, the std is capped at 20 px; the noise itself is not clipped, so
    # about 32% of the offsets lie beyond 20 px and almost none sit exactly on +-20.
    large = _box_noise(400)
    assert 18.0 < large.std() < 22.0
    assert 0.27 < (large.abs() > 20.5).float().mean() < 0.37
    assert ((large.abs() - 20.0).abs() < 1e-3).float().mean() < 0.01
    # Corners move independently of each other.
    per_box = large.view(-1, 4)
    assert abs(torch.corrcoef(per_box.T)[0, 2]) < 0.1
