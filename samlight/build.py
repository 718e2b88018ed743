"""Model variants (numbers only) and `build_sam`, the one place that turns them into a `Sam`."""

from __future__ import annotations

import dataclasses
import logging
import os
from dataclasses import dataclass

import torch

from samlight.modeling.image_encoder import ImageEncoderViT
from samlight.modeling.mask_decoder import MaskDecoder
from samlight.modeling.prompt_encoder import PromptEncoder
from samlight.modeling.sam import Sam
from samlight.modeling.transformer import TwoWayTransformer

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SamConfig:
    """The numbers that define a SAM variant; `build_sam(variant, **overrides)` replaces any of them.

    `encoder_img_size` fixes the encoder's parameter shapes (absolute position embedding); `image_size` is the
    model input S. They differ when fine-tuning at a lower resolution: timm resamples the position embeddings
    at run time, so the official weights still load.
    """

    image_size: int
    encoder_img_size: int
    patch_size: int
    encoder_embed_dim: int
    encoder_depth: int
    encoder_num_heads: int
    encoder_global_attn_indexes: tuple[int, ...]
    window_size: int
    prompt_embed_dim: int
    mask_in_chans: int
    decoder_depth: int
    decoder_num_heads: int
    decoder_mlp_dim: int
    iou_head_hidden_dim: int
    drop_path_rate: float = 0.0
    grad_checkpointing: bool = False
    text_embed_dim: int | None = None


def _official(embed_dim: int, depth: int, num_heads: int, global_attn: tuple[int, ...]) -> SamConfig:
    return SamConfig(
        image_size=1024,
        encoder_img_size=1024,
        patch_size=16,
        encoder_embed_dim=embed_dim,
        encoder_depth=depth,
        encoder_num_heads=num_heads,
        encoder_global_attn_indexes=global_attn,
        window_size=14,
        prompt_embed_dim=256,
        mask_in_chans=16,
        decoder_depth=2,
        decoder_num_heads=8,
        decoder_mlp_dim=2048,
        iou_head_hidden_dim=256,
    )


def sam_vit_b() -> SamConfig:
    return _official(768, 12, 12, (2, 5, 8, 11))


def sam_vit_l() -> SamConfig:
    return _official(1024, 24, 16, (5, 11, 17, 23))


def sam_vit_h() -> SamConfig:
    return _official(1280, 32, 16, (7, 15, 23, 31))


def sam_tiny() -> SamConfig:
    """~0.3M parameters, 256 px input: for tests and the CPU quickstart."""
    return SamConfig(
        image_size=256,
        encoder_img_size=256,
        patch_size=16,
        encoder_embed_dim=64,
        encoder_depth=2,
        encoder_num_heads=2,
        encoder_global_attn_indexes=(1,),
        window_size=8,
        prompt_embed_dim=32,
        mask_in_chans=16,
        decoder_depth=2,
        decoder_num_heads=2,
        decoder_mlp_dim=64,
        iou_head_hidden_dim=32,
    )


VARIANTS = {"vit_b": sam_vit_b, "vit_l": sam_vit_l, "vit_h": sam_vit_h, "tiny": sam_tiny}


def variant_config(variant: str, **overrides) -> SamConfig:
    """The config of `variant` with `overrides` applied; errors name the valid variants and keys."""
    if variant not in VARIANTS:
        raise ValueError(f"Unknown SAM variant {variant!r}; choose one of {sorted(VARIANTS)}")
    valid = {f.name for f in dataclasses.fields(SamConfig)}
    unknown = sorted(set(overrides) - valid)
    if unknown:
        raise TypeError(f"build_sam({variant!r}): unknown override(s) {unknown}; valid keys: {sorted(valid)}")
    cfg = dataclasses.replace(VARIANTS[variant](), **overrides)
    if cfg.image_size % cfg.patch_size:
        raise ValueError(f"image_size={cfg.image_size} must be a multiple of the patch size {cfg.patch_size}")
    if cfg.patch_size != 16:
        # The decoder upsamples the embedding grid 4x, and every mask frame in samlight (mask_inputs, fed-back
        # logits, loss targets) is S/4 as in SAM: that holds only for 16-pixel patches.
        raise ValueError(
            f"build_sam({variant!r}): patch_size={cfg.patch_size} is not supported; SAM's S/4 mask frame needs 16"
        )
    return cfg


