"""Mask panels: rendering from a hand-built Episode, and PNG panels from a short quickstart run."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from samlight.callbacks.panel_render import (
    BACKGROUND_CLICK,
    BOX_COLOR,
    FOREGROUND_CLICK,
    PIXEL_MEAN,
    PIXEL_STD,
    denormalize,
    label_map,
    panel_png,
    panels_from_trace,
)
from samlight.prompts.types import Prompts
from samlight.training.episode import Episode
from tests._quickstart import SHORT_RUN, own_demo_shards

S = 64


def _normalise(pixels: torch.Tensor) -> torch.Tensor:
    """B x 3 x S x S uint8 -> SAM-normalised float."""
    mean = torch.tensor(PIXEL_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(PIXEL_STD).view(1, 3, 1, 1)
    return (pixels.float() - mean) / std


def _square(y0: int, x0: int, side: int) -> torch.Tensor:
    m = torch.zeros(S, S, dtype=torch.bool)
    m[y0 : y0 + side, x0 : x0 + side] = True
    return m


def _trace(prompt: str) -> Episode:
    """Two images; image 0 has two masks (a big one and a small one inside it), image 1 one mask."""
    gt = torch.stack([_square(8, 8, 30), _square(12, 12, 6), _square(20, 4, 10)])  # 3 x S x S
    first = torch.stack([_square(8, 8, 20), torch.zeros(S, S, dtype=torch.bool), _square(20, 4, 10)])
    click_coords = torch.tensor([[[30.0, 30.0]], [[14.0, 14.0]], [[50.0, 50.0]]])  # 3 x 1 x 2, (x, y)
    click_labels = torch.tensor([[1], [1], [0]])
    if prompt == "box":
        prompts = Prompts(
            boxes=torch.tensor([[8.0, 8.0, 37.0, 37.0], [12.0, 12.0, 17.0, 17.0], [4.0, 20.0, 13.0, 29.0]])
        )
    else:
        prompts = Prompts(
            point_coords=torch.tensor([[[20.0, 20.0]], [[14.0, 14.0]], [[8.0, 24.0]]]),
            point_labels=torch.tensor([[1], [1], [1]]),
        )
    return Episode(
        rounds=[],
        image_index=torch.tensor([0, 0, 1]),
        gt_masks=gt,
        prompts=prompts,
        click_coords=click_coords,
        click_labels=click_labels,
        pred_masks=[first, gt.clone()],
        ious=torch.tensor([[0.44, 0.0, 1.0], [1.0, 1.0, 1.0]]),
        prompt_name=prompt,
    )


def _images() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Grey images with a padded region; returns (pixels uint8, normalised, input_sizes)."""
    pixels = torch.full((2, 3, S, S), 100, dtype=torch.uint8)
    pixels[1, :, :, 48:] = 0  # image 1 is 64 x 48 (H x W), padded on the right
    input_sizes = torch.tensor([[S, S], [S, 48]])
    return pixels, _normalise(pixels), input_sizes


def test_denormalize_inverts_sam_normalisation_and_crops_padding() -> None:
    pixels, images, sizes = _images()
    out = denormalize(images, sizes)
    assert out[0].shape == (S, S, 3) and out[1].shape == (S, 48, 3)
    assert out[0].dtype == np.uint8
    np.testing.assert_array_equal(out[1], pixels[1, :, :, :48].permute(1, 2, 0).numpy())


def test_label_map_paints_small_masks_on_top() -> None:
    masks = torch.stack([_square(12, 12, 6), _square(8, 8, 30)]).numpy()  # small first, big second
    labels = label_map(masks)
    assert labels[14, 14] == 1  # the small mask stays visible inside the big one
    assert labels[30, 30] == 2
    assert labels[0, 0] == 0


