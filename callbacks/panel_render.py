"""Turn an `Episode` into mask panels: images, label maps and drawn prompts, as arrays and PNGs.

Pure functions (no trainer, no logger) so they are tested on traces built by hand. `MaskPanels` calls them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageDraw
from torch import Tensor

from samlight.modeling.transforms import PIXEL_MEAN, PIXEL_STD

# SAM's pixel normalisation (on 0-255), as in SamPredictor and the datamodules.

FOREGROUND_CLICK = (0, 230, 0)
BACKGROUND_CLICK = (235, 0, 0)
BOX_COLOR = (255, 215, 0)

# Distinct, saturated colours for mask k (label k + 1); index 0 of a label map is background.
_PALETTE = np.array(
    [
        (31, 119, 180),
        (255, 127, 14),
        (44, 160, 44),
        (214, 39, 40),
        (148, 103, 189),
        (140, 86, 75),
        (227, 119, 194),
        (23, 190, 207),
        (188, 189, 34),
        (127, 127, 127),
    ],
    dtype=np.float32,
)


@dataclass
class Panel:
    """Everything shown for one image under one prompt type; arrays are cropped to the image (no padding).

    Attributes:
        image_index: index of the image in the panel batch.
        prompt_name: prompt type of the first round ("point", "box", ...).
        image: H x W x 3 uint8 RGB, no drawing.
        gt: H x W uint8 label map (0 background, k = mask k of this image).
        first: H x W uint8 label map of the prediction after the first prompt.
        last: H x W uint8 label map of the prediction after the last corrective round.
        first_drawn: H x W x 3 uint8, the image with the first prompts drawn (points, boxes).
        last_drawn: H x W x 3 uint8, the image with the first prompts and every corrective click drawn.
        miou_first: mean IoU over this image's masks after the first prompt.
        miou_last: mean IoU after the last round.
        num_clicks: number of corrective rounds in the trace.
    """

    image_index: int
    prompt_name: str
    image: np.ndarray
    gt: np.ndarray
    first: np.ndarray
    last: np.ndarray
    first_drawn: np.ndarray
    last_drawn: np.ndarray
    miou_first: float
    miou_last: float
    num_clicks: int

    def caption(self, which: str) -> str:
        if which == "first":
            return f"image {self.image_index}: {self.prompt_name}, mIoU {self.miou_first:.3f}"
        return f"image {self.image_index}: {self.prompt_name} + {self.num_clicks} clicks, mIoU {self.miou_last:.3f}"


def denormalize(images: Tensor, input_sizes: Tensor) -> list[np.ndarray]:
    """Undo SAM's normalisation and padding.

    Args:
        images: B x 3 x S x S float, normalised with SAM's pixel mean/std and zero-padded bottom-right.
        input_sizes: B x 2 long, (H, W) of each image before padding.

    Returns:
        B arrays of H_b x W_b x 3 uint8 RGB.
    """
    mean = torch.tensor(PIXEL_MEAN, dtype=torch.float32).view(1, 3, 1, 1)
    std = torch.tensor(PIXEL_STD, dtype=torch.float32).view(1, 3, 1, 1)
    pixels = (
        (images.detach().float().cpu() * std + mean).clamp(0, 255).round().to(torch.uint8)
    )  # B x 3 x S x S
    pixels = pixels.permute(0, 2, 3, 1).numpy()  # B x S x S x 3
    sizes = input_sizes.cpu().tolist()
    return [np.ascontiguousarray(pixels[b, :h, :w]) for b, (h, w) in enumerate(sizes)]


def label_map(masks: np.ndarray) -> np.ndarray:
    """Paint N binary masks into one label map, largest first so small (nested) masks stay visible.

    Args:
        masks: N x H x W bool.

    Returns:
        H x W uint8, 0 background, k (1..N) where mask k-1 is painted last.
    """
    out = np.zeros(masks.shape[1:], dtype=np.uint8)
    areas = masks.reshape(masks.shape[0], -1).sum(axis=1)
    for k in np.argsort(-areas, kind="stable"):
        out[masks[k]] = k + 1
    return out


def overlay(image: np.ndarray, labels: np.ndarray, alpha: float = 0.45) -> np.ndarray:
    """Blend a label map's colours onto an image and outline each mask in its full colour (fills alone vanish on
    busy or similarly coloured images). image: H x W x 3 uint8; labels: H x W uint8 -> H x W x 3 uint8."""
    colours = _PALETTE[(labels.astype(np.int64) - 1) % len(_PALETTE)]  # H x W x 3
    inside = labels[..., None] > 0
    blended = np.where(inside, (1 - alpha) * image + alpha * colours, image)
    edge = np.zeros(labels.shape, dtype=bool)  # pixels with a 4-neighbour of another label
    edge[:, :-1] |= labels[:, :-1] != labels[:, 1:]
    edge[:-1, :] |= labels[:-1, :] != labels[1:, :]
    edge[:, 1:] |= labels[:, 1:] != labels[:, :-1]
    edge[1:, :] |= labels[1:, :] != labels[:-1, :]
    blended = np.where((edge & (labels > 0))[..., None], colours, blended)
    return blended.round().astype(np.uint8)


def draw_prompts(
    image: np.ndarray,
    points: np.ndarray | None = None,
    labels: np.ndarray | None = None,
    boxes: np.ndarray | None = None,
) -> np.ndarray:
    """Draw clicks (green foreground, red background, padding skipped) and boxes onto a copy of `image`.

    Args:
        image: H x W x 3 uint8.
        points: K x 2 float (x, y) in this image's pixels.
        labels: K int (1 foreground, 0 background, anything else skipped).
        boxes: J x 4 float xyxy in this image's pixels.

    Returns:
        H x W x 3 uint8.
    """
    canvas = Image.fromarray(image)
    draw = ImageDraw.Draw(canvas)
    radius = max(2, round(max(image.shape[:2]) / 90))
    if boxes is not None:
        for x0, y0, x1, y1 in boxes.tolist():
            draw.rectangle((x0, y0, x1, y1), outline=BOX_COLOR, width=max(1, radius // 2))
    if points is not None and labels is not None:
        for (x, y), label in zip(points.tolist(), labels.tolist()):
            if label not in (0, 1):
                continue
            colour = FOREGROUND_CLICK if label == 1 else BACKGROUND_CLICK
            draw.ellipse(
                (x - radius, y - radius, x + radius, y + radius), fill=colour, outline=(255, 255, 255)
            )
    return np.asarray(canvas)


def _resize(array: np.ndarray, size: tuple[int, int], nearest: bool) -> np.ndarray:
    """Resize an H x W (x 3) uint8 array to size = (H', W')."""
    if array.shape[:2] == size:
        return array
    resample = Image.Resampling.NEAREST if nearest else Image.Resampling.BILINEAR
    return np.asarray(Image.fromarray(array).resize((size[1], size[0]), resample))


def panels_from_trace(trace, images: Sequence[np.ndarray], *, max_side: int = 512) -> list[Panel]:
    """Build one `Panel` per image that has at least one prompted mask in `trace`.

    Args:
        trace: an `Episode` (image_index N, gt_masks N x S x S, prompts, click_coords N x R x 2,
            click_labels N x R, pred_masks R+1 tensors of N x S x S, ious (R+1) x N, prompt_name).
        images: the panel batch's images as from `denormalize` (H_b x W_b x 3 uint8 each).
        max_side: longest side of the panel images; larger images are scaled down (masks with nearest).
    """
    image_index = trace.image_index.cpu()
    gt = trace.gt_masks.cpu().numpy()
    first = trace.pred_masks[0].cpu().numpy()
    last = trace.pred_masks[-1].cpu().numpy()
    ious = trace.ious.float().cpu()
    prompts = trace.prompts
    point_coords = None if prompts.point_coords is None else prompts.point_coords.float().cpu().numpy()
    point_labels = None if prompts.point_labels is None else prompts.point_labels.cpu().numpy()
    boxes = None if prompts.boxes is None else prompts.boxes.float().cpu().numpy()
    click_coords = trace.click_coords.float().cpu().numpy()
    click_labels = trace.click_labels.cpu().numpy()

    panels = []
    for b, image in enumerate(images):
        rows = (image_index == b).nonzero().flatten().numpy()
        if rows.size == 0:
            continue
        h, w = image.shape[:2]
        scale = min(1.0, max_side / max(h, w))
        size = (max(1, round(h * scale)), max(1, round(w * scale)))
        small = _resize(image, size, nearest=False)

        first_points = None if point_coords is None else point_coords[rows].reshape(-1, 2) * scale
        first_labels = None if point_labels is None else point_labels[rows].reshape(-1)
        first_boxes = None if boxes is None else boxes[rows] * scale
        clicks = click_coords[rows].reshape(-1, 2) * scale
        all_points = clicks if first_points is None else np.concatenate([first_points, clicks])
        all_labels = click_labels[rows].reshape(-1)
        if first_labels is not None:
            all_labels = np.concatenate([first_labels, all_labels])
        panels.append(
            Panel(
                image_index=b,
                prompt_name=trace.prompt_name,
                image=small,
                gt=_resize(label_map(gt[rows, :h, :w]), size, nearest=True),
                first=_resize(label_map(first[rows, :h, :w]), size, nearest=True),
                last=_resize(label_map(last[rows, :h, :w]), size, nearest=True),
                first_drawn=draw_prompts(small, first_points, first_labels, first_boxes),
                last_drawn=draw_prompts(small, all_points, all_labels, first_boxes),
                miou_first=float(ious[0, rows].mean()),
                miou_last=float(ious[-1, rows].mean()),
                num_clicks=int(trace.click_coords.shape[1]),
            )
        )
    return panels


def panel_png(panel: Panel) -> Image.Image:
    """Side-by-side PNG: ground truth | prediction after the first prompt | prediction after the last round.

    Each tile has a caption strip on top; prompts are drawn on the prediction tiles.
    """
    tiles = [
        (overlay(panel.image, panel.gt), f"ground truth, image {panel.image_index}"),
        (overlay(panel.first_drawn, panel.first), panel.caption("first").split(": ", 1)[1]),
        (overlay(panel.last_drawn, panel.last), panel.caption("last").split(": ", 1)[1]),
    ]
    h, w = panel.image.shape[:2]
    strip, gap = 14, 4
    sheet = Image.new("RGB", (3 * w + 2 * gap, h + strip), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    for i, (tile, text) in enumerate(tiles):
        x = i * (w + gap)
        sheet.paste(Image.fromarray(tile), (x, strip))
        draw.text((x + 2, 1), text, fill=(0, 0, 0))
    return sheet
