"""`build_sam`: the one place that turns a variant's numbers into a `Sam`, optionally with weights."""

from __future__ import annotations

import logging
import os

import torch

from samlight.modeling.checkpoint import load_encoder_weights, load_into, load_state_dict
from samlight.modeling.image_encoder import ImageEncoderViT
from samlight.modeling.mask_decoder import MaskDecoder
from samlight.modeling.prompt_encoder import PromptEncoder
from samlight.modeling.sam import Sam
from samlight.modeling.transformer import TwoWayTransformer
from samlight.modeling.variants import VARIANTS, SamConfig, variant_config

__all__ = ["VARIANTS", "SamConfig", "build_from_config", "build_sam", "variant_config"]

log = logging.getLogger(__name__)


def build_sam(
    variant: str,
    checkpoint: str | os.PathLike | None = None,
    *,
    encoder_checkpoint: str | os.PathLike | None = None,
    **overrides,
) -> Sam:
    """Build a SAM variant (`vit_b`, `vit_l`, `vit_h`, `tiny`), optionally loading weights strictly.

    Args:
        variant: name in `VARIANTS`.
        checkpoint: official .pth, Lightning .ckpt, safetensors, sharded checkpoint directory or official URL.
        encoder_checkpoint: image-encoder-only weights (MAE / timm ViT, or an `image_encoder.*` subset), the
            rest random, as SAM pre-training starts; see `samlight.modeling.checkpoint.load_encoder_weights`.
        **overrides: any `SamConfig` field, e.g. `drop_path_rate=0.4`, `grad_checkpointing=True`,
            `text_embed_dim=512`, `image_size=512`.

    Returns:
        Sam in train mode (call `.eval()` for inference).
    """
    cfg = variant_config(variant, **overrides)
    if encoder_checkpoint is not None:
        if checkpoint is not None:
            raise ValueError(
                "build_sam: give either checkpoint (a whole SAM) or encoder_checkpoint (the image encoder only)"
            )
        model = build_from_config(cfg)
        load_encoder_weights(model, encoder_checkpoint)
        return model
    if checkpoint is None:
        return build_from_config(cfg)
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
