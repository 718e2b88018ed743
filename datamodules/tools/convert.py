"""`samlight data convert`: one conversion skeleton, and one small adapter per source format.

The skeleton (`run`) is written once: it asks the format's adapter for its inputs, writes the samples each input
gives into SA-1B-format shards, skips and counts (by name) every input that cannot be converted, and returns the
summary the dispatcher prints. An adapter is a `FormatAdapter` subclass named in `FORMATS`, imported only when its
format is asked for (so `--format folder` never needs nibabel or rasterio). It says which inputs there are
(`inputs`), which samples one input gives (`samples`), and what no input claimed (`finish`).
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
import time
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from samlight.datamodules.tools.shards import SA1BShardWriter

log = logging.getLogger("samlight.datamodules")

T = TypeVar("T")

# How many skipped names per reason the summary keeps (all are counted, and each is named in a log warning).
MAX_NAMES_PER_REASON = 5


@dataclass(frozen=True)
class Format:
    """One source format of `samlight data convert`.

    Attributes:
        adapter: "module:Class" of its `FormatAdapter`, imported only when the format is asked for.
        example: one command line, shown by `samlight data convert --help`.
        extra: the `samlight[extra]` that installs its readers, named when the import fails.
    """

    adapter: str
    example: str
    extra: str | None = None


_TOOLS = "samlight.datamodules.tools"
FORMATS: dict[str, Format] = {
    "folder": Format(
        f"{_TOOLS}.convert_folder:FolderAdapter",
        "samlight data convert --format folder --images data/images --labels data/masks --output shards/",
    ),
    "coco": Format(
        f"{_TOOLS}.convert_coco:CocoAdapter",
        "samlight data convert --format coco --annotations instances_train2017.json --images train2017/ "
        "--output shards/",
    ),
    "nifti": Format(
        f"{_TOOLS}.convert_medical:NiftiAdapter",
        "samlight data convert --format nifti --images imagesTr/ --labels labelsTr/ --window soft-tissue "
        "--output shards/",
        extra="medical",
    ),
    "dicom": Format(
        f"{_TOOLS}.convert_medical:DicomAdapter",
        "samlight data convert --format dicom --images series/ --labels labels/ --window lung --output shards/",
        extra="medical",
    ),
    "geotiff": Format(
        f"{_TOOLS}.convert_geotiff:GeoTiffAdapter",
        "samlight data convert --format geotiff --images scenes/ --labels labels/ --tile-size 1024 "
        "--output shards/",
        extra="satellite",
    ),
}


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

    def skip(self, reason: str, name: str, detail: str = "", *, quiet: bool = False) -> None:
        """Count one skipped input and name it in a warning (`detail` says what was wrong).

        `quiet` logs at debug level instead, for routine skips that come by the thousand (empty tiles)."""
        self.skipped[reason] = self.skipped.get(reason, 0) + 1
        names = self.skipped_names.setdefault(reason, [])
        if len(names) < MAX_NAMES_PER_REASON:
            names.append(name)
        log.log(
            logging.DEBUG if quiet else logging.WARNING,
            "skipped %s (%s)%s",
            name,
            reason,
            f": {detail}" if detail else "",
        )

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


def skipped_lines(skipped: dict[str, int], names: dict[str, list[str]]) -> list[str]:
    """The summary's lines about skipped inputs: one per reason with its count and first names."""
    lines = []
    for reason, count in sorted(skipped.items()):
        shown = names.get(reason, [])
        more = " ..." if count > len(shown) else ""
        lines.append(f"  skipped ({reason}): {count}  [{', '.join(shown)}{more}]")
    return lines or ["  skipped: none"]


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
    lines += skipped_lines(summary.skipped, summary.skipped_names)
    print("\n".join(lines), file=out)


def progress(
    items: Iterable[T], *, total: int | None = None, desc: str = "", unit: str = "img"
) -> Iterator[T]:
    """A tqdm progress bar on stderr over `items`."""
    from tqdm.auto import tqdm

    return iter(tqdm(items, total=total, desc=desc, unit=unit, dynamic_ncols=True, mininterval=0.5))


# ------------------------------------------------------------------------------------------- the skeleton


class SkipInput(Exception):
    """An input that cannot be converted (unreadable, sizes disagree, ...); `reason` is the summary's bucket.

    The skeleton counts it under the input's name, or stops the run with `--strict`. An input that is merely
    empty (no mask left) is counted with `summary.skip` instead and never stops a run."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason


@dataclass(frozen=True)
class Sample:
    """One sample for the shard writer.

    Attributes:
        key: WebDataset sample key (no dot).
        image: H x W x 3 uint8 RGB, or ready JPEG bytes (then `info` gives height and width).
        annotations: SA-1B annotation dicts.
        info: fields of the json "image" entry.
    """

    key: str
    image: np.ndarray | bytes
    annotations: list[dict[str, Any]]
    info: dict[str, Any]


class FormatAdapter(ABC):
    """What one source format adds to the skeleton. Constructed from the parsed options.

    Class attributes:
        images_help, labels_help: help of the common `--images` and `--labels` (alias `--masks`) options;
            `labels_help = None` when the format has no label files (COCO keeps its masks in the json).
        desc: label of the progress bar over the inputs.
    """

    images_help: str = "images"
    labels_help: str | None = None
    desc: str = "convert"

    @staticmethod
    @abstractmethod
    def add_arguments(parser: argparse.ArgumentParser) -> None:
        """Add the format's own options (the common ones are there already)."""

    @abstractmethod
    def inputs(self, summary: ConvertSummary) -> Sequence[tuple[str, Any]]:
        """The inputs to convert, as (name used in skip messages, whatever `samples` needs). Inputs that cannot be
        paired (an image without its label file) may be counted in `summary` here."""

    @abstractmethod
    def samples(self, item: Any, summary: ConvertSummary) -> Iterator[Sample]:
        """The samples of one input. Raise `SkipInput` when the input is unusable; count skipped parts of it
        (a slice, a tile, one mask file) and dropped masks in `summary`."""

    def finish(self, summary: ConvertSummary) -> None:  # noqa: B027 - most formats leave nothing over
        """Count what no input claimed (orphan masks, annotations of unknown images) after the last input."""


