"""`samlight data convert`: dispatch to one converter per source format, all writing SA-1B-format shards.

A converter is a module listed in `FORMATS`, imported only when its format is asked for (so `--format folder`
never needs nibabel or rasterio). It exposes two functions:

    add_arguments(parser: argparse.ArgumentParser, fmt: str) -> None
        add the format's own options; the dispatcher has already added the common ones
        (`--format`, `--output`, `--shard-size`, `--max-shard-bytes`, `--prefix`, `--quality`), so do not add those.
    run(args: argparse.Namespace) -> ConvertSummary
        convert; open the writer with `open_writer(args)`, count every skipped input with
        `summary.skip(reason, name)`, show a progress bar with `progress(...)`, and return the summary.

The dispatcher prints the summary (`print_summary`) and turns it into the exit code.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

from samlight.datamodules.tools.shards import SA1BShardWriter

log = logging.getLogger("samlight.datamodules")

T = TypeVar("T")

FORMATS: dict[str, str] = {
    "folder": "samlight.datamodules.tools.convert_folder",
    "coco": "samlight.datamodules.tools.convert_coco",
    "nifti": "samlight.datamodules.tools.convert_medical",
    "dicom": "samlight.datamodules.tools.convert_medical",
    "geotiff": "samlight.datamodules.tools.convert_geotiff",
}

# How many skipped names per reason the summary keeps (all are counted, and each is named in a log warning).
MAX_NAMES_PER_REASON = 5


@dataclass
class ConvertSummary:
    """What a converter did; printed at the end of every `samlight data convert|prepare` run.

    Attributes:
        images_written: samples written to the shards.
        masks_written: masks (annotations) written in total.
        skipped: reason -> number of inputs skipped for that reason (e.g. "unmatched image", "unreadable").
        skipped_names: reason -> the first few skipped input names, for the printed summary.
        masks_dropped: reason -> masks left out of written samples (e.g. "below min area", "covers >90%").
        shards: the shard files written.
        elapsed: seconds from the start of the conversion to the end.
    """

    images_written: int = 0
    masks_written: int = 0
    skipped: dict[str, int] = field(default_factory=dict)
    skipped_names: dict[str, list[str]] = field(default_factory=dict)
    masks_dropped: dict[str, int] = field(default_factory=dict)
    shards: list[Path] = field(default_factory=list)
    elapsed: float = 0.0

    def skip(self, reason: str, name: str, detail: str = "") -> None:
        """Count one skipped input and name it in a warning (`detail` says what was wrong)."""
        self.skipped[reason] = self.skipped.get(reason, 0) + 1
        names = self.skipped_names.setdefault(reason, [])
        if len(names) < MAX_NAMES_PER_REASON:
            names.append(name)
        log.warning("skipped %s (%s)%s", name, reason, f": {detail}" if detail else "")

    def drop_masks(self, reason: str, count: int) -> None:
        """Count `count` masks left out of a written sample for `reason`."""
        if count:
            self.masks_dropped[reason] = self.masks_dropped.get(reason, 0) + int(count)

    def merge(self, other: ConvertSummary) -> ConvertSummary:
        """Add another summary's counts and shards into this one (parallel workers); elapsed is not added."""
        self.images_written += other.images_written
        self.masks_written += other.masks_written
        for reason, count in other.skipped.items():
            self.skipped[reason] = self.skipped.get(reason, 0) + count
            names = self.skipped_names.setdefault(reason, [])
            names.extend(other.skipped_names.get(reason, [])[: MAX_NAMES_PER_REASON - len(names)])
        for reason, count in other.masks_dropped.items():
            self.drop_masks(reason, count)
        self.shards.extend(other.shards)
        return self

    @property
    def num_skipped(self) -> int:
        return sum(self.skipped.values())

    def finish(self, writer: SA1BShardWriter, start: float) -> ConvertSummary:
        """Fill the counts from a closed writer and the elapsed time since `start` (a `time.perf_counter()`)."""
        self.images_written = writer.num_samples
        self.masks_written = writer.num_masks
        self.shards = list(writer.shards)
        self.elapsed = time.perf_counter() - start
        return self


