"""SamAutomaticMaskGenerator: the official generator's masks and scores on the same weights, and its helpers.

The model is a `tiny` SAM whose decoder learnt synthetic shapes (conftest `trained_tiny_checkpoint`), loaded
strictly into both samlight and the official `segment_anything.modeling.Sam` at the same sizes.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from pycocotools import mask as mask_utils
from segment_anything import SamAutomaticMaskGenerator as OfficialGenerator
from segment_anything.utils import amg as official_amg

from samlight import SamAutomaticMaskGenerator, build_sam
from samlight.inference import amg_ops
from tests._official import official_sam
from tests._trained import scene

# Thresholds low enough that the briefly trained tiny model passes a dozen or more masks.
SETTINGS = dict(points_per_side=16, pred_iou_thresh=0.2, stability_score_thresh=0.2)


@pytest.fixture(scope="module")
def models(trained_tiny_checkpoint):
    return build_sam("tiny", checkpoint=trained_tiny_checkpoint).eval(), official_sam(
        "tiny", trained_tiny_checkpoint
    )


@pytest.fixture(scope="module")
def image() -> np.ndarray:
    """A 200 x 300 scene: not square, so the resize to the model input and back is exercised."""
    return scene(np.random.default_rng(123), size=300, num=8)[0][:200]


def _match(ours: list[dict], theirs: list[dict]) -> list[tuple[dict, dict, float]]:
    """Pair every official record with our record of highest mask IoU (the order may differ)."""
    a = np.stack([r["segmentation"] for r in ours]).reshape(len(ours), -1).astype(np.float32)
    b = np.stack([r["segmentation"] for r in theirs]).reshape(len(theirs), -1).astype(np.float32)
    inter = b @ a.T
    union = b.sum(1)[:, None] + a.sum(1)[None] - inter
    iou = inter / np.maximum(union, 1)
    best = iou.argmax(1)
    assert len(set(best.tolist())) == len(theirs), "two official masks matched the same samlight mask"
    return [(ours[j], theirs[i], float(iou[i, j])) for i, j in enumerate(best)]


@pytest.mark.parametrize(
    "crop_n_layers,min_area", [(0, 0), (1, 0), (0, 150), (1, 150)], ids=["plain", "crops", "cleanup", "both"]
)
def test_same_masks_and_scores_as_official(models, image, crop_n_layers, min_area):
    ours_model, official_model = models
    if min_area:
        pytest.importorskip("cv2")  # the official cleanup needs OpenCV (samlight's uses scipy)
    settings = dict(
        SETTINGS, crop_n_layers=crop_n_layers, crop_n_points_downscale_factor=2, min_mask_region_area=min_area
    )
    theirs = OfficialGenerator(official_model, **settings).generate(image)
    ours = SamAutomaticMaskGenerator(ours_model, **settings).generate(image)
    print(f"crop_n_layers={crop_n_layers} min_area={min_area}: {len(theirs)} official, {len(ours)} samlight")
    assert len(theirs) >= 8, "settings too strict to compare anything"
    if crop_n_layers:
        assert len({tuple(r["crop_box"]) for r in theirs}) > 1, "no mask came from a crop"
    assert len(ours) == len(theirs)
    for o, t, iou in _match(ours, theirs):
        assert iou > 0.995, (t["bbox"], iou)
        assert o["predicted_iou"] == pytest.approx(t["predicted_iou"], abs=1e-4)
        assert o["stability_score"] == pytest.approx(t["stability_score"], abs=2e-3)
        assert o["crop_box"] == t["crop_box"]
        np.testing.assert_allclose(o["point_coords"], t["point_coords"], atol=1e-6)
        np.testing.assert_allclose(o["bbox"], t["bbox"], atol=1)
        assert abs(o["area"] - t["area"]) <= max(2, 0.003 * t["area"])
        assert o["segmentation"].shape == image.shape[:2] and o["segmentation"].dtype == bool


def test_output_modes_and_batch(models, image):
    """RLE modes encode exactly the binary masks; generate_batch equals generate per image; a small pixel
    budget (many chunks) changes nothing."""
    model = models[0]
    binary = SamAutomaticMaskGenerator(model, **SETTINGS).generate(image)
    assert len(binary) >= 8
    coco = SamAutomaticMaskGenerator(model, **SETTINGS, output_mode="coco_rle").generate(image)
    raw = SamAutomaticMaskGenerator(model, **SETTINGS, output_mode="uncompressed_rle").generate(image)
    for b, c, r in zip(binary, coco, raw):
        assert isinstance(c["segmentation"]["counts"], str)
        np.testing.assert_array_equal(mask_utils.decode(c["segmentation"]).astype(bool), b["segmentation"])
        np.testing.assert_array_equal(official_amg.rle_to_mask(r["segmentation"]), b["segmentation"])
        assert official_amg.area_from_rle(r["segmentation"]) == b["area"]
    other = scene(np.random.default_rng(7))[0]
    small = SamAutomaticMaskGenerator(model, **SETTINGS, pixel_budget=5000, crops_per_batch=1)
    batch = SamAutomaticMaskGenerator(model, **SETTINGS).generate_batch([image, other])
    for records, img in zip(batch, [image, other]):
        single = small.generate(img)
        assert len(records) == len(single)
        for a, b in zip(records, single):
            np.testing.assert_array_equal(a["segmentation"], b["segmentation"])
            assert a["predicted_iou"] == pytest.approx(b["predicted_iou"], abs=1e-5)


def test_tiled_scene_finds_objects_in_every_tile(models):
    """A 512 x 768 scene in 256 px tiles: masks come back in scene pixels, from several tiles, none cut by a
    tile border (they are dropped there and found whole in the neighbouring tile)."""
    model = models[0]
    rng = np.random.default_rng(5)
    tiles = [[scene(rng)[0] for _ in range(3)] for _ in range(2)]
    big = np.concatenate([np.concatenate(row, axis=1) for row in tiles], axis=0)  # 512 x 768
    gen = SamAutomaticMaskGenerator(model, **SETTINGS, tile_size=256, output_mode="coco_rle")
    records = gen.generate(big)
    assert len(records) >= 10
    crops = {tuple(r["crop_box"]) for r in records}
    assert len(crops) >= 4 and all(c[2] <= 256 and c[3] <= 256 for c in crops)
    for r in records:
        assert r["segmentation"]["size"] == [512, 768]
        x, y, w, h = r["bbox"]
        cx, cy, cw, ch = r["crop_box"]
        assert cx <= x and cy <= y and x + w <= cx + cw and y + h <= cy + ch


def test_point_grids_and_crop_boxes_match_official():
    for n, layers, down in [(32, 0, 1), (16, 2, 2), (7, 1, 1)]:
        ours = amg_ops.layer_point_grids(n, layers, down)
        theirs = official_amg.build_all_layer_point_grids(n, layers, down)
        assert len(ours) == len(theirs)
        for a, b in zip(ours, theirs):
            np.testing.assert_array_equal(a, b)
    for hw, layers in [((200, 300), 1), ((1500, 2250), 2), ((480, 480), 3)]:
        assert amg_ops.crop_boxes(hw, layers, 512 / 1500) == official_amg.generate_crop_boxes(
            hw, layers, 512 / 1500
        )


def _random_masks(n: int, h: int, w: int, seed: int) -> np.ndarray:
    """Blobby masks with holes and islands of many sizes (thresholded smoothed noise), plus an empty one."""
    g = torch.Generator().manual_seed(seed)
    noise = torch.nn.functional.avg_pool2d(torch.randn(n, 1, h, w, generator=g), 5, 1, 2)[:, 0]
    masks = (noise > 0.1).numpy()
    masks[0] = False
    return masks


def test_boxes_rle_stability_match_official():
    masks = _random_masks(6, 37, 53, seed=0)
    np.testing.assert_array_equal(
        amg_ops.masks_to_boxes(torch.from_numpy(masks)).numpy(),
        official_amg.batched_mask_to_box(torch.from_numpy(masks)).numpy(),
    )
    ours = amg_ops.uncompressed_rles(torch.from_numpy(masks))
    theirs = official_amg.mask_to_rle_pytorch(torch.from_numpy(masks))
    assert ours == theirs
    full = np.ones((1, 4, 5), dtype=bool)  # starts with foreground: counts begin with a zero-length run
    assert amg_ops.uncompressed_rles(full) == official_amg.mask_to_rle_pytorch(torch.from_numpy(full))
    logits = torch.randn(5, 20, 30, generator=torch.Generator().manual_seed(1)) * 3
    torch.testing.assert_close(
        amg_ops.stability_scores(logits, 0.0, 1.0), official_amg.calculate_stability_score(logits, 0.0, 1.0)
    )
    # Row lengths that are not a multiple of the int64 lane groups, and more than one group per row.
    values = torch.randn(4, 8 * 127 * 3 + 5, generator=torch.Generator().manual_seed(2))
    expected = torch.stack([(values > t).sum(1) for t in (-0.5, 0.0, 2.0)], dim=1)
    assert torch.equal(amg_ops.count_above(values, (-0.5, 0.0, 2.0)), expected)


def test_remove_small_regions_matches_official():
    pytest.importorskip("cv2")  # the official function needs OpenCV
    masks = _random_masks(8, 48, 64, seed=3)
    masks[1] = False
    masks[1, 5:8, 5:8] = True  # only small islands: the largest one is kept
    masks[1, 20:22, 30:31] = True
    for area in (5, 30, 200):
        cleaned, changed = amg_ops.remove_small_regions(masks, area)
        for i, m in enumerate(masks):
            ref, ref_changed_holes = official_amg.remove_small_regions(m, area, mode="holes")
            ref, ref_changed_islands = official_amg.remove_small_regions(ref, area, mode="islands")
            np.testing.assert_array_equal(cleaned[i], ref, err_msg=f"mask {i} area {area}")
            assert changed[i] == (ref_changed_holes or ref_changed_islands), (i, area)
    assert changed.any() and not changed.all()


def test_bad_arguments_are_clear(tiny_sam):
    with pytest.raises(ValueError, match="exactly one of points_per_side or point_grids"):
        SamAutomaticMaskGenerator(tiny_sam, points_per_side=None)
    with pytest.raises(ValueError, match="output_mode"):
        SamAutomaticMaskGenerator(tiny_sam, output_mode="png")
    with pytest.raises(ValueError, match="H x W x 3 uint8"):
        SamAutomaticMaskGenerator(tiny_sam).generate(np.zeros((10, 10), np.uint8))