def build_sam(variant: str, checkpoint: str | os.PathLike | None = None, **overrides) -> Sam:
    """Build a SAM variant (`vit_b`, `vit_l`, `vit_h`, `tiny`), optionally loading weights strictly.

    Args:
        variant: name in `VARIANTS`.
        checkpoint: official .pth, Lightning .ckpt, safetensors, sharded checkpoint directory or official URL.
        **overrides: any `SamConfig` field, e.g. `drop_path_rate=0.4`, `grad_checkpointing=True`,
            `text_embed_dim=512`, `image_size=512`.

    Returns:
        Sam in train mode (call `.eval()` for inference).
    """
    cfg = variant_config(variant, **overrides)
    if checkpoint is None:
        return build_from_config(cfg)
    from samlight.checkpoint import load_into, load_state_dict

    state = load_state_dict(checkpoint)
    # A text projection is new in samlight: official weights lack it, so it alone may start from random init.
    allow_missing = ("prompt_encoder.text_proj.",) if cfg.text_embed_dim else ()
    if allow_missing or torch.get_default_device().type == "meta":
        model = build_from_config(cfg)
        load_into(model, state, source=str(checkpoint), allow_missing=allow_missing)
        return model
    # Every weight comes from the file, so skip the random init (a minute for vit_h on CPU): build on the
    # meta device, check strictly, then adopt the loaded tensors.
    with torch.device("meta"):
        model = build_from_config(cfg)
    expected = model.state_dict()
    load_into(
        model,
        {k: v.to(expected[k].dtype) if k in expected else v for k, v in state.items()},
        source=str(checkpoint),
        assign=True,
    )
    model.reset_pixel_buffers()
    return model


def build_from_config(cfg: SamConfig) -> Sam:
    """Construct the modules of `cfg` with random init."""
    grid = cfg.image_size // cfg.patch_size
    image_encoder = ImageEncoderViT(
        img_size=cfg.encoder_img_size,
        patch_size=cfg.patch_size,
        embed_dim=cfg.encoder_embed_dim,
        depth=cfg.encoder_depth,
        num_heads=cfg.encoder_num_heads,
        global_attn_indexes=cfg.encoder_global_attn_indexes,
        window_size=cfg.window_size,
        out_chans=cfg.prompt_embed_dim,
        drop_path_rate=cfg.drop_path_rate,
    )
    image_encoder.img_size = cfg.image_size
    image_encoder.set_grad_checkpointing(cfg.grad_checkpointing)
    prompt_encoder = PromptEncoder(
        embed_dim=cfg.prompt_embed_dim,
        image_embedding_size=(grid, grid),
        input_image_size=(cfg.image_size, cfg.image_size),
        mask_in_chans=cfg.mask_in_chans,
        text_embed_dim=cfg.text_embed_dim,
    )
    mask_decoder = MaskDecoder(
        transformer_dim=cfg.prompt_embed_dim,
        transformer=TwoWayTransformer(
            depth=cfg.decoder_depth,
            embedding_dim=cfg.prompt_embed_dim,
            num_heads=cfg.decoder_num_heads,
            mlp_dim=cfg.decoder_mlp_dim,
        ),
        num_multimask_outputs=3,
        iou_head_depth=3,
        iou_head_hidden_dim=cfg.iou_head_hidden_dim,
    )
    return Sam(image_encoder=image_encoder, prompt_encoder=prompt_encoder, mask_decoder=mask_decoder)
