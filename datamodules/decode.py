"""Decode one SA-1B sample (JPEG + json of COCO RLE masks) into SamPredictor's input frame, cheaply.

This is the data workers' hot path, also used by `bench/data_throughput.py`:
- the JPEG is decoded at a reduced DCT scale (1/2, 1/4, 1/8) when the model input needs fewer pixels, then resized
  to exactly `get_preprocess_shape` with PIL bilinear, as `samlight.modeling.transforms.resize_longest_image` does;
- masks covering more than `max_mask_area` of the image are dropped using the json `area` (no decode);
- only the sampled masks are decoded, straight from their run lengths at the nearest-neighbour sample positions of
  the resized frame (identical to a full pycocotools decode followed by `F.interpolate(mode="nearest-exact")`),
  so a 1500 x 2250 mask never materialises;
- for training, the masks go straight to the loss frame (`decode_mask_targets`: S/4 soft targets as uint8
  counts, 4 MB per image at 64 masks and S = 1024 instead of 64 MB of S x S bools); the full S x S masks are
  decoded only where the evaluation protocol needs them (validation).
"""

from __future__ import annotations

import io
import json
from functools import lru_cache
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from samlight.datamodules.collate import SegmentationSample
from samlight.modeling.transforms import PIXEL_MEAN, PIXEL_STD, get_preprocess_shape

try:  # optional `fast` extra: libjpeg-turbo with DCT scaling, ~1.5x faster than Pillow
    import simplejpeg
except ImportError:  # pragma: no cover - exercised only without the extra
    simplejpeg = None

_MEAN = torch.tensor(PIXEL_MEAN).view(3, 1, 1)
_STD = torch.tensor(PIXEL_STD).view(3, 1, 1)


