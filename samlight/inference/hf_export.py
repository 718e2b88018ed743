"""Hugging Face transformers interop: a `SamModel` folder (`save_pretrained` layout) from samlight weights.

The key translation lives in `samlight.modeling.weight_names` (`official_to_hf` / `hf_to_official`); this module
only turns a variant's numbers into a `transformers.SamConfig` and lets transformers write the folder, so
`SamModel.from_pretrained(folder)` is the reader it was written for.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import Tensor

from samlight.modeling.variants import SamConfig
from samlight.modeling.weight_names import official_to_hf

# The official two-way transformer uses nn.LayerNorm's default eps 1e-5 in its blocks; transformers' SamConfig
# defaults to 1e-6 there (facebook/sam-vit-* configs too). Writing 1e-5 makes the HF model compute what samlight
# and segment_anything compute; the weights are the same either way.
OFFICIAL_DECODER_LAYER_NORM_EPS = 1e-5


def hf_config_kwargs(cfg: SamConfig) -> dict[str, dict]:
    """`transformers.SamConfig(**kwargs)` arguments for a samlight variant config (at its encoder size).

    The HF vision encoder has no run-time position-embedding resampling, so the folder is written at the
    variant's `encoder_img_size` (1024 for the official sizes), as the official .pth is.
    """
    if cfg.text_embed_dim:
        raise ValueError(
            "the checkpoint has prompt_encoder.text_proj (text prompts, a samlight extension) and transformers' "
            "SamModel has no text prompts; export it with --format pth, or remove the text_proj keys first"
        )
    return {
        "vision_config": {
            "hidden_size": cfg.encoder_embed_dim,
            "num_hidden_layers": cfg.encoder_depth,
            "num_attention_heads": cfg.encoder_num_heads,
            "image_size": cfg.encoder_img_size,
            "patch_size": cfg.patch_size,
            "window_size": cfg.window_size,
            "global_attn_indexes": list(cfg.encoder_global_attn_indexes),
            "output_channels": cfg.prompt_embed_dim,
            "num_pos_feats": cfg.prompt_embed_dim // 2,
            "mlp_dim": 4 * cfg.encoder_embed_dim,
        },
        "prompt_encoder_config": {
            "hidden_size": cfg.prompt_embed_dim,
            "image_size": cfg.encoder_img_size,
            "patch_size": cfg.patch_size,
            "mask_input_channels": cfg.mask_in_chans,
        },
        "mask_decoder_config": {
            "hidden_size": cfg.prompt_embed_dim,
            "num_hidden_layers": cfg.decoder_depth,
            "num_attention_heads": cfg.decoder_num_heads,
            "mlp_dim": cfg.decoder_mlp_dim,
            "iou_head_hidden_dim": cfg.iou_head_hidden_dim,
            "layer_norm_eps": OFFICIAL_DECODER_LAYER_NORM_EPS,
        },
    }


def save_hf(state_dict: Mapping[str, Tensor], cfg: SamConfig, out_dir: str | os.PathLike) -> Path:
    """Write official-named SAM weights as a transformers `SamModel` folder (config.json + model.safetensors).

    Loads the renamed weights into a `SamModel` strictly first (transformers' own check: every key used, no key
    missing), then `save_pretrained`s it. Returns the folder.
    """
    try:
        from transformers import SamConfig as HFSamConfig
        from transformers import SamModel
    except ImportError as e:  # an optional extra
        raise ImportError("--format hf needs transformers: pip install 'samlight[hf]'") from e
    hf_state = official_to_hf(state_dict)
    # Built on the meta device and given the tensors: no random init of weights that are replaced anyway.
    with torch.device("meta"):
        model = SamModel(HFSamConfig(**hf_config_kwargs(cfg)))
    model.load_state_dict(hf_state, strict=True, assign=True)
    model.tie_weights()
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(p.name not in _HF_FILES for p in out.iterdir())):
        raise FileExistsError(
            f"{out} exists and is not a samlight HF export folder; choose a new --out (nothing was written)"
        )
    # Written next to the target and renamed: a crash never leaves a half-written folder under `out`.
    tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        model.save_pretrained(tmp)
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


_HF_FILES = {"config.json", "model.safetensors", "generation_config.json"}
