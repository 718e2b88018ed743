"""The one input frame shared by the datamodules and the predictor: resize longest side, normalise, pad.

Every function here reproduces the official `ResizeLongestSide` and `Sam.preprocess` exactly (same rounding,
same PIL bilinear resize), so training data, inference and the official predictor agree pixel for pixel.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

# ImageNet statistics on the 0-255 scale, the official SAM defaults.
PIXEL_MEAN = (123.675, 116.28, 103.53)
PIXEL_STD = (58.395, 57.12, 57.375)


def get_preprocess_shape(h: int, w: int, long_side: int) -> tuple[int, int]:
    """Size (new_h, new_w) after scaling (h, w) so the longest side equals `long_side`.

    Rounds half up (`int(x + 0.5)`), as the official ResizeLongestSide does.
    """
    scale = long_side * 1.0 / max(h, w)
    return int(h * scale + 0.5), int(w * scale + 0.5)


def resize_longest_image(image: np.ndarray, long_side: int) -> np.ndarray:
    """Resize an H x W x 3 uint8 image so its longest side is `long_side` (PIL bilinear, as official).

    Returns:
        new_h x new_w x 3 uint8.
    """
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(
            f"resize_longest_image expects an H x W x 3 uint8 array, got shape {tuple(image.shape)} "
            f"dtype {image.dtype}; convert with np.asarray(pil_image.convert('RGB'))"
        )
    new_h, new_w = get_preprocess_shape(image.shape[0], image.shape[1], long_side)
    if (new_h, new_w) == image.shape[:2]:
        return np.array(image)
    # torchvision's resize(to_pil_image(x), size) is PIL's bilinear resize (with PIL's antialiasing);
    # calling PIL directly gives the same bytes without the torchvision detour.
    resized = Image.fromarray(np.ascontiguousarray(image)).resize((new_w, new_h), Image.BILINEAR)
    return np.array(resized)  # a writable copy, so torch.as_tensor can share it without a warning


def apply_coords(
    coords: np.ndarray | Tensor, original_size: tuple[int, int], long_side: int
) -> np.ndarray | Tensor:
    """Map (x, y) coordinates (... x 2) from the original H x W image into the resized frame.

    Returns a float copy of the same kind (numpy float64 or torch float32) as the input.
    """
    old_h, old_w = original_size
    new_h, new_w = get_preprocess_shape(old_h, old_w, long_side)
    if isinstance(coords, Tensor):
        scale = torch.tensor([new_w / old_w, new_h / old_h], dtype=torch.float, device=coords.device)
        return coords.to(torch.float) * scale
    coords = np.array(coords, dtype=float, copy=True)
    coords[..., 0] = coords[..., 0] * (new_w / old_w)
    coords[..., 1] = coords[..., 1] * (new_h / old_h)
    return coords


def apply_boxes(
    boxes: np.ndarray | Tensor, original_size: tuple[int, int], long_side: int
) -> np.ndarray | Tensor:
    """Map xyxy boxes (B x 4) from the original H x W image into the resized frame; returns B x 4."""
    return apply_coords(boxes.reshape(-1, 2, 2), original_size, long_side).reshape(-1, 4)


def normalize_and_pad(images: Tensor, pixel_mean: Tensor, pixel_std: Tensor, size: int) -> Tensor:
    """Normalise 0-255 images with mean/std and zero-pad bottom-right to size x size.

    Args:
        images: B x 3 x h x w float (or 3 x h x w) on the 0-255 scale, h, w <= size.
        pixel_mean, pixel_std: 3 x 1 x 1.

    Returns:
        B x 3 x size x size (or 3 x size x size).
    """
    h, w = images.shape[-2:]
    if h > size or w > size:
        raise ValueError(f"normalize_and_pad: image {h}x{w} is larger than the model input {size}x{size}")
    images = (images - pixel_mean) / pixel_std
    return F.pad(images, (0, size - w, 0, size - h))
