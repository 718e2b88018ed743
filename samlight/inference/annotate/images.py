"""The image folder an annotation session works on: listing, safe lookup by id, decoding, shard keys.

Only files found by walking `--images` are ever opened: a request names an image by its id (the path relative
to the folder, as listed), and an id that is not in the listing is refused before any path is built from it.
"""

from __future__ import annotations

import hashlib
import io
import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp", ".webp")
# Decompression bombs: Pillow warns above ~89 MP and raises above twice that; refuse clearly instead.
MAX_PIXELS = 100_000_000


class ImageError(ValueError):
    """An image that cannot be annotated (unreadable, too large, not an image); the message names the file."""


@dataclass(frozen=True)
class ImageEntry:
    """One image of the folder.

    Attributes:
        id: path relative to the folder with "/" separators (what the page and the session file use).
        path: the resolved file.
        key: the SA-1B sample key of its shard (no dots, unique, stable across runs).
    """

    id: str
    path: Path
    key: str


def shard_key(image_id: str) -> str:
    """A WebDataset-safe key for `image_id`: readable stem + 10 hex digits of its hash (keys split at dots)."""
    stem = re.sub(r"[^A-Za-z0-9_-]+", "_", Path(image_id).with_suffix("").as_posix()).strip("_")[:60]
    digest = hashlib.sha1(image_id.encode("utf-8")).hexdigest()[:10]
    return f"{stem or 'image'}-{digest}"


class ImageFolder:
    """The images under `root` (recursive, sorted by id; hidden files and folders skipped).

    Raises:
        ImageError: `root` is not a folder or holds no image with a known suffix.
    """

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root).expanduser().resolve()
        if not self.root.is_dir():
            raise ImageError(f"--images {root}: not a folder")
        entries = []
        for dirpath, dirnames, filenames in os.walk(self.root):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            for name in sorted(filenames):
                if name.startswith(".") or not name.lower().endswith(IMAGE_SUFFIXES):
                    continue
                path = Path(dirpath, name)
                # A symlink pointing outside the folder would let the server read any file: skip it.
                if not path.resolve().is_relative_to(self.root):
                    continue
                image_id = path.relative_to(self.root).as_posix()
                entries.append(ImageEntry(id=image_id, path=path.resolve(), key=shard_key(image_id)))
        if not entries:
            raise ImageError(
                f"--images {root}: no images found (looked for {', '.join(IMAGE_SUFFIXES)}, recursively)"
            )
        self.entries = sorted(entries, key=lambda e: e.id)
        self._by_id = {e.id: e for e in self.entries}
        self._index = {e.id: i for i, e in enumerate(self.entries)}

    def __len__(self) -> int:
        return len(self.entries)

    def __contains__(self, image_id: object) -> bool:
        return image_id in self._by_id

    def get(self, image_id: str) -> ImageEntry:
        """The entry of a listed id; KeyError for anything else (never a path built from the request)."""
        entry = self._by_id.get(image_id)
        if entry is None:
            raise KeyError(image_id)
        return entry

    def index(self, image_id: str) -> int:
        return self._index[image_id]

    def neighbour(self, image_id: str, step: int) -> ImageEntry | None:
        """The entry `step` places after (or before) `image_id`, or None past either end."""
        i = self._index[image_id] + step
        return self.entries[i] if 0 <= i < len(self.entries) else None


def load_rgb(path: Path) -> np.ndarray:
    """Decode an image file as H x W x 3 uint8 RGB, upright (EXIF orientation applied).

    The browser shows exactly these pixels (the server sends them re-encoded), and the model sees them too,
    so a rotated phone photo cannot put clicks on the wrong pixels.

    Raises:
        ImageError naming the file when it is not a readable image or is too large.
    """
    try:
        with Image.open(path) as image:
            if image.width * image.height > MAX_PIXELS:
                raise ImageError(
                    f"{path}: {image.width} x {image.height} pixels is over the {MAX_PIXELS:,} limit; "
                    "tile or downscale it first"
                )
            upright = ImageOps.exif_transpose(image)
            return np.asarray(upright.convert("RGB"))
    except ImageError:
        raise
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise ImageError(f"{path}: not a readable image ({type(e).__name__}: {e})") from e


def jpeg_for_shard(path: Path, pixels: np.ndarray, quality: int = 95) -> bytes:
    """The image bytes stored in the shard: the original file when it is already an upright RGB JPEG
    (no re-compression), else `pixels` (H x W x 3 uint8) encoded as JPEG."""
    from samlight.datamodules.tools.shards import encode_jpeg

    if path.suffix.lower() in (".jpg", ".jpeg"):
        with Image.open(path) as image:
            upright = image.getexif().get(0x0112, 1) == 1  # EXIF orientation tag absent or "normal"
            if image.format == "JPEG" and image.mode == "RGB" and upright:
                return path.read_bytes()
    return encode_jpeg(pixels, quality=quality)


def encode_for_browser(pixels: np.ndarray) -> tuple[bytes, str]:
    """(bytes, mimetype) of the upright pixels for the page: PNG (lossless, so the page shows what the model sees)."""
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG", compress_level=1)
    return buf.getvalue(), "image/png"
