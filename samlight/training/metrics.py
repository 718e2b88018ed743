"""Validation metrics: IoU and Dice of binary masks, and a per-mask mean accumulated over batches and ranks."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor


def mask_iou(pred: Tensor, gt: Tensor) -> Tensor:
    """IoU of binary masks: ... x H x W bool -> ...; 1 when both are empty."""
    pred, gt = pred.flatten(-2).bool(), gt.flatten(-2).bool()
    inter = (pred & gt).sum(-1).float()
    union = (pred | gt).sum(-1).float()
    return torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(union))


def mask_dice(pred: Tensor, gt: Tensor) -> Tensor:
    """Dice of binary masks: ... x H x W bool -> ...; 1 when both are empty."""
    pred, gt = pred.flatten(-2).bool(), gt.flatten(-2).bool()
    inter = (pred & gt).sum(-1).float()
    total = (pred.sum(-1) + gt.sum(-1)).float()
    return torch.where(total > 0, 2 * inter / total.clamp(min=1), torch.ones_like(total))


class MeanAccumulator:
    """Per-name weighted means over an epoch: `update(name, values, weights)`, then `compute()`.

    Means are over masks, not batches, so an image with many masks counts as many samples. `compute` sums
    across ranks when torch.distributed is initialised; names may differ between ranks (e.g. per-label
    metrics), the union is reduced.
    """

    def __init__(self) -> None:
        self._sums: dict[str, Tensor] = {}

    def reset(self) -> None:
        self._sums.clear()

    def update(self, name: str, values: Tensor, weights: Tensor | None = None) -> None:
        """values: N float; weights: N float (1 each if None)."""
        values = values.detach().float().flatten()
        weights = torch.ones_like(values) if weights is None else weights.detach().float().flatten()
        entry = torch.stack([(values * weights).sum(), weights.sum()])
        self._sums[name] = self._sums[name] + entry if name in self._sums else entry

    def compute(self, device: torch.device | str | None = None) -> dict[str, Tensor]:
        """name -> weighted mean (names with zero total weight are left out); reduced on `device`."""
        names = sorted(self._sums)
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            gathered: list[list[str]] = [[] for _ in range(dist.get_world_size())]
            dist.all_gather_object(gathered, names)
            names = sorted(set().union(*gathered))
        if not names:
            return {}
        if device is None:
            device = next(iter(self._sums.values())).device if self._sums else torch.device("cpu")
        table = torch.stack([self._sums.get(n, torch.zeros(2, device=device)).to(device) for n in names])
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(table)
        return {n: table[i, 0] / table[i, 1] for i, n in enumerate(names) if table[i, 1] > 0}
