"""FLOP counting (FlopCounterMode on the real modules) and the device peak table behind MFU."""

from __future__ import annotations

import pytest
import torch

from samlight import build_sam
from samlight.training.flops import (
    SamFlops,
    count_sam_flops,
    count_variant_flops,
    peak_bf16_flops,
    peak_bf16_flops_for_name,
)


def _vit_b_encoder_flops_by_hand() -> float:
    """Dense ViT-B/16 at 1024 px: linear layers + attention matmuls + patch embedding + neck (2 FLOPs per MAC)."""
    tokens, dim, depth = 64 * 64, 768, 12
    linear = depth * 2 * tokens * 12 * dim * dim  # qkv (3D^2) + proj (D^2) + MLP (8D^2) per token
    global_attn = 4 * (2 * 2 * tokens * tokens * dim)  # QK^T and AV over all 4096 tokens, 4 global blocks
    windows = 5 * 5  # 64 tokens padded to 70 -> 5 x 5 windows of 14 x 14
    window_attn = 8 * windows * (2 * 2 * 196 * 196 * dim)
    patch_embed = 2 * tokens * (3 * 16 * 16) * dim
    neck = 2 * tokens * dim * 256 + 2 * tokens * 256 * 256 * 9
    return float(linear + global_attn + window_attn + patch_embed + neck)


def test_vit_b_encoder_count_matches_hand_formula() -> None:
    flops = count_variant_flops("vit_b")
    # Relative-position terms and norms are not in the hand formula: allow a few percent.
    assert flops.encoder_per_image == pytest.approx(_vit_b_encoder_flops_by_hand(), rel=0.05)
    # The mask decoder works on 64 x 64 x 256 embeddings per mask: a few GFLOPs, far below the encoder.
    assert 1e9 < flops.decoder_per_mask < 1e10
    assert abs(flops.decoder_per_call) < 0.01 * flops.decoder_per_mask


def test_real_weights_and_meta_count_the_same() -> None:
    torch.manual_seed(0)
    real = count_sam_flops(build_sam("tiny"))
    assert real == count_variant_flops("tiny")
    assert real.encoder_per_image > 0 and real.decoder_per_mask > 0


def test_training_step_flops_triple_trained_parts_only() -> None:
    flops = SamFlops(encoder_per_image=100, decoder_per_mask=10, decoder_per_call=1)
    # 2 images, 5 masks, 3 rounds: 3 * (2 * 100) + 3 * 3 * (5 * 10 + 1)
    assert flops.training_step(images=2, masks=5, rounds=3) == 600 + 459
    assert flops.training_step(images=2, masks=5, rounds=3, encoder_trainable=False) == 200 + 459


@pytest.mark.parametrize(
    ("name", "peak"),
    [
        ("NVIDIA H100 80GB HBM3", 989e12),
        ("NVIDIA H100 PCIe", 756e12),
        ("NVIDIA H200", 989e12),
        ("NVIDIA A100-SXM4-80GB", 312e12),
        ("NVIDIA L40S", 362e12),
        ("NVIDIA A10G", None),
        ("NVIDIA GeForce GTX 1080", None),
    ],
)
def test_peak_table(name: str, peak: float | None) -> None:
    assert peak_bf16_flops_for_name(name) == peak


def test_cpu_has_no_peak() -> None:
    assert peak_bf16_flops("cpu") is None
