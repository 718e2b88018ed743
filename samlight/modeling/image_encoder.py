"""SAM's image encoder: timm's `VisionTransformerSAM` built with the official parameter names.

timm names the block MLP `mlp.fc1`/`mlp.fc2`, the official checkpoints `mlp.lin1`/`mlp.lin2`. Rather than rename
keys on every save and load (which breaks tools that map state-dict keys back to parameters, such as
torch.distributed.checkpoint under FSDP2), the encoder is built with an MLP layer that uses the official names,
so official checkpoints load with no renaming at all. The only translation left is for state dicts written by
timm itself (e.g. timm's `samvit_*` weights); it lives in `samlight.modeling.weight_names`.

Attention runs through `samlight.modeling.attention.RelPosAttention`: the same parameters as timm's, but the
relative-position bias is folded into the query/key vectors instead of being built as an N x N mask.
"""

from __future__ import annotations

from functools import partial

from timm.models.vision_transformer_sam import VisionTransformerSAM
from torch import Tensor, nn

from samlight.modeling.attention import use_rel_pos_attention
from samlight.modeling.common import MLPBlock


def _official_mlp(
    *, in_features: int, hidden_features: int, act_layer: type[nn.Module], drop: float = 0.0, **factory
) -> MLPBlock:
    """timm's `mlp_layer` hook: same computation as timm's Mlp, official parameter names (lin1/lin2)."""
    if drop:
        raise ValueError(
            "samlight's SAM encoder MLP has no dropout (the official model uses none); set proj_drop 0"
        )
    return MLPBlock(embedding_dim=in_features, mlp_dim=hidden_features, act=act_layer)


class ImageEncoderViT(VisionTransformerSAM):
    """ViT image encoder with windowed + global attention and a conv neck (timm implementation).

    Calling it maps B x 3 x S x S normalised, padded images to B x out_chans x S/16 x S/16 embeddings, as the
    official `ImageEncoderViT` does (timm's classifier head is left out).
    """

    def __init__(
        self,
        *,
        img_size: int,
        patch_size: int,
        embed_dim: int,
        depth: int,
        num_heads: int,
        global_attn_indexes: tuple[int, ...],
        window_size: int,
        out_chans: int,
        drop_path_rate: float = 0.0,
        mlp_ratio: float = 4.0,
    ) -> None:
        super().__init__(
            img_size=img_size,
            patch_size=patch_size,
            num_classes=0,
            global_pool="",
            embed_dim=embed_dim,
            depth=depth,
            num_heads=num_heads,
            mlp_ratio=mlp_ratio,
            qkv_bias=True,
            drop_path_rate=drop_path_rate,
            # The official encoder uses eps 1e-6; timm's default argument here would be 1e-5.
            norm_layer=partial(nn.LayerNorm, eps=1e-6),
            mlp_layer=_official_mlp,
            use_abs_pos=True,
            use_rel_pos=True,
            window_size=window_size,
            global_attn_indexes=tuple(global_attn_indexes),
            neck_chans=out_chans,
        )
        use_rel_pos_attention(self.blocks)  # no N x N bias tensor (see samlight/modeling/attention.py)
        # The official predictor and `Sam.postprocess_masks` read the input size from here.
        self.img_size = img_size

    def forward(self, x: Tensor) -> Tensor:
        """x: B x 3 x S x S -> B x out_chans x S/16 x S/16."""
        return self.forward_features(x)
