"""Prompt plugins: one contract test over every registered prompt type, plus each type's own promises."""

from __future__ import annotations

import pytest
import torch

from samlight import build_sam
from samlight.prompts import (
    BoxPrompt,
    MaskPrompt,
    PointPrompt,
    PromptContext,
    Prompts,
    PromptType,
    TextPrompt,
    available_prompt_types,
    check_prompts,
    resolve_prompt_type,
)

S = 128
TINY_CLIP = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 16, "head_width": 16},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 16, "heads": 1, "layers": 1},
}
# Arguments for registered types that cannot run with their defaults in a test (no CLIP download).
TEST_ARGS = {"text": {"clip_model": TINY_CLIP, "min_mask_side": 8}}


def _masks(n: int = 5) -> torch.Tensor:
    gt = torch.zeros(n, S, S, dtype=torch.bool)
    gt[0, 10:60, 20:90] = True
    gt[1, 70:120, 5:30] = True
    gt[2, 64, 64] = True  # one pixel
    gt[3, 0:128, 100:128] = True  # touches the border
    # gt[4] stays empty: a padding slot
    return gt


def _context(gt: torch.Tensor) -> PromptContext:
    images = torch.randn(2, 3, S, S)
    return PromptContext(
        images=images,
        image_index=torch.tensor([0, 0, 1, 1, 1])[: gt.shape[0]],
        input_sizes=torch.tensor([[S, S], [S, S - 20]]),
    )


@pytest.mark.filterwarnings("ignore:TextPrompt")
@pytest.mark.parametrize("name", sorted(available_prompt_types()))
def test_prompt_type_contract(name):
    cls = resolve_prompt_type(name)
    assert issubclass(cls, PromptType)
    ptype = cls(**TEST_ARGS.get(name, {}))
    gt = _masks()
    ctx = _context(gt)
    prompts = ptype.sample(gt, context=ctx, generator=torch.Generator().manual_seed(3))
    check_prompts(prompts, num_masks=5, image_size=S, source=name)
    for field in ("point_coords", "boxes", "mask_inputs", "text_embeddings"):
        value = getattr(prompts, field)
        assert value is None or torch.isfinite(value).all(), f"{name}: non-finite {field}"
    for coords in (prompts.point_coords, None if prompts.boxes is None else prompts.boxes.view(-1, 2, 2)):
        if coords is not None:
            assert ((coords >= 0) & (coords <= S - 1)).all(), f"{name}: coordinates outside the frame"
    again = ptype.sample(gt, context=ctx, generator=torch.Generator().manual_seed(3))
    for field in ("point_coords", "point_labels", "boxes", "mask_inputs", "text_embeddings"):
        a, b = getattr(prompts, field), getattr(again, field)
        assert (a is None and b is None) or torch.equal(a, b), f"{name}: same seed, different {field}"
    weights = ptype.mask_weights(gt, context=ctx)
    assert weights.shape == (5,) and ((weights >= 0) & (weights <= 1)).all()
    # The model accepts what the plugin returns.
    model = build_sam("tiny", image_size=S, text_embed_dim=ptype.text_embed_dim)
    embeddings = model.encode_images(ctx.images)
    logits, iou = model.decode(embeddings, ctx.image_index, prompts, prompts.is_ambiguous())
    assert logits.shape[0] == 5 and logits.shape[-1] == S // 4 and torch.isfinite(logits).all()


