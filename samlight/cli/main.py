"""The `samlight` command: dispatches to training (LightningCLI), export, data tools and segmentation."""

from __future__ import annotations

import sys
from collections.abc import Sequence

from samlight.cli.commands import command_line

USAGE = """usage: samlight <command> [options]

training (LightningCLI; `samlight fit --help`, `--print_config`, several --config files merge):
  fit | validate | test | predict   --config FILE [--section.key=value ...]
                                    with no --config, `fit` runs the built-in quickstart config

checkpoints:
  export --ckpt RUN.ckpt --out sam.pth     write the official segment_anything layout
         [--format pth|hf|onnx|onnx-encoder] [--quantize]   or a transformers SamModel folder, or ONNX

data (SA-1B-format tar shards):
  data convert --format folder|coco|nifti|dicom|geotiff ...
  data prepare --input URLS --output DIR --image-size 1024
  data inspect URLS

inference into source formats:
  segment --ckpt ... --input volume.nii.gz|scene.tif --prompts FILE --out FILE
"""

TRAIN_COMMANDS = ("fit", "validate", "test", "predict")


def main(argv: Sequence[str] | None = None) -> int:
    args = command_line(argv, USAGE)
    if args is None:
        return 0
    command, rest = args[0], args[1:]
    if command in TRAIN_COMMANDS:
        from samlight.cli.train import run_cli

        run_cli(args)
        return 0
    if command == "export":
        from samlight.cli.export import main as export_main

        return export_main(rest)
    if command == "data":
        from samlight.cli.data import main as data_main

        return data_main(rest)
    if command == "annotate":
        from samlight.cli.annotate import main as annotate_main

        return annotate_main(rest)
    if command == "segment":
        from samlight.inference.segment import main as segment_main

        return segment_main(rest)
    print(f"samlight: unknown command {command!r}\n\n{USAGE}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
