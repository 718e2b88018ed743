"""The SAM modules: shapes, the batched decode path against the official-signature path, switches, errors."""

from __future__ import annotations

import time
from functools import partial

import pytest
import torch
from timm.models.vision_transformer_sam import VisionTransformerSAM

from samlight import build_sam
from samlight.modeling.build import variant_config
from samlight.modeling.weight_names import official_to_timm, timm_to_official
from samlight.prompts.types import Prompts

S = 256  # tiny input side
N = 6  # prompts


def _images(b: int = 2) -> torch.Tensor:
    return torch.randn(b, 3, S, S)


def _points(n: int = N, p: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    coords = torch.rand(n, p, 2) * S
    labels = torch.randint(0, 2, (n, p))
    return coords, labels


def test_tiny_size_and_train_step_speed(tiny_sam):
    n_params = sum(p.numel() for p in tiny_sam.parameters())
    assert 1e5 < n_params < 1e6, n_params
    tiny_sam.train()
    # 2 images x 16 masks, every prompt kind at once so every parameter is used.
    coords, labels = _points(32, 2)
    labels[:, 1] = -1
    boxes = torch.tensor([[10.0, 20.0, 200.0, 180.0]]).expand(32, 4)
    prompts = Prompts(
        point_coords=coords, point_labels=labels, boxes=boxes, mask_inputs=torch.randn(32, 1, 64, 64)
    )
    index = torch.arange(32) % 2
    times = []
    for _ in range(2):
        start = time.perf_counter()
        logits, iou = tiny_sam.decode(
            tiny_sam.encode_images(_images()), index, prompts, multimask_output=True
        )
        (logits.mean() + iou.mean()).backward()
        times.append(time.perf_counter() - start)
    assert logits.shape == (32, 3, S // 4, S // 4) and iou.shape == (32, 3)
    # Every parameter takes part in the loss (no detached branch, no no_grad on forward).
    missing = [n for n, p in tiny_sam.named_parameters() if p.grad is None]
    assert missing == ["prompt_encoder.no_mask_embed.weight"], missing  # unused: every prompt has a mask
    assert min(times) < 10.0  # a shared 2-core CPU; about 1 s when the machine is idle


@pytest.mark.parametrize("kind", ["points", "box", "points+box", "mask", "points+mask"])
@pytest.mark.parametrize("multimask", [True, False])
def test_batched_decode_matches_official_signature(tiny_sam, kind, multimask):
    emb = tiny_sam.encode_images(_images(2))
    index = torch.tensor([0, 1, 1, 0, 1, 0])
    coords, labels = _points()
    boxes = torch.sort(torch.rand(N, 2, 2) * S, dim=1).values.reshape(N, 4)
    masks = torch.randn(N, 1, S // 4, S // 4)
    prompts = Prompts(
        point_coords=coords if "points" in kind else None,
        point_labels=labels if "points" in kind else None,
        boxes=boxes if "box" in kind else None,
        mask_inputs=masks if "mask" in kind else None,
    )
    logits, iou = tiny_sam.decode(emb, index, prompts, multimask_output=multimask)
    k = 3 if multimask else 1
    assert logits.shape == (N, k, S // 4, S // 4) and iou.shape == (N, k)
    for i in range(N):
        sparse, dense = tiny_sam.prompt_encoder(
            points=(coords[i : i + 1], labels[i : i + 1]) if prompts.point_coords is not None else None,
            boxes=boxes[i : i + 1] if prompts.boxes is not None else None,
            masks=masks[i : i + 1] if prompts.mask_inputs is not None else None,
        )
        ref_logits, ref_iou = tiny_sam.mask_decoder(
            image_embeddings=emb[index[i] : index[i] + 1],
            image_pe=tiny_sam.prompt_encoder.get_dense_pe(),
            sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=dense,
            multimask_output=multimask,
        )
        torch.testing.assert_close(logits[i : i + 1], ref_logits, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(iou[i : i + 1], ref_iou, atol=1e-5, rtol=1e-4)


def test_point_padding_and_not_a_point(tiny_sam):
    pe = tiny_sam.prompt_encoder
    coords, labels = _points(3, 2)
    sparse, _ = pe.embed(Prompts(point_coords=coords, point_labels=labels))
    # No box: one padding point is appended, embedded as not_a_point (official behaviour).
    assert sparse.shape == (3, 3, 32)
    torch.testing.assert_close(sparse[:, 2], pe.not_a_point_embed.weight.expand(3, -1))
    with_box, _ = pe.embed(
        Prompts(point_coords=coords, point_labels=labels, boxes=torch.tensor([[1.0, 2, 30, 40]] * 3))
    )
    assert with_box.shape == (3, 4, 32)  # 2 points + 2 corners, no padding
    labels[:, 1] = -1
    padded, _ = pe.embed(Prompts(point_coords=coords, point_labels=labels))
    torch.testing.assert_close(padded[:, 1], pe.not_a_point_embed.weight.expand(3, -1))
    # Foreground and background points differ by the two label embeddings.
    fg, _ = pe.embed(Prompts(point_coords=coords[:, :1], point_labels=torch.ones(3, 1, dtype=torch.long)))
    bg, _ = pe.embed(Prompts(point_coords=coords[:, :1], point_labels=torch.zeros(3, 1, dtype=torch.long)))
    diff = pe.point_embeddings[1].weight - pe.point_embeddings[0].weight
    torch.testing.assert_close(fg[:, 0] - bg[:, 0], diff.expand(3, -1))


def test_text_prompt_adds_one_token():
    sam = build_sam("tiny", text_embed_dim=16).eval()
    assert sam.prompt_encoder.text_proj.weight.shape == (32, 16)
    emb = sam.encode_images(_images(1))
    text = torch.nn.functional.normalize(torch.randn(N, 16), dim=-1)
    sparse, _ = sam.prompt_encoder.embed(Prompts(text_embeddings=text))
    assert sparse.shape == (N, 1, 32)
    logits, iou = sam.decode(emb, torch.zeros(N, dtype=torch.long), Prompts(text_embeddings=text), False)
    assert logits.shape == (N, 1, 64, 64) and torch.isfinite(logits).all()
    other, _ = sam.decode(emb, torch.zeros(N, dtype=torch.long), Prompts(text_embeddings=-text), False)
    assert not torch.allclose(logits, other)  # the text token reaches the masks


def test_text_without_projection_is_an_error(tiny_sam):
    with pytest.raises(ValueError, match="text_embed_dim"):
        tiny_sam.prompt_encoder.embed(Prompts(text_embeddings=torch.randn(2, 16)))


def test_drop_path_and_grad_checkpointing_switches():
    sam = build_sam("tiny", drop_path_rate=0.3)
    assert sam.image_encoder.blocks[-1].drop_path1.drop_prob == pytest.approx(0.3)
    plain = build_sam("tiny").train()
    ckpt = build_sam("tiny", grad_checkpointing=True).train()
    ckpt.load_state_dict(plain.state_dict())
    assert ckpt.image_encoder.grad_checkpointing and not plain.image_encoder.grad_checkpointing
    images = _images(1)
    for model in (plain, ckpt):
        model.encode_images(images).square().mean().backward()
    g_plain = plain.image_encoder.blocks[0].attn.qkv.weight.grad
    torch.testing.assert_close(ckpt.image_encoder.blocks[0].attn.qkv.weight.grad, g_plain)


def test_image_size_override_keeps_checkpoint_shapes():
    native = build_sam("tiny")
    small = build_sam("tiny", image_size=128)
    small.load_state_dict(native.state_dict())  # same parameter shapes
    assert small.image_size == 128 and small.prompt_encoder.mask_input_size == (32, 32)
    emb = small.encode_images(torch.randn(1, 3, 128, 128))
    assert emb.shape == (1, 32, 8, 8)
    coords, labels = _points(2, 1)
    logits, _ = small.decode(
        emb, torch.zeros(2, dtype=torch.long), Prompts(point_coords=coords / 2, point_labels=labels), True
    )
    assert logits.shape == (2, 3, 32, 32)


def test_timm_key_translation_round_trips(tiny_sam):
    """Official-named encoder weights load into a plain timm VisionTransformerSAM and give the same features."""
    cfg = variant_config("tiny")
    timm_vit = VisionTransformerSAM(
        img_size=S,
        patch_size=16,
        num_classes=0,
        global_pool="",
        embed_dim=cfg.encoder_embed_dim,
        depth=cfg.encoder_depth,
        num_heads=cfg.encoder_num_heads,
        norm_layer=partial(torch.nn.LayerNorm, eps=1e-6),
        use_rel_pos=True,
        window_size=cfg.window_size,
        global_attn_indexes=cfg.encoder_global_attn_indexes,
        neck_chans=cfg.prompt_embed_dim,
    ).eval()
    official = tiny_sam.image_encoder.state_dict()
    as_timm = official_to_timm(official)
    assert any(".mlp.fc1." in k for k in as_timm) and not any(".mlp.lin1." in k for k in as_timm)
    timm_vit.load_state_dict(as_timm, strict=True)
    assert timm_to_official(as_timm).keys() == official.keys()
    images = _images(1)
    torch.testing.assert_close(timm_vit.forward_features(images), tiny_sam.image_encoder(images))


def test_bad_inputs_are_named(tiny_sam):
    with pytest.raises(ValueError, match="Unknown SAM variant"):
        build_sam("vit_x")
    with pytest.raises(TypeError, match="unknown override"):
        build_sam("tiny", drop_path=0.1)
    with pytest.raises(ValueError, match="B x 3 x 256 x 256"):
        tiny_sam.encode_images(torch.randn(1, 3, 128, 128))
    emb = tiny_sam.encode_images(_images(1))
    with pytest.raises(ValueError, match="N x 1 x 64 x 64"):
        tiny_sam.decode(
            emb, torch.zeros(2, dtype=torch.long), Prompts(mask_inputs=torch.randn(2, 1, 32, 32)), False
        )
    with pytest.raises(ValueError, match="image_index"):
        tiny_sam.mask_decoder(
            image_embeddings=emb.expand(2, -1, -1, -1),
            image_pe=tiny_sam.prompt_encoder.get_dense_pe(),
            sparse_prompt_embeddings=torch.randn(3, 2, 32),
            dense_prompt_embeddings=torch.randn(3, 32, 16, 16),
            multimask_output=False,
        )


@pytest.mark.parametrize("variant,params_m", [("vit_b", 93.7), ("vit_l", 312.3), ("vit_h", 641.1)])
def test_official_variant_sizes(variant, params_m):
    with torch.device("meta"):
        sam = build_sam(variant)
    assert sam.image_size == 1024
    assert sum(p.numel() for p in sam.parameters()) / 1e6 == pytest.approx(params_m, abs=0.1)


def test_bf16_autocast_train_step(tiny_sam):
    """Training runs in bf16 mixed precision by default (DESIGN.md section 5): dtypes must line up."""
    tiny_sam.train()
    coords, labels = _points(8, 1)
    prompts = Prompts(point_coords=coords, point_labels=labels, mask_inputs=torch.randn(8, 1, 64, 64))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        emb = tiny_sam.encode_images(_images(2))
        logits, iou = tiny_sam.decode(emb, torch.arange(8) % 2, prompts, multimask_output=False)
    assert logits.dtype == torch.bfloat16 and logits.shape == (8, 1, 64, 64)
    (logits.float().mean() + iou.float().mean()).backward()
    grad = tiny_sam.image_encoder.patch_embed.proj.weight.grad
    assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0


def test_patch_size_other_than_16_is_refused():
    """Every mask frame is S/4 (mask_inputs, feedback, loss), which only a 16-pixel patch grid gives."""
    with pytest.raises(ValueError, match="patch_size=8"):
        variant_config("tiny", patch_size=8)
