"""Write SA-1B-format tar shards: `<key>.jpg` + `<key>.json` (COCO RLE masks), exactly Meta's layout.

Every converter (`samlight data convert|prepare`, the demo set, medical and satellite tools) writes through
`SA1BShardWriter`, so shards are the one currency between data sources and training.
"""

from __future__ import annotations

import io
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import webdataset as wds
from PIL import Image
from pycocotools import mask as mask_utils


def encode_rle(masks: np.ndarray) -> list[dict[str, Any]]:
    """Encode binary masks as COCO RLE with string counts (the SA-1B json form).

    Args:
        masks: M x H x W bool/uint8.
    Returns:
        M dicts {"size": [H, W], "counts": str}.
    """
    if masks.ndim != 3:
        raise ValueError(f"encode_rle expects M x H x W masks, got shape {masks.shape}")
    fortran = np.asfortranarray(masks.transpose(1, 2, 0).astype(np.uint8))  # H x W x M
    rles = mask_utils.encode(fortran)
    for rle in rles:
        rle["counts"] = rle["counts"].decode("ascii")
    return rles


def annotations_from_masks(masks: np.ndarray, start_id: int = 0) -> list[dict[str, Any]]:
    """SA-1B annotation dicts (segmentation RLE, area, bbox xywh, ...) for M x H x W binary masks."""
    return annotations_from_rles(encode_rle(masks), start_id=start_id)


def annotations_from_rles(
    rles: list[dict[str, Any]], start_id: int = 0, extra: list[dict[str, Any]] | None = None
) -> list[dict[str, Any]]:
    """SA-1B annotation dicts for M compressed COCO RLEs (counts as str or bytes), without decoding them.

    Args:
        rles: M dicts {"size": [H, W], "counts": str | bytes} (compressed RLE).
        start_id: id of the first annotation.
        extra: optional M dicts of fields to add to each annotation (e.g. {"category_id": 3}).
    Returns:
        M annotation dicts with string counts; area and bbox computed from the RLE.
    """
    if not rles:
        return []
    coco = [{"size": list(r["size"]), "counts": _as_bytes(r["counts"])} for r in rles]
    areas = mask_utils.area(coco)
    boxes = mask_utils.toBbox(coco)
    anns = []
    for i, (rle, area, box) in enumerate(zip(coco, areas, boxes)):
        height, width = rle["size"]
        ann = {
            "id": start_id + i,
            "segmentation": {"size": [int(height), int(width)], "counts": rle["counts"].decode("ascii")},
            "area": int(area),
            "bbox": [float(v) for v in box],
            "predicted_iou": 1.0,
            "stability_score": 1.0,
            "point_coords": [[float(box[0] + box[2] / 2), float(box[1] + box[3] / 2)]],
            "crop_box": [0.0, 0.0, float(width), float(height)],
        }
        if extra is not None:
            ann.update(extra[i])
        anns.append(ann)
    return anns


def _as_bytes(counts: str | bytes) -> bytes:
    return counts.encode("ascii") if isinstance(counts, str) else counts


def encode_jpeg(image: np.ndarray, quality: int = 90) -> bytes:
    """JPEG bytes of an H x W x 3 uint8 RGB image (simplejpeg when installed, else Pillow)."""
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"expected an H x W x 3 uint8 RGB image, got {image.shape} {image.dtype}")
    try:
        import simplejpeg

        return simplejpeg.encode_jpeg(np.ascontiguousarray(image), quality=quality, colorspace="RGB")
    except ImportError:
        buf = io.BytesIO()
        Image.fromarray(image).save(buf, format="JPEG", quality=quality)
        return buf.getvalue()