class SampleError(ValueError):
    """A defect in one sample; `reason` is the counter name (e.g. "corrupt image", "broken rle")."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


# ----------------------------------------------------------------------------------------------- image


def decode_image(data: bytes, long_side: int, *, reduced: bool = True) -> tuple[np.ndarray, tuple[int, int]]:
    """Decode a JPEG and resize it so its longest side is `long_side` (official ResizeLongestSide sizes).

    With `reduced`, decodes at the smallest DCT scale (1/2, 1/4, 1/8) that is still at least the target size,
    then resizes with PIL bilinear. The DCT scaling acts as an extra box filter, so pixels differ slightly from a
    full decode (mean |diff| about 2/255 for 1500 x 2250 -> 1024, more for larger reductions); `reduced=False`
    decodes in full and matches `samlight.modeling.transforms.resize_longest_image` (SamPredictor) exactly.

    Args:
        data: JPEG (or any Pillow-readable) bytes.
        long_side: S, the model's input size.
        reduced: allow reduced-size DCT decoding.
    Returns:
        (image h x w x 3 uint8 with (h, w) = get_preprocess_shape(H, W, S), original size (H, W)).
    Raises:
        SampleError("corrupt image") when the bytes do not decode.
    """
    array, original = _decode(data, long_side if reduced else 0)
    target = get_preprocess_shape(original[0], original[1], long_side)
    if array.shape[:2] != target:
        array = np.asarray(Image.fromarray(array).resize((target[1], target[0]), Image.BILINEAR))
    return array, original


def _decode(data: bytes, long_side: int) -> tuple[np.ndarray, tuple[int, int]]:
    # long_side 0: full-size decode.
    if simplejpeg is not None and long_side and simplejpeg.is_jpeg(data):
        try:
            height, width, _, _ = simplejpeg.decode_jpeg_header(data)
            target = get_preprocess_shape(height, width, long_side)
            image = simplejpeg.decode_jpeg(data, colorspace="RGB", min_height=target[0], min_width=target[1])
            return image, (height, width)
        except ValueError:
            pass  # CMYK, arithmetic coding, ...: let Pillow try before calling the image corrupt
    try:
        with Image.open(io.BytesIO(data)) as im:
            width, height = im.size
            target = get_preprocess_shape(height, width, long_side)
            if im.format == "JPEG" and long_side:
                im.draft("RGB", (target[1], target[0]))  # DCT scaling; keeps size >= requested
            return np.asarray(im.convert("RGB")), (height, width)
    except Exception as exn:  # Pillow raises OSError, SyntaxError, ValueError, ... on bad bytes
        raise SampleError("corrupt image", f"{type(exn).__name__}: {exn}") from exn


def normalize_pad_image(image: np.ndarray, size: int) -> torch.Tensor:
    """h x w x 3 uint8 -> 3 x S x S float32, (x - mean) / std, zero-padded bottom-right (SamPredictor)."""
    h, w = image.shape[:2]
    out = torch.zeros(3, size, size, dtype=torch.float32)
    if not image.flags.writeable:  # Pillow hands out read-only buffers; torch wants to own writable memory
        image = image.copy()
    chw = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)  # 3 x h x w uint8
    torch.sub(chw, _MEAN, out=out[:, :h, :w])
    out[:, :h, :w].div_(_STD)
    return out


# ----------------------------------------------------------------------------------------------- masks


def rle_counts(rle: dict[str, Any]) -> np.ndarray:
    """Run lengths of a COCO RLE (compressed string or uncompressed list), column-major, starting with 0s.

    Vectorised parser of the COCO compressed-string format (5 bits per char, continuation bit 0x20, sign bit 0x10,
    counts from the third on stored as differences to the count two before), validated so a broken RLE can never
    reach pycocotools' unchecked C decoder.

    Returns:
        K int64 counts summing to H * W.
    Raises:
        SampleError("broken rle") on malformed input.
    """
    try:
        height, width = (int(v) for v in rle["size"])
        counts = rle["counts"]
    except (KeyError, TypeError, ValueError) as exn:
        raise SampleError("broken rle", f"segmentation is not a COCO RLE dict ({exn!r})") from exn
    if isinstance(counts, list):
        values = np.asarray(counts, dtype=np.int64)
    else:
        raw = counts.encode("ascii", "replace") if isinstance(counts, str) else bytes(counts)
        values = _parse_compressed(np.frombuffer(raw, dtype=np.uint8).astype(np.int64) - 48)
    if values.size and (values.min() < 0 or int(values.sum()) != height * width):
        raise SampleError("broken rle", f"run lengths sum to {int(values.sum())}, size says {height}x{width}")
    if not values.size and height * width:
        raise SampleError("broken rle", "empty counts")
    return values


def _parse_compressed(chars: np.ndarray) -> np.ndarray:
    if chars.size == 0:
        return chars
    if chars.min() < 0 or chars.max() > 63 or chars[-1] & 0x20:
        raise SampleError("broken rle", "counts string has invalid or unterminated characters")
    ends = np.flatnonzero((chars & 0x20) == 0)  # last char of each count
    starts = np.concatenate(([0], ends[:-1] + 1))
    lengths = ends - starts + 1
    if lengths.max() > 10:  # 50 bits: far beyond any image, and keeps the shifts inside int64
        raise SampleError("broken rle", "counts string has an overlong number")
    shift = 5 * (np.arange(chars.size) - np.repeat(starts, lengths))
    values = np.add.reduceat((chars & 0x1F) << shift, starts)
    negative = (chars[ends] & 0x10) != 0
    values = np.where(negative, values - (np.int64(1) << (5 * lengths)), values)  # sign extension
    # From the fourth count on, each is stored relative to the count two places before it.
    if values.size > 3:
        values[1::2] = np.cumsum(values[1::2])
        values[2::2] = np.cumsum(values[2::2])
    return values


@lru_cache(maxsize=64)
def nearest_source_index(in_size: int, out_size: int) -> np.ndarray:
    """out_size source indices of `F.interpolate(mode="nearest-exact")` (pixel-centre sampling), int64."""
    # Computed by torch itself so the float rounding at exact half-pixel ties is torch's, bit for bit.
    src = torch.arange(in_size, dtype=torch.float32).view(1, 1, in_size)
    return F.interpolate(src, size=out_size, mode="nearest-exact").view(out_size).long().numpy()


def decode_masks(
    rles: list[dict[str, Any]], original_size: tuple[int, int], input_size: tuple[int, int], size: int
) -> torch.Tensor:
    """Decode COCO RLEs directly at the resized frame, nearest-exact, zero-padded to S x S.

    Args:
        rles: M RLE dicts, each of `original_size` (H, W).
        original_size: (H, W) of the masks.
        input_size: (h, w) to resize to (from `get_preprocess_shape`).
        size: S, pad to S x S.
    Returns:
        M x S x S bool, equal to pycocotools decode + nearest-exact resize + pad.
    """
    h, w = input_size
    if not rles:
        return torch.zeros(0, size, size, dtype=torch.bool)
    masks, col_of_x = _sampled_columns(rles, original_size, input_size)  # M x w' x h uint8 (column-major)
    masks = masks.view(torch.bool)
    if col_of_x is not None:
        masks = masks[:, col_of_x]  # M x w x h
    # Only the padding is zeroed: the image area is written once, by the transposing copy.
    out = torch.empty(len(rles), size, size, dtype=torch.bool)
    out[:, h:].zero_()
    out[:, :h, w:].zero_()
    out[:, :h, :w] = masks.transpose(1, 2)
    return out


def decode_mask_targets(
    rles: list[dict[str, Any]], original_size: tuple[int, int], input_size: tuple[int, int], size: int
) -> torch.Tensor:
    """Decode COCO RLEs straight into the training loss frame: S/4 x S/4 soft targets as uint8 counts.

    Each value is how many of the 16 pixels of a 4 x 4 cell of the S x S mask (`decode_masks`) are foreground,
    so `targets / 16` equals `F.avg_pool2d(decode_masks(...).float(), 4)` exactly. 16x fewer bytes than the
    bool masks, and no S x S mask is ever padded, transposed, collated or sent to the device.

    Args:
        rles, original_size, input_size, size: as `decode_masks`; S must be a multiple of 4.
    Returns:
        M x S/4 x S/4 uint8 in [0, 16].
    """
    if size % 4:
        raise ValueError(f"decode_mask_targets: image size {size} is not a multiple of 4")
    out = torch.zeros(len(rles), size // 4, size // 4, dtype=torch.uint8)
    if not rles:
        return out
    columns, col_of_x = _sampled_columns(rles, original_size, input_size)  # M x w' x h uint8
    rows = _sum_rows_of_4(columns)  # M x w' x ceil(h/4): 4-row sums of each sampled column
    if col_of_x is not None:
        rows = rows[:, col_of_x]  # M x w x ceil(h/4)
    cells = _sum_groups_of_4(rows.transpose(1, 2))  # M x ceil(h/4) x ceil(w/4)
    out[:, : cells.shape[1], : cells.shape[2]] = cells
    return out


def _sampled_columns(
    rles: list[dict[str, Any]], original_size: tuple[int, int], input_size: tuple[int, int]
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The masks at the nearest-exact sample positions, column-major: M x w' x h uint8 (0/1).

    w' counts distinct source columns (when upsampling, several output columns share one); the second value
    maps the w output columns to them (None when w' == w).
    """
    (height, width), (h, w) = original_size, input_size
    # Sample positions in RLE order (column-major): column cols[x], row rows[y] -> cols[x] * H + rows[y].
    rows = nearest_source_index(height, h)
    # Upsampling repeats columns; positions must be non-decreasing, so sample each source column once.
    cols, col_of_x = np.unique(nearest_source_index(width, w), return_inverse=True)
    positions = (cols[:, None] * height + rows[None, :]).reshape(-1)  # (w'*h), non-decreasing
    values, lengths = [], []
    for rle in rles:
        if [int(v) for v in rle["size"]] != [height, width]:
            raise SampleError(
                "broken rle", f"mask size {rle['size']} differs from image size {[height, width]}"
            )
        run_ends = np.cumsum(rle_counts(rle))
        taken = np.searchsorted(positions, run_ends, side="left")  # sampled positions before each run end
        lengths.append(np.diff(taken, prepend=0))
        values.append(np.arange(run_ends.size, dtype=np.uint8) & 1)  # runs alternate 0, 1, 0, ...
    flat = np.repeat(np.concatenate(values), np.concatenate(lengths))  # M*w'*h, mask after mask
    masks = torch.from_numpy(flat).view(len(rles), cols.size, h)  # M x w' x h (column-major)
    return masks, None if cols.size == w else torch.from_numpy(col_of_x)


