"""ONNX export under onnxruntime on CPU: the official interface (checked against segment_anything's own
`SamOnnxModel` with the same weights), parity with samlight's SamPredictor, the image encoder, quantisation."""

from __future__ import annotations

from functools import partial

import numpy as np
import pytest
import torch

ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")

from segment_anything.modeling import (  # noqa: E402
    ImageEncoderViT,
    MaskDecoder,
    PromptEncoder,
    Sam,
    TwoWayTransformer,
)
from segment_anything.utils.onnx import SamOnnxModel  # noqa: E402

from samlight.cli.export import main as export_main  # noqa: E402
from samlight.inference.onnx_export import DECODER_INPUTS, DECODER_OUTPUTS, export_decoder  # noqa: E402
from samlight.inference.predictor import SamPredictor  # noqa: E402
from samlight.modeling.build import build_sam  # noqa: E402
from samlight.modeling.checkpoint import save_official  # noqa: E402
from samlight.modeling.transforms import apply_coords, resize_longest_image  # noqa: E402

IMAGE_HW = (120, 90)  # portrait and smaller than the example size used at export: both axes must stay dynamic
# (points, labels, box, feed back the previous mask): 1 to 4 points plus corners, so N varies 2..5.
PROMPTS = {
    "point": ([[40, 60]], [1], None, False),
    "points": ([[40, 60], [10, 100], [70, 20]], [1, 0, 1], None, False),
    "box": (None, None, [5, 10, 80, 100], False),
    "box+point": ([[40, 60]], [1], [5, 10, 80, 100], False),
    "mask": ([[40, 60]], [0], None, True),
}


def _randomize(model: torch.nn.Module, seed: int, scale: float = 0.3) -> None:
    """Random weights large enough that attention is peaked: at a small scale every token is averaged alike and
    the outputs hardly depend on the prompt (a swapped pair of box-corner labels would then go unnoticed)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in model.state_dict().items():
            noise = torch.randn(t.shape, generator=g)
            if name.endswith("positional_encoding_gaussian_matrix"):
                t.copy_(noise)
            elif t.ndim == 1 and name.endswith("weight"):
                t.copy_(1 + 0.1 * noise)
            else:
                t.copy_(scale * noise)


def _official_tiny(state: dict) -> Sam:
    """segment_anything's own modules at samlight's `tiny` sizes, holding the same weights (strict load)."""
    sam = Sam(
        image_encoder=ImageEncoderViT(
            img_size=256,
            patch_size=16,
            embed_dim=64,
            depth=2,
            num_heads=2,
            global_attn_indexes=(1,),
            window_size=8,
            out_chans=32,
            mlp_ratio=4,
            qkv_bias=True,
            use_rel_pos=True,
            norm_layer=partial(torch.nn.LayerNorm, eps=1e-6),
        ),
        prompt_encoder=PromptEncoder(
            embed_dim=32, image_embedding_size=(16, 16), input_image_size=(256, 256), mask_in_chans=16
        ),
        mask_decoder=MaskDecoder(
            num_multimask_outputs=3,
            transformer=TwoWayTransformer(depth=2, embedding_dim=32, mlp_dim=64, num_heads=2),
            transformer_dim=32,
            iou_head_depth=3,
            iou_head_hidden_dim=32,
        ),
    )
    sam.load_state_dict(state, strict=True)
    return sam.eval()


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A random tiny model, its .pth, the decoder exported through the CLI (all 4 outputs and single-mask)."""
    tmp = tmp_path_factory.mktemp("onnx")
    torch.manual_seed(0)
    sam = build_sam("tiny").eval()
    _randomize(sam, seed=1)
    save_official(sam, tmp / "sam.pth")
    for name, extra in (("decoder", []), ("single", ["--return-single-mask"])):
        argv = ["--ckpt", str(tmp / "sam.pth"), "--out", str(tmp / f"{name}.onnx"), "--format", "onnx"]
        assert export_main(argv + extra) == 0
    sessions = {
        name: ort.InferenceSession(str(tmp / f"{name}.onnx"), providers=["CPUExecutionProvider"])
        for name in ("decoder", "single")
    }
    predictor = SamPredictor(sam)
    image = np.random.default_rng(0).integers(0, 256, (*IMAGE_HW, 3), dtype=np.uint8)
    predictor.set_image(image)
    return dict(tmp=tmp, sam=sam, sessions=sessions, predictor=predictor, image=image)


