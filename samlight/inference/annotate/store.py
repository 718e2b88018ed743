"""Where accepted masks live: one SA-1B-format shard per annotated image, rewritten atomically on every change.

Layout of `--output`:
    shards/<key>.tar     `<key>.jpg` + `<key>.json` (SA-1B record: COCO RLE, bbox, area, point_coords, "source"),
                         streamed by `samlight fit` as they are (`data.train_urls: OUTPUT/shards/*.tar`)
    session.json         the image being annotated and the images whose masks were all deleted
    embeddings/          the image-embedding cache (see embeddings.py)
    retrain/             fine-tuning rounds (see retrain.py)

A shard is written to a temporary name, flushed to disk and renamed over the old one, so a kill at any moment
leaves either the previous or the new shard, never a torn one; the state on disk is the state.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from pathlib import Path
from typing import Any

import numpy as np

from samlight.datamodules.sa1b_reader import SkipCounter, iter_shard
from samlight.datamodules.tools.shards import SA1BShardWriter, annotations_from_rles
from samlight.datamodules.urls import expand_urls
from samlight.inference.annotate.images import ImageFolder, jpeg_for_shard

log = logging.getLogger("samlight.annotate")

HUMAN, AUTO = "human", "auto"


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write `data` to `path` through a flushed temporary file and a rename (no torn file after a kill)."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


class AnnotationStore:
    """The masks of every image of `folder`, held in memory and mirrored to `output` after each change.

    Args:
        folder: the images being annotated.
        output: the output folder (created).
        existing: shard URL specs of earlier annotations to start from (e.g. `samlight data annotate` output);
            a record is matched to an image by its `image.source_file`, else by `image.file_name`, else by key.
            Images already in `output` keep their saved state instead.
    """

    def __init__(
        self, folder: ImageFolder, output: str | os.PathLike, existing: list[str] | None = None
    ) -> None:
        self.folder = folder
        self.output = Path(output)
        self.shards_dir = self.output / "shards"
        self.shards_dir.mkdir(parents=True, exist_ok=True)
        self.session_path = self.output / "session.json"
        self._lock = threading.RLock()
        self._annotations: dict[str, list[dict[str, Any]]] = {}
        self._session = self._read_session()
        self.loaded_existing = self._load_existing(existing or [])
        self.loaded_saved = self._load_saved()
        for image_id in self._session.get("cleared", []):
            if image_id in folder and not (self.shards_dir / f"{folder.get(image_id).key}.tar").exists():
                self._annotations.pop(image_id, None)

    # ------------------------------------------------------------------------------------------- reading

    def _read_session(self) -> dict[str, Any]:
        if not self.session_path.exists():
            return {}
        try:
            return json.loads(self.session_path.read_text())
        except (OSError, ValueError) as e:
            raise ValueError(
                f"{self.session_path}: unreadable session file ({e}); delete it to start at the first image "
                "(the masks in shards/ are kept)"
            ) from e

    def _load_existing(self, specs: list[str]) -> int:
        """Read earlier records into memory (not written to `output` until the image is changed)."""
        count = 0
        by_name: dict[str, str] = {}
        for entry in self.folder.entries:
            by_name.setdefault(entry.id, entry.id)
            by_name.setdefault(Path(entry.id).name, entry.id)
            by_name.setdefault(Path(entry.id).stem, entry.id)
            by_name.setdefault(entry.key, entry.id)
        for spec in specs:
            for url in expand_urls(spec):
                for sample in iter_shard(url, SkipCounter()):
                    record = json.loads(sample.members["json"])
                    info = record.get("image", {})
                    names = [info.get("source_file"), info.get("file_name"), sample.key]
                    candidates = [c for n in names if n for c in (str(n), Path(n).name, Path(n).stem)]
                    image_id = next((by_name[c] for c in candidates if c in by_name), None)
                    if image_id is None:
                        log.warning(
                            "samlight annotate: %s key %s matches no image in %s",
                            url,
                            sample.key,
                            self.folder.root,
                        )
                        continue
                    anns = [dict(a, source=a.get("source", AUTO)) for a in record.get("annotations", [])]
                    self._check_sizes(image_id, anns, f"{url} key {sample.key}")
                    self._annotations.setdefault(image_id, []).extend(anns)
                    count += len(anns)
        return count

    def _load_saved(self) -> int:
        count = 0
        by_key = {e.key: e.id for e in self.folder.entries}
        for path in sorted(self.shards_dir.glob("*.tar")):
            image_id = by_key.get(path.stem)
            if image_id is None:
                log.warning(
                    "samlight annotate: %s belongs to no image of %s; left alone", path, self.folder.root
                )
                continue
            for sample in iter_shard(str(path), SkipCounter()):
                anns = json.loads(sample.members["json"]).get("annotations", [])
                self._annotations[image_id] = anns  # the saved state replaces anything loaded from --existing
                count += len(anns)
        return count

    def _check_sizes(self, image_id: str, anns: list[dict[str, Any]], where: str) -> None:
        sizes = {tuple(a["segmentation"]["size"]) for a in anns}
        if len(sizes) > 1:
            raise ValueError(f"{where}: masks of different sizes {sorted(sizes)} for image {image_id}")

    # ------------------------------------------------------------------------------------------- session

    @property
    def current_image(self) -> str | None:
        """The image to resume on (None when the saved one is gone from the folder)."""
        image_id = self._session.get("image")
        return image_id if image_id in self.folder else None

    def set_current_image(self, image_id: str) -> None:
        with self._lock:
            if self._session.get("image") != image_id:
                self._session["image"] = image_id
                self._write_session()

    def _write_session(self) -> None:
        atomic_write_bytes(self.session_path, json.dumps(self._session, indent=1).encode())

    # ------------------------------------------------------------------------------------------- masks

    def annotations(self, image_id: str) -> list[dict[str, Any]]:
        with self._lock:
            return [dict(a) for a in self._annotations.get(image_id, [])]

    def mask_count(self, image_id: str) -> int:
        with self._lock:
            return len(self._annotations.get(image_id, []))

    def counts(self) -> dict[str, int]:
        """Masks by source over all images, plus the number of images holding any."""
        with self._lock:
            out = {HUMAN: 0, AUTO: 0, "images": 0}
            for anns in self._annotations.values():
                out["images"] += bool(anns)
                for a in anns:
                    out[a.get("source", AUTO)] = out.get(a.get("source", AUTO), 0) + 1
            return out

    def annotated_images(self, source: str | None = None) -> list[str]:
        """Ids of the images with at least one mask (of `source`, when given), in folder order."""
        with self._lock:
            return [
                e.id
                for e in self.folder.entries
                if any(source is None or a.get("source") == source for a in self._annotations.get(e.id, []))
            ]

    def shard_path(self, image_id: str) -> Path:
        return self.shards_dir / f"{self.folder.get(image_id).key}.tar"

    def add(
        self,
        image_id: str,
        rle: dict[str, Any],
        fields: dict[str, Any],
        pixels: np.ndarray | None = None,
        replaces: int | None = None,
    ) -> dict[str, Any]:
        """Save one mask (compressed COCO RLE, string counts) with extra record fields; returns the record.

        `replaces`: id of a mask of this image that the new one corrects (it is removed in the same write).
        """
        with self._lock:
            anns = self._annotations.setdefault(image_id, [])
            self._check_sizes(image_id, [*anns, {"segmentation": rle}], f"image {image_id}")
            if replaces is not None:
                self._index_of(image_id, replaces)  # KeyError when unknown, before anything changes
            new_id = 1 + max((int(a["id"]) for a in anns), default=-1)
            record = annotations_from_rles([rle], start_id=new_id, extra=[fields])[0]
            updated = [a for a in anns if replaces is None or int(a["id"]) != replaces] + [record]
            self._commit(image_id, updated, pixels)
            return dict(record)

    def delete(self, image_id: str, ann_id: int) -> None:
        with self._lock:
            anns = self._annotations.get(image_id, [])
            self._index_of(image_id, ann_id)
            self._commit(image_id, [a for a in anns if int(a["id"]) != ann_id], None)

    def _index_of(self, image_id: str, ann_id: int) -> int:
        for i, a in enumerate(self._annotations.get(image_id, [])):
            if int(a["id"]) == ann_id:
                return i
        raise KeyError(f"image {image_id} has no mask with id {ann_id}")

    def _commit(self, image_id: str, anns: list[dict[str, Any]], pixels: np.ndarray | None) -> None:
        """Write the image's shard (or remove it when no mask is left), then update memory."""
        entry = self.folder.get(image_id)
        path = self.shard_path(image_id)
        if anns:
            if pixels is None:
                from samlight.inference.annotate.images import load_rgb

                pixels = load_rgb(entry.path)
            height, width = pixels.shape[:2]
            info = {
                "image_id": self.folder.index(image_id),
                "source_file": image_id,
                "height": height,
                "width": width,
            }
            with SA1BShardWriter(self.shards_dir, prefix=entry.key, pattern="{prefix}.tar") as writer:
                writer.write(entry.key, jpeg_for_shard(entry.path, pixels), annotations=anns, image_info=info)
            _fsync_file(path)
        elif path.exists():
            path.unlink()
        cleared = set(self._session.get("cleared", []))
        if bool(anns) == (image_id in cleared):  # the image's "all masks deleted" state changed
            cleared.symmetric_difference_update({image_id})
            self._session["cleared"] = sorted(cleared)
            self._write_session()
        self._annotations[image_id] = anns
