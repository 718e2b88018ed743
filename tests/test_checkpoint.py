"""Checkpoint formats, strict loading with helpful errors, `save_official` and `samlight export`."""

from __future__ import annotations

import sys
import types

import pytest
import torch

from samlight import build_sam, load_state_dict, save_official
from samlight.cli.export import main as export_main
from samlight.modeling.checkpoint import infer_variant, save_state_dict


def _assert_same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


def _lightning_ckpt(sam: torch.nn.Module) -> dict:
    """What a SamModule checkpoint looks like: weights under state_dict with a `model.` prefix, plus extras."""
    state = {f"model.{k}": v for k, v in sam.state_dict().items()}
    state["loss_fn.focal_alpha"] = torch.tensor(0.25)  # a non-model buffer of the LightningModule
    return {"epoch": 3, "global_step": 120, "state_dict": state, "hyper_parameters": {"variant": "tiny"}}


def test_tiny_round_trips_through_save_official(tiny_sam, tmp_path):
    path = save_official(tiny_sam, tmp_path / "tiny.pth")
    raw = torch.load(path, map_location="cpu", weights_only=True)
    assert set(raw) == set(tiny_sam.state_dict())
    assert all(k.startswith(("image_encoder.", "prompt_encoder.", "mask_decoder.")) for k in raw)
    assert "pixel_mean" not in raw  # not persistent, as in the official files
    _assert_same_weights(build_sam("tiny", checkpoint=path), tiny_sam)


@pytest.mark.parametrize("fmt", ["lightning", "module", "compiled", "wrapped", "safetensors"])
def test_formats_load_to_the_same_weights(tiny_sam, tmp_path, fmt):
    state = tiny_sam.state_dict()
    path = tmp_path / f"weights.{'safetensors' if fmt == 'safetensors' else 'pth'}"
    if fmt == "lightning":
        torch.save(_lightning_ckpt(tiny_sam), path)
    elif fmt == "module":
        torch.save({f"module.{k}": v for k, v in state.items()}, path)
    elif fmt == "compiled":
        torch.save({f"module._orig_mod.{k}": v for k, v in state.items()}, path)
    elif fmt == "wrapped":
        torch.save({"model": state, "step": 7}, path)
    else:
        save_official(tiny_sam, path)
    loaded = load_state_dict(path)
    assert set(loaded) == set(state)
    _assert_same_weights(build_sam("tiny", checkpoint=path), tiny_sam)


def test_vit_l_file_as_vit_b_names_keys_and_variant(tmp_path):
    # A vit_l-shaped file without 1.2 GB of weights: each tensor is a stride-0 view of a single element,
    # and torch.save stores only that element.
    with torch.device("meta"):
        vit_l = build_sam("vit_l")
    fake = {k: torch.zeros(1).expand(v.shape) for k, v in vit_l.state_dict().items()}
    path = tmp_path / "sam_vit_l.pth"
    torch.save(fake, path)
    assert path.stat().st_size < 5e6
    with torch.device("meta"), pytest.raises(ValueError) as err:
        build_sam("vit_b", checkpoint=path)
    msg = str(err.value)
    assert "sam_vit_l.pth" in msg
    assert "unexpected keys" in msg and "image_encoder.blocks.12." in msg  # vit_b has 12 blocks
    assert "shape mismatches" in msg and "image_encoder.pos_embed: checkpoint (1, 64, 64, 1024)" in msg
    assert "'vit_l'" in msg


@pytest.mark.parametrize("variant", ["tiny", "vit_b", "vit_l", "vit_h"])
def test_infer_variant(variant):
    with torch.device("meta"):
        state = build_sam(variant).state_dict()
    assert infer_variant(state) == variant


def test_missing_keys_are_listed(tiny_sam, tmp_path):
    state = tiny_sam.state_dict()
    del state["mask_decoder.iou_token.weight"]
    state["mask_decoder.extra.weight"] = torch.zeros(2)
    torch.save(state, tmp_path / "partial.pth")
    with pytest.raises(ValueError, match=r"1 missing keys: \['mask_decoder.iou_token.weight'\]") as err:
        build_sam("tiny", checkpoint=tmp_path / "partial.pth")
    assert "1 unexpected keys: ['mask_decoder.extra.weight']" in str(err.value)
    assert "'tiny'" in str(err.value)


def test_truncated_file_is_named(tiny_sam, tmp_path):
    path = save_official(tiny_sam, tmp_path / "cut.pth")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"cut\.pth.*truncated or corrupted"):
        load_state_dict(path)
    st = save_official(tiny_sam, tmp_path / "cut.safetensors")
    st.write_bytes(st.read_bytes()[:1000])
    with pytest.raises(ValueError, match=r"cut\.safetensors"):
        load_state_dict(st)


class _NotWeights:
    pass


