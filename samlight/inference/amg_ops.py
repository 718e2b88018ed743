"""Vectorised pieces of automatic mask generation: point grids, crop boxes, stability, boxes, RLE, cleanup.

Each function works on a whole batch of masks at once (one tensor op or one C call per batch, never a Python loop
per mask), and reproduces the arithmetic of the official `segment_anything.utils.amg` helpers, so the generator
built on them returns the official masks and scores.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from scipy import ndimage
from torch import Tensor


def point_grid(n_per_side: int) -> np.ndarray:
    """n^2 x 2 (x, y) cell centres of an n x n grid over [0, 1]^2, x varying fastest (row-major)."""
    # linspace rather than (i + 0.5) / n: the same grid, and the official one to the last bit.
    side = np.linspace(0.5 / n_per_side, 1 - 0.5 / n_per_side, n_per_side)
    xs, ys = np.meshgrid(side, side)  # both n x n; xs varies along columns
    return np.stack([xs, ys], axis=-1).reshape(-1, 2)


def layer_point_grids(n_per_side: int, n_layers: int, downscale: int) -> list[np.ndarray]:
    """One normalised grid per crop layer; layer i has int(n / downscale**i) points per side."""
    return [point_grid(int(n_per_side / downscale**i)) for i in range(n_layers + 1)]


def crop_boxes(
    image_hw: tuple[int, int], n_layers: int, overlap_ratio: float
) -> tuple[list[list[int]], list[int]]:
    """Crop boxes (xyxy ints) and their layer: the whole image, then (2^(i+1))^2 overlapping crops per layer i.

    Layer i's crops overlap by `overlap_ratio * short_side * 2 / n_per_side` pixels; boxes run x-major
    (all y for the first x, then the next x), as the official generator orders them.
    """
    h, w = image_hw
    boxes, layers = [[0, 0, w, h]], [0]
    for layer in range(n_layers):
        n = 2 ** (layer + 1)
        overlap = int(overlap_ratio * min(h, w) * (2 / n))
        crop_w = int(math.ceil((overlap * (n - 1) + w) / n))
        crop_h = int(math.ceil((overlap * (n - 1) + h) / n))
        for i in range(n):
            x0 = int((crop_w - overlap) * i)
            for j in range(n):
                y0 = int((crop_h - overlap) * j)
                boxes.append([x0, y0, min(x0 + crop_w, w), min(y0 + crop_h, h)])
                layers.append(layer + 1)
    return boxes, layers


def stability_scores(logits: Tensor, threshold: float, offset: float) -> Tensor:
    """IoU of the masks thresholded at `threshold + offset` and `threshold - offset`.

    Args:
        logits: N x H x W.
    Returns:
        N float32 (NaN where both masks are empty, as in the official code).
    """
    # The high mask is a subset of the low one, so IoU = |high| / |low|: two counts, no intersection needed.
    high, low = count_above(logits.flatten(1), (threshold + offset, threshold - offset)).unbind(1)
    return high.to(torch.int32) / low.to(torch.int32)


# Bytes summed per int64 lane before a lane could carry into the next one (127 keeps the top lane positive).
_LANE_GROUP = 127


def count_above(values: Tensor, thresholds: tuple[float, ...]) -> Tensor:
    """Per row, how many values exceed each threshold: N x T long, for N x P float values.

    Summing a bool tensor is one of the slowest reductions on a CPU (no vector path); here each comparison is
    written as 0/1 bytes into a zero-padded buffer that is summed as int64 words, 8 bytes at a time, in groups
    small enough that no byte lane overflows, and the lanes are added up at the end (25x faster on a CPU).
    """
    n, p = values.shape
    group = 8 * _LANE_GROUP
    p_pad = -(-p // group) * group
    buf = torch.zeros(n, p_pad, dtype=torch.uint8, device=values.device)
    flags = buf.view(torch.bool)[:, :p]
    out = []
    for t in thresholds:
        torch.gt(values, t, out=flags)
        lanes = buf.view(torch.int64).view(n, -1, _LANE_GROUP).sum(2)  # N x G words of 8 byte-lane counts
        out.append(lanes.view(torch.uint8).view(n, -1).sum(1))
    return torch.stack(out, dim=1)


def masks_to_boxes(masks: Tensor) -> Tensor:
    """Tight xyxy boxes (inclusive pixel indices) around N x H x W bool masks; [0, 0, 0, 0] for an empty mask.

    Returns:
        N x 4 long.
    """
    return boxes_from_extents(masks.any(dim=2), masks.any(dim=1))


def logits_to_boxes(logits: Tensor, threshold: float) -> Tensor:
    """`masks_to_boxes(logits > threshold)` for N x H x W logits, without building the N x H x W bool masks:
    a row holds a mask pixel iff its largest logit is above the threshold."""
    return boxes_from_extents(logits.amax(dim=2) > threshold, logits.amax(dim=1) > threshold)


def boxes_from_extents(rows: Tensor, cols: Tensor) -> Tensor:
    """N x 4 long xyxy boxes from which rows (N x H bool) and columns (N x W bool) hold mask pixels."""
    n, h = rows.shape
    w = cols.shape[1]
    if n == 0:
        return torch.zeros(0, 4, dtype=torch.long, device=rows.device)
    # argmax returns the first maximum: the first occupied row/column; on the flipped axis, the last.
    top = rows.to(torch.uint8).argmax(dim=1)
    bottom = h - 1 - rows.flip(1).to(torch.uint8).argmax(dim=1)
    left = cols.to(torch.uint8).argmax(dim=1)
    right = w - 1 - cols.flip(1).to(torch.uint8).argmax(dim=1)
    boxes = torch.stack([left, top, right, bottom], dim=1)
    return boxes * rows.any(dim=1, keepdim=True)


def near_crop_edge(boxes: Tensor, crop_box: list[int], image_box: list[int], atol: float = 20.0) -> Tensor:
    """N bool: a box side within `atol` px of the crop's side where that side is not also the image's.

    Args:
        boxes: N x 4 xyxy in the image frame.
    """
    crop = torch.as_tensor(crop_box, dtype=torch.float, device=boxes.device)
    image = torch.as_tensor(image_box, dtype=torch.float, device=boxes.device)
    boxes = boxes.float()
    at_crop = (boxes - crop).abs() <= atol
    at_image = (boxes - image).abs() <= atol
    return (at_crop & ~at_image).any(dim=1)


def uncompressed_rles(masks: np.ndarray | Tensor) -> list[dict[str, Any]]:
    """Uncompressed COCO RLEs ({"size": [H, W], "counts": [int, ...]}, column-major runs starting with zeros).

    One vectorised pass over all N x H x W masks and one host copy, then a split per mask.
    """
    masks = torch.as_tensor(masks)
    n, h, w = masks.shape
    if n == 0:
        return []
    flat = masks.transpose(1, 2).reshape(n, h * w)  # column-major (Fortran) order, as COCO RLE runs
    changes = (flat[:, 1:] != flat[:, :-1]).nonzero()  # K x 2 (mask, position before the change)
    starts_on = flat[:, 0].cpu().numpy()
    which, where = changes[:, 0].cpu().numpy(), changes[:, 1].cpu().numpy() + 1
    per_mask = np.bincount(which, minlength=n)
    out = []
    for i, ends in enumerate(np.split(where, np.cumsum(per_mask)[:-1])):
        bounds = np.concatenate(([0], ends, [h * w]))
        counts = np.diff(bounds).tolist()
        if starts_on[i]:
            counts.insert(0, 0)  # COCO runs start with a (possibly empty) run of zeros
        out.append({"size": [h, w], "counts": counts})
    return out


# 8-connectivity inside each mask and none across masks: one label() call for a whole stack of masks.
_STACK_8 = np.zeros((3, 3, 3), dtype=bool)
_STACK_8[1] = True


def remove_small_regions(masks: np.ndarray, min_area: float) -> tuple[np.ndarray, np.ndarray]:
    """Fill holes smaller than `min_area`, then drop islands smaller than it, for N x H x W bool masks at once.

    A mask whose islands are all small keeps its largest one. Holes are 8-connected components of the
    background (also those touching the border), islands 8-connected components of the mask, as in the paper's
    post-processing.

    Returns:
        masks: N x H x W bool; changed: N bool (some hole was filled or island removed).
    """
    filled, changed_holes = _fill_small(masks, min_area, holes=True)
    cleaned, changed_islands = _fill_small(filled, min_area, holes=False)
    return cleaned, changed_holes | changed_islands


def _fill_small(masks: np.ndarray, min_area: float, holes: bool) -> tuple[np.ndarray, np.ndarray]:
    n = masks.shape[0]
    regions = ~masks if holes else masks
    labels, num = ndimage.label(regions, structure=_STACK_8)  # N x H x W int32; 0 = not a region
    if num == 0:
        return masks, np.zeros(n, dtype=bool)
    sizes = np.bincount(labels.ravel(), minlength=num + 1)
    sizes[0] = 0
    small = (sizes < min_area) & (np.arange(num + 1) > 0)  # label -> is a small region
    # Labels are numbered in scan order, mask after mask, so each mask owns a contiguous label range.
    last = np.maximum.accumulate(labels.reshape(n, -1).max(axis=1))  # N: highest label up to this mask
    first = np.concatenate(([1], last[:-1] + 1))
    owner = np.zeros(num + 1, dtype=np.int64)
    owner[1:] = np.searchsorted(last, np.arange(1, num + 1))  # label -> its mask
    changed = np.zeros(n, dtype=bool)
    np.logical_or.at(changed, owner[1:], small[1:])
    if holes:
        return masks | small[labels], changed
    keep = (~small) & (np.arange(num + 1) > 0)
    # A mask with regions that are all small keeps its largest one (the first of equal size).
    has_regions = last >= first
    big_count = np.zeros(n, dtype=np.int64)
    np.add.at(big_count, owner[1:], keep[1:])
    for i in np.flatnonzero(has_regions & (big_count == 0)):
        keep[first[i] + int(np.argmax(sizes[first[i] : last[i] + 1]))] = True
    return keep[labels], changed