class SA1BShardWriter:
    """Write samples into `<output>/<prefix>-000000.tar`, `...-000001.tar`, ... in SA-1B format.

    Args:
        output: directory for the shards (created).
        prefix: shard file name prefix.
        max_samples: samples per shard before a new tar is started.
        max_bytes: bytes per shard before a new tar is started.
        pattern: shard file name, formatted with `prefix` and `index` (e.g. "{prefix}.tar" to write exactly one
            shard of that name, as `samlight data prepare` does to keep the input shard names).

    Use as a context manager; `write()` takes an image and either binary masks or ready annotations.
    Shards are written to a temporary name and renamed when complete, so a crash never leaves a truncated
    tar under a final name.
    """

    def __init__(
        self,
        output: str | os.PathLike,
        *,
        prefix: str = "sa",
        max_samples: int = 1000,
        max_bytes: int = 1 << 30,
        pattern: str = "{prefix}-{index:06d}.tar",
    ) -> None:
        self.output = Path(output)
        self.output.mkdir(parents=True, exist_ok=True)
        self.prefix = prefix
        self.max_samples = max_samples
        self.max_bytes = max_bytes
        self.pattern = pattern
        self.shards: list[Path] = []
        self.num_samples = 0
        self.num_masks = 0
        self._writer: wds.TarWriter | None = None
        self._tmp: Path | None = None
        self._count = 0
        self._bytes = 0

    def __enter__(self) -> SA1BShardWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _next_shard(self) -> None:
        self._finish_shard()
        final = self.output / self.pattern.format(prefix=self.prefix, index=len(self.shards))
        if final in self.shards:
            raise ValueError(
                f"shard name pattern {self.pattern!r} gives {final.name} twice; put {{index}} in it or raise "
                "max_samples/max_bytes so everything fits in one shard"
            )
        self._tmp = final.with_suffix(".tar.tmp")
        self._writer = wds.TarWriter(str(self._tmp))
        self.shards.append(final)
        self._count = 0
        self._bytes = 0

    def _finish_shard(self) -> None:
        if self._writer is not None:
            self._writer.close()
            os.replace(self._tmp, self.shards[-1])
            self._writer = None

    def write(
        self,
        key: str,
        image: np.ndarray | bytes,
        *,
        masks: np.ndarray | None = None,
        annotations: list[dict[str, Any]] | None = None,
        image_info: dict[str, Any] | None = None,
        extra: dict[str, bytes] | None = None,
        quality: int = 90,
    ) -> None:
        """Write one sample.

        Args:
            key: sample key, e.g. "sa_1" (members become `sa_1.jpg`, `sa_1.json`). Must not contain a dot.
            image: H x W x 3 uint8 RGB array, or ready JPEG bytes (then `image_info` must give width/height).
            masks: M x H x W binary masks (encoded as RLE), or
            annotations: ready SA-1B annotation dicts.
            image_info: extra fields for the json "image" entry (spacing, CRS, source file, ...).
            extra: more members, extension -> bytes (e.g. {"clip.npy": ...}).
        """
        if "." in key:
            raise ValueError(
                f"sample key {key!r} must not contain '.', WebDataset splits keys at the first dot"
            )
        if (masks is None) == (annotations is None):
            raise ValueError(f"sample {key!r}: give exactly one of masks= or annotations=")
        if isinstance(image, np.ndarray):
            height, width = image.shape[:2]
            jpeg = encode_jpeg(image, quality=quality)
        else:
            jpeg = image
            height, width = int(image_info["height"]), int(image_info["width"])
        if masks is not None:
            if masks.shape[1:] != (height, width):
                raise ValueError(
                    f"sample {key!r}: masks {masks.shape[1:]} do not match image {(height, width)}"
                )
            annotations = annotations_from_masks(masks)
        info = {"image_id": self.num_samples, "file_name": f"{key}.jpg", "height": height, "width": width}
        info.update(image_info or {})
        info["height"], info["width"] = height, width
        record = {"image": info, "annotations": annotations}
        sample = {"__key__": key, "jpg": jpeg, "json": json.dumps(record).encode()}
        for ext, data in (extra or {}).items():
            sample[ext] = data
        size = sum(len(v) for k, v in sample.items() if k != "__key__")
        if self._writer is None or self._count >= self.max_samples or self._bytes + size > self.max_bytes:
            self._next_shard()
        self._writer.write(sample)
        self._count += 1
        self._bytes += size
        self.num_samples += 1
        self.num_masks += len(annotations)

    def close(self) -> None:
        self._finish_shard()
