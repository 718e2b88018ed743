"""The model side of the annotation tool: cached image embeddings, prompt -> candidate masks, weight swaps.

The decoder runs here on the server (docs/annotate.md has the measured latencies that chose this over an ONNX
decoder in the browser). Each image is embedded once per image encoder; embeddings live in
`<cache>/<encoder fingerprint>/<key>.npy` (plain arrays, read with `allow_pickle=False`), so switching back to
an image, restarting the server, or swapping in retrained weights with an unchanged (frozen) encoder costs
nothing. One background thread embeds the next image while the current one is being annotated.
"""

from __future__ import annotations

import hashlib
import io
import itertools
import threading
import time
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from pycocotools import mask as mask_utils

from samlight.inference.annotate.images import ImageFolder, load_rgb
from samlight.inference.annotate.store import atomic_write_bytes
from samlight.inference.predictor import SamPredictor
from samlight.modeling.sam import Sam
from samlight.modeling.transforms import apply_boxes, apply_coords, get_preprocess_shape

DISPLAY_LONG_SIDE = 1024  # masks go to the page at most this large; the saved mask is full resolution
MAX_POINTS = 64  # per prompt; a person clicks a handful, a bound keeps a crafted request cheap
_MASK_INPUT_LOGIT = 8.0  # magnitude of the logits made from a saved binary mask (SAM's own lie around +-10)


def encoder_fingerprint(model: Sam) -> str:
    """Hash of the image encoder's weights and input size: the embedding cache's namespace.

    Retraining with a frozen encoder keeps the fingerprint, so every cached embedding stays valid.
    """
    digest = hashlib.sha1(str(model.image_size).encode())
    for name, tensor in model.image_encoder.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


def display_size(original_size: tuple[int, int]) -> tuple[int, int]:
    """(h, w) of the frame the page's candidate masks are sent in: the image, shrunk to a long side of
    DISPLAY_LONG_SIDE when larger. Upsampling 3 candidates to 1500 x 2250 on every click would cost more than
    the decoder itself; the page scales the overlay to the image, and `accept` saves the full-size mask."""
    if max(original_size) <= DISPLAY_LONG_SIDE:
        return (int(original_size[0]), int(original_size[1]))
    return get_preprocess_shape(original_size[0], original_size[1], DISPLAY_LONG_SIDE)


def compressed_rle(mask: np.ndarray) -> dict:
    """COCO compressed RLE with string counts (the SA-1B json form) of an H x W bool mask."""
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode("ascii")}


@dataclass
class Prediction:
    """One decoder answer, kept briefly so "accept" saves exactly what the page showed.

    Attributes:
        id: handle the page sends back.
        image_id: the image.
        model_round: weights that made it (0 = the starting checkpoint, k = retrain round k).
        point_coords: P x 2 (x, y) original pixels; point_labels: P (1 fg, 0 bg); box: 4 xyxy or None.
        low_res_logits: K x 4h x 4w float32 (K = 3 for a single click, else 1).
        scores: K predicted IoUs; stability: K stability scores (IoU of the masks at logit +1 and -1).
        masks: K x h x w bool, in the display frame (`display_size(original_size)`).
        original_size: (H, W) of the image; input_size: (h, w) of the image in the model's input frame.
    """

    id: int
    image_id: str
    model_round: int
    point_coords: np.ndarray
    point_labels: np.ndarray
    box: np.ndarray | None
    low_res_logits: np.ndarray
    scores: np.ndarray
    stability: np.ndarray
    masks: np.ndarray = field(repr=False)
    original_size: tuple[int, int] = (0, 0)
    input_size: tuple[int, int] = (0, 0)
    seconds: float = 0.0


