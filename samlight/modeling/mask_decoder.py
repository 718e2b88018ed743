"""SAM's mask decoder: output tokens + prompt tokens + image embedding -> mask logits and predicted IoU.

Parameter names follow the official checkpoints. `predict_masks` serves N prompts over B images through an
`image_index` (prompt -> image) gather, so the image embedding is never repeated per prompt before the
transformer, and the positional encoding is broadcast.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from samlight.modeling.common import MLP, LayerNorm2d


class MaskDecoder(nn.Module):
    """Predicts `num_multimask_outputs` + 1 masks per prompt and an IoU estimate for each.

    Output 0 is the single-mask output (for unambiguous prompts); outputs 1..3 are the multimask outputs.
    """

    def __init__(
        self,
        *,
        transformer_dim: int,
        transformer: nn.Module,
        num_multimask_outputs: int = 3,
        activation: type[nn.Module] = nn.GELU,
        iou_head_depth: int = 3,
        iou_head_hidden_dim: int = 256,
    ) -> None:
        super().__init__()
        self.transformer_dim = transformer_dim
        self.transformer = transformer
        self.num_multimask_outputs = num_multimask_outputs
        self.num_mask_tokens = num_multimask_outputs + 1
        self.iou_token = nn.Embedding(1, transformer_dim)
        self.mask_tokens = nn.Embedding(self.num_mask_tokens, transformer_dim)
        self.output_upscaling = nn.Sequential(
            nn.ConvTranspose2d(transformer_dim, transformer_dim // 4, kernel_size=2, stride=2),
            LayerNorm2d(transformer_dim // 4),
            activation(),
            nn.ConvTranspose2d(transformer_dim // 4, transformer_dim // 8, kernel_size=2, stride=2),
            activation(),
        )
        self.output_hypernetworks_mlps = nn.ModuleList(
            MLP(
                input_dim=transformer_dim,
                hidden_dim=transformer_dim,
                output_dim=transformer_dim // 8,
                num_layers=3,
            )
            for _ in range(self.num_mask_tokens)
        )
        self.iou_prediction_head = MLP(
            input_dim=transformer_dim,
            hidden_dim=iou_head_hidden_dim,
            output_dim=self.num_mask_tokens,
            num_layers=iou_head_depth,
        )

    def forward(
        self,
        image_embeddings: Tensor,
        image_pe: Tensor,
        sparse_prompt_embeddings: Tensor,
        dense_prompt_embeddings: Tensor,
        multimask_output: bool | Tensor,
        image_index: Tensor | None = None,
    ) -> tuple[Tensor, Tensor]:
        """Official signature, plus an optional `image_index` for several images and per-prompt outputs.

        Args:
            image_embeddings: B x C x h x w.
            image_pe: 1 x C x h x w.
            sparse_prompt_embeddings: N x T x C.
            dense_prompt_embeddings: N x C x h x w, or 1 x C x 1 x 1 to broadcast (no mask input).
            multimask_output: True -> outputs 1..3, False -> output 0; an N bool tensor chooses per prompt
                (K = 3: outputs 1..3 where True, output 0 repeated 3 times where False, so one call with static
                shapes serves ambiguous and unambiguous prompts together).
            image_index: N long, the image of each prompt; None means B == 1 (shared) or B == N (paired).

        Returns:
            masks: N x K x 4h x 4w logits; iou_pred: N x K, with K = 3 if multimask_output else 1.
        """
        masks, iou_pred = self.predict_masks(
            image_embeddings=image_embeddings,
            image_pe=image_pe,
            sparse_prompt_embeddings=sparse_prompt_embeddings,
            dense_prompt_embeddings=dense_prompt_embeddings,
            image_index=image_index,
        )
        if isinstance(multimask_output, Tensor):
            multi = multimask_output.view(-1, 1)  # N x 1
            single = masks[:, :1].expand(-1, self.num_multimask_outputs, -1, -1)  # N x 3 x 4h x 4w
            masks = torch.where(multi[..., None, None], masks[:, 1:], single)
            iou_pred = torch.where(multi, iou_pred[:, 1:], iou_pred[:, :1].expand(-1, self.num_multimask_outputs))
            return masks, iou_pred
        keep = slice(1, None) if multimask_output else slice(0, 1)
        return masks[:, keep], iou_pred[:, keep]

    def predict_masks(
        self,
        *,
        image_embeddings: Tensor,
        image_pe: Tensor,
        sparse_prompt_embeddings: Tensor,
        dense_prompt_embeddings: Tensor,
        image_index: Tensor | None = None,
    ) -> tuple[Tensor, Tensor]:
        """All num_mask_tokens outputs: masks N x (1 + M) x 4h x 4w, iou_pred N x (1 + M). Args as `forward`."""
        n = sparse_prompt_embeddings.shape[0]
        output_tokens = torch.cat([self.iou_token.weight, self.mask_tokens.weight], dim=0)  # (1 + M) x C
        tokens = torch.cat([output_tokens.expand(n, -1, -1), sparse_prompt_embeddings], dim=1)  # N x T' x C

        # Each prompt's image embedding plus its dense prompt; the result is the only per-prompt copy of the
        # image embedding, which the transformer needs anyway (it updates the image tokens per prompt).
        src = self._image_plus_dense(
            image_embeddings, dense_prompt_embeddings, image_index, n
        )  # N x C x h x w
        n, c, h, w = src.shape

        hs, src = self.transformer(src, image_pe, tokens)  # N x T' x C, N x hw x C
        iou_token_out = hs[:, 0]  # N x C
        mask_tokens_out = hs[:, 1 : 1 + self.num_mask_tokens]  # N x (1 + M) x C

        upscaled = self.output_upscaling(src.transpose(1, 2).reshape(n, c, h, w))  # N x C/8 x 4h x 4w
        hyper_in = torch.stack(
            [mlp(mask_tokens_out[:, i]) for i, mlp in enumerate(self.output_hypernetworks_mlps)], dim=1
        )  # N x (1 + M) x C/8
        _, c8, hh, ww = upscaled.shape
        masks = (hyper_in @ upscaled.reshape(n, c8, hh * ww)).reshape(n, -1, hh, ww)
        return masks, self.iou_prediction_head(iou_token_out)

    @staticmethod
    def _image_plus_dense(
        image_embeddings: Tensor, dense: Tensor, image_index: Tensor | None, n: int
    ) -> Tensor:
        """image_embeddings B x C x h x w, dense N x C x h x w or 1 x C x 1 x 1 -> N x C x h x w.

        With `image_index` the gather and the add are one matmul, dense + one_hot(index) @ images: its backward
        is a matmul too, where `index_select`'s backward (a scatter-add) was 11% of a CPU training step.
        """
        b, c, h, w = image_embeddings.shape
        if image_index is not None:
            # A comparison, not F.one_hot, which checks the index range with a host sync on some devices.
            images = torch.arange(b, device=image_index.device)
            one_hot = (image_index[:, None] == images).to(image_embeddings.dtype)  # N x B
            dense_flat = dense.expand(-1, c, h, w).reshape(dense.shape[0], c * h * w)  # N (or 1) x Chw
            return torch.addmm(dense_flat, one_hot, image_embeddings.reshape(b, c * h * w)).view(n, c, h, w)
        if b not in (1, n):
            raise ValueError(
                f"MaskDecoder: {b} image embeddings for {n} prompts; pass image_index (N long) to say which "
                "image each prompt belongs to"
            )
        return image_embeddings.expand(n, -1, -1, -1) + dense
