"""SamModule: over-fitting a small batch, logged metrics, bad input, optimiser groups, LoRA and freezing."""

from __future__ import annotations

import pytest
import torch
from lightning.pytorch import LightningDataModule, Trainer
from torch.utils.data import DataLoader

from samlight import build_sam, save_official
from samlight.datamodules.batch import SegmentationBatch
from samlight.prompts import BoxPrompt, CorrectiveClicks, PointPrompt, Prompts, PromptType
from samlight.training.module import SamModule
from samlight.training.optim import AdamWRecipe, warmup_cosine_lambda, warmup_step_lambda

S = 128
SMALL = {"image_size": S}


def make_batch(b: int = 2, m: int = 3, seed: int = 0) -> SegmentationBatch:
    """Bright rectangles on noise; the last slot of the last image is padding."""
    g = torch.Generator().manual_seed(seed)
    images = 0.3 * torch.randn(b, 3, S, S, generator=g)
    masks = torch.zeros(b, m, S, S, dtype=torch.bool)
    for i in range(b):
        for j in range(m):
            y, x = torch.randint(0, S - 48, (2,), generator=g).tolist()
            h, w = torch.randint(20, 48, (2,), generator=g).tolist()
            masks[i, j, y : y + h, x : x + w] = True
            images[i, j % 3, y : y + h, x : x + w] += 2.0
    valid = torch.ones(b, m, dtype=torch.bool)
    valid[-1, -1] = False
    return SegmentationBatch(
        images=images,
        masks=masks,
        mask_valid=valid,
        original_sizes=torch.full((b, 2), S),
        input_sizes=torch.tensor([[S, S]] + [[S - 16, S]] * (b - 1)),
        meta=[{"mask_labels": [1, 2, 1][:m]} for _ in range(b)],
    )


class _Batches(LightningDataModule):
    def __init__(self, batches):
        super().__init__()
        self.batches = batches

    def train_dataloader(self):
        return DataLoader(self.batches, batch_size=None, collate_fn=lambda x: x)

    def val_dataloader(self):
        return DataLoader(self.batches[:1], batch_size=None, collate_fn=lambda x: x)


def _module(**kwargs) -> SamModule:
    """A tiny SamModule; optimiser settings (lr, weight_decay, ...) go into its AdamWRecipe."""
    recipe = {k: kwargs.pop(k) for k in ("lr", "weight_decay", "layer_decay") if k in kwargs}
    defaults = dict(
        variant="tiny",
        model_overrides=SMALL,
        clicks=CorrectiveClicks(num_clicks=1, mask_only_rounds=1),
        val_clicks=CorrectiveClicks(num_clicks=2, mask_only_rounds=0, mode="center"),
        optimizer=AdamWRecipe(warmup_steps=0, **recipe),
    )
    return SamModule(**{**defaults, **kwargs})


@pytest.mark.filterwarnings("ignore:.*self.trainer")
def test_overfits_a_small_batch():
    torch.manual_seed(0)
    # One feedback round besides the first keeps the test short while exercising the mask feedback.
    clicks = CorrectiveClicks(num_clicks=0, mask_only_rounds=1)
    module = _module(lr=1e-2, weight_decay=0.0, layer_decay=1.0, clicks=clicks)
    batch = make_batch(b=1, m=3)
    optimizer = module.configure_optimizers()["optimizer"]
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        before = module.interact(batch, prompt="box", num_clicks=0, generator=gen).ious[0].mean()
    losses = []
    for _ in range(40):
        loss = module.training_step(batch, 0)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    with torch.no_grad():
        after = module.interact(batch, prompt="box", num_clicks=0, generator=gen).ious[0].mean()
    assert losses[-1] < 0.5 * losses[0]
    assert after > 0.5 and after > before + 0.3, (float(before), float(after))


