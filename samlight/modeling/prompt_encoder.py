"""SAM's prompt encoder: points, boxes and (optionally) text become sparse tokens, a mask becomes a dense map.

Parameter names follow the official checkpoints. Besides the official call signature there is `embed(prompts)`,
the batched training path, which returns `no_mask_embed` as a 1 x C x 1 x 1 dense embedding when no mask is
given, so the decoder broadcasts it instead of materialising N copies.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from samlight.modeling.common import LayerNorm2d
from samlight.prompts.types import TEXT_LABEL, Prompts


class PositionEmbeddingRandom(nn.Module):
    """Fourier features of (x, y) positions with a fixed random Gaussian frequency matrix."""

    def __init__(self, *, num_pos_feats: int, scale: float = 1.0) -> None:
        super().__init__()
        # A persistent buffer: the official checkpoints store it, and it must match for the prompts to mean anything.
        self.register_buffer("positional_encoding_gaussian_matrix", scale * torch.randn(2, num_pos_feats))

    def _pe_encoding(self, coords: Tensor) -> Tensor:
        """coords: ... x 2 in [0, 1] -> ... x 2*num_pos_feats."""
        coords = (2 * coords - 1) @ self.positional_encoding_gaussian_matrix
        coords = 2 * math.pi * coords
        return torch.cat([torch.sin(coords), torch.cos(coords)], dim=-1)

    def forward(self, size: tuple[int, int]) -> Tensor:
        """Encoding of every cell centre of an h x w grid -> C x h x w."""
        h, w = size
        device = self.positional_encoding_gaussian_matrix.device
        ys = (torch.arange(h, device=device, dtype=torch.float32) + 0.5) / h
        xs = (torch.arange(w, device=device, dtype=torch.float32) + 0.5) / w
        grid = torch.stack(torch.meshgrid(xs, ys, indexing="xy"), dim=-1)  # h x w x 2 as (x, y)
        return self._pe_encoding(grid).permute(2, 0, 1)

    def forward_with_coords(self, coords: Tensor, image_size: tuple[int, int]) -> Tensor:
        """coords: N x P x 2 (x, y) in pixels of an image_size=(H, W) frame -> N x P x C."""
        scale = coords.new_tensor([1.0 / image_size[1], 1.0 / image_size[0]])
        return self._pe_encoding(coords.float() * scale)


class PromptEncoder(nn.Module):
    """Embeds prompts for the mask decoder.

    Args:
        embed_dim: C, the prompt/decoder embedding dimension.
        image_embedding_size: (h, w) of the image embedding (S/16 each).
        input_image_size: (S, S), the padded model input the coordinates refer to.
        mask_in_chans: hidden channels of the mask downscaling convolutions.
        text_embed_dim: D of text (CLIP) embeddings projected to one sparse token; None = no text input, so
            official checkpoints load strictly.
    """

    def __init__(
        self,
        *,
        embed_dim: int,
        image_embedding_size: tuple[int, int],
        input_image_size: tuple[int, int],
        mask_in_chans: int,
        activation: type[nn.Module] = nn.GELU,
        text_embed_dim: int | None = None,
    ) -> None:
        super().__init__()
        self.embed_dim = embed_dim
        self.input_image_size = tuple(input_image_size)
        self.image_embedding_size = tuple(image_embedding_size)
        self.pe_layer = PositionEmbeddingRandom(num_pos_feats=embed_dim // 2)
        # Indices 0/1: negative/positive point; 2/3: top-left/bottom-right box corner.
        self.num_point_embeddings = 4
        self.point_embeddings = nn.ModuleList(
            nn.Embedding(1, embed_dim) for _ in range(self.num_point_embeddings)
        )
        self.not_a_point_embed = nn.Embedding(1, embed_dim)
        self.mask_input_size = (4 * image_embedding_size[0], 4 * image_embedding_size[1])
        self.mask_downscaling = nn.Sequential(
            nn.Conv2d(1, mask_in_chans // 4, kernel_size=2, stride=2),
            LayerNorm2d(mask_in_chans // 4),
            activation(),
            nn.Conv2d(mask_in_chans // 4, mask_in_chans, kernel_size=2, stride=2),
            LayerNorm2d(mask_in_chans),
            activation(),
            nn.Conv2d(mask_in_chans, embed_dim, kernel_size=1),
        )
        self.no_mask_embed = nn.Embedding(1, embed_dim)
        self.text_proj = nn.Linear(text_embed_dim, embed_dim) if text_embed_dim else None

    def get_dense_pe(self) -> Tensor:
        """Positional encoding of the image embedding grid -> 1 x C x h x w."""
        return self.pe_layer(self.image_embedding_size).unsqueeze(0)

    def _embed_points(self, points: Tensor, labels: Tensor, pad: bool) -> Tensor:
        """points: N x P x 2, labels: N x P -> N x (P + pad) x C.

        Label 1 foreground, 0 background, -1 padding (not a point). Uses `torch.where` rather than boolean-mask
        assignment so no host synchronisation happens inside training rounds.
        """
        points = points.float() + 0.5  # pixel centres
        if pad:
            # With no box, the official model always sees one padding point; trained weights rely on it.
            points = torch.cat([points, points.new_zeros(points.shape[0], 1, 2)], dim=1)
            labels = torch.cat([labels, labels.new_full((labels.shape[0], 1), -1)], dim=1)
        pe = self.pe_layer.forward_with_coords(points, self.input_image_size)  # N x P x C
        labels = labels[..., None]  # N x P x 1
        # Labels 2/3 (box corners) are how `_embed_boxes` embeds a box: merged prompts carry boxes as points.
        label_embed = torch.where(labels == 1, self.point_embeddings[1].weight, 0.0)
        for label in (0, 2, 3):
            label_embed = torch.where(labels == label, self.point_embeddings[label].weight, label_embed)
        return torch.where(labels == -1, self.not_a_point_embed.weight, pe + label_embed)

    def _embed_merged(self, prompts: Prompts) -> Tensor:
        """Prompts(auto_pad=False): every token is in point_coords/labels (text tokens labelled 4) -> N x T x C."""
        tokens = self._embed_points(prompts.point_coords, prompts.point_labels, pad=False)  # N x T x C
        if prompts.text_embeddings is None:
            return tokens
        text = self._embed_text(prompts.text_embeddings).to(tokens.dtype)  # N x 1 x C
        return torch.where(prompts.point_labels[..., None] == TEXT_LABEL, text, tokens)

    def _embed_boxes(self, boxes: Tensor) -> Tensor:
        """boxes: N x 4 xyxy -> N x 2 x C (one token per corner)."""
        corners = boxes.float().reshape(-1, 2, 2) + 0.5  # N x 2 x 2
        corner_embed = torch.cat([self.point_embeddings[2].weight, self.point_embeddings[3].weight])  # 2 x C
        return self.pe_layer.forward_with_coords(corners, self.input_image_size) + corner_embed

    def _embed_text(self, text_embeddings: Tensor) -> Tensor:
        """text_embeddings: N x D -> N x 1 x C."""
        if self.text_proj is None:
            raise ValueError(
                "Prompts carry text_embeddings but this model has no text projection; "
                "build it with build_sam(..., text_embed_dim=D)"
            )
        return self.text_proj(text_embeddings.to(self.text_proj.weight.dtype))[:, None, :]

    def _embed_sparse(
        self, points: tuple[Tensor, Tensor] | None, boxes: Tensor | None, text: Tensor | None, n: int
    ) -> Tensor:
        """Concatenated sparse tokens, in the official order (points, box corners) then text -> N x T x C."""
        tokens = [self.not_a_point_embed.weight.new_empty(n, 0, self.embed_dim)]
        if points is not None:
            tokens.append(self._embed_points(points[0], points[1], pad=boxes is None))
        if boxes is not None:
            tokens.append(self._embed_boxes(boxes))
        if text is not None:
            tokens.append(self._embed_text(text))
        return torch.cat(tokens, dim=1)

    def embed(self, prompts: Prompts) -> tuple[Tensor, Tensor]:
        """Batched path for N prompts.

        Returns:
            sparse: N x T x C.
            dense: N x C x h x w from `prompts.mask_inputs` (N x 1 x 4h x 4w), or `no_mask_embed` as
                1 x C x 1 x 1 when there is no mask input (the decoder broadcasts it).
        """
        n = prompts.num_prompts
        if n == 0:
            raise ValueError(
                "Prompts is empty: give at least one of points, boxes, mask_inputs, text_embeddings"
            )
        if not prompts.auto_pad:
            sparse = self._embed_merged(prompts)
        else:
            points = None if prompts.point_coords is None else (prompts.point_coords, prompts.point_labels)
            sparse = self._embed_sparse(points, prompts.boxes, prompts.text_embeddings, n)
        if prompts.mask_inputs is None:
            return sparse, self.no_mask_embed.weight.reshape(1, -1, 1, 1)
        return sparse, self.mask_downscaling(prompts.mask_inputs)

    def forward(
        self,
        points: tuple[Tensor, Tensor] | None = None,
        boxes: Tensor | None = None,
        masks: Tensor | None = None,
    ) -> tuple[Tensor, Tensor]:
        """Official signature.

        Args:
            points: (coords N x P x 2, labels N x P) in input pixels, or None.
            boxes: N x 4 xyxy, or None.
            masks: N x 1 x 4h x 4w logits, or None.

        Returns:
            sparse: N x T x C; dense: N x C x h x w.
        """
        n = next((t.shape[0] for t in (points[0] if points else None, boxes, masks) if t is not None), 1)
        sparse = self._embed_sparse(points, boxes, None, n)
        if masks is not None:
            return sparse, self.mask_downscaling(masks)
        h, w = self.image_embedding_size
        return sparse, self.no_mask_embed.weight.reshape(1, -1, 1, 1).expand(n, -1, h, w)