def _sum_rows_of_4(t: torch.Tensor) -> torch.Tensor:
    """M x w' x h uint8 of 0/1 -> M x w' x ceil(h/4): `_sum_groups_of_4` along h, without strided reads.

    Four consecutive bytes read as one little-endian uint32 v: the top byte of v * 0x01010101 is their sum
    (no carries, each byte is 0 or 1), one multiply per four pixels instead of three strided adds.
    """
    m, w, h = t.shape
    h4 = -(-h // 4) * 4
    array = t.numpy()
    if h4 != h:
        padded = np.zeros((m, w, h4), np.uint8)
        padded[..., :h] = array
        array = padded
    words = array.reshape(-1).view("<u4")  # M*w'*h/4 groups of 4 pixels
    sums = ((words * np.uint32(0x01010101)) >> np.uint32(24)).astype(np.uint8)
    return torch.from_numpy(sums).view(m, w, h4 // 4)


def _sum_groups_of_4(t: torch.Tensor) -> torch.Tensor:
    """... x L uint8 -> ... x ceil(L/4): sums of consecutive groups of 4 along the last axis (zero-padded)."""
    length = t.shape[-1]
    full = length // 4 * 4
    out = t[..., 0:full:4] + t[..., 1:full:4] + t[..., 2:full:4] + t[..., 3:full:4]
    if full < length:
        out = torch.cat([out, t[..., full:].sum(-1, keepdim=True, dtype=torch.uint8)], dim=-1)
    return out


def select_masks(
    annotations: list[dict[str, Any]],
    image_area: int,
    *,
    max_masks: int,
    max_mask_area: float,
    rng: np.random.Generator | None,
) -> np.ndarray:
    """Indices of the annotations to use: area <= max_mask_area * image area, then up to `max_masks` of them.

    Uses the json `area` (no decode). `rng` given: a random subset in random order (training);
    None: the first `max_masks` in file order (validation, deterministic).
    """
    areas = np.array([float(a.get("area", 0.0)) for a in annotations], dtype=np.float64)
    keep = np.flatnonzero(areas <= max_mask_area * image_area)
    if rng is not None:
        return rng.permutation(keep)[:max_masks]
    return keep[:max_masks]


# ----------------------------------------------------------------------------------------------- sample


def parse_record(data: bytes) -> dict[str, Any]:
    """The SA-1B json of one image: {"image": {...}, "annotations": [...]}; SampleError if malformed."""
    try:
        record = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as exn:
        raise SampleError("malformed json", str(exn)) from exn
    if not isinstance(record, dict) or not isinstance(record.get("annotations"), list):
        raise SampleError("malformed json", "expected an object with an 'annotations' list")
    if not isinstance(record.get("image", {}), dict):
        raise SampleError("malformed json", "'image' is not an object")
    return record


def decode_sa1b_sample(
    jpg: bytes,
    record: dict[str, Any] | bytes,
    *,
    image_size: int = 1024,
    max_masks: int = 64,
    max_mask_area: float = 0.9,
    rng: np.random.Generator | None = None,
    clip: bytes | None = None,
    meta: dict[str, Any] | None = None,
    reduced_decode: bool = True,
    mask_frame: str = "auto",
) -> SegmentationSample:
    """Decode one SA-1B sample into the model's frame (the fast path).

    Args:
        jpg: image bytes.
        record: the parsed json (or its bytes).
        image_size: S, longest side after the resize and the padded square size.
        max_masks: at most this many masks (random subset when `rng` is given, else the first ones).
        max_mask_area: drop masks whose json `area` exceeds this fraction of the image.
        rng: randomness for mask sampling; None = deterministic (validation).
        clip: optional `<key>.clip.npy` bytes, an A x D array aligned with the annotations.
        meta: extra meta entries (shard url, key).
        reduced_decode: decode the JPEG at a reduced DCT scale when possible (see `decode_image`).
        mask_frame: "input" -> `masks` M x S x S bool (the evaluation frame); "targets" -> `mask_targets`
            M x S/4 x S/4 uint8 soft targets only (the training loss frame, `decode_mask_targets`); "auto" ->
            "targets" when `rng` is given (training samples masks at random), else "input" (validation).
    Returns:
        `SegmentationSample` with image 3 x S x S and masks M x S x S or mask_targets M x S/4 x S/4 (M >= 1).
    Raises:
        SampleError naming the defect (reason is the skip counter's name).
    """
    if mask_frame not in ("auto", "input", "targets"):
        raise ValueError(f"decode_sa1b_sample: mask_frame must be 'auto', 'input' or 'targets', got {mask_frame!r}")
    if mask_frame == "auto":
        mask_frame = "targets" if rng is not None else "input"
    if isinstance(record, (bytes, bytearray, str)):
        record = parse_record(record)
    annotations = record["annotations"]
    if not annotations:
        raise SampleError("no annotations", "the json lists no masks")
    info = record.get("image") or {}
    image, decoded_size = decode_image(jpg, image_size, reduced=reduced_decode)
    declared = (int(info.get("height", decoded_size[0])), int(info.get("width", decoded_size[1])))
    if declared != decoded_size:
        raise SampleError("size mismatch", f"json says {declared}, JPEG is {decoded_size}")
    chosen = select_masks(
        annotations,
        decoded_size[0] * decoded_size[1],
        max_masks=max_masks,
        max_mask_area=max_mask_area,
        rng=rng,
    )
    if chosen.size == 0:
        raise SampleError("no usable masks", f"all {len(annotations)} masks cover > {max_mask_area:.0%}")
    try:
        rles = [annotations[i]["segmentation"] for i in chosen]
    except (KeyError, TypeError) as exn:
        raise SampleError("broken rle", f"annotation without 'segmentation' ({exn!r})") from exn
    input_size = image.shape[0], image.shape[1]
    if mask_frame == "targets":
        masks, targets = None, decode_mask_targets(rles, decoded_size, input_size, image_size)
    else:
        masks, targets = decode_masks(rles, decoded_size, input_size, image_size), None
    text_embeddings = None if clip is None else _clip_rows(clip, len(annotations), chosen)
    # Prepared shards (samlight data prepare) are stored at training size but remember the source size.
    original_size = (
        int(info.get("original_height", decoded_size[0])),
        int(info.get("original_width", decoded_size[1])),
    )
    chosen_anns = [annotations[i] for i in chosen]
    labels = [a.get("category_id", a.get("label")) for a in chosen_anns]
    sample_meta = {
        "image_id": info.get("image_id"),
        "original_size": original_size,
        "annotation_ids": [a.get("id") for a in chosen_anns],
        "mask_labels": labels if any(v is not None for v in labels) else None,
        "image_info": {
            k: v for k, v in info.items() if k not in ("image_id", "height", "width", "file_name")
        },
    }
    sample_meta.update(meta or {})
    return SegmentationSample(
        image=normalize_pad_image(image, image_size),
        masks=masks,
        mask_targets=targets,
        original_size=original_size,
        input_size=input_size,
        text_embeddings=text_embeddings,
        meta=sample_meta,
    )


def _clip_rows(data: bytes, num_annotations: int, chosen: np.ndarray) -> torch.Tensor:
    try:
        array = np.load(io.BytesIO(data), allow_pickle=False)
    except (ValueError, OSError, EOFError) as exn:
        raise SampleError("broken clip.npy", str(exn)) from exn
    if array.ndim != 2 or array.shape[0] != num_annotations:
        raise SampleError(
            "broken clip.npy", f"shape {array.shape}, expected {num_annotations} x D (one row per annotation)"
        )
    return torch.from_numpy(np.ascontiguousarray(array[chosen], dtype=np.float32))  # M x D
