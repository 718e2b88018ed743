"""Model FLOPs of SAM training, counted by PyTorch on the real modules, and the peak bf16 FLOPS of common devices.

The counts come from `torch.utils.flop_counter.FlopCounterMode` running the model's own `encode_images` and `decode`
on a meta-device copy of it: every matmul, convolution and attention is seen with its real shapes, yet nothing is
computed and no weights are copied, so counting ViT-H takes about a second. One multiply-add counts as 2 FLOPs. A
training step is forward + backward = 3x the forward FLOPs of every part that receives gradients (the usual MFU
convention: activation-checkpointing recomputation is not counted as useful work).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from functools import lru_cache

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from samlight.prompts.types import Prompts

# Dense (no sparsity) bf16 tensor-core peaks from the vendors' datasheets, FLOP/s. Matched against
# `torch.cuda.get_device_name()` in order, first hit wins, so more specific names come first.
PEAK_BF16_FLOPS: tuple[tuple[str, float], ...] = (
    ("GH200", 989e12),
    ("H200", 989e12),
    ("H100 NVL", 835e12),
    ("H100 PCIE", 756e12),
    ("H100", 989e12),  # SXM (e.g. "NVIDIA H100 80GB HBM3")
    ("H800", 989e12),
    ("B200", 2250e12),
    ("A100", 312e12),
    ("A800", 312e12),
    ("L40S", 362e12),
    ("L40", 181e12),
    ("L4", 121e12),
    ("A10", 125e12),  # "NVIDIA A10"; the AWS A10G has a lower clock and is left unknown below
    ("MI300X", 1307e12),
    ("MI250X", 383e12),
)
_UNKNOWN_DEVICES = ("A10G",)


def peak_bf16_flops(device: torch.device | str | None = None) -> float | None:
    """Peak dense bf16 FLOP/s of a CUDA device, or None when the device is not a known GPU (CPU, unlisted GPU).

    None means "do not report MFU" rather than a guess; pass `peak_flops` to the Throughput callback instead.
    """
    device = torch.device("cuda" if device is None else device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    return peak_bf16_flops_for_name(torch.cuda.get_device_name(device))


def peak_bf16_flops_for_name(name: str) -> float | None:
    """Look up a device name such as "NVIDIA H100 80GB HBM3" in `PEAK_BF16_FLOPS` (case-insensitive)."""
    upper = name.upper()
    if any(unknown in upper for unknown in _UNKNOWN_DEVICES):
        return None
    for pattern, flops in PEAK_BF16_FLOPS:
        if pattern in upper:
            return flops
    return None


@dataclass(frozen=True)
class SamFlops:
    """Forward FLOPs of one SAM model at its input size.

    Attributes:
        encoder_per_image: image encoder forward, one S x S image.
        decoder_per_mask: one `decode` call (prompt encoder + mask decoder) for one mask, i.e. one mask in one
            round of the interactive loop.
        decoder_per_call: the part of a `decode` call that does not grow with the number of masks (usually ~0).
    """

    encoder_per_image: int
    decoder_per_mask: int
    decoder_per_call: int = 0

    def training_step(
        self, *, images: float, masks: float, rounds: int, encoder_trainable: bool = True
    ) -> float:
        """Model FLOPs of one training step: encoder per image + decoder per mask per round, x3 where trained.

        A frozen encoder runs forward only (x1); prompt encoder and mask decoder always train (x3).
        """
        encoder = self.encoder_per_image * images * (3 if encoder_trainable else 1)
        decoder = 3 * rounds * (self.decoder_per_mask * masks + self.decoder_per_call)
        return float(encoder + decoder)


def count_sam_flops(model: nn.Module, *, multimask_output: bool = True) -> SamFlops:
    """Count the forward FLOPs of `model` (a `samlight.Sam`) with FlopCounterMode on a meta-device copy.

    Call it on an unsharded model (before `apply_fsdp`): sharded parameters would need collectives. The decoder is
    measured with the prompt of a corrective round (one point plus the previous logits as mask input), whose cost
    is within a few percent of every other prompt mix because the two-way transformer dominates.
    """
    _check_unsharded(model)
    model = _meta_copy(model)
    size = int(model.image_size)
    images = torch.zeros(1, 3, size, size, device="meta")
    with FlopCounterMode(display=False) as counter:
        embeddings = model.encode_images(images)  # 1 x C x h x w
    encoder = counter.get_total_flops()
    one = _decode_flops(model, embeddings, num_masks=1, multimask_output=multimask_output)
    two = _decode_flops(model, embeddings, num_masks=2, multimask_output=multimask_output)
    return SamFlops(encoder_per_image=encoder, decoder_per_mask=two - one, decoder_per_call=2 * one - two)


def _decode_flops(
    model: nn.Module, embeddings: torch.Tensor, *, num_masks: int, multimask_output: bool
) -> int:
    h, w = embeddings.shape[-2:]
    device = embeddings.device
    prompts = Prompts(
        point_coords=torch.zeros(num_masks, 1, 2, device=device),  # N x 1 x 2
        point_labels=torch.ones(num_masks, 1, dtype=torch.long, device=device),  # N x 1
        mask_inputs=torch.zeros(num_masks, 1, 4 * h, 4 * w, device=device),  # N x 1 x S/4 x S/4
    )
    image_index = torch.zeros(num_masks, dtype=torch.long, device=device)
    with FlopCounterMode(display=False) as counter:
        model.decode(embeddings, image_index, prompts, multimask_output=multimask_output)
    return counter.get_total_flops()


def _meta_copy(model: nn.Module) -> nn.Module:
    """A structural copy of `model` whose parameters and buffers live on the meta device (no weights copied)."""
    # deepcopy consults `memo` by object id first, so each tensor is replaced by its meta twin instead of copied.
    memo: dict[int, torch.Tensor] = {}
    for param in model.parameters():
        memo[id(param)] = nn.Parameter(
            torch.empty_like(param, device="meta"), requires_grad=param.requires_grad
        )
    for buffer in model.buffers():
        memo[id(buffer)] = torch.empty_like(buffer, device="meta")
    twin = copy.deepcopy(model, memo)
    # Model FLOPs, as MFU means them: the attention as defined (timm's q.k + bias), not the wider q'.k' that
    # RelPosAttention computes to avoid the N x N bias (an implementation cost, like recomputation).
    from timm.models.vision_transformer_sam import Attention

    from samlight.modeling.attention import RelPosAttention

    for module in twin.modules():
        if type(module) is RelPosAttention:
            module.__class__ = Attention
    return twin


def _check_unsharded(model: nn.Module) -> None:
    from torch.distributed.tensor import DTensor

    if any(isinstance(p, DTensor) for p in model.parameters()):
        raise ValueError(
            "count_sam_flops got a sharded (FSDP2/DTensor) model; count before apply_fsdp, or count on "
            "build_sam(variant) with the same settings (FLOPs do not depend on the weights)."
        )


@lru_cache(maxsize=8)
def count_variant_flops(variant: str, *, multimask_output: bool = True, **overrides: object) -> SamFlops:
    """`count_sam_flops` of `build_sam(variant, **overrides)`, built on the meta device (no weights allocated). Cached."""
    from samlight import build_sam

    with torch.device("meta"):
        model = build_sam(variant, **overrides)
    return count_sam_flops(model, multimask_output=multimask_output)
