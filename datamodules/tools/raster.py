"""Raster helpers shared by the GeoTIFF converter and `samlight segment`: bands, percentile stretch, nodata, tiles.

Both directions read scenes through these functions, so a tile seen at prediction time is stretched exactly as
the training tiles were.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import numpy as np

# Percentiles are estimated on a decimated read of at most this many pixels per band, so a 10,000 px scene never
# has to sit in memory at full resolution just to find its stretch.
STRETCH_SAMPLE_PIXELS = 4_000_000


def require_rasterio() -> Any:
    try:
        import rasterio
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError("GeoTIFF support needs rasterio: pip install 'samlight[satellite]'") from err
    return rasterio


def parse_bands(value: str | list[int] | None, count: int, path: str | os.PathLike) -> list[int]:
    """`--bands 3,2,1` (1-based) -> [3, 2, 1]; default: 1,2,3 for scenes with 3+ bands, else 1.

    Raises:
        ValueError naming the file when a band is out of range or the count is not 1 or 3.
    """
    if value is None or value == "":
        return [1, 2, 3] if count >= 3 else [1]
    try:
        bands = [int(b) for b in (value if isinstance(value, list) else str(value).split(","))]
    except ValueError as err:
        raise ValueError(f"--bands {value!r}: expected 1-based band numbers such as '3,2,1'") from err
    bad = [b for b in bands if not 1 <= b <= count]
    if bad:
        raise ValueError(
            f"--bands {value!r}: band(s) {bad} out of range for {path}, which has bands 1..{count}"
        )
    if len(bands) not in (1, 3):
        raise ValueError(
            f"--bands {value!r}: give 1 band (shown as gray) or 3 bands (shown as RGB), got {len(bands)}"
        )
    return bands


@dataclass(frozen=True)
class Stretch:
    """Per-band linear stretch: raw `low[b]` -> 0 and `high[b]` -> 255 (clipped)."""

    low: tuple[float, ...]
    high: tuple[float, ...]

    def describe(self) -> dict[str, list[float]]:
        return {"low": list(self.low), "high": list(self.high)}

    @staticmethod
    def from_record(record: dict[str, list[float]]) -> Stretch:
        return Stretch(
            low=tuple(float(v) for v in record["low"]), high=tuple(float(v) for v in record["high"])
        )


def valid_mask(data: np.ndarray, nodata: float | None) -> np.ndarray:
    """H x W bool: True where every band is finite and differs from `nodata`.

    Args:
        data: bands x H x W raw values.
    """
    valid = (
        np.isfinite(data).all(axis=0)
        if np.issubdtype(data.dtype, np.floating)
        else np.ones(data.shape[1:], bool)
    )
    if nodata is not None and np.isfinite(nodata):
        valid &= (data != nodata).all(axis=0)
    return valid


def scene_stretch(src: Any, bands: list[int], percentile: tuple[float, float]) -> Stretch:
    """Per-band percentiles over the valid pixels of the whole scene (nodata and NaN excluded).

    Args:
        src: an open rasterio dataset.
    """
    scale = max(1.0, float(np.sqrt(src.width * src.height / STRETCH_SAMPLE_PIXELS)))
    shape = (len(bands), max(1, int(src.height / scale)), max(1, int(src.width / scale)))
    data = src.read(
        bands, out_shape=shape
    )  # nearest-neighbour decimation keeps raw values (no nodata blending)
    valid = valid_mask(data, src.nodata)
    if not valid.any():
        raise ValueError(f"{src.name}: every pixel of bands {bands} is nodata or NaN; nothing to stretch")
    lows, highs = [], []
    for band in data:
        low, high = np.percentile(band[valid].astype(np.float64), percentile)
        lows.append(float(low))
        highs.append(float(max(high, low + 1e-6)))
    return Stretch(low=tuple(lows), high=tuple(highs))


def stretch_to_uint8(data: np.ndarray, stretch: Stretch, valid: np.ndarray) -> np.ndarray:
    """bands x H x W raw -> H x W x 3 uint8; invalid (nodata/NaN) pixels become 0, one band is repeated to gray.

    Args:
        data: bands x H x W (1 or 3 bands).
        valid: H x W bool from `valid_mask`.
    """
    low = np.asarray(stretch.low, dtype=np.float32)[:, None, None]
    high = np.asarray(stretch.high, dtype=np.float32)[:, None, None]
    scaled = (data.astype(np.float32) - low) * (255.0 / (high - low))
    scaled = np.nan_to_num(scaled, nan=0.0, posinf=0.0, neginf=0.0)
    out = np.clip(np.rint(scaled), 0, 255).astype(np.uint8)
    out[:, ~valid] = 0
    if out.shape[0] == 1:
        out = np.repeat(out, 3, axis=0)
    return np.ascontiguousarray(out.transpose(1, 2, 0))  # H x W x 3


def tile_starts(length: int, tile: int, overlap: int) -> list[int]:
    """Start offsets of tiles of size `tile` with `overlap` covering [0, length); the last tile is shifted back
    to end at the border (so every tile is full size when the scene is at least one tile long)."""
    if tile <= overlap:
        raise ValueError(f"--tile-size {tile} must be larger than --overlap {overlap}")
    if length <= tile:
        return [0]
    stride = tile - overlap
    starts = list(range(0, length - tile, stride))
    starts.append(length - tile)
    return starts


def tile_windows(width: int, height: int, tile: int, overlap: int) -> list[tuple[int, int, int, int]]:
    """(col_off, row_off, width, height) of every tile of a width x height scene."""
    return [
        (col, row, min(tile, width), min(tile, height))
        for row in tile_starts(height, tile, overlap)
        for col in tile_starts(width, tile, overlap)
    ]


def same_grid(src: Any, other: Any) -> str | None:
    """None when two rasters share CRS, size and transform; otherwise what differs, in words."""
    problems = []
    if src.crs != other.crs:
        problems.append(f"CRS {src.crs} vs {other.crs}")
    if (src.width, src.height) != (other.width, other.height):
        problems.append(f"size {src.width}x{src.height} vs {other.width}x{other.height}")
    elif not src.transform.almost_equals(other.transform, precision=1e-3 * max(abs(src.transform.a), 1e-9)):
        problems.append(f"transform {tuple(src.transform)[:6]} vs {tuple(other.transform)[:6]}")
    return "; ".join(problems) or None