def print_summary(summary: ConvertSummary, *, title: str = "convert", file=None) -> None:
    """Print a short human-readable summary of a conversion."""
    out = file or sys.stdout
    rate = summary.images_written / summary.elapsed if summary.elapsed > 0 else 0.0
    lines = [
        f"samlight data {title}: {summary.images_written} images, {summary.masks_written} masks "
        f"in {len(summary.shards)} shard(s), {summary.elapsed:.1f} s ({rate:.1f} images/s)",
    ]
    if summary.shards:
        lines.append(
            f"  shards: {summary.shards[0].parent}/{{{summary.shards[0].name} .. {summary.shards[-1].name}}}"
        )
    for reason, count in sorted(summary.masks_dropped.items()):
        lines.append(f"  masks dropped ({reason}): {count}")
    for reason, count in sorted(summary.skipped.items()):
        names = ", ".join(summary.skipped_names.get(reason, []))
        more = " ..." if count > len(summary.skipped_names.get(reason, [])) else ""
        lines.append(f"  skipped ({reason}): {count}  [{names}{more}]")
    if not summary.skipped:
        lines.append("  skipped: none")
    print("\n".join(lines), file=out)


def progress(
    items: Iterable[T], *, total: int | None = None, desc: str = "", unit: str = "img"
) -> Iterator[T]:
    """A tqdm progress bar on stderr over `items`."""
    from tqdm.auto import tqdm

    return iter(tqdm(items, total=total, desc=desc, unit=unit, dynamic_ncols=True, mininterval=0.5))


def add_common_arguments(parser: argparse.ArgumentParser) -> None:
    """Options every converter shares (the shard writer's)."""
    parser.add_argument(
        "--output", required=True, type=Path, help="directory for the SA-1B-format tar shards"
    )
    parser.add_argument("--shard-size", type=int, default=1000, help="samples per shard (default 1000)")
    parser.add_argument(
        "--max-shard-bytes",
        type=int,
        default=1 << 30,
        help="bytes per shard before a new one starts (default 1 GiB)",
    )
    parser.add_argument(
        "--prefix", default="sa", help="shard file name prefix: PREFIX-000000.tar (default sa)"
    )
    parser.add_argument(
        "--quality", type=int, default=90, help="JPEG quality for re-encoded images (default 90)"
    )


def open_writer(args: argparse.Namespace) -> SA1BShardWriter:
    """The shard writer configured by the common options."""
    return SA1BShardWriter(
        args.output, prefix=args.prefix, max_samples=args.shard_size, max_bytes=args.max_shard_bytes
    )


def build_parser(fmt: str | None) -> argparse.ArgumentParser:
    """The `convert` parser; with `fmt` given it includes that format's own options."""
    parser = argparse.ArgumentParser(
        prog="samlight data convert",
        description="Convert image/mask folders, COCO json, medical volumes or GeoTIFF scenes into "
        "SA-1B-format tar shards (<key>.jpg + <key>.json with COCO RLE masks).",
    )
    parser.add_argument(
        "--format",
        required=True,
        choices=sorted(FORMATS),
        help="source format; `--format F --help` lists its options",
    )
    if fmt is not None:
        add_common_arguments(parser)
        load_format(fmt).add_arguments(parser, fmt)
    return parser


def load_format(fmt: str):
    """Import the converter module for `fmt`, with an error saying what to install when that fails."""
    if fmt not in FORMATS:
        raise SystemExit(
            f"samlight data convert: unknown --format {fmt!r}; choose from {', '.join(sorted(FORMATS))}"
        )
    try:
        return importlib.import_module(FORMATS[fmt])
    except ImportError as err:
        extra = {"nifti": "medical", "dicom": "medical", "geotiff": "satellite"}.get(fmt)
        hint = f" (install it with: pip install 'samlight[{extra}]')" if extra else ""
        raise SystemExit(
            f"samlight data convert --format {fmt}: cannot import {FORMATS[fmt]}: {err}{hint}"
        ) from err


def main(argv: Sequence[str]) -> int:
    """Entry point of `samlight data convert`; returns the exit code (1 when nothing was written)."""
    argv = list(argv)
    # The format decides which options exist, so it is parsed first; `--help` without a format shows the choices.
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--format", choices=sorted(FORMATS))
    known, _ = pre.parse_known_args(argv)
    parser = build_parser(known.format)
    args = parser.parse_args(argv)
    module = load_format(args.format)
    summary: ConvertSummary = module.run(args)
    print_summary(summary, title=f"convert --format {args.format}")
    if summary.images_written == 0:
        print("samlight data convert: no sample was written; see the skipped inputs above", file=sys.stderr)
        return 1
    return 0