class AnnotationEngine:
    """Embeds images (cached), decodes prompts, swaps weights; safe to call from the server's threads.

    Args:
        model: the Sam to start from (moved to `device`, eval mode).
        folder: the images.
        cache_dir: root of the on-disk embedding cache.
        device: where the model runs.
        model_round: the retrain round `model` comes from (0 = the user's checkpoint).
    """

    def __init__(
        self,
        model: Sam,
        folder: ImageFolder,
        cache_dir: str | Path,
        device: str | torch.device = "cpu",
        model_round: int = 0,
    ) -> None:
        self.folder = folder
        self.cache_dir = Path(cache_dir)
        self.device = torch.device(device)
        self._decode_lock = threading.Lock()
        self._state_lock = threading.Lock()
        self._encoder = ThreadPoolExecutor(max_workers=1, thread_name_prefix="samlight-encode")
        self._futures: dict[tuple[str, str], Future] = {}
        self._features: OrderedDict[tuple[str, str], torch.Tensor] = OrderedDict()  # small in-memory LRU
        self._pixels: OrderedDict[str, np.ndarray] = OrderedDict()
        self._predictions: OrderedDict[int, Prediction] = OrderedDict()
        self._ids = itertools.count(1)
        self._install(model, model_round)

    # ------------------------------------------------------------------------------------------ weights

    def _install(self, model: Sam, model_round: int) -> None:
        model = model.to(self.device).eval()
        fingerprint = encoder_fingerprint(model)
        with self._decode_lock, self._state_lock:
            self.model = model
            self.model_round = model_round
            self.fingerprint = fingerprint
            self._encoding = SamPredictor(model)
            with torch.inference_mode():  # the decoder's positional encoding depends on the weights only
                self._image_pe = model.prompt_encoder.get_dense_pe()

    def swap_model(self, model: Sam, model_round: int) -> bool:
        """Serve `model` from now on; returns whether its image encoder differs (embeddings recomputed)."""
        old = self.fingerprint
        self._install(model, model_round)
        return self.fingerprint != old

    # ---------------------------------------------------------------------------------------- embeddings

    def pixels(self, image_id: str) -> np.ndarray:
        """H x W x 3 uint8 of a listed image (a few kept decoded)."""
        with self._state_lock:
            if image_id in self._pixels:
                self._pixels.move_to_end(image_id)
                return self._pixels[image_id]
        pixels = load_rgb(self.folder.get(image_id).path)
        with self._state_lock:
            self._pixels[image_id] = pixels
            while len(self._pixels) > 4:
                self._pixels.popitem(last=False)
        return pixels

    def _cache_path(self, fingerprint: str, image_id: str) -> Path:
        return self.cache_dir / fingerprint / f"{self.folder.get(image_id).key}.npy"

    def embedding_future(self, image_id: str) -> Future:
        """The image's embedding (1 x C x h x w tensor) under the current encoder, computed at most once."""
        self.folder.get(image_id)  # KeyError for an unlisted id, before anything is queued
        with self._state_lock:
            key = (self.fingerprint, image_id)
            future = self._futures.get(key)
            if future is None or (future.done() and future.exception() is not None):
                future = self._encoder.submit(self._embed, key)
                self._futures[key] = future
            return future

    def prefetch(self, image_id: str | None) -> None:
        """Queue `image_id` for background embedding (the page calls this for the next image)."""
        if image_id is not None and image_id in self.folder:
            self.embedding_future(image_id)

    def is_cached(self, image_id: str) -> bool:
        return self._cache_path(self.fingerprint, image_id).exists()

    def _embed(self, key: tuple[str, str]) -> torch.Tensor:
        fingerprint, image_id = key
        path = self._cache_path(fingerprint, image_id)
        with self._state_lock:
            if key in self._features:
                return self._features[key]
        features = None
        if path.exists():
            try:
                features = torch.from_numpy(np.load(path, allow_pickle=False))
            except (OSError, ValueError):  # a torn or foreign file: recompute and overwrite it
                features = None
        if features is None:
            pixels = self.pixels(image_id)
            with self._state_lock:
                encoding, fp_now = self._encoding, self.fingerprint
            if fp_now != fingerprint:  # weights swapped while queued: the caller will ask again
                raise RuntimeError("image encoder changed while this embedding was queued")
            encoding.set_image(pixels)
            features = encoding.features.detach().float().cpu()
            path.parent.mkdir(parents=True, exist_ok=True)
            buf = io.BytesIO()
            np.save(buf, features.numpy(), allow_pickle=False)
            atomic_write_bytes(path, buf.getvalue())
        with self._state_lock:
            self._features[key] = features
            while len(self._features) > 8:
                self._features.popitem(last=False)
        return features

    def embedding(self, image_id: str) -> torch.Tensor:
        """Block until the image's embedding exists (retrying once if weights were swapped meanwhile)."""
        try:
            return self.embedding_future(image_id).result()
        except RuntimeError:
            return self.embedding_future(image_id).result()

    # ------------------------------------------------------------------------------------------ decoding

    def predict(
        self,
        image_id: str,
        point_coords: np.ndarray | None = None,
        point_labels: np.ndarray | None = None,
        box: np.ndarray | None = None,
        previous: int | None = None,
        previous_candidate: int = 0,
        base_mask: np.ndarray | None = None,
    ) -> Prediction:
        """Candidate masks for one prompt on one image, in the display frame (see `display_size`).

        Args:
            point_coords: P x 2 (x, y) original pixels; point_labels: P, 1 foreground / 0 background.
            box: 4 xyxy original pixels.
            previous: id of the prediction this prompt extends: its `previous_candidate` logits are fed back
                as the mask prompt, as in the paper's interactive training (ignored when no longer kept).
            base_mask: H x W bool mask being corrected (e.g. an automatic one), fed back as the mask prompt
                when there is no `previous`.

        Returns:
            a Prediction with 3 candidates for a single click (the ambiguous prompt), 1 otherwise;
            `full_mask` gives a candidate at the original resolution.
        """
        features = self.embedding(image_id)
        original = tuple(int(v) for v in self.pixels(image_id).shape[:2])
        coords, labels = _check_points(point_coords, point_labels, original)
        if box is not None:
            box = np.asarray(box, dtype=np.float64).reshape(4)
            _check_inside(box.reshape(2, 2), original, "box")
        if coords is None and box is None:
            raise ValueError("a prompt needs at least one point or a box")
        mask_input = None
        prev = self._predictions.get(previous) if previous is not None else None
        if prev is not None and prev.image_id == image_id:
            k = min(max(int(previous_candidate), 0), len(prev.low_res_logits) - 1)
            mask_input = prev.low_res_logits[k : k + 1]
        elif base_mask is not None:
            mask_input = self.mask_to_logits(base_mask)
        multimask = box is None and coords is not None and len(coords) == 1 and mask_input is None
        display = display_size(original)
        start = time.perf_counter()
        with self._decode_lock:
            model, model_round, image_pe = self.model, self.model_round, self._image_pe
            s = model.image_size
            input_size = get_preprocess_shape(original[0], original[1], s)
            tensor = partial(torch.as_tensor, dtype=torch.float, device=self.device)
            points = None
            if coords is not None:
                labels_t = torch.as_tensor(labels, dtype=torch.int, device=self.device)[None]  # 1 x P
                points = (tensor(apply_coords(coords, original, s))[None], labels_t)  # 1 x P x 2 input pixels
            with torch.inference_mode():
                sparse, dense = model.prompt_encoder(
                    points=points,
                    boxes=None if box is None else tensor(apply_boxes(box[None], original, s)),
                    masks=None if mask_input is None else tensor(mask_input)[None],
                )
                features = features.to(self.device)
                low_res, scores = model.mask_decoder(
                    image_embeddings=features,
                    image_pe=image_pe,
                    sparse_prompt_embeddings=sparse.to(features.dtype),
                    dense_prompt_embeddings=dense.to(features.dtype),
                    multimask_output=multimask,
                )  # 1 x K x 4h x 4w, 1 x K
                logits = self._to_display(low_res.float(), input_size, display)[0]  # K x h x w
            scores, low_res = scores[0].float().cpu().numpy(), low_res[0].float()
        threshold = self.model.mask_threshold
        masks = (logits > threshold).cpu().numpy()  # K x h x w
        inner = (logits > threshold + 1.0).sum((1, 2)).cpu().numpy()
        outer = (logits > threshold - 1.0).sum((1, 2)).cpu().numpy()
        stability = np.where(outer > 0, inner / np.maximum(outer, 1), 0.0)
        prediction = Prediction(
            id=next(self._ids),
            image_id=image_id,
            model_round=model_round,
            point_coords=np.zeros((0, 2)) if coords is None else coords,
            point_labels=np.zeros((0,), np.int64) if labels is None else labels,
            box=box,
            low_res_logits=low_res.cpu().numpy().astype(np.float32),
            scores=scores.astype(np.float32),
            stability=stability.astype(np.float32),
            masks=masks,
            original_size=original,
            input_size=input_size,
            seconds=time.perf_counter() - start,
        )
        with self._state_lock:
            self._predictions[prediction.id] = prediction
            while len(self._predictions) > 32:
                self._predictions.popitem(last=False)
        return prediction

    def _to_display(self, low_res: torch.Tensor, input_size: tuple[int, int], display: tuple[int, int]):
        """Low-res logits 1 x K x 4h x 4w -> 1 x K x h x w logits in the display frame.

        `Sam.postprocess_masks` with `display` as the target size, minus its second resize when the display
        frame is the model's input frame (any image with a long side >= 1024 under vit_b): bilinear resampling
        to the same size is the identity, so the values are the same and one pass over K masks is saved.
        """
        s = self.model.image_size
        logits = F.interpolate(low_res, (s, s), mode="bilinear", align_corners=False)
        logits = logits[..., : input_size[0], : input_size[1]]
        if tuple(input_size) != tuple(display):
            logits = F.interpolate(logits, display, mode="bilinear", align_corners=False)
        return logits

    def full_mask(self, prediction: Prediction, candidate: int) -> np.ndarray:
        """Candidate `candidate` of `prediction` at the original resolution: H x W bool (as SamPredictor).

        Computed from the kept low-res logits with the weights that made them, so it is what the page showed.
        """
        low = torch.as_tensor(prediction.low_res_logits[candidate : candidate + 1])[None]  # 1 x 1 x 4h x 4w
        with torch.no_grad():
            logits = self.model.postprocess_masks(low, prediction.input_size, prediction.original_size)
        return (logits[0, 0] > self.model.mask_threshold).numpy()

    def input_size(self, original_size: tuple[int, int]) -> tuple[int, int]:
        """(h, w) of an image of `original_size` resized into the model's input frame."""
        return get_preprocess_shape(original_size[0], original_size[1], self.model.image_size)

    def get_prediction(self, prediction_id: int) -> Prediction:
        """A recent prediction by id; KeyError when it is unknown or no longer kept."""
        with self._state_lock:
            return self._predictions[prediction_id]

    def mask_to_logits(self, mask: np.ndarray) -> np.ndarray:
        """An H x W bool mask as 1 x 4h x 4w mask-prompt logits in the model's input frame (+-8 inside/outside)."""
        s = self.model.image_size
        h, w = get_preprocess_shape(mask.shape[0], mask.shape[1], s)
        m = torch.as_tensor(np.ascontiguousarray(mask), dtype=torch.float)[None, None]
        m = F.interpolate(m, (h, w), mode="bilinear", align_corners=False)
        m = F.pad(m, (0, s - w, 0, s - h))  # zero pad bottom-right, as the image
        low = self.model.prompt_encoder.mask_input_size
        m = F.interpolate(m, tuple(low), mode="area")[0]  # 1 x 4h x 4w in [0, 1]
        return ((m * 2 - 1) * _MASK_INPUT_LOGIT).numpy()

    def close(self) -> None:
        self._encoder.shutdown(wait=False, cancel_futures=True)


