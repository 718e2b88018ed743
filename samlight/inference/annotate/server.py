"""The annotation tool's HTTP side (Flask): the page, the images of `--images`, and a small JSON API.

Safe by default: the CLI binds 127.0.0.1; the only files served are the static page assets (Flask's
`send_from_directory`, which refuses paths leaving the folder) and listed images, looked up by id in the
folder's listing (a request never becomes a path); request bodies are capped (`MAX_CONTENT_LENGTH`); every
request and response is JSON or image bytes, nothing is unpickled.

API (all JSON):
    GET  /api/state                         images, the session's image, mask counts, model round, retrain status
    GET  /api/image?id=ID                   the image's pixels (upright; original JPEG bytes or PNG)
    POST /api/open     {image}              embed (cached) + pre-encode the next image; the image's masks
    POST /api/predict  {image, points: [[x, y, label], ...], box: [x0, y0, x1, y1] | null,
                        previous: prediction id | null, candidate: k, base: mask id | null}
                                            candidate masks (COCO RLE), scores, timings
    POST /api/accept   {prediction, candidate, replaces: mask id | null}   save it; the SA-1B record
    POST /api/delete   {image, id}          delete a saved mask
    GET  /api/retrain                       the served model round and the retrain status (the page polls it)
    POST /api/retrain                       start a fine-tuning round
"""

from __future__ import annotations

import time
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
from flask import Flask, Response, jsonify, request, send_from_directory
from pycocotools import mask as mask_utils
from werkzeug.exceptions import HTTPException

from samlight.inference.annotate.engine import AnnotationEngine, compressed_rle
from samlight.inference.annotate.images import ImageError, encode_for_browser
from samlight.inference.annotate.retrain import Retrainer
from samlight.inference.annotate.store import HUMAN, AnnotationStore

MAX_REQUEST_BYTES = 64 * 1024  # prompts are a few points; nothing legitimate comes near this
STATIC_DIR = Path(str(resources.files("samlight.inference.annotate") / "static"))


class BadRequest(ValueError):
    """A request the API refuses (400), with a message for the page."""


def _body() -> dict[str, Any]:
    data = request.get_json(silent=True)
    if not isinstance(data, dict):
        raise BadRequest("expected a JSON object body (Content-Type: application/json)")
    return data


def _int(data: dict[str, Any], key: str, default: int | None = None) -> int | None:
    value = data.get(key, default)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise BadRequest(f"{key!r} must be an integer, got {value!r}")
    return value


def _image_id(data: dict[str, Any], engine: AnnotationEngine) -> str:
    image_id = data.get("image")
    if not isinstance(image_id, str) or image_id not in engine.folder:
        raise KeyError(f"no image {image_id!r} in {engine.folder.root}")
    return image_id


def _annotation_view(ann: dict[str, Any]) -> dict[str, Any]:
    """What the page needs of a saved mask: id, source, area, bbox, score and the compressed RLE."""
    return {
        "id": int(ann["id"]),
        "source": ann.get("source", "auto"),
        "area": int(ann.get("area", 0)),
        "bbox": ann.get("bbox"),
        "predicted_iou": ann.get("predicted_iou"),
        "rle": ann["segmentation"],
    }


