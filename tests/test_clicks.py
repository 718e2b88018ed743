"""CorrectiveClicks: the DESIGN.md contract (error region, labels, centre = farthest from the boundary)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import ndimage

from samlight.prompts.clicks import CorrectiveClicks, distance_to_boundary, jump_flood_distance


def _blobs(n: int, size: int, seed: int, threshold: float = 0.55) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    noise = torch.rand(n, 1, size // 8, size // 8, generator=g)
    return torch.nn.functional.interpolate(noise, size=(size, size), mode="bilinear")[:, 0] > threshold


def _edt(mask: np.ndarray) -> np.ndarray:
    return ndimage.distance_transform_edt(np.pad(mask, 1))[1:-1, 1:-1]


def _at(masks: torch.Tensor, coords: torch.Tensor) -> torch.Tensor:
    x, y = coords[:, 0, 0].long(), coords[:, 0, 1].long()
    return masks[torch.arange(masks.shape[0]), y, x]


@pytest.mark.parametrize("mode", ["uniform", "center"])
def test_click_in_error_region_with_correct_label(mode):
    gt, pred = _blobs(12, 48, 0), _blobs(12, 48, 1)
    coords, labels = CorrectiveClicks(mode=mode).next_clicks(
        gt, pred, generator=torch.Generator().manual_seed(0)
    )
    assert coords.shape == (12, 1, 2) and labels.shape == (12, 1) and labels.dtype == torch.long
    assert torch.all((coords >= 0) & (coords < 48))
    false_neg, false_pos = gt & ~pred, pred & ~gt
    assert _at(false_neg | false_pos, coords).all()
    assert torch.equal(labels[:, 0] == 1, _at(false_neg, coords))
    assert torch.equal(labels[:, 0] == 0, _at(false_pos, coords))


def test_center_click_is_farthest_from_error_boundary():
    gt, pred = _blobs(10, 40, 2), _blobs(10, 40, 3)
    coords, _ = CorrectiveClicks(mode="center").next_clicks(gt, pred)
    for i in range(10):
        fn = _edt((gt[i] & ~pred[i]).numpy())
        fp = _edt((pred[i] & ~gt[i]).numpy())
        best = max(fn.max(), fp.max())
        x, y = coords[i, 0].long().tolist()
        assert max(fn[y, x], fp[y, x]) == pytest.approx(best)


def test_uniform_clicks_cover_the_error_region():
    gt = torch.zeros(1, 16, 16, dtype=torch.bool)
    gt[0, 4:8, 4:8] = True  # 16 false-negative pixels, empty prediction
    clicks = CorrectiveClicks(mode="uniform")
    g = torch.Generator().manual_seed(0)
    seen = {tuple(clicks.next_clicks(gt, torch.zeros_like(gt), g)[0][0, 0].tolist()) for _ in range(200)}
    assert len(seen) == 16


@pytest.mark.parametrize("mode", ["uniform", "center"])
def test_perfect_prediction_and_tiny_masks_give_valid_clicks(mode):
    gt = torch.zeros(3, 32, 32, dtype=torch.bool)
    gt[0, 5:20, 8:30] = True  # perfect prediction of a real object
    gt[1, 7, 9] = True  # one-pixel mask, perfectly predicted
    pred = gt.clone()  # gt[2] is empty and so is its prediction
    coords, labels = CorrectiveClicks(mode=mode).next_clicks(gt, pred)
    assert torch.isfinite(coords).all()
    assert labels[:, 0].tolist() == [1, 1, 0]  # on the object, on the pixel, on the background
    assert _at(gt[:2], coords[:2]).all()
    assert coords[1, 0].tolist() == [9.0, 7.0]
    # A one-pixel mask missed by the prediction: the click must be that pixel, as a positive click.
    coords, labels = CorrectiveClicks(mode=mode).next_clicks(gt[1:2], torch.zeros_like(gt[1:2]))
    assert coords[0, 0].tolist() == [9.0, 7.0] and labels.item() == 1


def test_distance_transforms_match_scipy():
    masks = _blobs(6, 36, 4, threshold=0.45)
    masks[0] = False
    masks[1] = True
    reference = np.stack([_edt(m) for m in masks.numpy()])
    np.testing.assert_allclose(distance_to_boundary(masks).numpy(), reference, atol=1e-4)
    # The on-device variant (used on GPUs) may differ by a fraction of a pixel in rare configurations.
    np.testing.assert_allclose(jump_flood_distance(masks).numpy(), reference, atol=0.5)


def test_schedule_has_the_papers_eleven_rounds():
    torch.manual_seed(0)
    schedules = [CorrectiveClicks().schedule() for _ in range(30)]
    for s in schedules:
        assert len(s) == 10 and sum(s) == 8 and s[-1] is False  # + round 0 = 11 rounds
    # The other mask-only round moves around.
    assert len({tuple(s) for s in schedules}) > 1
    assert CorrectiveClicks(num_clicks=3, mask_only_rounds=0).schedule() == [True] * 3


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="mode"):
        CorrectiveClicks(mode="random")
    with pytest.raises(ValueError, match=">= 0"):
        CorrectiveClicks(num_clicks=-1)


@pytest.mark.parametrize("mode", ["uniform", "center"])
def test_clicks_stay_inside_the_valid_region(mode):
    gt = torch.zeros(3, 24, 24, dtype=torch.bool)
    gt[0, 2:6, 2:6] = True
    gt[1, 10:14, 3:9] = True
    valid = torch.zeros(3, 24, 24, dtype=torch.bool)
    valid[:, :16, :12] = True  # the image: 16 rows x 12 columns, the rest is padding
    pred = torch.ones_like(gt)  # foreground everywhere, padding included: false positives in the padding too
    pred[2] = False  # gt[2] is empty and perfectly predicted: the fallback click must stay on the image too
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        coords, labels = CorrectiveClicks(mode=mode).next_clicks(gt, pred, g, valid=valid)
        x, y = coords[:, 0, 0], coords[:, 0, 1]
        assert (x < 12).all() and (y < 16).all()
        assert labels[:, 0].tolist() == [0, 0, 0]
        assert not _at(gt, coords).any()