def add_common_arguments(parser: argparse.ArgumentParser, adapter: type[FormatAdapter]) -> None:
    """Options every format shares: its inputs, the shard writer's options, `--min-area` and `--strict`."""
    parser.add_argument("--images", required=True, type=Path, help=adapter.images_help)
    if adapter.labels_help is not None:
        parser.add_argument(
            "--labels", "--masks", dest="labels", required=True, type=Path,
            help=f"{adapter.labels_help} (--masks is an alias of --labels)",
        )  # fmt: skip
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
    parser.add_argument(
        "--min-area", type=int, default=1, help="drop masks smaller than this many pixels (default 1)"
    )
    parser.add_argument(
        "--strict",
        action="store_true",
        help="stop at the first input that cannot be converted instead of skipping and counting it",
    )


def run(args: argparse.Namespace) -> ConvertSummary:
    """Convert the inputs of `args.format` into shards; returns the summary (the dispatcher prints it).

    Bad options or inputs that make the whole run meaningless (a missing folder, an unknown window preset) end
    it with a message naming them, not a traceback.
    """
    start = time.perf_counter()
    summary = ConvertSummary()
    prefix = f"samlight data convert --format {args.format}"
    try:
        adapter = load_format(args.format)(args)
        inputs = adapter.inputs(summary)
        with SA1BShardWriter(
            args.output, prefix=args.prefix, max_samples=args.shard_size, max_bytes=args.max_shard_bytes
        ) as writer:
            for name, item in progress(inputs, total=len(inputs), desc=adapter.desc):
                try:
                    for sample in adapter.samples(item, summary):
                        writer.write(sample.key, sample.image, annotations=sample.annotations,
                                     image_info=sample.info, quality=args.quality)  # fmt: skip
                except SkipInput as err:
                    if args.strict:
                        raise SystemExit(f"{prefix}: {err}") from err
                    summary.skip(err.reason, name, str(err))
            adapter.finish(summary)
    except (ValueError, FileNotFoundError) as err:
        raise SystemExit(f"{prefix}: {err}") from err
    return summary.finish(writer, start)


def load_format(fmt: str) -> type[FormatAdapter]:
    """Import the adapter class of `fmt`, with an error saying what to install when that fails."""
    if fmt not in FORMATS:
        raise SystemExit(
            f"samlight data convert: unknown --format {fmt!r}; choose from {', '.join(sorted(FORMATS))}"
        )
    spec = FORMATS[fmt]
    module, _, name = spec.adapter.partition(":")
    try:
        return getattr(importlib.import_module(module), name)
    except ImportError as err:
        hint = f" (install it with: pip install 'samlight[{spec.extra}]')" if spec.extra else ""
        raise SystemExit(
            f"samlight data convert --format {fmt}: cannot import {module}: {err}{hint}"
        ) from err


def build_parser(fmt: str | None) -> argparse.ArgumentParser:
    """The `convert` parser; with `fmt` given it includes that format's own options."""
    examples = "\n".join(f"  {name:8s} {spec.example}" for name, spec in FORMATS.items())
    parser = argparse.ArgumentParser(
        prog="samlight data convert",
        description="Convert image/mask folders, COCO json, medical volumes or GeoTIFF scenes into "
        "SA-1B-format tar shards (<key>.jpg + <key>.json with COCO RLE masks).",
        epilog=f"formats, one example each (`--format F --help` lists F's options):\n{examples}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--format",
        required=True,
        choices=list(FORMATS),
        help="source format; `--format F --help` lists its options",
    )
    if fmt is not None:
        adapter = load_format(fmt)
        add_common_arguments(parser, adapter)
        adapter.add_arguments(parser)
    return parser


def main(argv: Sequence[str]) -> int:
    """Entry point of `samlight data convert`; returns the exit code (1 when nothing was written)."""
    argv = list(argv)
    # The format decides which options exist, so it is parsed first; `--help` without a format shows the choices.
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--format", choices=list(FORMATS))
    known, _ = pre.parse_known_args(argv)
    args = build_parser(known.format).parse_args(argv)
    summary = run(args)
    print_summary(summary, title=f"convert --format {args.format}")
    if summary.images_written == 0:
        print("samlight data convert: no sample was written; see the skipped inputs above", file=sys.stderr)
        return 1
    return 0
