"""Reading SA-1B shards back in the offline tools (`samlight data prepare | inspect`): the shard URLs a command
names, every sample of a shard with its defects counted, and one sample's record and image checked once."""

from __future__ import annotations

import argparse
import io
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

from samlight.datamodules.decode import SampleError, parse_record, rle_counts
from samlight.datamodules.sa1b_reader import RawSample, iter_shard
from samlight.datamodules.tools.convert import ConvertSummary
from samlight.datamodules.urls import expand_urls

# Masks covering more than this fraction of the image are dropped in training (SAM paper), so in prepare too.
MAX_AREA_FRACTION = 0.9
# Per-mask members that are read with a sample and carried over by `prepare` (rows follow the annotations).
PER_MASK_MEMBERS = ("clip.npy",)


def shard_tool_parser(command: str, description: str, *url_flags: str) -> argparse.ArgumentParser:
    """The parser of `samlight data COMMAND` with its shard URL argument (positional when no flag is given);
    `parse_shard_args` turns what the user typed into shard URLs."""
    parser = argparse.ArgumentParser(prog=f"samlight data {command}", description=description)
    names = url_flags or ("urls",)
    extra: dict[str, Any] = {"required": True, "dest": "urls"} if url_flags else {}
    parser.add_argument(
        *names,
        nargs="+",
        help="shards: paths, brace patterns (sa_{000000..000999}.tar), globs, folders, or pipe: commands",
        **extra,
    )
    return parser


def parse_shard_args(parser: argparse.ArgumentParser, argv: Sequence[str]) -> argparse.Namespace:
    """Parse `argv`; `args.urls` becomes the list of shard URLs (a folder stands for every `*.tar` inside)."""
    args = parser.parse_args(list(argv))
    patterns = [os.path.join(spec, "*.tar") if os.path.isdir(spec) else spec for spec in args.urls]
    try:
        # Empty results raise too, so a command never goes on with no shard.
        args.urls = expand_urls(patterns)
    except ValueError as err:
        raise SystemExit(f"samlight data: {err}") from err
    return args


class _SummaryCounter:
    """Adapts `ConvertSummary` to the reader's `SkipCounter` interface (`skip(reason, url, key, detail)`)."""

    def __init__(self, summary: ConvertSummary) -> None:
        self.summary = summary

    def skip(self, reason: str, url: str, key: str | None, detail: str = "", *, shared: bool = False) -> None:
        # `shared` matters only to training workers that read the same shard; one tool reads each shard once.
        self.summary.skip(reason, url if key is None else f"{url}:{key}", detail)


def iter_samples(url: str, summary: ConvertSummary) -> Iterator[RawSample]:
    """Every complete sample of one shard, whatever the member order; defects are counted in `summary`."""
    return iter_shard(url, _SummaryCounter(summary), optional=PER_MASK_MEMBERS)


@dataclass(frozen=True)
class CheckedSample:
    """A sample whose json parsed and whose JPEG has the size the json declares.

    Attributes:
        name: "shard:key", for messages.
        record: the parsed json ({"image": {...}, "annotations": [...]}).
        size: (H, W) of the image.
        pixels: H x W x 3 uint8 RGB when asked for, else None.
    """

    name: str
    record: dict[str, Any]
    size: tuple[int, int]
    pixels: np.ndarray | None


def check_sample(
    sample: RawSample, summary: ConvertSummary, *, pixels: bool = False, decode: bool = False
) -> CheckedSample | None:
    """Parse a sample's json and open its image (the header only unless `pixels` or `decode`); None when either
    is broken or their sizes differ (counted in `summary` under the sample's name)."""
    name = f"{sample.url}:{sample.key}"
    try:
        record = parse_record(sample.members["json"])
    except SampleError as err:
        summary.skip(err.reason, name, err.detail)
        return None
    try:
        with Image.open(io.BytesIO(sample.image)) as img:
            width, height = img.size  # the header is enough to know the size
            array = np.asarray(img.convert("RGB")) if pixels else None
            if decode and not pixels:
                img.load()
    except Exception as err:  # any decoder error (OSError, SyntaxError, ...): the image is unusable
        summary.skip("corrupt image", name, f"{type(err).__name__}: {err}")
        return None
    info = record.get("image") or {}
    declared = (int(info.get("height", height)), int(info.get("width", width)))
    if declared != (height, width):
        summary.skip("size mismatch", name, f"json says {declared}, JPEG is {(height, width)}")
        return None
    return CheckedSample(name, record, (height, width), array)


def mask_area(ann: Any, size: tuple[int, int]) -> int:
    """Pixel area of an annotation's RLE, validating it (parsed, not decoded) against an image of `size` (H, W).

    Raises:
        ValueError (SampleError for a size mismatch), KeyError or TypeError when the annotation holds no valid RLE
        of that size.
    """
    rle = ann["segmentation"]
    if [int(v) for v in rle["size"]] != list(size):
        raise SampleError("broken rle", f"mask size {rle['size']} differs from the image {list(size)}")
    return int(rle_counts(rle)[1::2].sum())  # odd runs are the 1s