def create_app(engine: AnnotationEngine, store: AnnotationStore, retrainer: Retrainer | None = None) -> Flask:
    """The Flask app serving one annotation session."""
    app = Flask("samlight.annotate", static_folder=str(STATIC_DIR), static_url_path="/static")
    app.config["MAX_CONTENT_LENGTH"] = MAX_REQUEST_BYTES
    app.json.sort_keys = False

    @app.errorhandler(BadRequest)
    @app.errorhandler(ValueError)
    def _bad(e: Exception):
        return jsonify(error=str(e)), 400

    @app.errorhandler(KeyError)
    def _missing(e: KeyError):
        return jsonify(error=str(e.args[0]) if e.args else "not found"), 404

    @app.errorhandler(ImageError)
    def _bad_image(e: ImageError):
        return jsonify(error=str(e)), 422

    @app.errorhandler(HTTPException)
    def _http(e: HTTPException):
        return jsonify(error=f"{e.code} {e.name}: {e.description}"), e.code

    @app.after_request
    def _headers(response: Response) -> Response:
        # The page needs nothing from elsewhere; keep other sites from framing or scripting it.
        response.headers["X-Content-Type-Options"] = "nosniff"
        response.headers["X-Frame-Options"] = "DENY"
        response.headers["Content-Security-Policy"] = "default-src 'self'; img-src 'self' blob: data:"
        return response

    @app.get("/")
    def index():
        return send_from_directory(STATIC_DIR, "index.html")

    @app.get("/api/state")
    def state():
        current = store.current_image or engine.folder.entries[0].id
        return jsonify(
            images=[{"id": e.id, "masks": store.mask_count(e.id)} for e in engine.folder.entries],
            current=current,
            counts=store.counts(),
            model_round=engine.model_round,
            retrain=None if retrainer is None else retrainer.status(),
        )

    @app.get("/api/image")
    def image():
        entry = engine.folder.get(request.args.get("id", ""))
        pixels = engine.pixels(entry.id)  # decodes (and checks) the file; ImageError -> 422
        if entry.path.suffix.lower() in (".jpg", ".jpeg"):
            from samlight.inference.annotate.images import jpeg_for_shard

            data = jpeg_for_shard(entry.path, pixels)
            mimetype = "image/jpeg"
        else:
            data, mimetype = encode_for_browser(pixels)
        response = Response(data, mimetype=mimetype)
        response.headers["Cache-Control"] = "private, max-age=3600"
        return response

    @app.post("/api/open")
    def open_image():
        image_id = _image_id(_body(), engine)
        pixels = engine.pixels(image_id)
        store.set_current_image(image_id)
        cached = engine.is_cached(image_id)
        start = time.perf_counter()
        engine.embedding(image_id)
        embed_ms = (time.perf_counter() - start) * 1000
        following = engine.folder.neighbour(image_id, 1)
        engine.prefetch(None if following is None else following.id)
        return jsonify(
            image=image_id,
            index=engine.folder.index(image_id),
            width=int(pixels.shape[1]),
            height=int(pixels.shape[0]),
            annotations=[_annotation_view(a) for a in store.annotations(image_id)],
            embedding_cached=cached,
            embed_ms=round(embed_ms, 1),
        )

    @app.post("/api/predict")
    def predict():
        start = time.perf_counter()
        data = _body()
        image_id = _image_id(data, engine)
        points = data.get("points") or []
        if not isinstance(points, list) or not all(
            isinstance(p, list) and len(p) == 3 and all(isinstance(v, (int, float)) for v in p)
            for p in points
        ):
            raise BadRequest("'points' must be a list of [x, y, label] (label 1 foreground, 0 background)")
        box = data.get("box")
        if box is not None and (
            not isinstance(box, list) or len(box) != 4 or not all(isinstance(v, (int, float)) for v in box)
        ):
            raise BadRequest("'box' must be [x0, y0, x1, y1] in image pixels, or null")
        base_id = _int(data, "base")
        base_mask = None
        if base_id is not None:
            ann = next((a for a in store.annotations(image_id) if int(a["id"]) == base_id), None)
            if ann is None:
                raise KeyError(f"image {image_id} has no mask with id {base_id}")
            base_mask = mask_utils.decode(ann["segmentation"]).astype(bool)
        coords = np.array([p[:2] for p in points], dtype=np.float64).reshape(-1, 2)
        labels = np.array([p[2] for p in points], dtype=np.int64)
        if box is not None:
            x0, y0, x1, y1 = box
            box = [min(x0, x1), min(y0, y1), max(x0, x1), max(y0, y1)]
        prediction = engine.predict(
            image_id,
            coords,
            labels,
            None if box is None else np.array(box, dtype=np.float64),
            previous=_int(data, "previous"),
            previous_candidate=_int(data, "candidate", 0) or 0,
            base_mask=base_mask,
        )
        masks = [
            {
                "rle": compressed_rle(m),
                "score": round(float(s), 4),
                "stability": round(float(t), 4),
                "area": int(m.sum()),
            }
            for m, s, t in zip(prediction.masks, prediction.scores, prediction.stability)
        ]
        return jsonify(
            prediction=prediction.id,
            model_round=prediction.model_round,
            frame=list(prediction.masks.shape[1:]),
            masks=masks,
            best=int(np.argmax(prediction.scores)),
            decode_ms=round(prediction.seconds * 1000, 2),
            server_ms=round((time.perf_counter() - start) * 1000, 2),
        )

    @app.post("/api/accept")
    def accept():
        data = _body()
        prediction_id = _int(data, "prediction")
        try:
            prediction = engine.get_prediction(prediction_id)
        except KeyError:
            return jsonify(error=f"prediction {prediction_id} is no longer kept; click again"), 409
        k = _int(data, "candidate", 0) or 0
        if not 0 <= k < len(prediction.masks):
            raise BadRequest(f"candidate must be in 0..{len(prediction.masks) - 1}, got {k}")
        mask = engine.full_mask(prediction, k)
        if not mask.any():
            raise BadRequest("the mask is empty: nothing to save")
        fields = {
            "predicted_iou": round(float(prediction.scores[k]), 6),
            "stability_score": round(float(prediction.stability[k]), 6),
            "point_coords": [[float(x), float(y)] for x, y in prediction.point_coords],
            "point_labels": [int(v) for v in prediction.point_labels],
            "prompt_box": None if prediction.box is None else [float(v) for v in prediction.box],
            "source": HUMAN,
            "model_round": prediction.model_round,
        }
        record = store.add(
            prediction.image_id,
            compressed_rle(mask),
            fields,
            pixels=engine.pixels(prediction.image_id),
            replaces=_int(data, "replaces"),
        )
        if retrainer is not None:
            retrainer.after_accept()
        return jsonify(record=record, annotation=_annotation_view(record), counts=store.counts())

    @app.post("/api/delete")
    def delete():
        data = _body()
        image_id = _image_id(data, engine)
        ann_id = _int(data, "id")
        if ann_id is None:
            raise BadRequest("'id' (the mask to delete) is required")
        store.delete(image_id, ann_id)
        return jsonify(deleted=ann_id, counts=store.counts())

    @app.get("/api/retrain")
    def retrain_status():
        return jsonify(
            model_round=engine.model_round, retrain=None if retrainer is None else retrainer.status()
        )

    @app.post("/api/retrain")
    def retrain():
        if retrainer is None:
            raise BadRequest("retraining is not configured for this session")
        started, message = retrainer.start()
        return jsonify(started=started, message=message, retrain=retrainer.status()), (
            202 if started else 409
        )

    return app
