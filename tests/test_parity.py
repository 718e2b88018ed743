"""Parity with the official `segment_anything` on vit_b with random weights, in both directions.

One 1024 px image is embedded once per implementation (module-scoped fixtures); every prompt kind reuses it.
Random weights rather than zeros/identity init, so every parameter (position embeddings, relative positions,
the prompt encoder's Gaussian matrix) influences the outputs being compared.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from segment_anything import SamPredictor as OfficialPredictor
from segment_anything import sam_model_registry

from samlight import SamPredictor, build_sam, save_official
from samlight.modeling.checkpoint import save_state_dict

pytestmark = pytest.mark.slow

MAX_REL_DIFF = 1e-3
IMAGE_HW = (240, 320)

PROMPTS = {
    "single_point": dict(
        point_coords=np.array([[160.0, 120.0]]), point_labels=np.array([1]), multimask_output=True
    ),
    "points": dict(
        point_coords=np.array([[160.0, 120.0], [50.0, 200.0], [300.0, 25.0]]),
        point_labels=np.array([1, 0, 1]),
        multimask_output=False,
    ),
    "box": dict(box=np.array([50.0, 40.0, 250.0, 210.0]), multimask_output=False),
    "mask_input": dict(
        point_coords=np.array([[100.0, 150.0]]), point_labels=np.array([0]), multimask_output=False
    ),
}


def _randomize(state: dict[str, torch.Tensor], seed: int, prefix: str = "") -> dict[str, torch.Tensor]:
    """Random values for every tensor under `prefix`: norms near 1, everything else small (ViT-like scale)."""
    g = torch.Generator().manual_seed(seed)
    out = dict(state)
    for k, v in state.items():
        if not k.startswith(prefix):
            continue
        noise = torch.randn(v.shape, generator=g)
        if k.endswith("positional_encoding_gaussian_matrix"):
            out[k] = noise
        elif v.ndim == 1 and k.endswith("weight"):
            out[k] = 1 + 0.1 * noise
        else:
            out[k] = 0.02 * noise
    return out


def _rel_diff(ours: np.ndarray, theirs: np.ndarray) -> float:
    """max |ours - theirs| relative to the largest reference magnitude."""
    return float(np.abs(ours - theirs).max() / np.abs(theirs).max())


@pytest.fixture(scope="module")
def image() -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (*IMAGE_HW, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """samlight vit_b with seeded random weights, and the official vit_b loaded strictly from save_official.

    Both are built on the meta device and adopt the loaded tensors, which skips two costly random inits.
    """
    tmp = tmp_path_factory.mktemp("parity")
    with torch.device("meta"):
        shapes = build_sam("vit_b").state_dict()
    save_state_dict(
        _randomize({k: torch.empty(v.shape) for k, v in shapes.items()}, seed=0), tmp / "random.pth"
    )
    ours = build_sam("vit_b", checkpoint=tmp / "random.pth").eval()
    path = save_official(ours, tmp / "sam_vit_b_random.pth")
    with torch.device("meta"):
        official = sam_model_registry["vit_b"]()
    # What sam_model_registry["vit_b"](checkpoint=path) does (strict), with weights_only=True.
    official.load_state_dict(
        torch.load(path, map_location="cpu", weights_only=True), strict=True, assign=True
    )
    # Its non-persistent pixel statistics are not in any file: give them their official values.
    official.pixel_mean = torch.tensor([123.675, 116.28, 103.53]).view(-1, 1, 1)
    official.pixel_std = torch.tensor([58.395, 57.12, 57.375]).view(-1, 1, 1)
    return ours, official.eval()


@pytest.fixture(scope="module")
def predictors(models, image):
    ours, official = models
    p_ours, p_official = SamPredictor(ours), OfficialPredictor(official)
    p_ours.set_image(image)
    p_official.set_image(image)
    return p_ours, p_official


def _predict(predictor, kind: str):
    prompt = dict(PROMPTS[kind])
    if kind == "mask_input":
        # A previous round's best low-res logits fed back, as in interactive use.
        _, scores, low_res = predictor.predict(**PROMPTS["single_point"], return_logits=True)
        prompt["mask_input"] = low_res[np.argmax(scores)][None]
    return predictor.predict(**prompt, return_logits=True)


def test_image_embeddings_match(predictors):
    ours, official = predictors
    assert ours.input_size == official.input_size == (768, 1024)
    diff = _rel_diff(ours.features.numpy(), official.features.numpy())
    print(f"parity image_embedding max rel diff {diff:.2e}")
    assert diff < MAX_REL_DIFF


@pytest.mark.parametrize("kind", list(PROMPTS))
def test_samlight_to_official(predictors, kind):
    ours, official = predictors
    for name, a, b in zip(("masks", "scores", "low_res"), _predict(ours, kind), _predict(official, kind)):
        assert a.shape == b.shape, name
        diff = _rel_diff(a, b)
        print(f"parity samlight->official {kind} {name} max rel diff {diff:.2e}")
        assert diff < MAX_REL_DIFF, (kind, name, diff)


def test_official_to_samlight(models, predictors, tmp_path, kind_list=tuple(PROMPTS)):
    """An official-side state dict (decoder re-randomised there) loads strictly into build_sam and agrees."""
    _, official = models
    p_ours, p_official = predictors
    state = _randomize(official.state_dict(), seed=1, prefix="mask_decoder.")
    state = _randomize(state, seed=2, prefix="prompt_encoder.")
    official.load_state_dict(state, strict=True)
    path = tmp_path / "official_random.pth"
    torch.save(official.state_dict(), path)
    reverse = build_sam("vit_b", checkpoint=path).eval()
    reverse_state = reverse.state_dict()
    assert list(reverse_state) == list(state)
    for k, v in state.items():
        assert torch.equal(reverse_state[k], v), k
    # The encoder weights are bitwise those whose embedding matched above, so both predictors reuse the
    # embedded image instead of spending another minute of CPU on the 1024 px encoder.
    p_reverse = SamPredictor(reverse)
    p_reverse.features = p_ours.features
    p_reverse.original_size, p_reverse.input_size = p_ours.original_size, p_ours.input_size
    p_reverse.is_image_set = True
    for kind in kind_list:
        for name, a, b in zip(
            ("masks", "scores", "low_res"), _predict(p_reverse, kind), _predict(p_official, kind)
        ):
            diff = _rel_diff(a, b)
            print(f"parity official->samlight {kind} {name} max rel diff {diff:.2e}")
            assert diff < MAX_REL_DIFF, (kind, name, diff)