def _feed(predictor: SamPredictor, points, labels, box, mask_input) -> dict[str, np.ndarray]:
    """The official demo's recipe: box corners labelled 2 and 3, else a (0, 0) padding point labelled -1."""
    coords = np.zeros((0, 2))
    point_labels = np.zeros(0)
    if points is not None:
        coords, point_labels = np.array(points, float), np.array(labels, float)
    if box is not None:
        coords = np.concatenate([coords, np.array(box, float).reshape(2, 2)])
        point_labels = np.concatenate([point_labels, [2, 3]])
    else:
        coords = np.concatenate([coords, [[0.0, 0.0]]])
        point_labels = np.concatenate([point_labels, [-1]])
    size = predictor.model.image_size
    coords = apply_coords(coords, predictor.original_size, size)
    h = size // 4
    return {
        "image_embeddings": predictor.features.numpy(),
        "point_coords": coords[None].astype(np.float32),
        "point_labels": point_labels[None].astype(np.float32),
        "mask_input": (np.zeros((1, 1, h, h)) if mask_input is None else mask_input[None]).astype(np.float32),
        "has_mask_input": np.array([0.0 if mask_input is None else 1.0], np.float32),
        "orig_im_size": np.array(predictor.original_size, np.float32),
    }


def _previous_mask(predictor: SamPredictor, points, labels) -> np.ndarray:
    _, scores, low = predictor.predict(np.array(points, float), np.array(labels), multimask_output=True)
    return low[np.argmax(scores)][None]  # 1 x 4h x 4w


def _cases(predictor: SamPredictor):
    for name, (points, labels, box, feed_back) in PROMPTS.items():
        mask_input = _previous_mask(predictor, points, labels) if feed_back else None
        yield name, points, labels, box, mask_input


def test_interface_is_the_official_one(exported):
    session = exported["sessions"]["decoder"]
    inputs = {i.name: i.shape for i in session.get_inputs()}
    assert tuple(inputs) == DECODER_INPUTS
    assert [o.name for o in session.get_outputs()] == list(DECODER_OUTPUTS)
    assert inputs["point_coords"] == [1, "num_points", 2] and inputs["point_labels"] == [1, "num_points"]
    assert inputs["image_embeddings"] == [1, 32, 16, 16] and inputs["mask_input"] == [1, 1, 64, 64]


@pytest.mark.parametrize("single", [False, True], ids=["all_masks", "single_mask"])
def test_matches_segment_anything_onnx_model(exported, single):
    """Same inputs into segment_anything's SamOnnxModel (torch) and our graph (onnxruntime)."""
    predictor = exported["predictor"]
    reference = SamOnnxModel(_official_tiny(exported["sam"].state_dict()), return_single_mask=single)
    session = exported["sessions"]["single" if single else "decoder"]
    low_res = {}
    for name, points, labels, box, mask_input in _cases(predictor):
        feed = _feed(predictor, points, labels, box, mask_input)
        ours = session.run(None, feed)
        low_res[name] = ours[2]
        with torch.no_grad():
            theirs = reference(**{k: torch.from_numpy(v) for k, v in feed.items()})
        for output, a, b in zip(DECODER_OUTPUTS, ours, theirs):
            assert a.shape == tuple(b.shape), (name, output)
            np.testing.assert_allclose(a, b.numpy(), atol=1e-4, rtol=1e-5, err_msg=f"{name}: {output}")
    # The comparison has power: every prompt gives a clearly different prediction.
    names = list(low_res)
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            assert np.abs(low_res[a] - low_res[b]).max() > 0.1 * np.abs(low_res[a]).max(), (a, b)


def test_matches_samlight_predictor(exported):
    """Output 0 is the single-mask prediction, outputs 1..3 the multimask ones, at the original image size."""
    predictor = exported["predictor"]
    session = exported["sessions"]["decoder"]
    worst = 0.0
    for name, points, labels, box, mask_input in _cases(predictor):
        masks, scores, low = session.run(None, _feed(predictor, points, labels, box, mask_input))
        assert masks.shape == (1, 4, *IMAGE_HW)
        for multimask, keep in ((False, slice(0, 1)), (True, slice(1, 4))):
            kw = dict(mask_input=mask_input, multimask_output=multimask, return_logits=True)
            if points is not None:
                kw.update(point_coords=np.array(points, float), point_labels=np.array(labels))
            if box is not None:
                kw["box"] = np.array(box, float)
            want_masks, want_scores, want_low = predictor.predict(**kw)
            for got, want in (
                (masks[0, keep], want_masks),
                (scores[0, keep], want_scores),
                (low[0, keep], want_low),
            ):
                diff = float(np.abs(got - want).max())
                assert diff < 1e-4, (name, multimask, diff)
                worst = max(worst, diff)
            assert ((masks[0, keep] > 0) == (want_masks > 0))[np.abs(want_masks) > 1e-3].all(), name
    print(f"ONNX decoder vs SamPredictor, max |diff| over all prompts and outputs: {worst:.2e}")


