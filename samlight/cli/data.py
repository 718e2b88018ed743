"""`samlight data convert|prepare|inspect|annotate|evaluate`: the data tools' command line."""

from __future__ import annotations

import importlib
import logging
import sys
from collections.abc import Sequence

from samlight.cli.commands import command_line

USAGE = """usage: samlight data <command> [options]

  convert --format folder|coco|nifti|dicom|geotiff --output DIR ...
                      turn your images and masks into SA-1B-format shards (`convert --format F --help`)
  prepare --input URLS --output DIR [--image-size 1024] [--workers N]
                      re-encode SA-1B shards at training resolution (resized image, RLE at that size, >90% masks dropped)
  inspect URLS [--overlays DIR --num 8]
                      counts, image sizes, mask statistics, broken samples, and PNG overlays
  annotate --checkpoint CKPT --images DIR_OR_URLS --output DIR [--devices N] [--keep-existing]
                      SAM's automatic masks for a folder of images or shards -> SA-1B shards (resumable)
  evaluate --pred DIR --gt DIR
                      recall/precision of automatic masks against ground truth at IoU 0.5/0.75/0.9
"""


# command -> module whose `main(argv) -> int` runs it, imported only when that command runs
COMMANDS = {
    "convert": "samlight.datamodules.tools.convert",
    "prepare": "samlight.datamodules.tools.prepare",
    "inspect": "samlight.datamodules.tools.inspect",
    "annotate": "samlight.inference.annotate_shards",
    "evaluate": "samlight.inference.evaluate",
}


def _setup_logging() -> None:
    # Warnings name each skipped input; show them once on stderr unless the caller configured logging already.
    root = logging.getLogger()
    if not root.handlers:
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")


def main(argv: Sequence[str] | None = None) -> int:
    """Dispatch `samlight data <command>`; returns the exit code."""
    args = command_line(argv, USAGE)
    if args is None:
        return 0
    command, rest = args[0], args[1:]
    if command not in COMMANDS:
        print(f"samlight data: unknown command {command!r}\n\n{USAGE}", file=sys.stderr)
        return 2
    _setup_logging()
    from tqdm.contrib.logging import logging_redirect_tqdm

    # Warnings go through tqdm.write so they do not tear the progress bar apart.
    with logging_redirect_tqdm():
        return importlib.import_module(COMMANDS[command]).main(rest)


if __name__ == "__main__":
    sys.exit(main())
