"""The Segment Anything Model: image encoder + prompt encoder + mask decoder, and the batched decode path."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from samlight.modeling.image_encoder import ImageEncoderViT
from samlight.modeling.mask_decoder import MaskDecoder
from samlight.modeling.prompt_encoder import PromptEncoder
from samlight.modeling.transforms import PIXEL_MEAN, PIXEL_STD, normalize_and_pad
from samlight.prompts.types import Prompts


class Sam(nn.Module):
    """SAM with the official submodule names (so official checkpoints load strictly).

    `encode_images` runs once per image; `decode` then serves any number of prompts over those images.
    Nothing here disables autograd: the same modules train and infer.
    """

    mask_threshold: float = 0.0
    image_format: str = "RGB"

    def __init__(
        self,
        *,
        image_encoder: ImageEncoderViT,
        prompt_encoder: PromptEncoder,
        mask_decoder: MaskDecoder,
        pixel_mean: tuple[float, float, float] = PIXEL_MEAN,
        pixel_std: tuple[float, float, float] = PIXEL_STD,
    ) -> None:
        super().__init__()
        self.image_encoder = image_encoder
        self.prompt_encoder = prompt_encoder
        self.mask_decoder = mask_decoder
        self._pixel_stats = (tuple(pixel_mean), tuple(pixel_std))
        self.reset_pixel_buffers()

    def reset_pixel_buffers(self) -> None:
        """(Re)create the pixel mean/std buffers (3 x 1 x 1), e.g. after building on the meta device.

        Not persistent: the official checkpoints do not store them, so loading never fills them.
        """
        mean, std = self._pixel_stats
        device = (
            None if not hasattr(self, "pixel_mean") or self.pixel_mean.is_meta else self.pixel_mean.device
        )
        self.register_buffer("pixel_mean", torch.tensor(mean, device=device).view(-1, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(std, device=device).view(-1, 1, 1), persistent=False)

    @property
    def image_size(self) -> int:
        """S, the side of the square padded model input."""
        return self.prompt_encoder.input_image_size[0]

    @property
    def device(self) -> torch.device:
        return self.pixel_mean.device

    def preprocess(self, images: Tensor) -> Tensor:
        """Resized 0-255 images (B x 3 x h x w, h, w <= S) -> normalised, zero-padded B x 3 x S x S."""
        return normalize_and_pad(images, self.pixel_mean, self.pixel_std, self.image_size)

    def encode_images(self, images: Tensor) -> Tensor:
        """images: B x 3 x S x S normalised + padded -> image embeddings B x C x S/16 x S/16."""
        if images.ndim != 4 or images.shape[1] != 3 or tuple(images.shape[-2:]) != (self.image_size,) * 2:
            raise ValueError(
                f"encode_images expects B x 3 x {self.image_size} x {self.image_size} normalised, padded images, "
                f"got {tuple(images.shape)}; use samlight.modeling.transforms (resize_longest_image, normalize_and_pad)"
            )
        return self.image_encoder(images)

    def decode(
        self,
        image_embeddings: Tensor,
        image_index: Tensor,
        prompts: Prompts,
        multimask_output: bool | Tensor,
    ) -> tuple[Tensor, Tensor]:
        """Batched path: N prompts over B images, the training hot path.

        Args:
            image_embeddings: B x C x h x w from `encode_images`.
            image_index: N long, the image of each prompt.
            prompts: N prompts, coordinates in input pixels (the S x S frame).
            multimask_output: True -> the 3 multimask outputs; False -> the single output; N bool -> per prompt
                (K = 3, the single output repeated where False; see `MaskDecoder.forward`).

        Returns:
            low_res_logits: N x K x 4h x 4w; iou_predictions: N x K; K = 3 if multimask_output else 1.
        """
        self._check_mask_inputs(prompts)
        sparse, dense = self.prompt_encoder.embed(prompts)  # N x T x C, N x C x h x w or 1 x C x 1 x 1
        return self.mask_decoder(
            image_embeddings=image_embeddings,
            image_pe=self.prompt_encoder.get_dense_pe(),
            sparse_prompt_embeddings=sparse.to(image_embeddings.dtype),
            dense_prompt_embeddings=dense.to(image_embeddings.dtype),
            multimask_output=multimask_output,
            image_index=image_index,
        )

    def forward(
        self, images: Tensor, image_index: Tensor, prompts: Prompts, multimask_output: bool = False
    ) -> tuple[Tensor, Tensor]:
        """`encode_images` then `decode`; see those for shapes."""
        return self.decode(self.encode_images(images), image_index, prompts, multimask_output)

    def postprocess_masks(
        self, masks: Tensor, input_size: tuple[int, int], original_size: tuple[int, int]
    ) -> Tensor:
        """Low-res logits N x K x 4h x 4w -> N x K x H x W logits in the original image frame (as official)."""
        masks = F.interpolate(masks, (self.image_size, self.image_size), mode="bilinear", align_corners=False)
        masks = masks[..., : input_size[0], : input_size[1]]
        return F.interpolate(masks, tuple(original_size), mode="bilinear", align_corners=False)

    def _check_mask_inputs(self, prompts: Prompts) -> None:
        expected = tuple(self.prompt_encoder.mask_input_size)
        m = prompts.mask_inputs
        if m is not None and (m.ndim != 4 or m.shape[1] != 1 or tuple(m.shape[-2:]) != expected):
            raise ValueError(
                f"Prompts.mask_inputs must be N x 1 x {expected[0]} x {expected[1]} logits (S/4 of the input), "
                f"got {tuple(m.shape)}"
            )
