"""`SamPredictor`: the official SamPredictor's API, shapes and preprocessing, for every samlight variant."""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor, nn

from samlight.modeling.sam import Sam
from samlight.modeling.transforms import apply_boxes, apply_coords, resize_longest_image


class SamPredictor:
    """Embed an image once with `set_image`, then `predict` masks for any number of prompts on it.

    Args:
        sam_model: a `Sam` (or a module holding one as `.model`, such as `SamModule`).
    """

    def __init__(self, sam_model: nn.Module) -> None:
        model = getattr(sam_model, "model", sam_model)
        if not isinstance(model, Sam):
            raise TypeError(
                f"SamPredictor needs a samlight Sam (or a module with .model), got {type(model).__name__}"
            )
        self.model = model
        self.reset_image()

    @property
    def device(self) -> torch.device:
        return self.model.device

    def reset_image(self) -> None:
        """Forget the current image and its embedding."""
        self.is_image_set = False
        self.features: Tensor | None = None
        self.original_size: tuple[int, int] | None = None
        self.input_size: tuple[int, int] | None = None

    def set_image(self, image: np.ndarray, image_format: str = "RGB") -> None:
        """Embed `image` (H x W x 3 uint8, RGB or BGR) for the following `predict` calls."""
        if image_format not in ("RGB", "BGR"):
            raise ValueError(f"image_format must be 'RGB' or 'BGR', got {image_format!r}")
        if (
            not isinstance(image, np.ndarray)
            or image.ndim != 3
            or image.shape[2] != 3
            or image.dtype != np.uint8
        ):
            got = (
                f"shape {tuple(image.shape)} dtype {image.dtype}"
                if isinstance(image, np.ndarray)
                else type(image)
            )
            raise ValueError(
                f"set_image expects an H x W x 3 uint8 numpy array, got {got}; "
                "e.g. np.asarray(PIL.Image.open(f).convert('RGB'))"
            )
        if image_format != self.model.image_format:
            image = image[..., ::-1]
        resized = resize_longest_image(image, self.model.image_size)  # h x w x 3 uint8
        tensor = torch.as_tensor(resized, device=self.device).permute(2, 0, 1).contiguous()[None]
        self.set_torch_image(tensor, image.shape[:2])

    @torch.no_grad()
    def set_torch_image(self, transformed_image: Tensor, original_image_size: tuple[int, ...]) -> None:
        """Embed an image already resized to long side S: 1 x 3 x h x w on the 0-255 scale."""
        s = self.model.image_size
        if (
            transformed_image.ndim != 4
            or transformed_image.shape[1] != 3
            or max(transformed_image.shape[2:]) != s
        ):
            raise ValueError(
                f"set_torch_image expects B x 3 x h x w with long side {s}, got {tuple(transformed_image.shape)}"
            )
        self.reset_image()
        self.original_size = (int(original_image_size[0]), int(original_image_size[1]))
        self.input_size = (int(transformed_image.shape[-2]), int(transformed_image.shape[-1]))
        images = self.model.preprocess(transformed_image.float())
        self.features = self.model.encode_images(images.to(next(self.model.parameters()).dtype))
        self.is_image_set = True

    def predict(
        self,
        point_coords: np.ndarray | None = None,
        point_labels: np.ndarray | None = None,
        box: np.ndarray | None = None,
        mask_input: np.ndarray | None = None,
        multimask_output: bool = True,
        return_logits: bool = False,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Masks for one prompt set on the current image, in original-image pixels.

        Args:
            point_coords: P x 2 (x, y) pixels of the original image; point_labels: P (1 fg, 0 bg).
            box: 4 (or 1 x 4) xyxy pixels of the original image.
            mask_input: 1 x 4h x 4w low-res logits from a previous call.
            multimask_output: 3 masks (ambiguous prompt) instead of 1.
            return_logits: return logits instead of boolean masks.

        Returns:
            masks: K x H x W (bool, or float logits); scores: K; low_res_logits: K x 4h x 4w.
        """
        self._require_image()
        coords = labels = box_t = mask_t = None
        if point_coords is not None or point_labels is not None:
            coords, labels = self._check_points(point_coords, point_labels)
            coords = torch.as_tensor(
                apply_coords(coords, self.original_size, self.model.image_size),
                dtype=torch.float,
                device=self.device,
            )[None]
            labels = torch.as_tensor(labels, dtype=torch.int, device=self.device)[None]
        if box is not None:
            box = self._check_box(box)
            box_t = torch.as_tensor(
                apply_boxes(box, self.original_size, self.model.image_size),
                dtype=torch.float,
                device=self.device,
            )
        if mask_input is not None:
            mask_t = torch.as_tensor(self._check_mask(mask_input), dtype=torch.float, device=self.device)[
                None
            ]
        masks, scores, low_res = self.predict_torch(
            coords, labels, box_t, mask_t, multimask_output, return_logits
        )
        return masks[0].cpu().numpy(), scores[0].float().cpu().numpy(), low_res[0].float().cpu().numpy()

    @torch.no_grad()
    def predict_torch(
        self,
        point_coords: Tensor | None,
        point_labels: Tensor | None,
        boxes: Tensor | None = None,
        mask_input: Tensor | None = None,
        multimask_output: bool = True,
        return_logits: bool = False,
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Batched prompts already in the input frame (see `samlight.modeling.transforms.apply_coords`).

        Args:
            point_coords: B x P x 2; point_labels: B x P; boxes: B x 4; mask_input: B x 1 x 4h x 4w.

        Returns:
            masks: B x K x H x W; scores: B x K; low_res_logits: B x K x 4h x 4w.
        """
        self._require_image()
        points = None if point_coords is None else (point_coords, point_labels)
        sparse, dense = self.model.prompt_encoder(points=points, boxes=boxes, masks=mask_input)
        low_res, scores = self.model.mask_decoder(
            image_embeddings=self.features,
            image_pe=self.model.prompt_encoder.get_dense_pe(),
            sparse_prompt_embeddings=sparse.to(self.features.dtype),
            dense_prompt_embeddings=dense.to(self.features.dtype),
            multimask_output=multimask_output,
        )
        masks = self.model.postprocess_masks(low_res.float(), self.input_size, self.original_size)
        if not return_logits:
            masks = masks > self.model.mask_threshold
        return masks, scores, low_res

    def get_image_embedding(self) -> Tensor:
        """The current image's embedding: 1 x C x S/16 x S/16."""
        self._require_image()
        return self.features

    def _require_image(self) -> None:
        if not self.is_image_set:
            raise RuntimeError("An image must be set with .set_image(...) before mask prediction.")

    def _check_points(
        self, coords: np.ndarray | None, labels: np.ndarray | None
    ) -> tuple[np.ndarray, np.ndarray]:
        if coords is None or labels is None:
            raise ValueError("point_coords and point_labels must be given together")
        coords, labels = np.asarray(coords, dtype=float), np.asarray(labels)
        if coords.ndim != 2 or coords.shape[1] != 2 or labels.shape != (coords.shape[0],):
            raise ValueError(
                f"point_coords must be P x 2 (x, y) and point_labels P, got {coords.shape} and {labels.shape}"
            )
        self._check_inside(coords, "point_coords")
        return coords, labels

    def _check_box(self, box: np.ndarray) -> np.ndarray:
        box = np.asarray(box, dtype=float)
        if box.size != 4:
            raise ValueError(f"box must be 4 numbers x0, y0, x1, y1, got shape {box.shape}")
        box = box.reshape(1, 4)
        self._check_inside(box.reshape(2, 2), "box")
        return box

    def _check_inside(self, xy: np.ndarray, what: str) -> None:
        h, w = self.original_size
        inside = (xy[:, 0] >= 0) & (xy[:, 0] <= w) & (xy[:, 1] >= 0) & (xy[:, 1] <= h)
        if not np.isfinite(xy).all() or not inside.all():
            raise ValueError(
                f"{what} {xy[~inside].tolist() or xy.tolist()} lie outside the image: expected x in [0, {w}] and "
                f"y in [0, {h}] (original-image pixels, x first)"
            )

    def _check_mask(self, mask_input: np.ndarray) -> np.ndarray:
        mask_input = np.asarray(mask_input)
        expected = (1, *self.model.prompt_encoder.mask_input_size)
        if mask_input.shape != expected:
            raise ValueError(
                f"mask_input must be {expected[0]} x {expected[1]} x {expected[2]} low-res logits "
                f"(e.g. low_res_logits[i:i+1] from a previous predict), got {mask_input.shape}"
            )
        return mask_input
