"""`SamAutomaticMaskGenerator`: "segment everything" with the official generator's API and results, faster.

The official algorithm (paper, sec. 5 and App. B): prompt SAM with a regular grid of points over the image and
over zoomed-in crops, keep masks that are confident (predicted IoU) and stable (stability score), drop masks cut
by a crop border, remove duplicates with box NMS within and across crops, optionally clean small holes and
islands. The results here are the official ones on the same weights (tests/test_amg.py); the work is organised
differently:

- the image encoder runs on several crops (and images, `generate_batch`) per call;
- masks below the predicted-IoU threshold are dropped before they are upsampled, and only survivors are ever
  brought to full resolution, in chunks bounded by `pixel_budget`, so memory does not grow with the image
  beyond a fixed multiple of its pixels;
- candidates are kept as low-resolution logits (S/4, independent of the image size) and only the masks left
  after NMS are upsampled again for output, bitwise as the first time;
- stability, boxes, RLE and small-region cleanup are one vectorised call per chunk, not a loop per mask with a
  host sync each; everything stays on the model's device until the output is built.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import batched_nms

from samlight.datamodules.tools.shards import encode_rle
from samlight.inference.amg_ops import (
    crop_boxes,
    layer_point_grids,
    logits_to_boxes,
    masks_to_boxes,
    near_crop_edge,
    remove_small_regions,
    stability_scores,
    uncompressed_rles,
)
from samlight.modeling.sam import Sam
from samlight.modeling.transforms import get_preprocess_shape, resize_longest_image
from samlight.prompts.types import Prompts

OUTPUT_MODES = ("binary_mask", "uncompressed_rle", "coco_rle")


@dataclass
class _Candidates:
    """Masks kept so far for one image (K of them), all tensors on the model's device.

    Attributes:
        low_res: K x S/4 x S/4 logits, the decoder output the full-resolution mask is upsampled from.
        iou: K predicted IoU; stability: K stability score.
        boxes: K x 4 xyxy (inclusive) in the image frame.
        points: K x 2 float64 (x, y) of the prompt, image frame.
        crop: K long, index into the image's crop boxes.
    """

    low_res: Tensor
    iou: Tensor
    stability: Tensor
    boxes: Tensor
    points: Tensor
    crop: Tensor

    def select(self, keep: Tensor) -> _Candidates:
        return _Candidates(*(t[keep] for t in self._fields()))

    def _fields(self) -> tuple[Tensor, ...]:
        return (self.low_res, self.iou, self.stability, self.boxes, self.points, self.crop)

    @staticmethod
    def cat(parts: list[_Candidates]) -> _Candidates:
        return _Candidates(*(torch.cat(ts) for ts in zip(*(p._fields() for p in parts))))


class SamAutomaticMaskGenerator:
    """Generate masks for everything in an image, as the official `SamAutomaticMaskGenerator` does.

    Args (the official ones, same meaning and defaults):
        model: a samlight `Sam` (or a module with `.model`, such as `SamModule`).
        points_per_side: points per side of the prompt grid (points_per_side^2 points); None -> `point_grids`.
        points_per_batch: points decoded per decoder call (memory knob).
        pred_iou_thresh: keep masks whose predicted IoU is above this.
        stability_score_thresh: keep masks whose stability score is at least this.
        stability_score_offset: logit offset for the stability score.
        box_nms_thresh: box IoU above which duplicates within a crop are suppressed.
        crop_n_layers: extra crop layers; layer i has (2^i)^2 crops.
        crop_nms_thresh: box IoU for duplicates across crops (smaller crops win).
        crop_overlap_ratio: overlap of first-layer crops as a fraction of the short side.
        crop_n_points_downscale_factor: layer i uses points_per_side / factor^i points per side.
        point_grids: explicit normalised grids (one n x 2 array per layer), exclusive with points_per_side.
        min_mask_region_area: if > 0, fill holes and drop islands smaller than this (pixels), then NMS again.
        output_mode: "binary_mask" (H x W bool), "uncompressed_rle" or "coco_rle" (string counts).
    Extra (samlight):
        crops_per_batch: crops (of one or several images) embedded per image-encoder call.
        pixel_budget: most mask pixels held at full resolution at once (float logits); bounds peak memory.
        tile_size: scenes whose longer side exceeds this are cut into overlapping square tiles, each treated
            like a crop of the scene (masks cut by a tile border are dropped there and found whole in the
            neighbouring tile); None never tiles (the official behaviour).
    """

    def __init__(
        self,
        model: nn.Module,
        points_per_side: int | None = 32,
        points_per_batch: int = 64,
        pred_iou_thresh: float = 0.88,
        stability_score_thresh: float = 0.95,
        stability_score_offset: float = 1.0,
        box_nms_thresh: float = 0.7,
        crop_n_layers: int = 0,
        crop_nms_thresh: float = 0.7,
        crop_overlap_ratio: float = 512 / 1500,
        crop_n_points_downscale_factor: int = 1,
        point_grids: list[np.ndarray] | None = None,
        min_mask_region_area: int = 0,
        output_mode: str = "binary_mask",
        *,
        crops_per_batch: int = 4,
        pixel_budget: int = 1 << 25,
        tile_size: int | None = None,
    ) -> None:
        sam = getattr(model, "model", model)
        if not isinstance(sam, Sam):
            raise TypeError(
                f"SamAutomaticMaskGenerator needs a samlight Sam (or a module with .model), got {type(sam).__name__}"
            )
        if (points_per_side is None) == (point_grids is None):
            raise ValueError("give exactly one of points_per_side or point_grids")
        if output_mode not in OUTPUT_MODES:
            raise ValueError(f"output_mode must be one of {OUTPUT_MODES}, got {output_mode!r}")
        if points_per_batch < 1 or crops_per_batch < 1 or pixel_budget < 1:
            raise ValueError("points_per_batch, crops_per_batch and pixel_budget must be positive")
        if tile_size is not None and tile_size < 64:
            raise ValueError(f"tile_size must be at least 64 px (or None), got {tile_size}")
        self.model = sam
        if point_grids is None:
            point_grids = layer_point_grids(points_per_side, crop_n_layers, crop_n_points_downscale_factor)
        if len(point_grids) < crop_n_layers + 1:
            raise ValueError(
                f"point_grids has {len(point_grids)} grid(s); crop_n_layers={crop_n_layers} needs {crop_n_layers + 1}"
            )
        self.point_grids = [np.asarray(g, dtype=np.float64).reshape(-1, 2) for g in point_grids]
        self.points_per_batch = points_per_batch
        self.pred_iou_thresh = pred_iou_thresh
        self.stability_score_thresh = stability_score_thresh
        self.stability_score_offset = stability_score_offset
        self.box_nms_thresh = box_nms_thresh
        self.crop_n_layers = crop_n_layers
        self.crop_nms_thresh = crop_nms_thresh
        self.crop_overlap_ratio = crop_overlap_ratio
        self.crop_n_points_downscale_factor = crop_n_points_downscale_factor
        self.min_mask_region_area = min_mask_region_area
        self.output_mode = output_mode
        self.crops_per_batch = crops_per_batch
        self.pixel_budget = pixel_budget
        self.tile_size = tile_size

    @property
    def device(self) -> torch.device:
        return self.model.device

    # ------------------------------------------------------------------ public API

    @torch.no_grad()
    def generate(self, image: np.ndarray) -> list[dict[str, Any]]:
        """Masks for one H x W x 3 uint8 RGB image.

        Returns:
            one record per mask: segmentation (H x W bool, or an RLE dict per `output_mode`), area (int),
            bbox (XYWH), predicted_iou, point_coords ([[x, y]]), stability_score, crop_box (XYWH).
        """
        return self.generate_batch([image])[0]

    @torch.no_grad()
    def generate_batch(self, images: list[np.ndarray]) -> list[list[dict[str, Any]]]:
        """`generate` for several images, their crops sharing image-encoder calls; one record list per image."""
        for i, image in enumerate(images):
            _check_image(image, i)
        plans = [self._crop_plan(image.shape[:2]) for image in images]
        jobs = [(i, c) for i, boxes in enumerate(plans) for c in range(len(boxes[0]))]
        found: list[list[_Candidates]] = [[] for _ in images]
        for start in range(0, len(jobs), self.crops_per_batch):
            chunk = jobs[start : start + self.crops_per_batch]
            embeddings = self._embed([_crop(images[i], plans[i][0][c]) for i, c in chunk])
            for k, (i, c) in enumerate(chunk):
                boxes, layers = plans[i]
                found[i].append(
                    self._crop_candidates(embeddings[k : k + 1], boxes[c], layers[c], c, images[i].shape[:2])
                )
        return [self._records(images[i].shape[:2], plans[i][0], found[i]) for i in range(len(images))]

    # ------------------------------------------------------------------ stages

    def _crop_plan(self, image_hw: tuple[int, int]) -> tuple[list[list[int]], list[int]]:
        """The crop boxes (xyxy, image frame) and their layers; tiles of a large scene each get their crops."""
        h, w = image_hw
        if self.tile_size is None or max(h, w) <= self.tile_size:
            return crop_boxes(image_hw, self.crop_n_layers, self.crop_overlap_ratio)
        boxes, layers = [], []
        for ty0, tx0, ty1, tx1 in _tiles(h, w, self.tile_size, self.crop_overlap_ratio):
            tile_boxes, tile_layers = crop_boxes(
                (ty1 - ty0, tx1 - tx0), self.crop_n_layers, self.crop_overlap_ratio
            )
            boxes += [[x0 + tx0, y0 + ty0, x1 + tx0, y1 + ty0] for x0, y0, x1, y1 in tile_boxes]
            layers += tile_layers
        return boxes, layers

    def _embed(self, crops: list[np.ndarray]) -> Tensor:
        """Crops (h x w x 3 uint8) -> image embeddings B x C x S/16 x S/16, one encoder call."""
        s = self.model.image_size
        tensors = [
            torch.as_tensor(resize_longest_image(crop, s), device=self.device).permute(2, 0, 1).float()
            for crop in crops
        ]
        images = torch.stack([self.model.preprocess(t) for t in tensors])  # B x 3 x S x S
        return self.model.encode_images(images.to(next(self.model.parameters()).dtype))

    def _crop_candidates(
        self,
        embedding: Tensor,
        crop_box: list[int],
        layer: int,
        crop_index: int,
        image_hw: tuple[int, int],
    ) -> _Candidates:
        """Decode the crop's point grid; keep confident, stable masks not cut by the crop; NMS within the crop.

        Args:
            embedding: 1 x C x S/16 x S/16 of this crop.
        """
        x0, y0, x1, y1 = crop_box
        crop_hw = (y1 - y0, x1 - x0)
        input_hw = get_preprocess_shape(*crop_hw, self.model.image_size)
        points = self.point_grids[layer] * np.array([crop_hw[1], crop_hw[0]], dtype=np.float64)  # P x 2
        scale = np.array([input_hw[1] / crop_hw[1], input_hw[0] / crop_hw[0]])
        in_points = torch.as_tensor(points * scale, dtype=torch.float, device=self.device)  # P x 2
        points_t = torch.as_tensor(points, device=self.device)
        image_box = [0, 0, image_hw[1], image_hw[0]]
        offset = torch.tensor([x0, y0, x0, y0], device=self.device)
        parts = []
        for start in range(0, len(points), self.points_per_batch):
            coords = in_points[start : start + self.points_per_batch, None, :]  # n x 1 x 2
            n = coords.shape[0]
            prompts = Prompts(
                point_coords=coords, point_labels=torch.ones(n, 1, dtype=torch.int, device=self.device)
            )
            low_res, iou = self.model.decode(
                embedding,
                torch.zeros(n, dtype=torch.long, device=self.device),
                prompts,
                multimask_output=True,
            )  # n x 3 x S/4 x S/4, n x 3
            low_res, iou = low_res.flatten(0, 1).float(), iou.flatten().float()  # 3n x S/4 x S/4, 3n
            point_index = torch.arange(start, start + n, device=self.device).repeat_interleave(3)
            if self.pred_iou_thresh > 0.0:
                # Filtering before upsampling is what the official code does after it: same masks, less work.
                keep = iou > self.pred_iou_thresh
                low_res, iou, point_index = low_res[keep], iou[keep], point_index[keep]
            for sub in self._chunks(len(iou), crop_hw):
                logits = self._upsample(low_res[sub], input_hw, crop_hw)  # k x h x w
                stability = stability_scores(logits, self.model.mask_threshold, self.stability_score_offset)
                keep = (
                    stability >= self.stability_score_thresh
                    if self.stability_score_thresh > 0.0
                    else torch.ones_like(stability, dtype=torch.bool)
                )
                # Boxes of all k straight from the logits (no k x h x w bool masks, no copy of the kept ones).
                boxes = logits_to_boxes(logits, self.model.mask_threshold) + offset  # k x 4, image frame
                keep &= ~near_crop_edge(boxes, crop_box, image_box)
                idx = sub[keep]
                parts.append(
                    _Candidates(
                        low_res=low_res[idx],
                        iou=iou[idx],
                        stability=stability[keep],
                        boxes=boxes[keep],
                        points=points_t[point_index[idx]],
                        crop=torch.full((len(idx),), crop_index, dtype=torch.long, device=self.device),
                    )
                )
        found = _Candidates.cat(parts) if parts else self._empty(embedding)
        # The offset is shared by the whole crop, so NMS in the image frame equals the official crop-frame NMS.
        keep = batched_nms(found.boxes.float(), found.iou, torch.zeros_like(found.crop), self.box_nms_thresh)
        found = found.select(keep)
        found.points = found.points + torch.tensor([x0, y0], dtype=found.points.dtype, device=self.device)
        return found

    def _records(
        self, image_hw: tuple[int, int], boxes: list[list[int]], found: list[_Candidates]
    ) -> list[dict[str, Any]]:
        """NMS across crops, full-resolution masks, optional small-region cleanup, and the output records."""
        cands = _Candidates.cat(found)
        crops = torch.tensor(boxes, dtype=torch.long, device=self.device)  # C x 4 xyxy
        if len(boxes) > 1:
            crop_area = ((crops[:, 2] - crops[:, 0]) * (crops[:, 3] - crops[:, 1])).float()
            # Prefer masks from smaller crops: they saw the object at a higher resolution.
            keep = batched_nms(
                cands.boxes.float(),
                1 / crop_area[cands.crop],
                torch.zeros_like(cands.crop),
                self.crop_nms_thresh,
            )
            cands = cands.select(keep)
        segs, areas, box_list, changed = self._segmentations(image_hw, boxes, cands)
        if self.min_mask_region_area > 0 and len(segs):
            # Masks that needed no cleanup win ties, then NMS again: cleanup can make new duplicates.
            keep = batched_nms(
                box_list.float(),
                (~changed).float(),
                torch.zeros(len(box_list), dtype=torch.long),
                max(self.box_nms_thresh, self.crop_nms_thresh),
            ).tolist()
        else:
            keep = list(range(len(segs)))
        iou, stability = cands.iou.cpu().tolist(), cands.stability.cpu().tolist()
        points, crop_of = cands.points.cpu().tolist(), cands.crop.cpu().tolist()
        xywh = box_list.clone()
        xywh[:, 2:] -= xywh[:, :2]
        xywh = xywh.tolist()
        crops_xywh = crops.cpu().clone()
        crops_xywh[:, 2:] -= crops_xywh[:, :2]
        crops_xywh = crops_xywh.tolist()
        return [
            {
                "segmentation": segs[i],
                "area": int(areas[i]),
                "bbox": xywh[i],
                "predicted_iou": iou[i],
                "point_coords": [points[i]],
                "stability_score": stability[i],
                "crop_box": crops_xywh[crop_of[i]],
            }
            for i in keep
        ]

    def _segmentations(
        self, image_hw: tuple[int, int], boxes: list[list[int]], cands: _Candidates
    ) -> tuple[list[Any], np.ndarray, Tensor, Tensor]:
        """Full-resolution masks of the candidates in the output form, chunk by chunk.

        Returns:
            segmentations (K, per `output_mode`), areas (K int), boxes (K x 4 xyxy, CPU long, recomputed after
            cleanup), changed (K bool, CPU: cleanup altered the mask).
        """
        h, w = image_hw
        k = len(cands.iou)
        segs: list[Any] = [None] * k
        areas = np.zeros(k, dtype=np.int64)
        out_boxes = cands.boxes.cpu().clone()
        changed = torch.zeros(k, dtype=torch.bool)
        for c in cands.crop.unique().tolist():
            x0, y0, x1, y1 = boxes[c]
            crop_hw = (y1 - y0, x1 - x0)
            input_hw = get_preprocess_shape(*crop_hw, self.model.image_size)
            members = torch.nonzero(cands.crop == c).flatten()
            for sub in self._chunks(len(members), image_hw):
                idx = members[sub]
                crop_masks = self._upsample(cands.low_res[idx], input_hw, crop_hw) > self.model.mask_threshold
                masks = F.pad(crop_masks, (x0, w - x1, y0, h - y1))  # k x H x W in the image frame
                idx_cpu = idx.cpu()
                if self.min_mask_region_area > 0:
                    cleaned, did = remove_small_regions(masks.cpu().numpy(), self.min_mask_region_area)
                    masks = torch.from_numpy(cleaned)
                    changed[idx_cpu] = torch.from_numpy(did)
                    out_boxes[idx_cpu] = masks_to_boxes(masks)
                areas[idx_cpu.numpy()] = masks.flatten(1).sum(1).cpu().numpy()
                for j, seg in zip(idx_cpu.tolist(), self._encode(masks)):
                    segs[j] = seg
        return segs, areas, out_boxes, changed

    def _encode(self, masks: Tensor) -> list[Any]:
        """k x H x W bool -> k segmentations in the output mode."""
        if self.output_mode == "binary_mask":
            return list(masks.cpu().numpy())
        if self.output_mode == "uncompressed_rle":
            return uncompressed_rles(masks)
        return encode_rle(masks.cpu().numpy())

    # ------------------------------------------------------------------ helpers

    def _chunks(self, n: int, hw: tuple[int, int]) -> list[Tensor]:
        """Index chunks of n masks so one chunk holds at most `pixel_budget` full-resolution pixels."""
        per = max(1, self.pixel_budget // max(1, hw[0] * hw[1]))
        return [torch.arange(s, min(s + per, n), device=self.device) for s in range(0, n, per)]

    def _upsample(self, low_res: Tensor, input_hw: tuple[int, int], crop_hw: tuple[int, int]) -> Tensor:
        """k x S/4 x S/4 logits -> k x h x w logits in the crop frame (the official postprocess_masks)."""
        s = self.model.image_size
        x = F.interpolate(low_res[:, None], (s, s), mode="bilinear", align_corners=False)
        x = x[..., : input_hw[0], : input_hw[1]]
        if tuple(input_hw) != tuple(crop_hw):  # resizing to the same size is the identity: skip it
            x = F.interpolate(x, crop_hw, mode="bilinear", align_corners=False)
        return x[:, 0]

    def _empty(self, embedding: Tensor) -> _Candidates:
        side = 4 * embedding.shape[-1]
        d = self.device
        return _Candidates(
            low_res=torch.zeros(0, side, side, device=d),
            iou=torch.zeros(0, device=d),
            stability=torch.zeros(0, device=d),
            boxes=torch.zeros(0, 4, dtype=torch.long, device=d),
            points=torch.zeros(0, 2, dtype=torch.float64, device=d),
            crop=torch.zeros(0, dtype=torch.long, device=d),
        )


def _check_image(image: np.ndarray, index: int) -> None:
    if not isinstance(image, np.ndarray) or image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        got = f"shape {getattr(image, 'shape', None)} dtype {getattr(image, 'dtype', type(image).__name__)}"
        raise ValueError(
            f"image {index}: expected an H x W x 3 uint8 RGB array, got {got}; "
            "e.g. np.asarray(PIL.Image.open(f).convert('RGB'))"
        )


def _crop(image: np.ndarray, box: list[int]) -> np.ndarray:
    x0, y0, x1, y1 = box
    return image[y0:y1, x0:x1]


def _tiles(h: int, w: int, size: int, overlap_ratio: float) -> list[tuple[int, int, int, int]]:
    """Overlapping square tiles (y0, x0, y1, x1) covering an h x w scene; neighbours share overlap_ratio * size."""
    step = max(1, int(size * (1 - overlap_ratio)))

    def starts(length: int) -> list[int]:
        if length <= size:
            return [0]
        out = list(range(0, length - size, step))
        return out + [length - size]

    return [(y, x, min(y + size, h), min(x + size, w)) for y in starts(h) for x in starts(w)]
