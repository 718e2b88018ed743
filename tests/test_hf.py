"""Hugging Face transformers interop: SamModel folders load strictly, `samlight export --format hf` writes one that
`SamModel.from_pretrained` reads, and both models predict the same masks and IoU scores (no download)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")

from samlight.cli.export import main as export_main  # noqa: E402
from samlight.inference.hf_export import hf_config_kwargs  # noqa: E402
from samlight.inference.predictor import SamPredictor  # noqa: E402
from samlight.modeling.build import build_sam  # noqa: E402
from samlight.modeling.checkpoint import official_state_dict, save_official  # noqa: E402
from samlight.modeling.transforms import apply_boxes, apply_coords, resize_longest_image  # noqa: E402
from samlight.modeling.variants import variant_config  # noqa: E402
from samlight.modeling.weight_names import hf_to_official, official_to_hf  # noqa: E402

# One prompt set per prompt kind the two APIs share: (points, labels, box, multimask, feed the mask back).
PROMPTS = {
    "point": ([[70, 50]], [1], None, True, False),
    "points": ([[70, 50], [20, 90]], [1, 0], None, False, False),
    "box": (None, None, [10, 12, 110, 80], False, False),
    "box+point": ([[60, 40]], [1], [10, 12, 110, 80], False, False),
    "mask": ([[70, 50]], [1], None, False, True),
}


def _randomize(model: torch.nn.Module, seed: int = 0, scale: float = 0.05) -> None:
    """Every parameter random (zero-initialised rel-pos / pos-embed tables would hide a wrong mapping).

    The tiny tests pass scale 0.3: with 32-wide layers much smaller weights leave attention nearly uniform, so
    the outputs would hardly depend on the prompt tokens (vit_b's 256/768-wide layers are fine at 0.05).
    """
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if "positional_embedding" in name:
                p.copy_(noise)  # Fourier frequencies: unit scale, as the official init
            elif "norm" in name and name.endswith("weight"):
                p.copy_(1 + 0.1 * noise)
            else:
                p.copy_(scale * noise)


def _hf_tiny(seed: int = 0):
    cfg = transformers.SamConfig(**hf_config_kwargs(variant_config("tiny")))
    model = transformers.SamModel(cfg).eval()
    _randomize(model, seed, scale=0.3)
    return model


def _image(h: int, w: int) -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _pixel_values(sam, image: np.ndarray) -> torch.Tensor:
    """The normalised, padded input both models see (the HF processor's resize is bypassed on purpose)."""
    resized = torch.as_tensor(resize_longest_image(image, sam.image_size)).permute(2, 0, 1)[None].float()
    return sam.preprocess(resized)


def _compare(predictor: SamPredictor, hf_model, image_embeddings: torch.Tensor, *, atol: float) -> float:
    """Run every prompt of PROMPTS through both; assert masks and IoU scores agree. Returns the max |diff|."""
    size = predictor.model.image_size
    processor = transformers.SamImageProcessor()
    orig, inp = predictor.original_size, predictor.input_size
    worst = 0.0
    outputs = {}
    for name, (points, labels, box, multimask, feed_back) in PROMPTS.items():
        mask_input = None
        if feed_back:
            _, scores, low = predictor.predict(np.array(points), np.array(labels), multimask_output=True)
            mask_input = low[np.argmax(scores)][None]
        kw = {}
        sl_kw = dict(multimask_output=multimask, return_logits=True, mask_input=mask_input)
        if points is not None:
            sl_kw.update(point_coords=np.array(points, float), point_labels=np.array(labels))
            kw["input_points"] = torch.tensor(apply_coords(np.array(points, float), orig, size)).float()[
                None, None
            ]
            kw["input_labels"] = torch.tensor(labels)[None, None]
        if box is not None:
            sl_kw["box"] = np.array(box, float)
            kw["input_boxes"] = torch.tensor(apply_boxes(np.array([box], float), orig, size)).float()[None]
        if mask_input is not None:
            kw["input_masks"] = torch.tensor(mask_input)[None]
        logits, scores, low = predictor.predict(**sl_kw)
        with torch.no_grad():
            out = hf_model(image_embeddings=image_embeddings, multimask_output=multimask, **kw)
        hf_low = out.pred_masks[0, 0]  # K x 4h x 4w
        hf_logits = processor.post_process_masks(
            [out.pred_masks[0]], [orig], [inp], binarize=False, pad_size={"height": size, "width": size}
        )[0][0]
        assert hf_low.shape == low.shape, name
        diffs = (
            np.abs(hf_low.numpy() - low).max(),
            np.abs(out.iou_scores[0, 0].numpy() - scores).max(),
            np.abs(hf_logits.numpy() - logits).max(),
        )
        scale = max(1.0, float(np.abs(low).max()))
        assert max(diffs) < atol * scale, (
            f"{name}: low-res / IoU / full-size max |diff| = {diffs} (logits {scale})"
        )
        # Binary masks agree everywhere the logit is not within float noise of the threshold.
        clear = np.abs(logits) > 10 * atol
        assert ((hf_logits.numpy() > 0) == (logits > 0))[clear].all(), name
        worst = max(worst, *diffs)
        outputs[name] = low
    # The comparison has power: the prompts give clearly different predictions.
    names = list(outputs)
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            if outputs[a].shape == outputs[b].shape:
                assert np.abs(outputs[a] - outputs[b]).max() > 0.05 * np.abs(outputs[a]).max(), (a, b)
    return worst


def test_name_table_maps_every_key_both_ways():
    sam = build_sam("tiny")
    hf = _hf_tiny()
    official = sam.state_dict()
    renamed = official_to_hf(official)
    expected = hf.state_dict()
    assert set(renamed) == set(expected)
    assert {k: tuple(v.shape) for k, v in renamed.items()} == {k: tuple(v.shape) for k, v in expected.items()}
    back = hf_to_official(renamed)
    assert set(back) == set(official) and all(back[k] is official[k] for k in official)


def test_build_sam_reads_hf_folder_and_weight_files(tmp_path):
    hf = _hf_tiny(seed=1)
    hf.save_pretrained(tmp_path / "hf")
    # A folder with the older torch pickle instead of safetensors, as some hub repos still ship.
    (tmp_path / "bin").mkdir()
    torch.save(hf.state_dict(), tmp_path / "bin" / "pytorch_model.bin")
    hf.save_pretrained(tmp_path / "sharded", max_shard_size="200KB")  # large hub models come sharded
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    want = hf_to_official(hf.state_dict())
    for source in (
        tmp_path / "hf",
        tmp_path / "hf" / "model.safetensors",
        tmp_path / "bin",
        tmp_path / "sharded",
    ):
        sam = build_sam("tiny", checkpoint=source)
        got = sam.state_dict()
        assert set(got) == set(want), source
        assert all(torch.equal(got[k], want[k]) for k in want), source
    # The relative-position tables are where a wrong block mapping would show: check one explicitly.
    assert torch.equal(
        sam.image_encoder.blocks[1].attn.rel_pos_h, hf.vision_encoder.layers[1].attn.rel_pos_h.detach()
    )
    # And the model read from the HF folder predicts what the HF model predicts (a swapped pair of same-shaped
    # tensors would pass the key and shape checks but not this).
    image = _image(96, 128)
    predictor = SamPredictor(sam.eval())
    predictor.set_image(image)
    with torch.no_grad():
        hf_embeddings = hf.get_image_embeddings(_pixel_values(sam, image))
    assert torch.allclose(hf_embeddings, predictor.features, atol=1e-5)
    _compare(predictor, hf, hf_embeddings, atol=1e-4)


def test_hf_checkpoint_errors_name_the_keys(tmp_path):
    """Strict: a missing, an unknown, an inconsistent tied key, the wrong variant, a non-SAM config."""
    from safetensors.torch import save_file

    state = {k: v.clone() for k, v in _hf_tiny().state_dict().items()}  # the tied pair as two tensors
    missing = dict(state)
    del missing["vision_encoder.neck.conv2.weight"]
    save_file(missing, str(tmp_path / "missing.safetensors"))
    with pytest.raises(ValueError, match=r"(?s)missing keys.*image_encoder\.neck\.2\.weight"):
        build_sam("tiny", checkpoint=tmp_path / "missing.safetensors")

    extra = dict(state, **{"vision_encoder.adapter.weight": torch.zeros(2)})
    save_file(extra, str(tmp_path / "extra.safetensors"))
    with pytest.raises(ValueError, match=r"vision_encoder\.adapter\.weight"):
        build_sam("tiny", checkpoint=tmp_path / "extra.safetensors")

    tied = dict(state, **{"prompt_encoder.shared_embedding.positional_embedding": torch.zeros(2, 16)})
    save_file(tied, str(tmp_path / "tied.safetensors"))
    with pytest.raises(ValueError, match="differ"):
        build_sam("tiny", checkpoint=tmp_path / "tied.safetensors")

    with pytest.raises(ValueError, match=r"(?s)shape mismatches.*looks like variant 'tiny'"):
        build_sam("vit_b", checkpoint=_write(tmp_path / "ok.safetensors", state))

    folder = tmp_path / "sam2"
    folder.mkdir()
    save_file(state, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps({"model_type": "sam2"}))
    with pytest.raises(ValueError, match="model_type 'sam2'"):
        build_sam("tiny", checkpoint=folder)


def _write(path, state):
    from safetensors.torch import save_file

    save_file(state, str(path))
    return path


def test_export_hf_cli_from_pretrained_predicts_the_same(tmp_path, capsys):
    torch.manual_seed(0)
    sam = build_sam("tiny").eval()
    _randomize(sam, seed=2, scale=0.3)
    save_official(sam, tmp_path / "sam.pth")
    assert (
        export_main(["--ckpt", str(tmp_path / "sam.pth"), "--out", str(tmp_path / "hf"), "--format", "hf"])
        == 0
    )
    assert "transformers SamModel folder" in capsys.readouterr().out
    hf = transformers.SamModel.from_pretrained(tmp_path / "hf").eval()

    image = _image(96, 128)
    predictor = SamPredictor(sam)
    predictor.set_image(image)
    with torch.no_grad():
        hf_embeddings = hf.get_image_embeddings(_pixel_values(sam, image))
    assert torch.allclose(hf_embeddings, predictor.features, atol=1e-5)
    _compare(predictor, hf, hf_embeddings, atol=1e-4)

    # The same folder read back into samlight gives the weights that were exported.
    again = build_sam("tiny", checkpoint=tmp_path / "hf")
    assert all(
        torch.equal(a, b) for a, b in zip(again.state_dict().values(), official_state_dict(sam).values())
    )


def test_export_hf_refuses_text_projection(tmp_path, capsys):
    sam = build_sam("tiny", text_embed_dim=8)
    save_official(sam, tmp_path / "text.pth")
    assert (
        export_main(["--ckpt", str(tmp_path / "text.pth"), "--out", str(tmp_path / "hf"), "--format", "hf"])
        == 1
    )
    assert "text" in capsys.readouterr().err
    assert not (tmp_path / "hf").exists()


@pytest.mark.slow
def test_parity_vit_b_both_directions(tmp_path):
    """vit_b sizes (the facebook/sam-vit-base config = transformers' SamConfig defaults), random weights.

    HF -> samlight: build_sam reads the HF folder; samlight -> HF: the exported folder is what from_pretrained
    reads. One encoder pass per library (about a minute on 2 CPU cores); the prompts reuse the embeddings.
    """
    torch.manual_seed(0)
    hf = transformers.SamModel(transformers.SamConfig()).eval()
    _randomize(hf, seed=3)
    hf.save_pretrained(tmp_path / "from_hf")
    sam = build_sam("vit_b", checkpoint=tmp_path / "from_hf").eval()

    image = _image(384, 512)
    predictor = SamPredictor(sam)
    predictor.set_image(image)
    with torch.no_grad():
        hf_embeddings = hf.get_image_embeddings(_pixel_values(sam, image))
    encoder_diff = (hf_embeddings - predictor.features).abs().max().item()
    assert encoder_diff < 1e-3 * predictor.features.abs().max().item(), encoder_diff
    # Same embeddings for both decoders, so the decoder comparison measures the decoders alone.
    predictor.features = hf_embeddings
    # transformers' default decoder LayerNorm eps is 1e-6, the official 1e-5: agreement to ~1e-4, not 1e-6.
    default_diff = _compare(predictor, hf, hf_embeddings, atol=2e-3)

    save_official(sam, tmp_path / "sam.pth")
    assert (
        export_main(["--ckpt", str(tmp_path / "sam.pth"), "--out", str(tmp_path / "to_hf"), "--format", "hf"])
        == 0
    )
    exported = transformers.SamModel.from_pretrained(tmp_path / "to_hf").eval()
    theirs, ours = hf.state_dict(), exported.state_dict()
    assert set(theirs) == set(ours) and all(torch.equal(theirs[k], ours[k]) for k in theirs)

    # The exported encoder config has the numbers of the reference one (so the same weights compute the same).
    def numbers(config):
        return {k: getattr(config, k) for k in hf_config_kwargs(variant_config("vit_b"))["vision_config"]}

    ours_cfg, theirs_cfg = numbers(exported.config.vision_config), numbers(hf.config.vision_config)
    assert {**ours_cfg, "global_attn_indexes": list(ours_cfg["global_attn_indexes"])} == {
        **theirs_cfg,
        "global_attn_indexes": list(theirs_cfg["global_attn_indexes"]),
    }
    # Written with the official eps, the exported decoder matches samlight to float noise.
    decoder_diff = _compare(predictor, exported, hf_embeddings, atol=1e-4)
    print(
        f"vit_b parity: encoder max |diff| {encoder_diff:.2e} (embeddings up to "
        f"{predictor.features.abs().max().item():.1f}); decoder vs HF defaults {default_diff:.2e}, "
        f"vs exported folder {decoder_diff:.2e}"
    )
