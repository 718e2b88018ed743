"""The paper's training recipe, tested on behaviour: box noise, clicks inside the image, the mask fed back,
per-rank randomness, the non-finite step and the encoder-only initialisation.

Each test here was written against a wrong implementation first (see docs/training.md, "What is guaranteed").
"""

from __future__ import annotations

import math

import pytest
import torch

from samlight.prompts import BoxPrompt, CorrectiveClicks, PromptContext
from samlight.training.optim import AdamWRecipe

# ------------------------------------------------------------------------------------------- box noise


def _square_masks(n: int, size: int, side: int) -> torch.Tensor:
    """n identical masks holding one side x side square in the middle of a size x size frame (no copy)."""
    mask = torch.zeros(1, size, size, dtype=torch.bool)
    start = (size - side) // 2
    mask[0, start : start + side, start : start + side] = True
    return mask.expand(n, size, size)


def _box_noise(side: int, *, n: int = 1000, size: int = 512) -> torch.Tensor:
    gt = _square_masks(n, size, side)
    exact = BoxPrompt(noise_std=0.0).sample(gt[:1]).boxes
    noisy = BoxPrompt().sample(gt, generator=torch.Generator().manual_seed(0)).boxes
    return (noisy - exact).flatten()  # 4n coordinate offsets


def test_box_noise_std_is_ten_percent_of_the_side_capped_at_20px():
    # A 100 px box: std 10 px, Gaussian (about 32% of the offsets beyond one std, none piled up anywhere).
    small = _box_noise(100)
    assert 9.0 < small.std() < 11.0
    assert 0.27 < (small.abs() > 10.0).float().mean() < 0.37
    # A 400 px box: 10% would be 40 px, the std is capped at 20 px; the noise itself is not clipped, so
    # about 32% of the offsets lie beyond 20 px and almost none sit exactly on +-20.
    large = _box_noise(400)
    assert 18.0 < large.std() < 22.0
    assert 0.27 < (large.abs() > 20.5).float().mean() < 0.37
    assert ((large.abs() - 20.0).abs() < 1e-3).float().mean() < 0.01
    # Corners move independently of each other.
    per_box = large.view(-1, 4)
    assert abs(torch.corrcoef(per_box.T)[0, 2]) < 0.1


def test_box_noise_follows_each_side_and_keeps_corners_in_order():
    gt = torch.zeros(1, 128, 128, dtype=torch.bool)
    gt[0, 40:80, 60:70] = True  # 10 px wide, 40 px high: x std 1 px, y std 4 px
    exact = BoxPrompt(noise_std=0.0).sample(gt).boxes
    offsets = (
        BoxPrompt().sample(gt.expand(4000, -1, -1), generator=torch.Generator().manual_seed(0)).boxes - exact
    )
    std = offsets.std(0)  # x0, y0, x1, y1
    assert torch.allclose(std, torch.tensor([1.0, 4.0, 1.0, 4.0]), rtol=0.05), std
    # Corners that cross are swapped back per axis: x with x, y with y, whatever the box's place.
    gt = torch.zeros(2, 128, 128, dtype=torch.bool)
    gt[0, 80:100, 20:40] = True  # centre (x, y) = (29.5, 89.5)
    gt[1, 20:40, 80:100] = True  # centre (89.5, 29.5)
    boxes = BoxPrompt(noise_std=0.5).sample(gt.repeat(1000, 1, 1), generator=torch.Generator().manual_seed(1))
    boxes = boxes.boxes.view(1000, 2, 4)
    assert (boxes[..., 2:] >= boxes[..., :2]).all()
    centres = (boxes[..., :2] + boxes[..., 2:]).mean(0) / 2  # 2 x 2 (x, y)
    assert torch.allclose(centres, torch.tensor([[29.5, 89.5], [89.5, 29.5]]), atol=1.0), centres


