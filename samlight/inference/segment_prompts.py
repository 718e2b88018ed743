"""Prompts of one object for `samlight segment`: parsed and checked, predicted as mask logits, and pasted into a
label image where the object is more confident than what is there. Shared by volumes and scenes."""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np


@dataclass(frozen=True)
class ObjectPrompt:
    """The prompts of one object, in pixel coordinates (x, y) of the image the predictor sees.

    Attributes:
        box: 4 (x0, y0, x1, y1) or None.
        points: P x 2 (x, y) or None.
        point_labels: P (1 foreground, 0 background) or None.
        label: value written where this object wins.
        where: where the prompt came from, for error messages.
    """

    box: np.ndarray | None
    points: np.ndarray | None
    point_labels: np.ndarray | None
    label: int
    where: str

    def bounds(self) -> tuple[float, float, float, float]:
        """x0, y0, x1, y1 around every coordinate of the prompt."""
        coords = [
            c
            for c in (self.box.reshape(2, 2) if self.box is not None else None, self.points)
            if c is not None
        ]
        xy = np.concatenate(coords)
        return float(xy[:, 0].min()), float(xy[:, 1].min()), float(xy[:, 0].max()), float(xy[:, 1].max())

    def shifted(self, dx: float, dy: float) -> ObjectPrompt:
        """The same prompt in a frame whose origin is at (dx, dy) of this one."""
        offset = np.array([dx, dy], dtype=np.float64)
        box = None if self.box is None else self.box - np.tile(offset, 2)
        points = None if self.points is None else self.points - offset
        return replace(self, box=box, points=points)

    def check_inside(self, width: int, height: int) -> None:
        x0, y0, x1, y1 = self.bounds()
        if x0 < 0 or y0 < 0 or x1 > width or y1 > height:
            raise ValueError(
                f"{self.where}: prompt spans x {x0:g}..{x1:g}, y {y0:g}..{y1:g}, outside the {width} x {height} image"
            )


def read_prompt_file(path: Path, what: str) -> Any:
    """The parsed JSON of a prompt file; a file that cannot be read or parsed is a ValueError naming it."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"{path}: cannot read {what}: {err}") from err


def parse_object(entry: Any, where: str) -> ObjectPrompt:
    """One object of a volume prompt file: `[x0, y0, x1, y1]` or `{"box": ..., "points": ..., "label": ...}`."""
    if isinstance(entry, (list, tuple)):
        entry = {"box": entry}
    if not isinstance(entry, dict) or not ({"box", "points"} & entry.keys()):
        raise ValueError(
            f"{where}: expected [x0, y0, x1, y1] or an object with 'box' and/or 'points', got {entry!r}"
        )
    box = points = point_labels = None
    if entry.get("box") is not None:
        box = np.asarray(entry["box"], dtype=np.float64)
        if box.shape != (4,) or box[2] < box[0] or box[3] < box[1]:
            raise ValueError(
                f"{where}: a box is [x0, y0, x1, y1] with x0 <= x1 and y0 <= y1, got {entry['box']}"
            )
    if entry.get("points") is not None:
        points = np.asarray(entry["points"], dtype=np.float64).reshape(-1, 2)
        point_labels = np.asarray(entry.get("point_labels", [1] * len(points)), dtype=np.int64)
        if point_labels.shape != (len(points),):
            raise ValueError(f"{where}: {len(points)} points but point_labels {entry.get('point_labels')}")
    try:
        label = int(entry.get("label", 1))
    except (TypeError, ValueError) as err:
        raise ValueError(f"{where}: label must be a positive integer, got {entry.get('label')!r}") from err
    if label <= 0:
        raise ValueError(f"{where}: label must be a positive integer (0 is background), got {label}")
    return ObjectPrompt(box=box, points=points, point_labels=point_labels, label=label, where=where)


def predict_logits(predictor: Any, prompt: ObjectPrompt) -> np.ndarray:
    """H x W mask logits of one object on the image set in `predictor`.

    A single click is ambiguous, so it gets the three outputs and the one with the highest predicted IoU is kept
    (the paper's rule); boxes and several clicks use the single output.
    """
    multimask = prompt.box is None and prompt.points is not None and len(prompt.points) == 1
    logits, scores, _ = predictor.predict(
        point_coords=prompt.points,
        point_labels=prompt.point_labels,
        box=prompt.box,
        multimask_output=multimask,
        return_logits=True,
    )
    return np.asarray(logits[int(np.argmax(scores))], dtype=np.float32)


def mask_threshold(predictor: Any) -> float:
    """The model's logit threshold (0.0 for SAM)."""
    return float(getattr(getattr(predictor, "model", None), "mask_threshold", 0.0))


def merge(labels: np.ndarray, best: np.ndarray, logits: np.ndarray, value: int, threshold: float) -> None:
    """Paste one object into `labels` (in place) where it is foreground and more confident than what is there.

    Args:
        labels, best: H x W views of the output and of the best logit so far (-inf where empty).
        logits: H x W logits of the object.
    """
    wins = (logits > threshold) & (logits > best)
    labels[wins] = value
    best[wins] = logits[wins]


def paste_objects(
    predictor: Any, image: np.ndarray, objects: list[ObjectPrompt], labels: np.ndarray, best: np.ndarray
) -> None:
    """Set `image` in the predictor (one embedding for all `objects`) and paste each object into `labels`.

    Args:
        image: H x W x 3 uint8 RGB.
        objects: prompts in the pixel frame of `image`.
        labels, best: H x W views of the output and of the best logit so far (-inf where empty); logits are
            compared in the dtype of `best`.
    """
    predictor.set_image(image)
    threshold = mask_threshold(predictor)
    for obj in objects:
        merge(labels, best, predict_logits(predictor, obj).astype(best.dtype), obj.label, threshold)