def test_point_prompt_points_lie_inside_the_mask():
    gt = _masks()
    prompts = PointPrompt(num_points=3).sample(gt, generator=torch.Generator().manual_seed(0))
    x, y = prompts.point_coords[..., 0].long(), prompts.point_labels
    inside = gt[torch.arange(5)[:, None], prompts.point_coords[..., 1].long(), x]
    assert not ((y == 1) & ~inside).any()  # every real point is inside its mask
    # Points are drawn independently; a repeat of an earlier point is padding, so the real points are distinct.
    flat = prompts.point_coords[..., 1].long() * S + x
    for n in range(5):
        real = flat[n][y[n] == 1].tolist()
        assert len(real) == len(set(real))
    assert (y[:2] == 1).all() and (y[2] == torch.tensor([1, -1, -1])).all() and (y[4] == -1).all()
    center = PointPrompt(mode="center").sample(gt[:1]).point_coords[0, 0].tolist()
    # Farthest from the boundary of the 70 x 50 box: its middle row, away from the short sides.
    assert abs(center[1] - 34.5) <= 1 and 20 + 24 <= center[0] <= 89 - 24


def test_box_prompt_noise_and_clamp_to_the_image():
    gt = _masks()
    exact = BoxPrompt(noise_std=0.0).sample(gt).boxes
    assert exact[0].tolist() == [20.0, 10.0, 89.0, 59.0]
    noisy = (
        BoxPrompt(noise_std=0.1, max_noise=3.0).sample(gt, generator=torch.Generator().manual_seed(0)).boxes
    )
    # std min(10% of the side, 3 px): well inside 5 std, and the offsets are not clipped at 3 px.
    offsets = (noisy[:2] - exact[:2]).abs()
    assert offsets.max() <= 15.0 and offsets.max() > 3.0
    assert not torch.equal(noisy, exact)
    huge = BoxPrompt(noise_std=5.0, max_noise=1000.0)
    boxes = huge.sample(gt, context=_context(gt), generator=torch.Generator().manual_seed(1)).boxes
    assert (boxes[:, 2:] >= boxes[:, :2]).all() and boxes.min() >= 0 and boxes.max() <= S - 1
    assert boxes[2:, 2].max() <= S - 21  # images 1 is 20 px narrower: boxes stay inside it


def test_mask_prompt_is_a_coarse_version_of_the_mask():
    gt = _masks()
    logits = MaskPrompt(noise_std=0.0).sample(gt).mask_inputs
    small = torch.nn.functional.avg_pool2d(gt[:, None].float(), 4)[:, 0] > 0.5
    agreement = ((logits[:, 0] > 0) == small).float().mean()
    assert agreement > 0.95


def test_text_prompt_without_clip_or_embeddings_fails_clearly():
    with pytest.raises(ValueError, match="CLIP model"):
        TextPrompt()
    only_precomputed = TextPrompt(embed_dim=8)
    with pytest.raises(ValueError, match="no text_embeddings and no CLIP model"):
        only_precomputed.sample(_masks(), context=_context(_masks()))
    emb = torch.randn(5, 8)
    emb[4] = 0
    ctx = PromptContext(text_embeddings=emb)
    out = only_precomputed.sample(_masks(), context=ctx).text_embeddings
    assert torch.allclose(out[:4].norm(dim=-1), torch.ones(4))
    assert only_precomputed.mask_weights(_masks(), context=ctx).tolist() == [1, 1, 1, 1, 0]


@pytest.mark.filterwarnings("ignore:TextPrompt")
def test_text_prompt_crops_skip_small_masks_and_encode_text():
    prompt = TextPrompt(clip_model=TINY_CLIP, min_mask_side=40)
    gt = _masks()
    assert prompt.mask_weights(gt).tolist() == [1, 0, 0, 0, 0]  # only mask 0 is >= 40 px on both sides
    emb = prompt.sample(gt, context=_context(gt), generator=torch.Generator().manual_seed(0)).text_embeddings
    assert emb.shape == (5, 16) and torch.allclose(emb.norm(dim=-1), torch.ones(5), atol=1e-5)
    text = prompt.encode_text(["a cat", "a dog"])
    assert text.shape == (2, 16) and torch.allclose(text.norm(dim=-1), torch.ones(2), atol=1e-5)
    assert prompt.text_embed_dim == 16