def test_noisy_boxes_are_clamped_to_the_frame_or_the_image():
    gt = torch.zeros(1, 64, 64, dtype=torch.bool)
    gt[0, 20:40, 20:40] = True
    wild = BoxPrompt(noise_std=5.0, max_noise=1000.0)
    boxes = wild.sample(gt.expand(200, -1, -1), generator=torch.Generator().manual_seed(0)).boxes
    assert boxes.min() == 0 and boxes.max() == 63  # reaches both edges of the frame, never beyond
    context = PromptContext(
        image_index=torch.zeros(200, dtype=torch.long), input_sizes=torch.tensor([[50, 44]])
    )
    boxes = wild.sample(
        gt.expand(200, -1, -1), context=context, generator=torch.Generator().manual_seed(0)
    ).boxes
    assert boxes.min() == 0 and boxes[:, 0::2].max() == 43 and boxes[:, 1::2].max() == 49  # W = 44, H = 50


# ------------------------------------------------------------------------------- clicks inside the image

S = 128


def _batch(b: int = 2, m: int = 3, seed: int = 0, input_hw: tuple[int, int] = (S - 48, S - 40)):
    """Rectangles inside each image; image 0 fills the frame, the others are input_hw with zero padding."""
    from samlight.datamodules.batch import SegmentationBatch

    g = torch.Generator().manual_seed(seed)
    sizes = torch.tensor([[S, S]] + [list(input_hw)] * (b - 1))
    images = 0.3 * torch.randn(b, 3, S, S, generator=g)
    masks = torch.zeros(b, m, S, S, dtype=torch.bool)
    for i in range(b):
        h, w = sizes[i].tolist()
        images[i, :, h:] = 0
        images[i, :, :, w:] = 0
        for j in range(m):
            y, x = (
                torch.randint(0, h - 24, (1,), generator=g).item(),
                torch.randint(0, w - 24, (1,), generator=g).item(),
            )
            masks[i, j, y : y + 20, x : x + 20] = True
    return SegmentationBatch(
        images=images,
        masks=masks,
        mask_valid=torch.ones(b, m, dtype=torch.bool),
        original_sizes=sizes.clone(),
        input_sizes=sizes,
    )


def _module(**kwargs):
    from samlight.training.module import SamModule

    defaults = dict(
        variant="tiny",
        model_overrides={"image_size": S},
        clicks=CorrectiveClicks(num_clicks=3, mask_only_rounds=1),
        optimizer=AdamWRecipe(warmup_steps=0),
    )
    return SamModule(**{**defaults, **kwargs})


def _record_episodes(module, monkeypatch) -> list:
    """Make `module.training_step` keep every Episode it runs."""
    import samlight.training.module as module_file

    episodes = []

    def recording(*args, **kwargs):
        episodes.append(module_file.run_episode.__wrapped__(*args, **kwargs))
        return episodes[-1]

    recording.__wrapped__ = module_file.run_episode
    monkeypatch.setattr(module_file, "run_episode", recording)
    return episodes


def _decode_everything_foreground(module, monkeypatch, value: float = 8.0) -> None:
    """The decoder predicts foreground on every pixel (padding included): false positives everywhere."""
    original = module.model.decode

    def decode(embeddings, image_index, prompts, multimask_output):
        logits, iou = original(embeddings, image_index, prompts, multimask_output)
        return logits * 0 + value, iou

    monkeypatch.setattr(module.model, "decode", decode)


def test_training_clicks_never_fall_in_the_padding(monkeypatch):
    module = _module()
    episodes = _record_episodes(module, monkeypatch)
    _decode_everything_foreground(module, monkeypatch)
    batch = _batch(b=3)
    module.training_step(batch, 0)
    assert episodes, "training_step ran no episode"
    for episode in episodes:
        hw = batch.input_sizes[episode.image_index]  # N x 2 (H, W)
        x, y = episode.click_coords[..., 0], episode.click_coords[..., 1]  # N x R, input pixels
        assert episode.click_coords.shape[1] == 3
        assert (x >= 0).all() and (y >= 0).all()
        assert (x <= hw[:, 1:] - 1).all() and (y <= hw[:, :1] - 1).all(), "a click fell in the padding"
        # Background clicks on the false positives inside the image (the only error there is).
        assert (episode.click_labels == 0).any()
    # The paper's first prompt: a point or a box, with equal odds (9 masks here).
    # One episode over all masks: a box is its two corner tokens (labels 2 and 3), a point a label-1 token.
    labels = torch.cat([e.prompts.point_labels for e in episodes])  # N x T
    is_box = (labels == 2).any(1)
    drawn = {"box": int(is_box.sum()), "point": int(((labels == 1).any(1) & ~is_box).sum())}
    assert min(drawn.values()) >= 2 and sum(drawn.values()) == labels.shape[0], drawn