def test_fit_logs_the_documented_metrics(tmp_path):
    module = _module()
    trainer = Trainer(
        max_steps=2,
        limit_val_batches=1,
        num_sanity_val_steps=0,
        val_check_interval=2,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    trainer.fit(module, datamodule=_Batches([make_batch(seed=i) for i in range(2)]))
    logged = trainer.callback_metrics
    expected = [
        "train/loss",
        "train/loss_focal",
        "train/loss_dice",
        "train/loss_iou",
        "train/skipped_nonfinite",
    ]
    expected += [f"val/miou@{k}" for k in (1, 2, 3)] + [f"val/point/miou@{k}" for k in (1, 2, 3)]
    expected += ["val/oracle@1", "val/box/miou", "val/box/miou@1", "val/iou_calibration_error", "val/dice"]
    expected += ["val/dice/label_1", "val/iou/label_2"]
    missing = [k for k in expected if k not in logged]
    assert not missing, f"missing {missing}; logged {sorted(logged)}"
    for key in expected[5:]:
        assert 0.0 <= float(logged[key]) <= 1.0, key
    assert float(logged["val/oracle@1"]) >= float(logged["val/miou@1"]) - 1e-6
    assert float(logged["train/skipped_nonfinite"]) == 0.0


@pytest.mark.filterwarnings("ignore:.*self.trainer")
def test_nonfinite_step_is_skipped_without_poisoning_weights():
    module = _module(weight_decay=0.0)
    optimizer = module.configure_optimizers()["optimizer"]
    batch = make_batch()
    batch.images[0, 0, 0, 0] = float("nan")
    loss = module.training_step(batch, 0)
    assert not torch.isfinite(loss)
    loss.backward()
    module.on_before_optimizer_step(optimizer)
    optimizer.step()
    assert all(torch.isfinite(p).all() for p in module.parameters())
    assert float(module._skipped_nonfinite) == 1.0
    # A clean step afterwards trains normally and is not counted.
    optimizer.zero_grad()
    module.training_step(make_batch(seed=1), 0).backward()
    module.on_before_optimizer_step(optimizer)
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in module.parameters())
    assert float(module._skipped_nonfinite) == 1.0


@pytest.mark.filterwarnings("ignore:.*self.trainer")
def test_images_without_valid_masks():
    module = _module()
    batch = make_batch()
    batch.mask_valid[0] = False  # one image with no masks
    assert torch.isfinite(module.training_step(batch, 0))
    batch.mask_valid[:] = False  # none at all
    loss = module.training_step(batch, 0)
    assert float(loss.detach()) == 0.0
    loss.backward()  # still a valid graph


class _WrongShape(PromptType):
    name = "wrong"

    def sample(self, gt_masks, *, context=None, generator=None):
        n = gt_masks.shape[0]
        return Prompts(point_coords=torch.zeros(n, 1, 3), point_labels=torch.ones(n, 1))


@pytest.mark.filterwarnings("ignore:.*self.trainer")
def test_plugin_with_wrong_shapes_is_named():
    module = _module(prompts=[_WrongShape()])
    with pytest.raises(ValueError, match="_WrongShape.*point_coords"):
        module.training_step(make_batch(), 0)


def test_interact_trace():
    module = _module(val_prompts=[PointPrompt(mode="center"), BoxPrompt(noise_std=0.0)]).eval()
    batch = make_batch(b=2, m=3)
    with torch.no_grad():
        trace = module.interact(batch, prompt="point", num_clicks=3, max_masks_per_image=2)
    n = 4  # 2 images x first 2 valid masks
    assert trace.image_index.tolist() == [0, 0, 1, 1]
    assert trace.gt_masks.shape == (n, S, S) and trace.prompt_name == "point"
    assert trace.click_coords.shape == (n, 3, 2) and trace.click_labels.shape == (n, 3)
    assert len(trace.pred_masks) == 4 and trace.ious.shape == (4, n)
    assert torch.equal(trace.gt_masks, batch.masks[:, :2].flatten(0, 1))
    for r, pred in enumerate(trace.pred_masks):
        inter = (pred & trace.gt_masks).flatten(1).sum(1).float()
        union = (pred | trace.gt_masks).flatten(1).sum(1).float()
        assert torch.allclose(trace.ious[r], inter / union.clamp(min=1))
    # Clicks are corrective: each lands where the mask passed on from the previous round was wrong.
    for r in range(3):
        x, y = trace.click_coords[:, r].round().long().unbind(-1)
        wrong = trace.pred_masks[r] ^ trace.gt_masks
        assert wrong[torch.arange(n), y, x].all()
        assert torch.equal(trace.click_labels[:, r] == 1, trace.gt_masks[torch.arange(n), y, x])
    with pytest.raises(KeyError, match="configured"):
        module.interact(batch, prompt="lasso")