def test_malformed_plugin_output_names_the_plugin():
    bad = Prompts(point_coords=torch.zeros(4, 1, 2), point_labels=torch.ones(4, 1))
    with pytest.raises(ValueError, match="BrokenPrompt.*point_coords has shape"):
        check_prompts(bad, num_masks=5, image_size=S, source="BrokenPrompt")
    with pytest.raises(ValueError, match="mask_inputs"):
        check_prompts(Prompts(mask_inputs=torch.zeros(5, 1, S, S)), num_masks=5, image_size=S, source="x")


def test_registry_names_and_unknown_name():
    assert {"point", "box", "mask", "text"} <= set(available_prompt_types())
    assert resolve_prompt_type("box") is BoxPrompt
    with pytest.raises(KeyError, match="registered short names: .*box"):
        resolve_prompt_type("lasso")


@pytest.mark.filterwarnings("ignore:TextPrompt", "ignore:.*self.trainer")
def test_text_prompt_trains_the_text_projection():
    from samlight.datamodules.batch import SegmentationBatch
    from samlight.prompts import CorrectiveClicks
    from samlight.training.module import SamModule

    module = SamModule(
        variant="tiny",
        model_overrides={"image_size": S},
        prompts=[TextPrompt(clip_model=TINY_CLIP, min_mask_side=8)],
        clicks=CorrectiveClicks(num_clicks=1, mask_only_rounds=0),
    )
    gt = _masks(4)[None]  # 1 image x 4 mask slots
    batch = SegmentationBatch(
        images=torch.randn(1, 3, S, S),
        masks=gt,
        mask_valid=torch.ones(1, 4, dtype=torch.bool),
        original_sizes=torch.tensor([[S, S]]),
        input_sizes=torch.tensor([[S, S]]),
    )
    loss = module.training_step(batch, 0)
    loss.backward()
    assert torch.isfinite(loss)
    assert module.model.prompt_encoder.text_proj.weight.grad.abs().sum() > 0
    assert not any(p.requires_grad for p in module.prompt_types[0]._clip[0].parameters())  # CLIP stays frozen
    assert not any("clip" in k.lower() for k in module.state_dict())  # and is not saved


def test_box_of_masks_at_the_frame_corners_and_argument_checks():
    from samlight.prompts.box import boxes_from_masks

    gt = torch.zeros(3, 8, 8, dtype=torch.bool)
    gt[0, 0, 0] = True  # the top-left pixel only
    gt[1, 0, 2:5] = True  # a segment in row 0
    gt[2, 7, 7] = True  # the bottom-right pixel
    assert boxes_from_masks(gt).tolist() == [[0, 0, 0, 0], [2, 0, 4, 0], [7, 7, 7, 7]]
    assert boxes_from_masks(torch.zeros(1, 8, 8, dtype=torch.bool)).tolist() == [[0, 0, 0, 0]]
    with pytest.raises(ValueError, match="BoxPrompt: noise_std and max_noise"):
        BoxPrompt(noise_std=-0.1)
    with pytest.raises(ValueError, match="BoxPrompt: noise_std and max_noise"):
        BoxPrompt(max_noise=-1.0)
    # A cap of 0 (or under a pixel) is allowed: 0 gives the exact box whatever noise_std says.
    exact = BoxPrompt(noise_std=0.0).sample(_masks()).boxes
    assert torch.equal(BoxPrompt(max_noise=0.0).sample(_masks(), generator=torch.Generator()).boxes, exact)
    assert BoxPrompt(max_noise=0.5).max_noise == 0.5


def test_point_prompt_argument_checks():
    with pytest.raises(ValueError, match="PointPrompt: num_points must be >= 1, got 0"):
        PointPrompt(num_points=0)
    with pytest.raises(ValueError, match="PointPrompt: mode must be 'uniform' or 'center', got 'middle'"):
        PointPrompt(mode="middle")
    assert PointPrompt(num_points=1).num_points == 1  # the smallest allowed