# ------------------------------------------------------------------------------------ non-finite steps


def _optimizer_snapshot(module, optimizer) -> dict[str, torch.Tensor]:
    snap = {f"param/{n}": p.detach().clone() for n, p in module.named_parameters()}
    names = {id(p): n for n, p in module.named_parameters()}
    for p, state in optimizer.state.items():
        for key, value in state.items():
            snap[f"{key}/{names[id(p)]}"] = value.detach().clone()
    return snap


def _train_step(module, optimizer, batch) -> torch.Tensor:
    optimizer.zero_grad()
    loss = module.training_step(batch, 0)
    loss.backward()
    module.on_before_optimizer_step(optimizer)
    optimizer.step()
    return loss


@pytest.mark.filterwarnings("ignore:.*self.trainer")
def test_nonfinite_step_is_a_true_noop_and_its_count_is_checkpointed():
    module = _module(
        optimizer=AdamWRecipe(warmup_steps=0, weight_decay=0.1),
        clicks=CorrectiveClicks(num_clicks=1, mask_only_rounds=0),
    )
    optimizer = module.configure_optimizers()["optimizer"]
    _train_step(module, optimizer, _batch(seed=1))  # moments and step counts exist and are non-zero
    before = _optimizer_snapshot(module, optimizer)
    assert any(k.startswith("exp_avg/") for k in before) and any(k.startswith("step/") for k in before)
    poisoned = _batch(seed=2)
    poisoned.images[0, 0, 0, 0] = float("nan")
    assert not torch.isfinite(_train_step(module, optimizer, poisoned))
    after = _optimizer_snapshot(module, optimizer)
    moved = [k for k in before if not torch.equal(before[k], after[k])]
    assert not moved, f"a skipped step changed {moved[:5]} (+{max(len(moved) - 5, 0)})"
    assert float(module._skipped_nonfinite) == 1.0
    # The next finite step trains again, and the count survives a checkpoint.
    _train_step(module, optimizer, _batch(seed=3))
    assert not torch.equal(
        _optimizer_snapshot(module, optimizer)["param/model.mask_decoder.iou_token.weight"],
        after["param/model.mask_decoder.iou_token.weight"],
    )
    checkpoint: dict = {}
    module.on_save_checkpoint(checkpoint)
    resumed = _module()
    resumed.on_load_checkpoint(checkpoint)
    resumed_optimizer = resumed.configure_optimizers()["optimizer"]
    assert not torch.isfinite(_train_step(resumed, resumed_optimizer, poisoned))
    assert float(resumed._skipped_nonfinite) == 2.0


# ------------------------------------------------------------------------------ randomness of each rank


def _draws_of_rank(module, rank: int, seed: int) -> dict[str, torch.Tensor]:
    """What rank `rank` draws at the start of a run seeded with `seed`: prompt types, rounds, drop path."""
    from unittest import mock

    from lightning.pytorch import seed_everything

    from samlight.training.module import SamModule

    seed_everything(seed, verbose=False)  # as a Trainer run does, alike on every rank
    with mock.patch.object(SamModule, "global_rank", new_callable=mock.PropertyMock, return_value=rank):
        module.on_fit_start()
        rng = module.rank_randomness()
    types = module._draw_prompt_types(64, rng)
    schedules = torch.tensor([module.clicks.schedule(rng.cpu) for _ in range(8)])
    encoder = module.model.image_encoder.train()
    with torch.no_grad():
        features = encoder(torch.ones(4, 3, S, S))  # drop path: which blocks each image skips
    return {"prompt types": types, "mask-only rounds": schedules, "drop path": features}


