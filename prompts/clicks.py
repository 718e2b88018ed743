"""Corrective clicks: the next click of a simulated user, placed in the error region of the previous prediction.

Vectorised over N masks and free of host synchronisation, so training can call it in every round.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from samlight.prompts.base import ShowsConfig

MODES = ("uniform", "center")


class CorrectiveClicks(ShowsConfig):
    """Corrective-click simulation as in the SAM paper (App. A) and its evaluation protocol (D.1).

    Args:
        num_clicks: corrective clicks per episode after the initial prompt (paper: 8).
        mask_only_rounds: extra rounds that add no click and only feed back the previous mask (paper: 2,
            one at a random position among the click rounds and one at the end).
        mode: "uniform" samples a click uniformly over the error region (training); "center" takes the error
            pixel farthest from the error region's boundary (evaluation).
    """

    def __init__(self, *, num_clicks: int = 8, mask_only_rounds: int = 2, mode: str = "uniform") -> None:
        if mode not in MODES:
            raise ValueError(f"CorrectiveClicks: mode must be one of {MODES}, got {mode!r}")
        if num_clicks < 0 or mask_only_rounds < 0:
            raise ValueError("CorrectiveClicks: num_clicks and mask_only_rounds must be >= 0")
        self.num_clicks = num_clicks
        self.mask_only_rounds = mask_only_rounds
        self.mode = mode

    def schedule(self, generator: torch.Generator | None = None) -> list[bool]:
        """One flag per round after the first: True = the round adds a click, False = mask-only round.

        The random position of the mask-only rounds is drawn on the CPU (`generator`, a CPU generator, or
        torch's default one), so drawing it never waits for the device.
        """
        rounds = [True] * self.num_clicks
        if self.mask_only_rounds == 0:
            return rounds
        for _ in range(self.mask_only_rounds - 1):
            position = int(torch.randint(len(rounds) + 1, (1,), generator=generator))
            rounds.insert(position, False)
        return rounds + [False]

    def click_noise(
        self, n: int, generator: torch.Generator | None = None, device: torch.device | str | None = None
    ) -> Tensor | None:
        """The N x 1 random numbers one round of `next_clicks` draws (mode "uniform"); None in mode "center".

        `next_clicks(..., uniform=click_noise(n, g))` places the same clicks as `next_clicks(..., g)`.
        """
        if self.mode != "uniform":
            return None
        return torch.rand(n, 1, generator=generator, device=device)

    def next_clicks(
        self,
        gt_masks: Tensor,
        pred_masks: Tensor,
        generator: torch.Generator | None = None,
        valid: Tensor | None = None,
        *,
        uniform: Tensor | None = None,
    ) -> tuple[Tensor, Tensor]:
        """The next click for each of N masks.

        A click lies in the error region; its label is 1 on a false negative (missed foreground) and 0 on a
        false positive. A perfect prediction has no error region: the click then goes on the object (label 1),
        or on the background (label 0) when the ground truth is empty, so the result is always a valid click.
        With `valid`, every click lies inside it (a user clicks on the image, never on its padding).

        Args:
            gt_masks: N x H x W bool.
            pred_masks: N x H x W bool.
            generator: random source on the masks' device (mode "uniform").
            uniform: N x 1 numbers in [0, 1) to draw with instead of `generator` (mode "uniform"), e.g. drawn
                outside a `torch.compile`d region, which cannot take a `torch.Generator`.
            valid: N x H x W bool, the pixels of the image inside the padded frame; None = the whole frame.

        Returns:
            coords: N x 1 x 2 float, (x, y) pixel indices in the H x W frame.
            labels: N x 1 long.
        """
        gt_masks, pred_masks = gt_masks.bool(), pred_masks.bool()
        frame = torch.ones_like(gt_masks) if valid is None else valid.bool().expand_as(gt_masks)
        gt_masks, pred_masks = gt_masks & frame, pred_masks & frame
        false_neg = gt_masks & ~pred_masks
        false_pos = pred_masks & ~gt_masks
        if self.mode == "uniform":
            region = _with_fallback(false_neg | false_pos, gt_masks, frame)
            flat = random_pixel(region, generator, uniform=uniform)
        else:
            # The paper's protocol: the pixel farthest from the boundary of its own error region (false
            # negatives and false positives separately, so they never share a boundary), best of both. A mask
            # without error has an empty false-negative region, so its fallback region takes that slot.
            error = false_neg | false_pos
            has_error = error.flatten(1).any(1)[:, None, None]
            first = torch.where(has_error, false_neg, _with_fallback(error, gt_masks, frame))
            dist = distance_to_boundary(torch.cat([first, false_pos])).flatten(1)  # 2N x HW
            flat = dist.view(2, -1, dist.shape[-1]).amax(0).argmax(1)
        labels = gt_masks.flatten(1).gather(1, flat[:, None]).long()  # N x 1
        return pixel_coords(flat, gt_masks.shape[-1])[:, None, :], labels


def _with_fallback(error: Tensor, gt_masks: Tensor, frame: Tensor) -> Tensor:
    """The error region, or for masks without error the object (or the image `frame` if the object is empty)."""
    has_error = error.flatten(1).any(1)[:, None, None]
    has_object = gt_masks.flatten(1).any(1)[:, None, None]
    return torch.where(has_error, error, torch.where(has_object, gt_masks, frame))


def random_pixel(
    region: Tensor, generator: torch.Generator | None = None, *, uniform: Tensor | None = None
) -> Tensor:
    """N long flat indices, one pixel drawn uniformly from each N x H x W region (index 0 if empty)."""
    return random_pixels(region, 1, generator, uniform=uniform)[:, 0]


def random_pixels(
    region: Tensor, num: int, generator: torch.Generator | None = None, *, uniform: Tensor | None = None
) -> Tensor:
    """N x num long flat indices, each drawn uniformly (independently) from its N x H x W region; 0 if empty.

    Draws N x num random numbers, not N x H x W: a uniform rank among the region's pixels picks the row by the
    cumulative row counts, then the column inside that row, each with a binary search. Sync-free. `uniform`
    (N x num in [0, 1)) replaces the draw, so that the rest can run where a generator cannot go (a compiled
    graph); the same numbers give the same pixels.
    """
    n, h, w = region.shape
    cum_rows = region.sum(2).cumsum(1)  # N x H: region pixels in rows <= y
    total = cum_rows[:, -1:]  # N x 1
    u = torch.rand(n, num, generator=generator, device=region.device) if uniform is None else uniform
    rank = torch.minimum((u * total).long(), (total - 1).clamp(min=0))  # N x num in [0, total)
    row = torch.searchsorted(cum_rows, rank, right=True).clamp(max=h - 1)  # N x num
    before = torch.where(row > 0, cum_rows.gather(1, (row - 1).clamp(min=0)), 0)  # N x num
    row_pixels = region.gather(1, row[..., None].expand(-1, -1, w))  # N x num x W
    cum_cols = row_pixels.cumsum(2)  # N x num x W
    col = torch.searchsorted(cum_cols, (rank - before)[..., None], right=True)[..., 0].clamp(max=w - 1)
    return torch.where(total > 0, row * w + col, 0)


def pixel_coords(flat: Tensor, width: int) -> Tensor:
    """N x 2 float (x, y) from N long flat pixel indices in a frame `width` pixels wide."""
    return torch.stack([flat % width, torch.div(flat, width, rounding_mode="floor")], dim=-1).float()


def distance_to_boundary(region: Tensor) -> Tensor:
    """Euclidean distance from every pixel of `region` to the nearest pixel outside it (0 outside).

    The frame border counts as outside, as in the paper's evaluation (a 1-pixel zero pad before the distance
    transform). On CPU tensors this is scipy's exact transform (C code, no device to stay on); on an
    accelerator it is `jump_flood_distance`, which stays on the device.

    Args:
        region: N x H x W bool.

    Returns:
        N x H x W float.
    """
    if region.device.type != "cpu":
        return jump_flood_distance(region)
    return torch.from_numpy(
        np.stack([_edt_cropped(m) for m in region.numpy()])
        if len(region)
        else np.zeros(region.shape, np.float32)
    )


def _edt_cropped(mask: np.ndarray) -> np.ndarray:
    """scipy's exact transform on the region's bounding box plus a 1-pixel ring of outside pixels.

    Every pixel outside the box is outside the region, so the nearest outside pixel of any region pixel lies
    within the ring: cropping changes nothing but the cost (error regions are usually small).
    """
    from scipy import ndimage

    out = np.zeros(mask.shape, np.float32)
    rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
    if rows.size == 0:
        return out
    y0, y1, x0, x1 = rows[0], rows[-1] + 1, cols[0], cols[-1] + 1
    crop = np.pad(mask[y0:y1, x0:x1], 1)
    out[y0:y1, x0:x1] = ndimage.distance_transform_edt(crop)[1:-1, 1:-1]
    return out


def jump_flood_distance(region: Tensor) -> Tensor:
    """`distance_to_boundary` by jump flooding, vectorised over N on any device.

    log2(H + W) passes, each comparing 9 shifted copies of the nearest-outside-pixel map, so the cost does not
    grow with the largest distance as iterative erosion does. Jump flooding can be off by a fraction of a pixel
    in rare configurations; a final extra pass at step 1 removes most of that.
    """
    n, h, w = region.shape
    padded = F.pad(region, (1, 1, 1, 1), value=False)  # N x (H+2) x (W+2)
    hp, wp = h + 2, w + 2
    ys = torch.arange(hp, device=region.device, dtype=torch.float32)[:, None].expand(hp, wp)
    xs = torch.arange(wp, device=region.device, dtype=torch.float32)[None, :].expand(hp, wp)
    far = float(4 * (hp + wp))
    # nearest[n, :, y, x] = (y, x) of the nearest known outside pixel; outside pixels are their own seed.
    seed = ~padded
    nearest = torch.stack(
        [torch.where(seed, ys, far), torch.where(seed, xs, far)], dim=1
    )  # N x 2 x (H+2) x (W+2)
    best = _sq_dist(nearest, ys, xs)
    steps = [2**k for k in reversed(range(math.ceil(math.log2(max(hp, wp)))))] + [1]
    for step in steps:
        for dy in (-step, 0, step):
            for dx in (-step, 0, step):
                if dy == 0 and dx == 0:
                    continue
                cand = _shift(nearest, dy, dx, far)
                d = _sq_dist(cand, ys, xs)
                better = d < best
                nearest = torch.where(better[:, None], cand, nearest)
                best = torch.where(better, d, best)
    return best.sqrt()[:, 1:-1, 1:-1]


def _sq_dist(nearest: Tensor, ys: Tensor, xs: Tensor) -> Tensor:
    """N x H x W squared distance from each pixel to the seed stored in N x 2 x H x W `nearest`."""
    return (nearest[:, 0] - ys) ** 2 + (nearest[:, 1] - xs) ** 2


def _shift(t: Tensor, dy: int, dx: int, fill: float) -> Tensor:
    """out[..., y, x] = t[..., y + dy, x + dx], `fill` where that falls outside the frame."""
    h, w = t.shape[-2:]
    out = torch.full_like(t, fill)
    ys_out, ys_in = _range(h, dy)
    xs_out, xs_in = _range(w, dx)
    out[..., ys_out, xs_out] = t[..., ys_in, xs_in]
    return out


def _range(size: int, offset: int) -> tuple[slice, slice]:
    if offset >= 0:
        return slice(0, max(size - offset, 0)), slice(offset, size)
    return slice(-offset, size), slice(0, max(size + offset, 0))
