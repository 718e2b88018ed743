"""SAM variants as numbers only (`SamConfig`, one small builder per size) and the registry `VARIANTS`."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass


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
