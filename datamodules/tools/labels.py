"""Label maps -> binary masks -> SA-1B annotations, shared by the folder, medical and satellite converters.

Masks are made a chunk of label ids at a time, so a 16-bit map with thousands of objects never materialises
thousands of full-size masks at once.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Any

import numpy as np

from samlight.datamodules.tools.shards import annotations_from_masks

if TYPE_CHECKING:
    from samlight.datamodules.tools.convert import ConvertSummary

MASK_CHUNK = 64


def label_masks(
    labels: np.ndarray, *, components: int | None = None, ignore: tuple[int, ...] = ()
) -> Iterator[tuple[np.ndarray, list[int]]]:
    """Binary masks of a label map, in chunks of at most `MASK_CHUNK` label ids.

    Args:
        labels: H x W integer labels; 0 (and every value in `ignore`) is background.
        components: None for one mask per label id; 4 or 8 for one mask per 4- or 8-connected component of it.
    Yields:
        (K x H x W bool masks, the K label ids they came from), ids in increasing order.
    """
    ids = [int(v) for v in np.unique(labels) if v != 0 and int(v) not in ignore]
    for begin in range(0, len(ids), MASK_CHUNK):
        block = np.asarray(ids[begin : begin + MASK_CHUNK], dtype=labels.dtype)
        masks = labels[None] == block[:, None, None]  # K x H x W
        if components:
            masks, owners = split_components(masks, components)
            yield masks, [int(block[i]) for i in owners]
        else:
            yield masks, [int(v) for v in block]


def split_components(masks: np.ndarray, connectivity: int = 8) -> tuple[np.ndarray, list[int]]:
    """Split each of M x H x W masks into its 4- or 8-connected components.

    Returns:
        K x H x W bool components, and for each the index of the mask it came from.
    """
    from scipy import ndimage

    parts, owners = [], []
    structure = ndimage.generate_binary_structure(2, 1 if connectivity == 4 else 2)
    for i, mask in enumerate(masks):
        components, count = ndimage.label(mask, structure=structure)
        if count:
            parts.append(components[None] == np.arange(1, count + 1, dtype=components.dtype)[:, None, None])
            owners.extend([i] * count)
    if not parts:
        return np.zeros((0, *masks.shape[1:]), dtype=bool), []
    return np.concatenate(parts), owners


def label_annotations(
    chunks: Iterable[tuple[np.ndarray, list[int]]],
    *,
    min_area: int,
    field: str,
    summary: ConvertSummary,
    drop_reason: str,
) -> list[dict[str, Any]]:
    """SA-1B annotations of mask chunks (as `label_masks` yields), each recording its label id as `field`.

    Masks under `min_area` pixels are left out and counted in `summary` under `drop_reason`.
    """
    annotations: list[dict[str, Any]] = []
    for masks, ids in chunks:  # K x H x W bool, K label ids
        keep = np.flatnonzero(masks.sum(axis=(1, 2)) >= min_area)
        summary.drop_masks(drop_reason, masks.shape[0] - keep.size)
        if keep.size:
            chunk = annotations_from_masks(masks[keep], start_id=len(annotations))
            for ann, index in zip(chunk, keep):
                ann[field] = int(ids[index])
            annotations.extend(chunk)
    return annotations
