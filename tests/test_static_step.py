"""The training step's speed properties: loss-frame data, one static episode, no host sync, compilable."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from pycocotools import mask as mask_utils

from samlight import build_sam
from samlight.datamodules.batch import SegmentationBatch
from samlight.datamodules.collate import collate_samples
from samlight.datamodules.decode import decode_mask_targets, decode_masks, decode_sa1b_sample
from samlight.prompts import BoxPrompt, CorrectiveClicks, PointPrompt
from samlight.prompts.clicks import random_pixels
from samlight.prompts.types import merge_prompts
from samlight.training.episode import episode_round, run_episode
from samlight.training.module import SamModule

S = 64


def _rles(height: int, width: int, count: int, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    rles = []
    for _ in range(count):
        mask = np.zeros((height, width), np.uint8, order="F")
        cy, cx = rng.uniform(0, height), rng.uniform(0, width)
        ry, rx = rng.uniform(2, height / 2), rng.uniform(2, width / 2)
        yy, xx = np.ogrid[:height, :width]
        mask[((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1] = 1
        rles.append(mask_utils.encode(mask))
    return rles


@pytest.mark.parametrize(("height", "width", "size"), [(150, 225, 64), (37, 23, 64), (64, 64, 64), (61, 90, 128)])
def test_mask_targets_equal_pooled_full_masks(height, width, size):
    from samlight.modeling.transforms import get_preprocess_shape

    rles = _rles(height, width, 6)
    input_size = get_preprocess_shape(height, width, size)
    full = decode_masks(rles, (height, width), input_size, size)  # M x S x S
    targets = decode_mask_targets(rles, (height, width), input_size, size)
    assert targets.dtype == torch.uint8 and targets.shape == (6, size // 4, size // 4)
    assert torch.equal(targets.float() / 16, F.avg_pool2d(full[:, None].float(), 4)[:, 0])


def test_training_samples_carry_loss_frame_targets_only(tmp_path):
    import io

    from PIL import Image

    rles = _rles(120, 180, 64)
    buf = io.BytesIO()
    Image.fromarray(np.full((120, 180, 3), 128, np.uint8)).save(buf, format="JPEG")
    record = {"image": {"height": 120, "width": 180}, "annotations": [
        {"segmentation": {"size": r["size"], "counts": r["counts"].decode()}, "area": 1.0, "id": i}
        for i, r in enumerate(rles)
    ]}  # fmt: skip
    train = decode_sa1b_sample(buf.getvalue(), record, image_size=1024, rng=np.random.default_rng(0))
    val = decode_sa1b_sample(buf.getvalue(), record, image_size=1024)
    assert train.masks is None and train.mask_targets.shape == (64, 256, 256)
    assert val.mask_targets is None and val.masks.shape == (64, 1024, 1024)
    assert train.mask_targets.nbytes <= 8e6 < val.masks.nbytes  # 4 MB vs 64 MB at 64 masks
    batch = collate_samples([train, train])
    assert batch.masks is None and batch.mask_targets.shape == (2, 64, 256, 256)
    order = [record["annotations"][i] for i in train.meta["annotation_ids"]]
    full = decode_masks([a["segmentation"] for a in order], (120, 180), (683, 1024), 1024)
    assert torch.equal(batch.soft_targets()[0], F.avg_pool2d(full[:, None].float(), 4)[:, 0])


def test_random_pixels_draw_few_numbers_and_stay_inside(monkeypatch):
    region = torch.zeros(5, 32, 32, dtype=torch.bool)
    region[0, 3:9, 20:30] = True
    region[1, 31, 0] = True
    region[2] = True
    # region[3], region[4] empty
    region[4, 10, 10] = True
    drawn = []
    real_rand = torch.rand
    monkeypatch.setattr(torch, "rand", lambda *a, **k: drawn.append(real_rand(*a, **k)) or drawn[-1])
    flat = random_pixels(region, 7, torch.Generator().manual_seed(0))
    assert max(t.numel() for t in drawn) == 5 * 7  # N x P numbers, not N x H x W
    assert region.flatten(1).gather(1, flat)[[0, 1, 2, 4]].all()
    assert (flat[3] == 0).all() and (flat[1] == 31 * 32).all()
    # Uniform: every pixel of a 60-pixel region is hit about equally often.
    many = random_pixels(region[:1].expand(3000, -1, -1), 1, torch.Generator().manual_seed(1))
    counts = torch.bincount(many.flatten(), minlength=32 * 32)[region[0].flatten()]
    assert counts.min() > 20 and counts.max() < 90  # mean 50


def _gt(n: int = 6) -> torch.Tensor:
    gt = torch.zeros(n, S, S, dtype=torch.bool)
    for i in range(n):
        gt[i, 4 + i * 3 : 30 + i * 3, 8 : 40 + i * 2] = True
    return gt


def test_merged_prompts_embed_to_each_types_official_tokens():
    model = build_sam("tiny", image_size=S)
    gt = _gt()
    points = PointPrompt().sample(gt, generator=torch.Generator().manual_seed(0))
    boxes = BoxPrompt().sample(gt, generator=torch.Generator().manual_seed(0))
    choice = torch.tensor([0, 1, 1, 0, 1, 0])
    merged = merge_prompts([points, boxes], choice)
    assert merged.point_labels.shape == (6, 2)  # one point + padding and two corners: same width
    assert merged.ambiguous().tolist() == [True, False, False, True, False, True]
    sparse, _ = model.prompt_encoder.embed(merged)
    ref_points, _ = model.prompt_encoder.embed(points)
    ref_boxes, _ = model.prompt_encoder.embed(boxes)
    expected = torch.where(choice[:, None, None] == 0, ref_points, ref_boxes)
    torch.testing.assert_close(sparse, expected)
    # Per-mask outputs: three multimask outputs where ambiguous, the single output (repeated) elsewhere.
    emb = model.encode_images(torch.randn(2, 3, S, S))
    index = torch.tensor([0, 0, 0, 1, 1, 1])
    logits, iou = model.decode(emb, index, merged, merged.ambiguous())
    multi, multi_iou = model.decode(emb, index, merged, True)
    single, single_iou = model.decode(emb, index, merged, False)
    amb = merged.ambiguous()
    torch.testing.assert_close(logits[amb], multi[amb])
    torch.testing.assert_close(logits[~amb], single[~amb].expand(-1, 3, -1, -1))
    torch.testing.assert_close(iou[~amb], single_iou[~amb].expand(-1, 3))


def _batch(seed: int, targets_only: bool = True) -> SegmentationBatch:
    g = torch.Generator().manual_seed(seed)
    masks = torch.zeros(2, 3, S, S, dtype=torch.bool)
    for i in range(2):
        for j in range(3):
            # Multiples of 4 px, so the S/4 targets repeated 4 x 4 are exactly these masks.
            y, x = (4 * torch.randint(0, (S - 28) // 4, (2,), generator=g)).tolist()
            masks[i, j, y : y + 16 + 4 * j, x : x + 20] = True
    valid = torch.ones(2, 3, dtype=torch.bool)
    valid[1, 2] = False
    counts = (F.avg_pool2d(masks.float(), 4) * 16).round().to(torch.uint8)
    return SegmentationBatch(
        images=torch.randn(2, 3, S, S, generator=g),
        masks=None if targets_only else masks,
        mask_targets=counts if targets_only else None,
        mask_valid=valid,
        original_sizes=torch.full((2, 2), S),
        input_sizes=torch.tensor([[S, S], [S - 8, S]]),
    )


def _module(**kwargs) -> SamModule:
    return SamModule(
        variant="tiny",
        model_overrides={"image_size": S},
        clicks=CorrectiveClicks(num_clicks=2, mask_only_rounds=1),
        **kwargs,
    )


class _NoHostSync:
    """Make every tensor -> host conversion raise (a CPU stand-in for CUDA's sync debug mode)."""

    NAMES = ("item", "tolist", "nonzero", "__bool__", "__int__", "__float__", "numpy", "cpu")

    def __init__(self, monkeypatch) -> None:
        self.monkeypatch = monkeypatch

    def __enter__(self):
        for name in self.NAMES:
            def refuse(*args, _name=name, **kwargs):
                raise AssertionError(f"host sync: Tensor.{_name} called in the training step")

            self.monkeypatch.setattr(torch.Tensor, name, refuse)
        return self

    def __exit__(self, *exc) -> None:
        self.monkeypatch.undo()


@pytest.mark.filterwarnings("ignore:.*self.trainer", "ignore:You are trying to `self.log")
def test_training_step_has_static_shapes_and_no_host_sync(monkeypatch):
    torch.manual_seed(0)
    module = _module()
    calls: list[tuple] = []
    module.model.mask_decoder.register_forward_pre_hook(
        lambda mod, args, kwargs: calls.append(tuple(kwargs["sparse_prompt_embeddings"].shape)),
        with_kwargs=True,
    )
    shapes = []
    for seed in range(3):
        calls.clear()
        batch = _batch(seed)
        with _NoHostSync(monkeypatch):
            loss = module.training_step(batch, 0)
        loss.backward()
        shapes.append(sorted(calls))
    # One decoder call over all 6 slots per round (1 + 2 clicks + 1 mask-only = 4), whatever the prompt types
    # drawn; the mask-only round's position may change the order, never the set of shapes.
    assert all(len(c) == 4 and all(s[0] == 6 for s in c) for c in shapes)
    assert shapes[0] == shapes[1] == shapes[2]
    assert torch.isfinite(loss)


@pytest.mark.filterwarnings("ignore:.*self.trainer", "ignore:You are trying to `self.log")
def test_targets_only_batch_trains_like_the_full_mask_batch():
    """A batch with mask_targets gives the loss of the same batch with full masks, up to prompt placement."""
    module = _module()
    module.seed_rank_randomness()  # the step's prompts, clicks and mask-only round come from these streams
    with_targets = module.training_step(_batch(0, targets_only=True), 0)
    module.seed_rank_randomness()
    with_masks = module.training_step(_batch(0, targets_only=False), 0)
    torch.testing.assert_close(with_targets, with_masks)


def test_episode_compiles_fullgraph():
    torch._dynamo.reset()
    model = build_sam("tiny", image_size=S)
    gt = _gt(4)
    click_gt = F.avg_pool2d(gt[:, None].float(), 4)[:, 0] >= 0.5
    emb = model.encode_images(torch.randn(2, 3, S, S)).detach()
    index = torch.tensor([0, 0, 1, 1])
    prompts = merge_prompts([PointPrompt().sample(gt), BoxPrompt().sample(gt)], torch.tensor([0, 1, 1, 0]))
    clicks = CorrectiveClicks(num_clicks=1, mask_only_rounds=1)
    schedule = [True, False]

    def episode(embeddings):
        ep = run_episode(model, embeddings, index, prompts, click_gt, clicks, schedule=schedule)
        return torch.cat([r.low_res_logits.flatten(1) for r in ep.rounds], 1), ep.click_coords

    with torch._inductor.config.patch(fallback_random=True):
        torch.manual_seed(3)
        eager = episode(emb)
        torch.manual_seed(3)
        # fullgraph raises on any graph break while Dynamo captures the episode; aot_eager also runs AOTAutograd
        # on the graph but skips inductor's C++ code generation, which would take minutes on a CI CPU.
        compiled = torch.compile(episode, fullgraph=True, backend="aot_eager")(emb)
    torch.testing.assert_close(compiled[0], eager[0], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(compiled[1], eager[1])


def test_loss_compiles_fullgraph():
    from samlight.training.loss import SamLoss

    torch._dynamo.reset()
    loss = SamLoss()
    logits, iou = torch.randn(5, 3, 16, 16), torch.rand(5, 3)
    targets, weights = torch.rand(5, 16, 16), torch.tensor([1.0, 1.0, 0.0, 1.0, 1.0])
    eager = loss(logits, iou, targets, weights)
    compiled = torch.compile(loss.forward, fullgraph=True, backend="aot_eager")(logits, iou, targets, weights)
    torch.testing.assert_close(compiled.loss, eager.loss, rtol=1e-5, atol=1e-5)
    assert torch.equal(compiled.best_output, eager.best_output)


def test_training_round_compiles_fullgraph_with_a_click_generator():
    """`SamModule(compile=True)` compiles `episode_round` and passes the rank's click generator: the round must
    trace with no graph break (a Generator inside it used to stop Dynamo) and place the eager run's clicks."""
    torch._dynamo.reset()
    model = build_sam("tiny", image_size=S)
    gt = _gt(4)
    click_gt = F.avg_pool2d(gt[:, None].float(), 4)[:, 0] >= 0.5
    emb = model.encode_images(torch.randn(2, 3, S, S)).detach()
    index = torch.tensor([0, 0, 1, 1])
    prompts = BoxPrompt().sample(gt)
    clicks = CorrectiveClicks(num_clicks=2, mask_only_rounds=0, mode="uniform")
    compiled_round = torch.compile(episode_round, fullgraph=True, backend="aot_eager")

    def episode(round_fn):
        ep = run_episode(
            model,
            emb,
            index,
            prompts,
            click_gt,
            clicks,
            generator=torch.Generator().manual_seed(11),
            round_fn=round_fn,
        )
        return torch.cat([r.low_res_logits.flatten(1) for r in ep.rounds], 1), ep.click_coords

    eager = episode(None)
    compiled = episode(compiled_round)
    torch.testing.assert_close(compiled[1], eager[1])  # the same clicks from the same generator
    torch.testing.assert_close(compiled[0], eager[0], rtol=1e-4, atol=1e-4)
    assert eager[1].shape == (4, 2, 2)  # the 2 corrective clicks of each mask


def test_pre_drawn_click_noise_places_the_generators_clicks():
    gt = _gt(6)
    pred = torch.zeros_like(gt)
    clicks = CorrectiveClicks(mode="uniform")
    drawn = clicks.next_clicks(gt, pred, torch.Generator().manual_seed(4))
    noise = clicks.click_noise(6, torch.Generator().manual_seed(4))
    torch.testing.assert_close(clicks.next_clicks(gt, pred, uniform=noise), drawn)
    other = clicks.next_clicks(gt, pred, uniform=torch.rand(6, 1, generator=torch.Generator().manual_seed(9)))
    assert not torch.equal(other[0], drawn[0])  # the noise, not some fixed rule, places the click
    assert CorrectiveClicks(mode="center").click_noise(6) is None