def test_non_state_dict_pickles_are_refused(tmp_path):
    torch.save({"net": _NotWeights()}, tmp_path / "obj.pth")
    with pytest.raises(ValueError, match=r"obj\.pth is not a plain state dict"):
        load_state_dict(tmp_path / "obj.pth")
    torch.save({"a": torch.zeros(1), "lr": 0.1}, tmp_path / "mixed.pth")
    with pytest.raises(ValueError, match=r"mixed\.pth is not a plain state dict.*'lr'"):
        load_state_dict(tmp_path / "mixed.pth")
    torch.save([torch.zeros(1)], tmp_path / "list.pth")
    with pytest.raises(ValueError, match="holds a list"):
        load_state_dict(tmp_path / "list.pth")
    with pytest.raises(FileNotFoundError, match="sam_vit_b_01ec64"):
        load_state_dict(tmp_path / "nope.pth")


def test_text_projection_may_start_random_from_official_weights(tiny_sam, tmp_path, caplog):
    path = save_official(tiny_sam, tmp_path / "tiny.pth")
    sam = build_sam("tiny", checkpoint=path, text_embed_dim=8)
    assert torch.equal(sam.mask_decoder.iou_token.weight, tiny_sam.mask_decoder.iou_token.weight)
    assert "prompt_encoder.text_proj.weight" in caplog.text  # said out loud, not silent
    with pytest.raises(ValueError, match="unexpected keys"):
        build_sam("tiny", checkpoint=save_official(sam, tmp_path / "text.pth"))


def test_directory_uses_distributed_checkpoint(tiny_sam, tmp_path, monkeypatch):
    calls = []

    def load_full_state_dict(path):
        calls.append(path)
        return _lightning_ckpt(tiny_sam)

    fake = types.ModuleType("samlight.modeling.sharded_checkpoint")
    fake.load_full_state_dict = load_full_state_dict
    monkeypatch.setitem(sys.modules, "samlight.modeling.sharded_checkpoint", fake)
    (tmp_path / "run.ckpt").mkdir()
    _assert_same_weights(build_sam("tiny", checkpoint=tmp_path / "run.ckpt"), tiny_sam)
    assert calls == [tmp_path / "run.ckpt"]


def test_url_downloads_once_into_cache(tiny_sam, tmp_path, monkeypatch):
    import torch.hub

    import samlight.modeling.checkpoint as ckpt

    downloads = []

    def fake_download(url, dst, hash_prefix=None, progress=True):
        downloads.append(url)
        save_official(tiny_sam, dst)

    monkeypatch.setattr(torch.hub, "download_url_to_file", fake_download)
    monkeypatch.setattr(ckpt, "CACHE_DIR", tmp_path / "cache")
    url = "https://example.invalid/sam_tiny.pth"
    for _ in range(2):
        _assert_same_weights(build_sam("tiny", checkpoint=url), tiny_sam)
    assert downloads == [url] and (tmp_path / "cache" / "sam_tiny.pth").exists()


def test_export_cli_writes_official_layout(tiny_sam, tmp_path, capsys):
    ckpt = tmp_path / "run.ckpt"
    torch.save(_lightning_ckpt(tiny_sam), ckpt)
    out = tmp_path / "out" / "sam.pth"
    assert export_main(["--ckpt", str(ckpt), "--out", str(out)]) == 0
    assert "tiny" in capsys.readouterr().out
    raw = torch.load(out, map_location="cpu", weights_only=True)
    assert list(raw) == list(tiny_sam.state_dict())
    _assert_same_weights(build_sam("tiny", checkpoint=out), tiny_sam)
    assert not list(out.parent.glob(".*tmp*"))  # the temporary file was renamed away

    assert export_main(["--ckpt", str(ckpt), "--out", str(tmp_path / "b.pth"), "--variant", "vit_b"]) == 1
    err = capsys.readouterr().err
    assert "missing keys" in err and "'tiny'" in err
    assert not (tmp_path / "b.pth").exists()


def test_save_state_dict_is_atomic(tmp_path, monkeypatch):
    target = tmp_path / "w.pth"
    save_state_dict({"a": torch.ones(2)}, target)

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", boom)
    with pytest.raises(OSError):
        save_state_dict({"a": torch.zeros(2)}, target)
    assert torch.equal(torch.load(target, weights_only=True)["a"], torch.ones(2))  # old file intact
    assert [p.name for p in tmp_path.iterdir()] == ["w.pth"]


def test_export_keeps_a_text_projection(tmp_path, capsys):
    sam = build_sam("tiny", text_embed_dim=8)
    ckpt = tmp_path / "text.ckpt"
    torch.save(_lightning_ckpt(sam), ckpt)
    out = tmp_path / "text.safetensors"
    assert export_main(["--ckpt", str(ckpt), "--out", str(out)]) == 0
    assert "text_proj" in capsys.readouterr().out
    _assert_same_weights(build_sam("tiny", checkpoint=out, text_embed_dim=8), sam)


def test_two_models_in_one_checkpoint_is_an_error(tiny_sam, tmp_path):
    state = tiny_sam.state_dict()
    both = {**{f"model.{k}": v for k, v in state.items()}, **{f"ema.{k}": v for k, v in state.items()}}
    torch.save({"state_dict": both}, tmp_path / "ema.ckpt")
    with pytest.raises(ValueError, match=r"ema\.ckpt holds several SAM models.*'ema\.', 'model\.'"):
        load_state_dict(tmp_path / "ema.ckpt")