def test_each_rank_draws_its_own_reproducible_randomness():
    module = _module(model_overrides={"image_size": S, "drop_path_rate": 0.5}, clicks=CorrectiveClicks())
    rank0, rank1 = _draws_of_rank(module, 0, seed=7), _draws_of_rank(module, 1, seed=7)
    again0, again1 = _draws_of_rank(module, 0, seed=7), _draws_of_rank(module, 1, seed=7)
    other_seed = _draws_of_rank(module, 1, seed=8)
    for key in rank0:
        assert not torch.equal(rank0[key], rank1[key]), f"ranks 0 and 1 drew the same {key}"
        assert torch.equal(rank0[key], again0[key]) and torch.equal(rank1[key], again1[key]), key
        assert not torch.equal(rank1[key], other_seed[key]), f"seeds 7 and 8 drew the same {key}"
    # Both prompt types (point and box) are drawn, in about equal numbers.
    assert 16 <= int((rank0["prompt types"] == 1).sum()) <= 48


# ------------------------------------------------------------------- the episode: feedback and clicks


class _ScriptedSam:
    """Stands in for `Sam.decode`: scripted round-0 outputs, then the mask fed back; records every call.

    Mask 0, a tall thin object (columns 1-3, rows 2-13): output 2 has the highest predicted IoU and covers its
    top half only, so the only error is a false negative in rows 8-13. Mask 1, a wide object (rows 10-12):
    output 0 has the highest predicted IoU, covers it and adds a false positive in rows 0-3, columns 12-15.
    Outputs 0 and 1 of mask 0 and outputs 1 and 2 of mask 1 are deliberately wrong everywhere.
    """

    image_size = 64  # click frame 16 x 16: 4 input pixels per click-frame pixel

    def __init__(self) -> None:
        self.calls: list[tuple] = []
        gt = torch.zeros(2, 16, 16, dtype=torch.bool)
        gt[0, 2:14, 1:4] = True
        gt[1, 10:13, 4:15] = True
        outputs = torch.full((2, 3, 16, 16), -5.0)
        outputs[0, 1] = 5.0  # everything
        outputs[0, 2, 2:8, 1:4] = 5.0  # top half of the object
        outputs[1, 0][gt[1]] = 5.0
        outputs[1, 0, 0:4, 12:16] = 5.0  # plus a false positive
        outputs[1, 2] = 5.0
        self.gt, self.outputs = gt, outputs
        self.iou = torch.tensor([[0.1, 0.2, 0.9], [0.9, 0.1, 0.2]])

    def decode(self, image_embeddings, image_index, prompts, multimask_output):
        self.calls.append((prompts, multimask_output))
        if multimask_output:
            return self.outputs.clone(), self.iou.clone()
        return prompts.mask_inputs.clone(), torch.full((2, 1), 0.5)


