"""FSDP2 for SAM: which modules become sharding units, in which precision, on which device mesh.

`apply_fsdp` is what `SamModule.configure_model` calls under `samlight.scale.strategy.FSDP2Strategy` (or Lightning's
`ModelParallelStrategy`). Units: every image-encoder block, the encoder neck, the rest of the image encoder (patch
embedding, absolute position embedding), and the root `Sam`, which holds the prompt encoder and the mask decoder.
A frozen image encoder is therefore always in units of its own, never mixed with trainable parameters.

Why the decoder is not a unit of its own: a training step decodes 11 rounds per prompt-type group, and how many
groups a rank runs depends on its own random draw. FSDP2 all-gathers and reduce-scatters a unit around *every*
call whose inputs need gradients, so a decoder unit would communicate up to ~20 times a step and, worse, a
different number of times on different ranks, which deadlocks the collectives. In the root unit it is gathered
once by `encode_images` (the only method registered with FSDP; its input images need no gradient) and its
gradients are reduce-scattered once, in FSDP's end-of-backward callback, in the same order on every rank. It
holds ~4M parameters, so keeping it gathered for the whole step costs ~8-16 MB.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method

_DTYPES = {
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}


def apply_fsdp(
    model: nn.Module,
    device_mesh: DeviceMesh,
    *,
    reshard_after_forward: bool = True,
    hybrid: bool = False,
    mp_param_dtype: str | torch.dtype | None = "auto",
    activation_checkpointing: bool = False,
) -> nn.Module:
    """Shard a `samlight.Sam` in place with FSDP2 (`fully_shard`) and return it.

    Args:
        model: a `Sam` (needs `image_encoder.blocks`, `image_encoder.neck`, `prompt_encoder`, `mask_decoder`).
        device_mesh: the strategy's mesh. 1-D: shard over all ranks. 2-D ("replicate", "shard"): with
            `hybrid=True`, shard inside each group of the second dim (a node) and replicate across the first (HSDP);
            with `hybrid=False` the two dims are flattened and every rank holds 1/world of each parameter.
        reshard_after_forward: free the gathered encoder blocks after their forward (ZeRO-3, least memory) or keep
            them until backward (ZeRO-2, one all-gather less per block). The root (prompt encoder and mask
            decoder) always stays gathered from `encode_images` to the end of backward.
        hybrid: hybrid sharding (needs a 2-D mesh); use it for ViT-H across nodes, where intra-node NVLink carries
            the all-gathers and only gradient all-reduces cross the slower inter-node network.
        mp_param_dtype: dtype parameters are all-gathered and computed in ("bfloat16", "float16", a torch dtype);
            gradients are always reduced in float32 and the sharded master weights stay float32. "auto" means
            bfloat16 on CUDA and full precision elsewhere (CPU bf16 matmuls are slow); None disables it. Pair a
            16-bit dtype with `trainer.precision: bf16-mixed` (configs/fsdp.yaml does): `decode` is not an FSDP
            method, so only autocast reconciles its float32 prompt tensors with 16-bit decoder weights.
        activation_checkpointing: recompute each encoder block's activations in backward instead of storing them
            (timm's per-block checkpointing; memory per block drops to its input).

    Returns:
        The same `model`, now an `FSDPModule`. Call `encode_images` before `decode` in every step (as
        `SamModule` does): it is the call that gathers the root's parameters.
    """
    mesh = _fsdp_mesh(device_mesh, hybrid=hybrid)
    policy = _mixed_precision(mp_param_dtype, device_type=mesh.device_type)
    encoder = model.image_encoder
    if activation_checkpointing:
        if not hasattr(encoder, "set_grad_checkpointing"):
            raise TypeError(
                f"activation_checkpointing=True needs an image encoder with set_grad_checkpointing(); "
                f"{type(encoder).__name__} has none."
            )
        encoder.set_grad_checkpointing(True)

    blocks = list(encoder.blocks)
    for index, block in enumerate(blocks):
        # The last block's parameters are needed again first in backward: keeping them avoids a re-gather.
        keep = not reshard_after_forward or index == len(blocks) - 1
        fully_shard(block, mesh=mesh, reshard_after_forward=not keep, mp_policy=policy)
    if _has_parameters(encoder.neck):
        fully_shard(encoder.neck, mesh=mesh, reshard_after_forward=reshard_after_forward, mp_policy=policy)
    fully_shard(encoder, mesh=mesh, reshard_after_forward=reshard_after_forward, mp_policy=policy)
    fully_shard(model, mesh=mesh, reshard_after_forward=False, mp_policy=policy)
    _touch_root_parameters(model)
    # Training calls `encode_images`, not `forward`: FSDP must run its root hooks around it (lazy init, gathering
    # the root's parameters for the decode calls that follow). `decode` is deliberately not registered (see above).
    register_fsdp_forward_method(model, "encode_images")
    return model


def _touch_root_parameters(model: nn.Module) -> None:
    """Make every trainable root parameter receive a gradient (of zeros if unused) in every step.

    FSDP2 reduce-scatters only the parameters that have a gradient. Which prompt-encoder parameters are used
    depends on the prompts a rank drew (box corner embeddings only with boxes, the text projection only with text,
    `no_mask_embed` only without a mask prompt), so ranks would enter the reduce-scatter with different sizes and
    hang. Adding 0 x (one element of each) to the image embeddings costs one tiny op per parameter. The one
    visible effect: AdamW then applies weight decay (and leftover momentum) to a parameter no rank used in a step,
    which a single process would skip.
    """
    encode_images = model.encode_images
    root_parts = (model.prompt_encoder, model.mask_decoder)

    def encode_images_touching_all(images: torch.Tensor) -> torch.Tensor:
        embeddings = encode_images(images)  # B x C x h x w
        if not torch.is_grad_enabled():
            return embeddings
        # Read the parameters now, not at setup: inside FSDP's forward they are the gathered (unsharded) tensors.
        firsts = [p.reshape(-1)[:1] for part in root_parts for p in part.parameters() if p.requires_grad]
        if not firsts:
            return embeddings
        return embeddings + 0.0 * torch.cat(firsts).sum().to(embeddings.dtype)

    model.encode_images = encode_images_touching_all


def _fsdp_mesh(device_mesh: DeviceMesh, *, hybrid: bool) -> DeviceMesh:
    if hybrid:
        if device_mesh.ndim != 2:
            raise ValueError(
                f"apply_fsdp(hybrid=True) needs a 2-D (replicate, shard) device mesh, got a {device_mesh.ndim}-D mesh "
                f"of shape {tuple(device_mesh.shape)}. Use strategy samlight.scale.strategy.FSDP2Strategy, which builds one "
                "(shard_size = devices per node by default), or set hybrid: false."
            )
        return device_mesh
    if device_mesh.ndim == 1:
        return device_mesh
    return device_mesh._flatten()


def _mixed_precision(mp_param_dtype: str | torch.dtype | None, *, device_type: str) -> MixedPrecisionPolicy:
    if mp_param_dtype == "auto":
        mp_param_dtype = torch.bfloat16 if device_type == "cuda" else None
    if isinstance(mp_param_dtype, str):
        if mp_param_dtype not in _DTYPES:
            raise ValueError(
                f"fsdp mp_param_dtype={mp_param_dtype!r} is not one of {sorted(_DTYPES)}, 'auto' or null "
                "(model.fsdp_options.mp_param_dtype in the config)."
            )
        mp_param_dtype = _DTYPES[mp_param_dtype]
    if mp_param_dtype is None:
        return MixedPrecisionPolicy()
    # float32 reductions: summing bf16 gradients over hundreds of ranks loses the small ones.
    return MixedPrecisionPolicy(param_dtype=mp_param_dtype, reduce_dtype=torch.float32)


def _has_parameters(module: nn.Module) -> bool:
    return any(True for _ in module.parameters())
