"""ViT attention with SAM's decomposed relative-position bias, computed without an N x N bias tensor.

SAM adds to each attention logit a bias that is a sum of two small terms (MViTv2's decomposed relative
positions): for query i at (ih, iw) and key j at (jh, jw),

    logit[i, j] = scale * q_i . k_j  +  q_i . Rh[ih, jh]  +  q_i . Rw[iw, jw].

timm builds that bias as a dense (B*heads) x N x N float mask and hands it to `scaled_dot_product_attention`,
which then cannot use a FlashAttention kernel and keeps the mask and its gradient alive (for ViT-H at 1024 input,
N = 4096: 1 GiB in float32 per image per global block). The two bias terms are themselves dot products, so they
fold into the query/key vectors exactly:

    q'_i = [scale * q_i,  q_i . Rh[ih, :],  q_i . Rw[iw, :]]      (d + H + W values)
    k'_j = [k_j,          onehot_H(jh),     onehot_W(jw)]

and q'_i . k'_j is the biased logit. Attention over (q', k', v) with scale 1 and no mask is the same attention,
with O(N (d + H + W)) memory instead of O(N^2), and any fused SDPA kernel (FlashAttention, memory-efficient,
cuDNN, the CPU flash kernel) applies. The price is H + W extra dot-product dimensions in q . k (192 instead of
64 for ViT-B at 1024: q.k FLOPs x3, attention FLOPs x2); the memory saving is what lets the kernel stay fused.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.models.vision_transformer_sam import Attention, get_rel_pos
from torch import Tensor


def rel_pos_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    rel_pos_h: Tensor,
    rel_pos_w: Tensor,
    size: tuple[int, int],
    *,
    scale: float,
    dropout_p: float = 0.0,
) -> Tensor:
    """Softmax attention with the decomposed relative-position bias folded into augmented q/k.

    Args:
        q, k, v: (B*heads) x N x d, N = H * W tokens in row-major order.
        rel_pos_h: (2H' - 1) x d relative position table for the height axis (resampled to 2H - 1 if needed).
        rel_pos_w: (2W' - 1) x d for the width axis.
        size: (H, W) token grid of both query and key (SAM's blocks attend within one grid).
        scale: the q . k scale (head_dim ** -0.5); the bias terms are not scaled, as in SAM.
        dropout_p: attention dropout probability.

    Returns:
        (B*heads) x N x d, equal to timm's `Attention` with `use_rel_pos=True` (up to float rounding).
    """
    height, width = size
    bh, n, dim = q.shape
    rh = get_rel_pos(height, height, rel_pos_h).to(q.dtype)  # H x H x d: [ih, jh]
    rw = get_rel_pos(width, width, rel_pos_w).to(q.dtype)  # W x W x d: [iw, jw]
    grid_q = q.reshape(bh, height, width, dim)
    rel_h = torch.einsum("bhwc,hkc->bhwk", grid_q, rh).reshape(bh, n, height)  # BH x N x H
    rel_w = torch.einsum("bhwc,wkc->bhwk", grid_q, rw).reshape(bh, n, width)  # BH x N x W
    # Zero columns add nothing to q'.k' but round the width up to the 8-element alignment fused kernels want.
    pad = -(dim + height + width) % 8
    q_aug = torch.cat([q * scale, rel_h, rel_w, q.new_zeros(bh, n, pad)], dim=-1)  # BH x N x E
    codes = _key_position_codes(height, width, pad, k).expand(bh, -1, -1)  # BH x N x (H + W + pad)
    k_aug = torch.cat([k, codes], dim=-1)  # BH x N x E, E = d + H + W + pad
    if q.device.type == "cpu":
        # The CPU flash kernel needs v as wide as q and k (else SDPA falls back to the math path, which builds
        # the N x N scores); CUDA's memory-efficient kernel takes a narrower v, so it is padded only here.
        out = F.scaled_dot_product_attention(
            q_aug, k_aug, F.pad(v, (0, q_aug.shape[-1] - dim)), dropout_p=dropout_p, scale=1.0
        )
        return out[..., :dim]
    return F.scaled_dot_product_attention(q_aug, k_aug, v, dropout_p=dropout_p, scale=1.0)


def _key_position_codes(height: int, width: int, pad: int, like: Tensor) -> Tensor:
    """1 x N x (H + W + pad): for key j at (jh, jw), one-hot row jh, one-hot column jw, then `pad` zeros."""
    rows = torch.arange(height, device=like.device).repeat_interleave(width)  # N: jh
    cols = torch.arange(width, device=like.device).repeat(height)  # N: jw
    codes = torch.cat(
        [
            rows[:, None] == torch.arange(height, device=like.device),
            cols[:, None] == torch.arange(width, device=like.device),
            rows.new_zeros(height * width, pad, dtype=torch.bool),
        ],
        dim=1,
    )  # N x (H + W + pad) bool
    return codes.to(like.dtype)[None]


class RelPosAttention(Attention):
    """timm's SAM `Attention` (same parameters: qkv, proj, rel_pos_h, rel_pos_w) with `rel_pos_attention`.

    Adds no state, only a forward, so it can replace timm's class on an already-built block and every
    checkpoint (official, timm, samlight) loads unchanged.
    """

    def forward(self, x: Tensor) -> Tensor:
        """x: B x H x W x C -> B x H x W x C."""
        if not self.use_rel_pos or self.rope is not None:
            return super().forward(x)
        batch, height, width, _ = x.shape
        n = height * width
        qkv = self.qkv(x.reshape(batch, n, -1)).view(batch, n, 3, self.num_heads, -1)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).reshape(3, batch * self.num_heads, n, -1).unbind(0)  # BH x N x d
        q, k = self.q_norm(q), self.k_norm(k)
        out = rel_pos_attention(
            q,
            k,
            v,
            self.rel_pos_h,
            self.rel_pos_w,
            (height, width),
            scale=self.scale,
            dropout_p=self.attn_drop.p if self.training else 0.0,
        )  # BH x N x d
        out = out.view(batch, self.num_heads, n, -1).transpose(1, 2).reshape(batch, n, -1)  # B x N x C
        out = self.proj_drop(self.proj(out))
        return out.view(batch, height, width, -1)


def use_rel_pos_attention(blocks: torch.nn.Module) -> None:
    """Switch every timm SAM `Attention` under `blocks` to `RelPosAttention`, in place (weights untouched)."""
    for module in blocks.modules():
        if type(module) is Attention:
            # timm's Block has no hook for its attention class; the subclass adds only a forward, so
            # re-classing keeps parameters, buffers and state-dict names exactly as built.
            module.__class__ = RelPosAttention
