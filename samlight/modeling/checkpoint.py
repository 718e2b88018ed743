"""Reading and writing SAM weights: official .pth, Lightning .ckpt, safetensors, sharded dirs, official URLs,
Hugging Face transformers SamModel folders.

Every read uses `torch.load(..., map_location="cpu", weights_only=True)` or safetensors; every load into a model
is strict, and a mismatch is an error naming the keys and the variant the file would fit.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
from collections.abc import Mapping
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from samlight.modeling.variants import VARIANTS
from samlight.modeling.weight_names import (
    SAM_PARTS,
    encoder_only_to_official,
    hf_to_official,
    is_hf_sam,
    strip_sam_prefix,
    timm_to_official,
    vit_prefix_tokens,
)

log = logging.getLogger(__name__)

OFFICIAL_URLS = {
    "vit_b": "https://dl.fbaipublicfiles.com/segment_anything/sam_vit_b_01ec64.pth",
    "vit_l": "https://dl.fbaipublicfiles.com/segment_anything/sam_vit_l_0b3195.pth",
    "vit_h": "https://dl.fbaipublicfiles.com/segment_anything/sam_vit_h_4b8939.pth",
}
CACHE_DIR = Path(os.environ.get("SAMLIGHT_CACHE", Path.home() / ".cache" / "samlight"))

_MAX_LISTED = 10


def load_state_dict(path_or_url: str | os.PathLike) -> dict[str, Tensor]:
    """Read SAM weights from any supported source and return them with official key names.

    Accepts an official .pth, a Lightning .ckpt (`state_dict` with a `model.` prefix), safetensors, a state dict
    with `module.` / `model.` / `_orig_mod.` prefixes, a sharded distributed checkpoint directory, a Hugging Face
    transformers `SamModel` folder (`save_pretrained` / hub layout: config.json + model.safetensors or
    pytorch_model.bin, sharded or not) or one of its weight files, or an http(s) URL (downloaded once into
    ~/.cache/samlight). Keys outside the SAM model of a training checkpoint
    (e.g. a loss buffer) are dropped; everything else is kept for a strict load.
    """
    source = str(path_or_url)
    if source.startswith(("http://", "https://")):
        path = _download(source)
    else:
        path = Path(source).expanduser()
        if not path.exists():
            raise FileNotFoundError(
                f"Checkpoint {source} does not exist; official weights: {', '.join(OFFICIAL_URLS.values())}"
            )
    if path.is_dir() and _is_hf_folder(path):
        obj = _read_hf_folder(path)
    elif path.is_dir():
        # Sharded (FSDP / distributed checkpoint) directory, consolidated by the scale-out code.
        from samlight.modeling.sharded_checkpoint import load_full_state_dict

        obj = load_full_state_dict(path)
    elif path.suffix == ".safetensors":
        obj = _read_safetensors(path)
    else:
        obj = _torch_load(path)
    return normalize_state_dict(obj, source=str(path))


_HF_WEIGHTS = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)


def _is_hf_folder(path: Path) -> bool:
    return any((path / name).exists() for name in _HF_WEIGHTS)


def _read_hf_folder(path: Path) -> dict[str, Tensor]:
    """The weights of a `SamModel.save_pretrained` folder, safetensors preferred; a sharded one is merged."""
    config = path / "config.json"
    if config.exists():
        model_type = json.loads(config.read_text()).get("model_type")
        if model_type != "sam":
            raise ValueError(
                f"{config} says model_type {model_type!r}; samlight reads transformers SamModel folders "
                "(model_type 'sam', e.g. facebook/sam-vit-base)"
            )
    name = next(n for n in _HF_WEIGHTS if (path / n).exists())
    if not name.endswith(".index.json"):
        return _read_safetensors(path / name) if name.endswith(".safetensors") else _torch_load(path / name)
    index = path / name
    shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    merged: dict[str, Tensor] = {}
    for shard in shards:
        part = path / shard
        if not part.exists():
            raise FileNotFoundError(f"{index} lists the shard {shard}, which is not in {path}")
        merged.update(_read_safetensors(part) if shard.endswith(".safetensors") else _torch_load(part))
    return merged


def _read_safetensors(path: Path) -> dict[str, Tensor]:
    from safetensors.torch import load_file

    try:
        return load_file(str(path), device="cpu")
    except Exception as e:
        raise ValueError(f"Could not read safetensors file {path}: {e}. Is it truncated or corrupted?") from e


def _torch_load(path: Path) -> object:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError) as e:
        raise ValueError(
            f"Could not read checkpoint {path}: the file looks truncated or corrupted ({str(e).splitlines()[0]}). "
            "Download or copy it again."
        ) from e
    except Exception as e:  # pickle.UnpicklingError and friends from the weights-only unpickler
        detail = next((line.strip() for line in str(e).splitlines() if "Unsupported global" in line), "")
        raise ValueError(
            f"Checkpoint {path} is not a plain state dict (weights-only loading refused it{': ' + detail if detail else ''}). "
            "samlight only loads tensors; save weights with torch.save(model.state_dict(), path), "
            "samlight.save_official(model, path) or `samlight export`."
        ) from e


def normalize_state_dict(obj: object, *, source: str = "<state dict>") -> dict[str, Tensor]:
    """Unwrap a loaded checkpoint object into a flat {official key: tensor} dict.

    Handles Lightning's {"state_dict": ...}, {"model": ...} / {"module": ...} wrappers, key prefixes such as
    `model.`, `module.`, `_orig_mod.` (torch.compile), timm-named image encoder keys and transformers `SamModel`
    names (every one of those translated, or an error naming the rest).
    """
    for wrapper in ("state_dict", "model", "module"):
        if isinstance(obj, Mapping) and isinstance(obj.get(wrapper), Mapping):
            obj = obj[wrapper]
            break
    if not isinstance(obj, Mapping) or not obj:
        raise ValueError(f"Checkpoint {source} holds a {type(obj).__name__}, not a non-empty state dict")
    not_tensors = [k for k, v in obj.items() if not isinstance(v, Tensor)]
    if not_tensors:
        raise ValueError(
            f"Checkpoint {source} is not a plain state dict: {len(not_tensors)} entries are not tensors "
            f"(e.g. {not_tensors[:5]})"
        )
    if is_hf_sam(obj):
        return hf_to_official(obj, source=source)
    return timm_to_official(strip_sam_prefix(dict(obj), source=source))


def infer_variant(state_dict: Mapping[str, Tensor]) -> str | None:
    """The variant whose image encoder shape (embed dim, depth, patch grid) matches `state_dict`, if any."""
    pos = state_dict.get("image_encoder.pos_embed")
    if pos is None:
        return None
    depth = 1 + max(
        (int(m.group(1)) for k in state_dict if (m := re.match(r"image_encoder\.blocks\.(\d+)\.", k))),
        default=-1,
    )
    for name, make in VARIANTS.items():
        cfg = make()
        grid = cfg.encoder_img_size // cfg.patch_size
        if tuple(pos.shape) == (1, grid, grid, cfg.encoder_embed_dim) and depth == cfg.encoder_depth:
            return name
    return None


def check_state_dict(
    model: nn.Module, state_dict: Mapping[str, Tensor], *, source: str, allow_missing: tuple[str, ...] = ()
) -> None:
    """Raise a ValueError listing missing/unexpected keys and shape mismatches between model and state_dict.

    Works on a model built on the meta device too (only names and shapes are compared).
    `allow_missing`: key prefixes that may be absent (logged, never silent).
    """
    expected = model.state_dict()
    missing = [k for k in expected if k not in state_dict]
    allowed = [k for k in missing if k.startswith(allow_missing)] if allow_missing else []
    missing = [k for k in missing if k not in allowed]
    unexpected = [k for k in state_dict if k not in expected]
    shapes = [
        f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(expected[k].shape)}"
        for k, v in state_dict.items()
        if k in expected and v.shape != expected[k].shape
    ]
    if allowed:
        log.warning(
            "%s: %d keys not in the checkpoint keep their random init: %s", source, len(allowed), allowed
        )
    if not (missing or unexpected or shapes):
        return
    lines = [f"Checkpoint {source} does not fit this model (strict loading):"]
    for title, items in (
        ("missing keys", missing),
        ("unexpected keys", unexpected),
        ("shape mismatches", shapes),
    ):
        if items:
            more = f" (+{len(items) - _MAX_LISTED} more)" if len(items) > _MAX_LISTED else ""
            lines.append(f"  {len(items)} {title}: {items[:_MAX_LISTED]}{more}")
    variant = infer_variant(state_dict)
    if variant:
        lines.append(
            f"  The checkpoint looks like variant {variant!r}: build_sam({variant!r}, checkpoint=...)"
        )
    else:
        lines.append("  It matches none of the known variants; check the file is a SAM checkpoint.")
    raise ValueError("\n".join(lines))


def load_into(
    model: nn.Module,
    state_dict: Mapping[str, Tensor],
    *,
    source: str,
    allow_missing: tuple[str, ...] = (),
    assign: bool = False,
) -> None:
    """Strictly load `state_dict` into `model` (a Sam), with `check_state_dict`'s error on any mismatch.

    `assign=True` adopts the given tensors instead of copying (for a model built on the meta device).
    """
    check_state_dict(model, state_dict, source=source, allow_missing=allow_missing)
    model.load_state_dict(state_dict, strict=not allow_missing, assign=assign)


def official_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """The weights of a Sam (or a module holding one as `.model`) under the official key names, on CPU.

    A module with `merged_model()` (SamModule, which may carry LoRA adapters) is asked for its merged copy.
    """
    sam = model.merged_model() if hasattr(model, "merged_model") else getattr(model, "model", model)
    state = sam.state_dict()
    extra = [k for k in state if not k.startswith(SAM_PARTS)]
    if extra:
        raise ValueError(f"save_official: {type(sam).__name__} has keys outside the SAM parts: {extra[:10]}")
    return {k: v.detach().to("cpu").contiguous() for k, v in state.items()}


def save_official(model: nn.Module, path: str | os.PathLike) -> Path:
    """Write `model`'s weights in the official layout (`image_encoder.*`, `prompt_encoder.*`, `mask_decoder.*`).

    `segment_anything.sam_model_registry[variant](checkpoint=path)` loads the result with strict keys (for a
    model built without `text_embed_dim`; a text projection is saved too and is then an extra key). A path
    ending in `.safetensors` is written as safetensors. The write is atomic (temporary file + rename).
    """
    return save_state_dict(official_state_dict(model), path)


def save_state_dict(state_dict: Mapping[str, Tensor], path: str | os.PathLike) -> Path:
    """Atomically write a flat state dict as .pth (torch.save) or .safetensors; returns the path written."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import save_file

            save_file(dict(state_dict), str(tmp))
        else:
            torch.save(dict(state_dict), tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def _download(url: str) -> Path:
    """Fetch `url` into the cache once (never used by tests)."""
    dst = CACHE_DIR / url.rsplit("/", 1)[-1]
    if not dst.exists():
        from torch.hub import download_url_to_file

        dst.parent.mkdir(parents=True, exist_ok=True)
        log.info("Downloading %s to %s", url, dst)
        download_url_to_file(url, str(dst), progress=True)
    return dst


def load_encoder_weights(model: nn.Module, path_or_url: str | os.PathLike) -> None:
    """Initialise `model.image_encoder` of a Sam from encoder-only weights, as SAM pre-training does.

    The paper starts from an MAE-pretrained ViT. Accepted: an MAE checkpoint (`{"model": {...}}`), a timm ViT
    or `samvit_*` state dict, or the `image_encoder.*` subset of a SAM checkpoint. Strict on the encoder:
    every block weight must be in the file with the model's shape, and nothing in the file goes unused
    except the ViT-only keys (class token, final norm, classifier, MAE decoder; logged). Adapted where the
    input or patch size differs:
    - the absolute position embedding is resampled to the model's patch grid (timm; class-token slot dropped);
    - the patch-embedding kernel is resampled to the model's patch size (timm's FlexiViT resampling);
    - relative position tables absent from the file (MAE and plain ViTs have none) start at zero, as in the
      official image encoder; present ones of another length are resized linearly, as the official
      `get_rel_pos` does at run time.
    The neck (absent from plain ViTs) keeps its init; prompt encoder and mask decoder are untouched.
    """
    source = str(path_or_url)
    raw = load_state_dict(path_or_url)
    state, dropped = encoder_only_to_official(raw, source=source)
    encoder = model.image_encoder
    expected = {f"image_encoder.{k}": v for k, v in encoder.state_dict().items()}
    state = _fit_encoder_shapes(state, expected, prefix_tokens=vit_prefix_tokens(raw), source=source)
    new = ("image_encoder.neck.",) if not any(k.startswith("image_encoder.neck.") for k in state) else ()
    zero = [k for k in expected if k.endswith((".rel_pos_h", ".rel_pos_w")) and k not in state]
    for key in zero:
        state[key] = torch.zeros_like(expected[key])
    check_state_dict(
        encoder,
        {k[len("image_encoder.") :]: v for k, v in state.items()},
        source=source,
        allow_missing=tuple(p[len("image_encoder.") :] for p in new),
    )
    encoder.load_state_dict({k[len("image_encoder.") :]: v for k, v in state.items()}, strict=not new)
    log.info(
        "%s: image encoder initialised (%d tensors); left out %s; zero relative position tables: %d; "
        "new (kept init): %s",
        source,
        len(state) - len(zero),
        dropped or "nothing",
        len(zero),
        list(new) or "none",
    )


def _fit_encoder_shapes(
    state: dict[str, Tensor], expected: Mapping[str, Tensor], *, prefix_tokens: int, source: str
) -> dict[str, Tensor]:
    """Resample the position embedding, patch embedding and relative position tables to the model's sizes."""
    from timm.layers import resample_abs_pos_embed_nhwc, resample_patch_embed

    state = dict(state)
    pos = state.get("image_encoder.pos_embed")
    if pos is not None and "image_encoder.pos_embed" in expected:
        target = expected["image_encoder.pos_embed"].shape  # 1 x G x G x D
        if pos.ndim == 3:  # a plain ViT's 1 x (prefix + g*g) x D: drop the prefix tokens, to 1 x g x g x D
            grid = pos.shape[1] - prefix_tokens
            side = math.isqrt(max(grid, 0))
            if side * side != grid:
                raise ValueError(
                    f"{source}: pos_embed {tuple(pos.shape)} with {prefix_tokens} prefix token(s) is not a square "
                    "patch grid"
                )
            pos = pos[:, prefix_tokens:].reshape(1, side, side, pos.shape[-1])
        if pos.ndim == 4 and pos.shape[-1] == target[-1] and pos.shape[1:3] != target[1:3]:
            pos = resample_abs_pos_embed_nhwc(pos.float(), list(target[1:3])).to(pos.dtype)
        state["image_encoder.pos_embed"] = pos
    key = "image_encoder.patch_embed.proj.weight"
    if key in state and key in expected:
        weight, target = state[key], expected[key].shape  # D x 3 x p x p
        if weight.shape[:2] == target[:2] and weight.shape[2:] != target[2:]:
            state[key] = resample_patch_embed(weight.float(), list(target[2:])).to(weight.dtype)
    for key, table in list(state.items()):
        if key.endswith((".rel_pos_h", ".rel_pos_w")) and key in expected:
            length, dim = expected[key].shape  # 2 * size - 1 x head dim
            if table.shape[1] == dim and table.shape[0] != length:
                resized = F.interpolate(table.float().T[None], size=length, mode="linear")
                state[key] = resized[0].T.to(table.dtype)
    return state
