"""A tiny SAM trained for a few seconds on synthetic scenes, so "segment everything" has real masks to find.

Random weights give one blob per image (every point gets the same mask), which cannot tell a correct automatic
mask generator from a wrong one; a few dozen steps of point-prompted training give distinct objects.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from samlight import build_sam
from samlight.modeling.sam import Sam
from samlight.modeling.transforms import normalize_and_pad
from samlight.prompts.types import Prompts


def scene(rng: np.random.Generator, size: int = 256, num: int = 6) -> tuple[np.ndarray, np.ndarray]:
    """A textured background with `num` coloured rectangles and ellipses: (H x W x 3 uint8, num x H x W bool)."""
    image = rng.integers(20, 70, (size, size, 3)).astype(np.uint8)
    yy, xx = np.mgrid[:size, :size]
    masks = []
    for k in range(num):
        h, w = rng.integers(size // 8, size // 3, 2)
        y0, x0 = rng.integers(0, size - h), rng.integers(0, size - w)
        if k % 2:
            cy, cx = y0 + h / 2, x0 + w / 2
            m = ((yy - cy) / (h / 2)) ** 2 + ((xx - cx) / (w / 2)) ** 2 <= 1
        else:
            m = (yy >= y0) & (yy < y0 + h) & (xx >= x0) & (xx < x0 + w)
        image[m] = rng.integers(90, 256, 3)
        for prev in masks:  # later shapes occlude earlier ones
            prev &= ~m
        masks.append(m)
    return image, np.stack(masks)


def train_tiny(steps: int = 150, seed: int = 0, num_scenes: int = 16, batch: int = 4) -> Sam:
    """`tiny` SAM whose prompt encoder and mask decoder are trained `steps` steps on synthetic scenes.

    The image encoder keeps its random init and its embeddings of `num_scenes` scenes are computed once, so a
    step is one decoder forward + backward (one foreground click per mask, best of 3 outputs, BCE + dice, and
    the IoU head regressed to the actual IoU): seconds on a CPU, where training the encoder too takes minutes.
    """
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    model = build_sam("tiny")
    s = model.image_size
    scenes = [scene(rng, s) for _ in range(num_scenes)]
    images = torch.stack([torch.from_numpy(im).permute(2, 0, 1).float() for im, _ in scenes])
    with torch.no_grad():
        model.eval()
        embeddings = model.encode_images(normalize_and_pad(images, model.pixel_mean, model.pixel_std, s))
    model.train()
    model.image_encoder.requires_grad_(False)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=5e-3, weight_decay=0.01)
    for _ in range(steps):
        pick = rng.choice(num_scenes, batch, replace=False)
        masks = torch.from_numpy(np.concatenate([scenes[i][1] for i in pick]))  # N x S x S
        index = torch.arange(batch).repeat_interleave(torch.tensor([len(scenes[i][1]) for i in pick]))
        keep = masks.flatten(1).any(1)
        masks, index = masks[keep], index[keep]
        # One click uniformly inside each mask.
        flat = torch.multinomial(masks.flatten(1).float(), 1)[:, 0]
        coords = torch.stack([flat % s, flat // s], dim=1).float()[:, None] + 0.5  # N x 1 x 2
        prompts = Prompts(point_coords=coords, point_labels=torch.ones(len(masks), 1, dtype=torch.int))
        low, iou = model.decode(embeddings[pick], index, prompts, multimask_output=True)  # N x 3 x 64 x 64
        target = F.interpolate(masks[:, None].float(), low.shape[-2:], mode="area").expand_as(low)
        bce = F.binary_cross_entropy_with_logits(low, target, reduction="none").mean((-1, -2))
        p = low.sigmoid()
        dice = 1 - (2 * (p * target).sum((-1, -2)) + 1) / (p.sum((-1, -2)) + target.sum((-1, -2)) + 1)
        per_output = bce + dice  # N x 3
        with torch.no_grad():
            pred, hard = low > 0, target > 0.5
            actual = (pred & hard).sum((-1, -2)) / (pred | hard).sum((-1, -2)).clamp(min=1)
        best = per_output.argmin(1, keepdim=True)
        loss = per_output.gather(1, best).mean() + F.mse_loss(iou, actual)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()
