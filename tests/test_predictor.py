"""SamPredictor: the official API and shapes on the tiny variant, agreement with the batched path, bad input."""

from __future__ import annotations

import numpy as np
import pytest
import segment_anything
import torch

from samlight import SamPredictor
from samlight.modeling.transforms import (
    apply_coords,
    get_preprocess_shape,
    normalize_and_pad,
    resize_longest_image,
)
from samlight.prompts.types import Prompts

H, W = 150, 200  # a non-square image smaller than the tiny input (256)


@pytest.fixture
def image() -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (H, W, 3), dtype=np.uint8)


@pytest.fixture
def predictor(tiny_sam, image) -> SamPredictor:
    p = SamPredictor(tiny_sam)
    p.set_image(image)
    return p


def test_shapes_and_types(predictor):
    assert predictor.input_size == get_preprocess_shape(H, W, 256) == (192, 256)
    assert predictor.get_image_embedding().shape == (1, 32, 16, 16)
    masks, scores, low_res = predictor.predict(point_coords=np.array([[50, 60]]), point_labels=np.array([1]))
    assert masks.shape == (3, H, W) and masks.dtype == bool
    assert scores.shape == (3,) and low_res.shape == (3, 64, 64)
    logits, _, _ = predictor.predict(
        point_coords=np.array([[50, 60]]), point_labels=np.array([1]), return_logits=True
    )
    np.testing.assert_array_equal(logits > 0.0, masks)
    single, s_scores, _ = predictor.predict(box=np.array([10, 20, 120, 140]), multimask_output=False)
    assert single.shape == (1, H, W) and s_scores.shape == (1,)
    best = low_res[np.argmax(scores)][None]
    again, _, _ = predictor.predict(
        point_coords=np.array([[50, 60], [150, 100]]), point_labels=np.array([1, 0]), mask_input=best
    )
    assert again.shape == (3, H, W)


@pytest.mark.parametrize(
    "prompt",
    [
        dict(point_coords=np.array([[50.0, 60.0]]), point_labels=np.array([1])),
        dict(
            point_coords=np.array([[50.0, 60.0], [199.0, 149.0]]),
            point_labels=np.array([1, 0]),
            multimask_output=False,
        ),
        dict(box=np.array([10.0, 20.0, 120.0, 140.0]), multimask_output=False),
        dict(
            point_coords=np.array([[5.0, 6.0]]),
            point_labels=np.array([0]),
            box=np.array([0.0, 0.0, 200.0, 150.0]),
            mask_input=np.random.default_rng(1).normal(size=(1, 64, 64)).astype(np.float32),
        ),
    ],
)
def test_matches_official_predictor_on_the_same_model(tiny_sam, image, predictor, prompt):
    """segment_anything's own SamPredictor runs samlight's Sam through the official signatures; both agree."""
    official = segment_anything.SamPredictor(tiny_sam)
    official.set_image(image)
    torch.testing.assert_close(official.features, predictor.features)
    for ours, theirs in zip(
        predictor.predict(**prompt, return_logits=True), official.predict(**prompt, return_logits=True)
    ):
        np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-5)


def test_predictor_matches_batched_decode(tiny_sam, image, predictor):
    """The training path (transforms + encode_images + decode) sees exactly what the predictor sees."""
    resized = torch.as_tensor(resize_longest_image(image, 256)).permute(2, 0, 1).float()
    images = normalize_and_pad(resized, tiny_sam.pixel_mean, tiny_sam.pixel_std, 256)[None]
    with torch.no_grad():
        emb = tiny_sam.encode_images(images)
    torch.testing.assert_close(emb, predictor.features)
    points = np.array([[[50.0, 60.0], [120.0, 30.0]], [[10.0, 140.0], [0.0, 0.0]]])  # 2 prompts x 2 points
    labels = np.array([[1, 0], [1, 1]])
    coords = torch.as_tensor(apply_coords(points, (H, W), 256), dtype=torch.float)
    with torch.no_grad():
        logits, iou = tiny_sam.decode(
            emb,
            torch.zeros(2, dtype=torch.long),
            Prompts(point_coords=coords, point_labels=torch.as_tensor(labels)),
            True,
        )
    for i in range(2):
        _, scores, low_res = predictor.predict(point_coords=points[i], point_labels=labels[i])
        np.testing.assert_allclose(low_res, logits[i].numpy(), rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(scores, iou[i].numpy(), rtol=1e-4, atol=1e-5)


def test_bgr_equals_flipped_rgb(tiny_sam, image, predictor):
    bgr = SamPredictor(tiny_sam)
    bgr.set_image(np.ascontiguousarray(image[..., ::-1]), image_format="BGR")
    torch.testing.assert_close(bgr.features, predictor.features)


def test_bad_images_say_what_was_expected(tiny_sam, image):
    p = SamPredictor(tiny_sam)
    with pytest.raises(RuntimeError, match="set_image"):
        p.predict(point_coords=np.array([[1, 1]]), point_labels=np.array([1]))
    for bad in (image.astype(np.float32), image[..., 0], image[..., :2], np.zeros((H, W, 4), np.uint8)):
        with pytest.raises(ValueError, match="H x W x 3 uint8"):
            p.set_image(bad)
    with pytest.raises(ValueError, match="H x W x 3 uint8"):
        p.set_image(torch.zeros(H, W, 3, dtype=torch.uint8))
    with pytest.raises(ValueError, match="image_format"):
        p.set_image(image, image_format="RGBA")
    with pytest.raises(TypeError, match="samlight Sam"):
        SamPredictor(torch.nn.Linear(2, 2))


def test_bad_prompts_say_what_was_expected(predictor):
    with pytest.raises(ValueError, match=r"outside the image: expected x in \[0, 200\] and y in \[0, 150\]"):
        predictor.predict(point_coords=np.array([[10, 160]]), point_labels=np.array([1]))
    with pytest.raises(ValueError, match="outside the image"):
        predictor.predict(box=np.array([-5, 0, 100, 100]))
    with pytest.raises(ValueError, match="P x 2"):
        predictor.predict(point_coords=np.array([10, 20]), point_labels=np.array([1]))
    with pytest.raises(ValueError, match="P x 2"):
        predictor.predict(point_coords=np.array([[10, 20]]), point_labels=np.array([1, 0]))
    with pytest.raises(ValueError, match="together"):
        predictor.predict(point_coords=np.array([[10, 20]]))
    with pytest.raises(ValueError, match="4 numbers"):
        predictor.predict(box=np.array([1, 2, 3]))
    with pytest.raises(ValueError, match="1 x 64 x 64"):
        predictor.predict(box=np.array([1, 2, 30, 40]), mask_input=np.zeros((1, 256, 256)))


def test_reset_image(predictor):
    predictor.reset_image()
    assert not predictor.is_image_set
    with pytest.raises(RuntimeError):
        predictor.get_image_embedding()