def _click_frame(coords: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Input-pixel (x, y) of N clicks -> click-frame column and row indices (N long each)."""
    xy = ((coords + 0.5) / 4 - 0.5).round().long()
    return xy[:, 0], xy[:, 1]


@pytest.mark.parametrize("mode", ["uniform", "center"])
def test_episode_feeds_back_the_best_mask_and_clicks_on_its_errors(mode):
    from samlight.prompts import Prompts
    from samlight.training.episode import run_episode

    sam = _ScriptedSam()
    first = Prompts(point_coords=torch.tensor([[[9.5, 25.5]], [[33.5, 45.5]]]), point_labels=torch.ones(2, 1))
    clicks = CorrectiveClicks(
        num_clicks=1, mask_only_rounds=1, mode=mode
    )  # rounds: initial, click, mask-only
    episode = run_episode(
        sam,
        torch.zeros(1, 1, 4, 4),
        torch.zeros(2, dtype=torch.long),
        first,
        sam.gt,
        clicks,
        generator=torch.Generator().manual_seed(0),
    )
    assert [multimask for _, multimask in sam.calls] == [True, False, False]
    assert episode.rounds[0].best.tolist() == [2, 0]  # the highest predicted IoU, not output 0
    chosen = sam.outputs[torch.arange(2), torch.tensor([2, 0])][:, None]  # N x 1 x 16 x 16
    round1, _ = sam.calls[1]
    assert torch.equal(round1.mask_inputs, chosen), "the mask fed back is not the highest-IoU output"
    # The click of round 1: the initial point kept, one click added where the chosen mask was wrong.
    assert round1.point_coords.shape == (2, 2, 2)
    assert torch.equal(round1.point_coords[:, :1], first.point_coords)
    col, row = _click_frame(round1.point_coords[:, 1])
    assert 1 <= col[0] <= 3 and 8 <= row[0] <= 13, "mask 0: click not in its false negative"
    assert 12 <= col[1] <= 15 and 0 <= row[1] <= 3, "mask 1: click not in its false positive"
    assert round1.point_labels[:, 1].tolist() == [1, 0]  # missed foreground = positive, extra = negative
    assert torch.equal(episode.click_coords[:, 0], round1.point_coords[:, 1])
    assert episode.click_labels[:, 0].tolist() == [1, 0]
    # The mask-only round adds no click and feeds back round 1's mask.
    round2, _ = sam.calls[2]
    assert torch.equal(round2.point_coords, round1.point_coords)
    assert torch.equal(round2.mask_inputs, chosen)
    # IoU of the mask passed on: mask 0 covers 18 of 36 object pixels; mask 1 33 + 16 false positives.
    assert episode.ious[0].tolist() == pytest.approx([0.5, 33 / 49])
    # A click is the centre of its click-frame pixel in input pixels: (col + 0.5) x 4 - 0.5, exactly.
    frame = (episode.click_coords + 0.5) / 4 - 0.5
    assert torch.equal(frame, frame.round())
    assert episode.prompts is first and torch.equal(episode.rounds[0].iou_predictions, sam.iou)
    assert episode.pred_masks == []  # kept only when asked


def test_episode_valid_region_generator_and_no_clicks():
    from samlight.prompts import Prompts
    from samlight.training.episode import run_episode

    first = Prompts(point_coords=torch.tensor([[[9.5, 25.5]], [[33.5, 45.5]]]), point_labels=torch.ones(2, 1))
    args = (torch.zeros(1, 1, 4, 4), torch.zeros(2, dtype=torch.long), first)
    valid = torch.zeros(2, 16, 16, dtype=torch.bool)
    valid[:, :, :14] = True  # columns 14 and 15 are padding
    clicks = CorrectiveClicks(num_clicks=4, mask_only_rounds=0)
    runs = []
    for global_seed in (0, 1):  # the episode draws from its generator, not from torch's global RNG
        torch.manual_seed(global_seed)
        sam = _ScriptedSam()
        runs.append(
            run_episode(
                sam,
                *args,
                sam.gt,
                clicks,
                valid_region=valid,
                generator=torch.Generator().manual_seed(3),
                keep_pred_masks=True,
            )
        )
    episode = runs[0]
    assert torch.equal(runs[0].click_coords, runs[1].click_coords)
    assert (episode.click_coords[..., 0] <= 14 * 4 - 1).all()  # never in the padding columns
    assert not any((pred & ~valid).any() for pred in episode.pred_masks)
    # Mask 1 inside the image: 30 of its 33 pixels predicted, plus 8 false positives (columns 12-13).
    assert episode.ious[0, 1].item() == pytest.approx(30 / 41)
    only_first = run_episode(_ScriptedSam(), *args, _ScriptedSam().gt, None)
    assert only_first.click_coords.shape == (2, 0, 2) and only_first.click_labels.shape == (2, 0)
    assert len(only_first.rounds) == 1 and only_first.ious.shape == (1, 2)


# ------------------------------------------------------------------------- masks over 90% of the image


def test_masks_over_90_percent_of_the_image_are_dropped():
    import io
    import json

    import numpy as np
    from PIL import Image
    from pycocotools import mask as mask_utils

    from samlight.datamodules.decode import decode_sa1b_sample

    h, w = 20, 30
    buffer = io.BytesIO()
    Image.fromarray(np.full((h, w, 3), 128, np.uint8)).save(buffer, format="JPEG")
    annotations = []
    for rows in (20, 19, 18, 17, 3):  # 100%, 95%, 90%, 85%, 15% of the image
        mask = np.zeros((h, w), np.uint8)
        mask[:rows] = 1
        rle = mask_utils.encode(np.asfortranarray(mask))
        rle["counts"] = rle["counts"].decode()
        annotations.append({"segmentation": rle, "area": int(mask.sum())})
    record = json.dumps({"image": {"height": h, "width": w}, "annotations": annotations}).encode()
    sample = decode_sa1b_sample(buffer.getvalue(), record, image_size=32, max_masks=8)
    areas = sorted(round(float(a)) for a in torch.as_tensor(sample.masks).flatten(1).float().sum(1))
    # Resized 20 x 30 -> 21 x 32 (longest side 32): the 90% (19 rows), 85% and 15% masks stay, the 95% (20
    # rows) and the full one go.
    assert len(areas) == 3 and areas[-1] == 19 * 32 and areas[0] > 0


# ------------------------------------------------------------------- encoder-only initialisation (MAE)


def _mae_file(tmp_path, *, patch_size: int = 16, img_size: int = 64, embed_dim: int = 64, depth: int = 2):
    """An MAE-style pre-training checkpoint of a small timm ViT: {"model": encoder + MAE decoder keys}."""
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(1)
    vit = VisionTransformer(
        img_size=img_size, patch_size=patch_size, embed_dim=embed_dim, depth=depth, num_heads=2, num_classes=0
    )
    state = {k: v.detach().clone() for k, v in vit.state_dict().items()}
    # Smooth over the grid like MAE's sin-cos embedding (timm inits it near zero): ramps with random slopes.
    side = math.isqrt(state["pos_embed"].shape[1] - 1)
    ramp = torch.arange(side, dtype=torch.float32) - (side - 1) / 2
    slopes = torch.randn(2, embed_dim)
    grid = ramp[:, None, None] * slopes[0] + ramp[None, :, None] * slopes[1]  # side x side x D
    state["pos_embed"] = torch.cat([torch.randn(1, embed_dim), grid.reshape(-1, embed_dim)])[None]
    state["mask_token"] = torch.zeros(1, 1, 32)
    state["decoder_embed.weight"] = torch.zeros(32, embed_dim)
    path = tmp_path / "mae_pretrain_vit.pth"
    torch.save({"model": state}, path)
    return path, state


def test_encoder_only_init_from_an_mae_vit(tmp_path):
    import torch.nn.functional as F

    from samlight import build_sam

    path, vit = _mae_file(tmp_path)
    torch.manual_seed(0)
    reference = build_sam("tiny")
    torch.manual_seed(0)
    model = build_sam("tiny", encoder_checkpoint=path)
    encoder = model.image_encoder.state_dict()
    for i in range(2):
        assert torch.equal(encoder[f"blocks.{i}.attn.qkv.weight"], vit[f"blocks.{i}.attn.qkv.weight"])
        assert torch.equal(encoder[f"blocks.{i}.mlp.lin1.weight"], vit[f"blocks.{i}.mlp.fc1.weight"])
        assert torch.equal(encoder[f"blocks.{i}.norm2.bias"], vit[f"blocks.{i}.norm2.bias"])
        # MAE has no relative position tables: zeros, as the official image encoder starts them.
        assert (
            not encoder[f"blocks.{i}.attn.rel_pos_h"].any()
            and not encoder[f"blocks.{i}.attn.rel_pos_w"].any()
        )
    assert torch.equal(encoder["patch_embed.proj.weight"], vit["patch_embed.proj.weight"])
    # The 4 x 4 MAE grid (class token dropped) resampled to the tiny model's 16 x 16 grid: pooled back, it is
    # the MAE embedding again.
    pos = encoder["pos_embed"]
    assert pos.shape == (1, 16, 16, 64)
    mae_grid = vit["pos_embed"][0, 1:].reshape(4, 4, 64)
    pooled = F.avg_pool2d(pos[0].permute(2, 0, 1), 4).permute(1, 2, 0)
    assert torch.allclose(pooled, mae_grid, atol=0.15 * mae_grid.abs().max())
    # Neck, prompt encoder and mask decoder keep their init.
    for name, value in reference.state_dict().items():
        if not name.startswith("image_encoder.") or name.startswith("image_encoder.neck."):
            assert torch.equal(model.state_dict()[name], value), name
    assert torch.isfinite(model.encode_images(torch.randn(1, 3, 256, 256))).all()


def test_encoder_only_init_resizes_patch_embedding_and_sam_tables(tmp_path):
    from samlight import build_sam

    path, vit = _mae_file(tmp_path, patch_size=8, img_size=32)  # patch 8: resampled to SAM's 16
    model = build_sam("tiny", encoder_checkpoint=path)
    assert model.image_encoder.patch_embed.proj.weight.shape == (64, 3, 16, 16)
    # An image_encoder.* subset of a SAM trained at 256 px, into one whose encoder is built for 128 px.
    torch.manual_seed(2)
    source = build_sam("tiny")
    with torch.no_grad():
        for name, p in source.image_encoder.named_parameters():
            if "rel_pos" in name:
                p.normal_()
    subset = {k: v for k, v in source.state_dict().items() if k.startswith("image_encoder.")}
    torch.save(subset, tmp_path / "encoder.pth")
    small = build_sam(
        "tiny", encoder_img_size=128, image_size=128, encoder_checkpoint=tmp_path / "encoder.pth"
    )
    got, want = small.image_encoder.state_dict(), source.image_encoder.state_dict()
    assert torch.equal(got["blocks.1.mlp.lin2.weight"], want["blocks.1.mlp.lin2.weight"])
    assert torch.equal(got["neck.0.weight"], want["neck.0.weight"])  # a SAM encoder brings its neck
    assert got["pos_embed"].shape == (1, 8, 8, 64) and want["pos_embed"].shape == (1, 16, 16, 64)
    table = got["blocks.1.attn.rel_pos_h"]  # global block: 2 x 8 - 1 rows instead of 2 x 16 - 1
    assert table.shape == (15, 32) and table.any()


def test_encoder_only_init_is_strict_with_clear_errors(tmp_path):
    from samlight import build_sam, save_official
    from samlight.training.module import SamModule

    path, vit = _mae_file(tmp_path, depth=1)  # the tiny model has 2 blocks
    with pytest.raises(ValueError, match=r"missing keys.*blocks\.1\.attn\.qkv\.weight"):
        build_sam("tiny", encoder_checkpoint=path)
    path, _ = _mae_file(tmp_path, embed_dim=32)
    with pytest.raises(ValueError, match=r"shape mismatches.*blocks\.0\.attn\.qkv\.weight"):
        build_sam("tiny", encoder_checkpoint=path)
    path, vit = _mae_file(tmp_path)
    torch.save({**vit, "blocks.0.attn.q_norm.weight": torch.ones(32)}, tmp_path / "extra.pth")
    with pytest.raises(ValueError, match=r"unexpected keys.*q_norm"):
        build_sam("tiny", encoder_checkpoint=tmp_path / "extra.pth")
    save_official(build_sam("tiny"), tmp_path / "sam.pth")
    with pytest.raises(ValueError, match="full SAM checkpoint.*model.checkpoint"):
        build_sam("tiny", encoder_checkpoint=tmp_path / "sam.pth")
    with pytest.raises(ValueError, match="either"):
        SamModule(variant="tiny", checkpoint=str(tmp_path / "sam.pth"), encoder_checkpoint=str(path))