@pytest.mark.parametrize("prompt", ["point", "box"])
def test_panels_from_trace(prompt: str) -> None:
    _, images, sizes = _images()
    panels = panels_from_trace(_trace(prompt), denormalize(images, sizes), max_side=512)
    assert [p.image_index for p in panels] == [0, 1]
    p0, p1 = panels
    assert p0.prompt_name == prompt and p0.num_clicks == 1
    assert p1.image.shape == (S, 48, 3) and p1.gt.shape == (S, 48)
    # Ground truth and predictions as label maps: image 0's first prediction misses the small mask.
    assert set(np.unique(p0.gt)) == {0, 1, 2}
    assert set(np.unique(p0.first)) == {0, 1}
    np.testing.assert_array_equal(p0.last, p0.gt)
    assert p0.miou_first == pytest.approx(0.22) and p0.miou_last == pytest.approx(1.0)
    # Prompts are drawn: a foreground corrective click (green) at (30, 30) on image 0's last panel only,
    # a background click (red) at (50, 50) on image 1.
    assert tuple(p0.last_drawn[30, 30]) == FOREGROUND_CLICK
    assert tuple(p0.first_drawn[30, 30]) != FOREGROUND_CLICK
    assert tuple(p1.last_drawn[50, 40]) != BACKGROUND_CLICK  # outside the 48 px wide image: no click there
    if prompt == "box":
        assert tuple(p0.first_drawn[8, 20]) == BOX_COLOR  # top edge of the first box
    else:
        assert tuple(p0.first_drawn[20, 20]) == FOREGROUND_CLICK  # the initial point
    assert "mIoU 0.220" in p0.caption("first") and "1 clicks" in p0.caption("last")


def test_panels_scale_down_large_images() -> None:
    _, images, sizes = _images()
    panels = panels_from_trace(_trace("point"), denormalize(images, sizes), max_side=32)
    assert panels[0].image.shape == (32, 32, 3) and panels[0].gt.shape == (32, 32)
    assert panels[1].image.shape == (32, 24, 3)
    assert tuple(panels[0].last_drawn[15, 15]) == FOREGROUND_CLICK  # (30, 30) scaled by 1/2


def test_panel_png_has_three_tiles(tmp_path: Path) -> None:
    _, images, sizes = _images()
    panel = panels_from_trace(_trace("box"), denormalize(images, sizes))[1]
    path = tmp_path / "p.png"
    panel_png(panel).save(path)
    png = Image.open(path)
    assert png.size[0] == 3 * 48 + 2 * 4 and png.size[1] > S


@pytest.mark.slow
def test_quickstart_writes_png_panels_in_the_run_directory(tmp_path: Path, monkeypatch, caplog) -> None:
    """Without W&B: PNG panels, config.yaml and checkpoints in one `runs/<config name>/version_0` directory."""
    import logging
    import sys

    from samlight.cli.train import default_config_path, run_cli

    monkeypatch.setattr(sys, "argv", ["samlight"])
    monkeypatch.chdir(tmp_path)
    with caplog.at_level(logging.INFO):
        run_cli(
            [
                "fit",
                "--config",
                default_config_path(),
                *SHORT_RUN,
                "--panels.every_n_steps=1",  # also during training: the first training batch stands in
                *own_demo_shards(tmp_path),
                f"--trainer.default_root_dir={tmp_path / 'runs'}",
            ]
        )

    run_dir = tmp_path / "runs" / "quickstart" / "version_0"
    assert (run_dir / "config.yaml").is_file()
    assert list((run_dir / "checkpoints").glob("*.ckpt"))
    expected = ["box_image0.png", "box_image1.png", "point_image0.png", "point_image1.png"]
    for step in (1, 2):  # step 1: training panels; step 2: training, then validation images
        assert sorted(p.name for p in (run_dir / "panels" / f"step_{step}").glob("*.png")) == expected
    validation_images = (run_dir / "panels" / "step_2" / "point_image0.png").read_bytes()
    assert validation_images != (run_dir / "panels" / "step_1" / "point_image0.png").read_bytes()
    sheet = np.asarray(Image.open(run_dir / "panels" / "step_2" / "point_image0.png").convert("RGB"))
    assert sheet.shape[1] > 2 * sheet.shape[0] // 2 and sheet.std() > 10  # three tiles with content
    # The model summary with trainable/frozen counts is on.
    assert "Trainable params" in caplog.text and "Non-trainable params" in caplog.text
    assert "model.image_encoder" in caplog.text and "frozen" in caplog.text