def _check_points(
    coords: np.ndarray | list | None, labels: np.ndarray | list | None, original_size: tuple[int, int]
) -> tuple[np.ndarray | None, np.ndarray | None]:
    if coords is None or len(coords) == 0:
        return None, None
    coords = np.asarray(coords, dtype=np.float64)
    labels = np.asarray(labels, dtype=np.int64)
    if coords.ndim != 2 or coords.shape[1] != 2 or labels.shape != (len(coords),):
        raise ValueError(f"points must be P x 2 (x, y) with P labels, got {coords.shape} and {labels.shape}")
    if len(coords) > MAX_POINTS:
        raise ValueError(f"at most {MAX_POINTS} points per prompt, got {len(coords)}")
    if not np.isin(labels, (0, 1)).all():
        raise ValueError(
            f"point labels must be 1 (foreground) or 0 (background), got {sorted(set(labels.tolist()))}"
        )
    _check_inside(coords, original_size, "points")
    return coords, labels


def _check_inside(xy: np.ndarray, original_size: tuple[int, int], what: str) -> None:
    h, w = original_size
    inside = np.isfinite(xy).all(1) & (xy[:, 0] >= 0) & (xy[:, 0] <= w) & (xy[:, 1] >= 0) & (xy[:, 1] <= h)
    if not inside.all():
        raise ValueError(
            f"{what} {xy[~inside].tolist()} lie outside the image: x in [0, {w}], y in [0, {h}] (pixels, x first)"
        )
