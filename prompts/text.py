"""`TextPrompt`: a CLIP embedding as the prompt (paper D.5); image crops while training, text at inference.

The CLIP model is open_clip, frozen, loaded from a local weights file and kept outside the LightningModule's
parameters (it is neither trained nor saved). The model's `prompt_encoder.text_proj` maps its embedding into the
prompt token space.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from samlight.modeling.transforms import PIXEL_MEAN, PIXEL_STD
from samlight.prompts.base import PromptContext, PromptType
from samlight.prompts.box import boxes_from_masks
from samlight.prompts.types import Prompts

# SAM's pixel normalisation (on 0-255), needed to turn batch images back into pixels for CLIP.


class TextPrompt(PromptType):
    """One CLIP embedding per mask, l2-normalised.

    Training (paper D.5): the CLIP image embedding of a crop around the mask, its box expanded by a random
    factor in `crop_expand`, pixels outside the mask zeroed with probability `zero_outside_prob`; masks whose box
    is smaller than `min_mask_side` on either side get loss weight 0. Precomputed per-mask embeddings carried by
    the batch (`batch.text_embeddings`) take precedence. Inference: `encode_text(["a dog", ...])`.

    Args:
        clip_model: open_clip model name (e.g. "ViT-B-16") or a config dict for `open_clip.CLIP`
            (embed_dim, vision_cfg, text_cfg); None when only precomputed embeddings are used.
        clip_weights: local path of the CLIP weights (open_clip `pretrained=` file); None keeps random weights
            (tests only: a warning says so).
        embed_dim: CLIP embedding width; needed only when `clip_model` is None.
        min_mask_side: masks whose box is narrower or lower than this (input pixels) are skipped.
        crop_expand: (low, high) range of the random box expansion factor.
        zero_outside_prob: probability of zeroing the pixels outside the mask in the crop.
    """

    name = "text"

    def __init__(
        self,
        *,
        clip_model: str | dict[str, Any] | None = None,
        clip_weights: str | None = None,
        embed_dim: int | None = None,
        min_mask_side: int = 100,
        crop_expand: tuple[float, float] = (1.0, 2.0),
        zero_outside_prob: float = 0.5,
    ) -> None:
        if clip_model is None and embed_dim is None:
            raise ValueError(
                "TextPrompt needs a CLIP model (clip_model=<open_clip name or config dict>, clip_weights=<local "
                "file>) or, for precomputed per-mask embeddings in the shards, their width (embed_dim=...)."
            )
        self.clip_model = clip_model
        self.clip_weights = clip_weights
        self._embed_dim = embed_dim
        self.min_mask_side = min_mask_side
        self.crop_expand = tuple(crop_expand)
        self.zero_outside_prob = zero_outside_prob
        self._clip: list[torch.nn.Module] = []  # a list keeps CLIP out of the LightningModule's parameters

    def __repr__(self) -> str:
        return f"TextPrompt(clip_model={self.clip_model!r}, clip_weights={self.clip_weights!r})"

    @property
    def text_embed_dim(self) -> int:
        if self._embed_dim is not None:
            return self._embed_dim
        if isinstance(self.clip_model, dict):
            return int(self.clip_model["embed_dim"])
        import open_clip

        config = open_clip.get_model_config(self.clip_model)
        if config is None:
            raise ValueError(f"TextPrompt: open_clip knows no model named {self.clip_model!r}")
        return int(config["embed_dim"])

    def mask_weights(self, gt_masks: Tensor, *, context: PromptContext | None = None) -> Tensor:
        """N float: 1 for masks this prompt can serve (an embedding is present, or the mask is large enough)."""
        if context is not None and context.text_embeddings is not None:
            return (context.text_embeddings.float().norm(dim=-1) > 0).float()
        boxes = boxes_from_masks(gt_masks)
        sides = boxes[:, 2:] - boxes[:, :2] + 1  # N x 2
        return (sides.amin(1) >= self.min_mask_side).float()

    def sample(
        self,
        gt_masks: Tensor,
        *,
        context: PromptContext | None = None,
        generator: torch.Generator | None = None,
    ) -> Prompts:
        """N x D l2-normalised embeddings: precomputed ones when present, else CLIP image embeddings of crops."""
        if context is not None and context.text_embeddings is not None:
            return Prompts(text_embeddings=F.normalize(context.text_embeddings.float(), dim=-1))
        if self.clip_model is None:
            raise ValueError(
                "TextPrompt: the batch carries no text_embeddings and no CLIP model is configured; set "
                "clip_model and clip_weights, or write per-mask embeddings into the shards."
            )
        if context is None or context.images is None or context.image_index is None:
            raise ValueError("TextPrompt: image crops need context.images and context.image_index")
        crops = self._crops(gt_masks, context.images, context.image_index, generator)
        clip = self._model(gt_masks.device)
        with torch.no_grad():
            embeddings = clip.encode_image(crops, normalize=True)
        return Prompts(text_embeddings=embeddings.float())

    def encode_text(self, texts: list[str], device: torch.device | str = "cpu") -> Tensor:
        """len(texts) x D l2-normalised CLIP text embeddings (inference)."""
        import open_clip

        if self.clip_model is None:
            raise ValueError("TextPrompt.encode_text needs clip_model (and clip_weights) configured")
        clip = self._model(torch.device(device))
        if isinstance(self.clip_model, dict):
            context_length = self.clip_model.get("text_cfg", {}).get("context_length", 77)
            tokens = open_clip.tokenize(texts, context_length=context_length)
        else:
            tokens = open_clip.get_tokenizer(self.clip_model)(texts)
        with torch.no_grad():
            return clip.encode_text(tokens.to(device), normalize=True).float()

    def _crops(self, gt_masks: Tensor, images: Tensor, image_index: Tensor, generator) -> Tensor:
        """N x 3 x s x s crops around each mask, in CLIP's normalisation (s = CLIP input size)."""
        from torchvision.ops import roi_align

        clip = self._model(gt_masks.device)
        size = clip.visual.image_size
        size = tuple(size) if isinstance(size, (tuple, list)) else (size, size)
        n, device = gt_masks.shape[0], gt_masks.device
        boxes = boxes_from_masks(gt_masks)  # N x 4
        low, high = self.crop_expand
        scale = low + (high - low) * torch.rand(n, 1, generator=generator, device=device)  # N x 1
        center = (boxes[:, :2] + boxes[:, 2:]) / 2  # N x 2
        half = (boxes[:, 2:] - boxes[:, :2] + 1) * scale / 2  # N x 2
        boxes = torch.cat([center - half, center + half], dim=1)  # N x 4
        mean = torch.tensor(PIXEL_MEAN, device=device)[:, None, None]
        std = torch.tensor(PIXEL_STD, device=device)[:, None, None]
        pixels = (images.float() * std + mean) / 255.0  # B x 3 x S x S in [0, 1]
        crops = roi_align(pixels, torch.cat([image_index[:, None].float(), boxes], 1), size, aligned=True)
        mask_rois = torch.cat([torch.arange(n, device=device)[:, None].float(), boxes], 1)
        crop_masks = (
            roi_align(gt_masks[:, None].float(), mask_rois, size, aligned=True) > 0.5
        )  # N x 1 x s x s
        zero_outside = torch.rand(n, 1, 1, 1, generator=generator, device=device) < self.zero_outside_prob
        crops = torch.where(zero_outside & ~crop_masks, torch.zeros_like(crops), crops)
        clip_mean = torch.tensor(getattr(clip.visual, "image_mean", None) or _OPENAI_MEAN, device=device)
        clip_std = torch.tensor(getattr(clip.visual, "image_std", None) or _OPENAI_STD, device=device)
        return (crops - clip_mean[:, None, None]) / clip_std[:, None, None]

    def _model(self, device: torch.device) -> torch.nn.Module:
        if not self._clip:
            self._clip.append(self._load())
        clip = self._clip[0]
        if next(clip.parameters()).device != device:
            clip.to(device)
        return clip

    def _load(self) -> torch.nn.Module:
        import open_clip

        if self.clip_weights is None:
            warnings.warn(
                "TextPrompt: no clip_weights given, CLIP has random weights (fine for tests, useless for training)",
                stacklevel=3,
            )
        if isinstance(self.clip_model, dict):
            clip = open_clip.CLIP(**self.clip_model)
            if self.clip_weights is not None:
                state = torch.load(self.clip_weights, map_location="cpu", weights_only=True)
                clip.load_state_dict(state.get("state_dict", state))
        else:
            clip = open_clip.create_model(self.clip_model, pretrained=self.clip_weights)
        clip.eval().requires_grad_(False)
        return clip


_OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
_OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