def test_optimizer_groups_layer_decay_and_no_decay():
    module = _module(lr=1.0, weight_decay=0.1, layer_decay=0.5)
    groups = module.configure_optimizers()["optimizer"].param_groups
    names = {id(p): n for n, p in module.model.named_parameters()}
    depth = len(module.model.image_encoder.blocks)
    for group in groups:
        for p in group["params"]:
            name = names[id(p)]
            if ".blocks.0." in name:
                assert group["lr"] == pytest.approx(0.5**depth)
            if name.startswith("mask_decoder."):
                assert group["lr"] == pytest.approx(1.0)
            no_decay = ("pos_embed", "rel_pos", "iou_token", "mask_tokens")
            if p.ndim == 1 or any(part in name for part in no_decay):
                assert group["weight_decay"] == 0.0, name
            else:
                assert group["weight_decay"] == 0.1, name
    covered = sum(p.numel() for g in groups for p in g["params"])
    assert covered == sum(p.numel() for p in module.model.parameters())
    factor = warmup_step_lambda(10, [100, 200], 0.1)
    assert [factor(s) for s in (0, 9, 99, 100, 250)] == pytest.approx([0.1, 1.0, 1.0, 0.1, 0.01])


def test_cosine_schedule_decays_over_the_run_the_trainer_sets():
    """`schedule: cosine` reads the run's length from trainer.max_steps: peak after warmup, half at the midpoint
    of the decay, `min_lr_ratio` at the last step; without a length it says which setting is missing."""
    factor = warmup_cosine_lambda(10, 110, 0.1)
    assert [factor(s) for s in (0, 9, 10, 60, 110, 500)] == pytest.approx([0.1, 1.0, 1.0, 0.55, 0.1, 0.1])
    short = warmup_cosine_lambda(10, 3)  # a 3-step smoke run of a config with 10 warmup steps
    assert [short(s) for s in range(3)] == pytest.approx([0.1, 0.2, 0.3])
    recipe = AdamWRecipe(lr=2.0, layer_decay=1.0, warmup_steps=10, schedule="cosine", min_lr_ratio=0.1)
    module = _module(optimizer=recipe)
    trainer = Trainer(max_steps=110, logger=False, enable_checkpointing=False, enable_progress_bar=False)
    module._trainer = trainer  # what Trainer.fit sets before configure_optimizers
    sched = module.configure_optimizers()["lr_scheduler"]["scheduler"]
    lrs = []
    for _ in range(111):
        lrs.append(sched.get_last_lr()[0])
        sched.optimizer.step()
        sched.step()
    assert lrs[9] == pytest.approx(2.0) and lrs[60] == pytest.approx(1.1) and lrs[110] == pytest.approx(0.2)
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:]))  # never rises after the warmup
    with pytest.raises(ValueError, match="trainer.max_steps"):
        recipe.configure(module.model, total_steps=None)
    with pytest.raises(ValueError, match="'step' or 'cosine'"):
        AdamWRecipe(schedule="linear")


def test_freezing_flags():
    module = _module(freeze=["image_encoder", "prompt_encoder"])
    trainable = {n.split(".")[0] for n, p in module.model.named_parameters() if p.requires_grad}
    assert trainable == {"mask_decoder"}
    params = {id(p) for g in module.configure_optimizers()["optimizer"].param_groups for p in g["params"]}
    assert params == {id(p) for p in module.model.mask_decoder.parameters()}


def test_lora_trains_adapters_and_merges_to_official_keys(tmp_path):
    module = _module(lora={"r": 4, "alpha": 8, "dropout": 0.0}, freeze=["prompt_encoder"])
    encoder_trainable = [n for n, p in module.model.image_encoder.named_parameters() if p.requires_grad]
    assert encoder_trainable and all("lora_" in n for n in encoder_trainable)
    assert any(".attn.qkv." in n for n in encoder_trainable) and any(
        ".attn.proj." in n for n in encoder_trainable
    )
    # Move the adapters away from their zero init so merging changes the weights.
    with torch.no_grad():
        for n, p in module.model.image_encoder.named_parameters():
            if "lora_B" in n:
                p.normal_(std=0.05)
    images = make_batch().images
    module.eval()
    with torch.no_grad():
        adapted = module.model.encode_images(images)
        merged = module.merged_model()
        assert torch.allclose(merged.encode_images(images), adapted, atol=1e-4)
    path = tmp_path / "sam_tiny.pth"
    save_official(merged, path)
    reloaded = build_sam("tiny", checkpoint=str(path), **SMALL).eval()  # strict load: official keys only
    with torch.no_grad():
        assert torch.allclose(reloaded.encode_images(images), adapted, atol=1e-4)