def test_image_encoder_export(exported, capsys):
    tmp, sam, predictor = exported["tmp"], exported["sam"], exported["predictor"]
    argv = ["--ckpt", str(tmp / "sam.pth"), "--out", str(tmp / "encoder.onnx"), "--format", "onnx-encoder"]
    assert export_main(argv) == 0
    assert "ONNX image encoder" in capsys.readouterr().out
    session = ort.InferenceSession(str(tmp / "encoder.onnx"), providers=["CPUExecutionProvider"])
    resized = torch.as_tensor(resize_longest_image(exported["image"], sam.image_size)).permute(2, 0, 1)[None]
    image = sam.preprocess(resized.float()).numpy()
    flipped = image[..., ::-1].copy()  # a second, different image: the batch axis is dynamic
    (embeddings,) = session.run(None, {"image": np.concatenate([image, flipped])})
    np.testing.assert_allclose(embeddings[0], predictor.features[0].numpy(), atol=1e-4)
    with torch.no_grad():
        np.testing.assert_allclose(embeddings[1], sam.image_encoder(torch.from_numpy(flipped))[0], atol=1e-4)

    # At another input size (a model fine-tuned at 128 px): timm resamples the position embedding at run time
    # with an operator ONNX lacks, so the export resamples it once; the graph must still match the model.
    argv = ["--ckpt", str(tmp / "sam.pth"), "--out", str(tmp / "enc128.onnx"), "--format", "onnx-encoder"]
    assert export_main([*argv, "--image-size", "128"]) == 0
    small = build_sam("tiny", image_size=128, checkpoint=tmp / "sam.pth").eval()
    x = torch.randn(1, 3, 128, 128)
    session = ort.InferenceSession(str(tmp / "enc128.onnx"), providers=["CPUExecutionProvider"])
    with torch.no_grad():
        np.testing.assert_allclose(
            session.run(None, {"image": x.numpy()})[0], small.image_encoder(x), atol=1e-4
        )


def test_quantized_decoder_at_official_sizes(tmp_path):
    """The decoder of every official variant (prompt dim 256, 8 heads, MLP 2048) quantised to uint8 weights:
    about a quarter of the size, and its masks agree with the float graph's (IoU > 0.9 per mask)."""
    torch.manual_seed(0)
    sam = build_sam(
        "tiny",
        image_size=1024,
        encoder_img_size=1024,
        prompt_embed_dim=256,
        decoder_num_heads=8,
        decoder_mlp_dim=2048,
        iou_head_hidden_dim=256,
    ).eval()
    _randomize(sam, seed=2, scale=0.05)  # 256-wide layers: 0.05 keeps attention peaked (see _randomize)
    float_path = export_decoder(sam, tmp_path / "decoder.onnx")
    quant_path = export_decoder(sam, tmp_path / "decoder.quant.onnx", quantize=True)
    ratio = quant_path.stat().st_size / float_path.stat().st_size
    assert ratio < 0.35, ratio
    sessions = [
        ort.InferenceSession(str(p), providers=["CPUExecutionProvider"]) for p in (float_path, quant_path)
    ]
    predictor = SamPredictor(sam)
    predictor.set_image(np.random.default_rng(1).integers(0, 256, IMAGE_HW + (3,), dtype=np.uint8))
    ious = []
    for _, points, labels, box, mask_input in _cases(predictor):
        feed = _feed(predictor, points, labels, box, mask_input)
        full, quant = (s.run(None, feed)[0][0] > 0 for s in sessions)  # 4 x H x W each
        ious.extend((full & quant).sum((1, 2)) / np.maximum((full | quant).sum((1, 2)), 1))
    print(f"quantised / float size {ratio:.3f}; mask IoU min {min(ious):.3f} mean {np.mean(ious):.3f}")
    assert min(ious) > 0.9, ious


def test_onnx_only_options_are_refused_for_pth(exported, capsys):
    tmp = exported["tmp"]
    argv = ["--ckpt", str(tmp / "sam.pth"), "--out", str(tmp / "x.pth"), "--quantize"]
    assert export_main(argv) == 1
    assert "onnx formats only" in capsys.readouterr().err
    assert not (tmp / "x.pth").exists()
