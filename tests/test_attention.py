"""`RelPosAttention`: timm's SAM attention, computed without an N x N bias tensor."""

from __future__ import annotations

import copy

import pytest
import torch
from timm.models.vision_transformer_sam import Attention
from torch.utils._python_dispatch import TorchDispatchMode

from samlight.modeling.attention import RelPosAttention


def _pair(dim: int, heads: int, table: int, dtype=torch.float32) -> tuple[Attention, RelPosAttention]:
    torch.manual_seed(0)
    reference = Attention(dim, num_heads=heads, use_rel_pos=True, input_size=(table, table)).to(dtype)
    # Trained tables are far from timm's zero init; a zero table would hide a wrong bias.
    torch.nn.init.normal_(reference.rel_pos_h, std=0.5)
    torch.nn.init.normal_(reference.rel_pos_w, std=0.5)
    ours = copy.deepcopy(reference)
    ours.__class__ = RelPosAttention
    return reference, ours


@pytest.mark.parametrize(
    ("grid", "table"),
    [((8, 8), 8), ((12, 12), 8), ((6, 10), 10)],
    ids=["global", "resampled-table", "non-square"],
)
def test_matches_timm_attention_forward_and_backward(grid, table):
    reference, ours = _pair(64, 4, table)
    x = torch.randn(2, *grid, 64, requires_grad=True)
    out_ref, out = reference(x), ours(x)
    assert (out - out_ref).abs().max() / out_ref.abs().max() < 1e-5
    params_ref = [x, reference.rel_pos_h, reference.rel_pos_w, reference.qkv.weight]
    params = [x, ours.rel_pos_h, ours.rel_pos_w, ours.qkv.weight]
    grads_ref = torch.autograd.grad(out_ref.square().sum(), params_ref)
    grads = torch.autograd.grad(out.square().sum(), params)
    for g, g_ref in zip(grads, grads_ref):
        assert (g - g_ref).abs().max() / g_ref.abs().max() < 1e-5


def test_exact_in_float64():
    reference, ours = _pair(32, 2, 6, dtype=torch.float64)
    x = torch.randn(1, 6, 6, 32, dtype=torch.float64)
    torch.testing.assert_close(ours(x), reference(x), rtol=1e-12, atol=1e-12)


class _LargestTensor(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


def test_no_tensor_of_n_squared_size():
    """timm builds a (B*heads) x N x N bias; ours never creates a tensor even B*heads*N*N/4 large."""
    reference, ours = _pair(32, 2, 16)
    x = torch.randn(1, 16, 16, 32)
    bias_numel = 2 * 256 * 256
    with _LargestTensor() as seen_ref:
        reference(x)
    with _LargestTensor() as seen:
        ours(x)
    assert seen_ref.largest >= bias_numel  # the probe does see timm's bias
    assert seen.largest < bias_numel // 4


def test_encoder_uses_it_and_keeps_parameter_names():
    from samlight import build_sam

    model = build_sam("tiny")
    attns = [blk.attn for blk in model.image_encoder.blocks]
    assert attns and all(type(a) is RelPosAttention for a in attns)
    names = set(model.image_encoder.state_dict())
    assert {"blocks.0.attn.qkv.weight", "blocks.0.attn.rel_pos_h", "blocks.1.attn.rel_pos_w"} <= names
