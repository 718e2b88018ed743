"""What every `samlight fit` run gets from the CLI, whatever configs are merged: dashboards, run layout, key check.

Mixed into `SamlightCLI`. The callbacks every run should have are first-class config sections (`panels`,
`data_health`, `throughput`, `lr_monitor`) rather than entries of `trainer.callbacks`: jsonargparse replaces
lists when configs merge, so an add-on config such as configs/wandb.yaml would otherwise drop the base config's
callbacks.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lightning.pytorch.callbacks import Callback, LearningRateMonitor, ModelSummary, ProgressBar

from samlight.cli.config_check import find_unknown_keys, format_problems
from samlight.training.run_layout import SaveRunConfig

DEFAULT_ROOT_DIR = "runs"


class DashboardsCLIMixin:
    """LightningCLI mixin: always-on dashboard sections, the run directory layout, and the config key check."""

    def __init__(self, *args: Any, save_config_callback: type | None = SaveRunConfig, **kwargs: Any) -> None:
        super().__init__(*args, save_config_callback=save_config_callback, **kwargs)

    def add_arguments_to_parser(self, parser: Any) -> None:
        from samlight.callbacks.data_health import DataHealth
        from samlight.callbacks.mask_panels import MaskPanels
        from samlight.callbacks.throughput import Throughput

        super().add_arguments_to_parser(parser)
        parser.add_lightning_class_args(MaskPanels, "panels")
        parser.add_lightning_class_args(DataHealth, "data_health")
        parser.add_lightning_class_args(Throughput, "throughput")
        parser.add_lightning_class_args(LearningRateMonitor, "lr_monitor")
        parser.set_defaults(
            {"lr_monitor.logging_interval": "step", "trainer.default_root_dir": DEFAULT_ROOT_DIR}
        )

    def parse_arguments(self, parser: Any, args: Any) -> None:
        argv = list(sys.argv[1:] if args is None else args) if not isinstance(args, dict) else []
        subcommands = getattr(self, "_subcommand_parsers", {})
        if argv and argv[0] in subcommands:
            problems = find_unknown_keys(subcommands[argv[0]], argv[1:])
            if problems:
                print(format_problems(problems, f"samlight {argv[0]}"), file=sys.stderr)
                raise SystemExit(2)
        self._config_files = _config_files(argv)
        super().parse_arguments(parser, args)

    def before_instantiate_classes(self) -> None:
        super().before_instantiate_classes()
        config = self.config.get(str(self.subcommand), self.config)
        trainer = config.get("trainer")
        if trainer is not None:
            _default_logger(trainer, getattr(self, "_config_files", []))
            if config.get("ckpt_path") == "last":
                _resume_latest_version(trainer)

    def _instantiate_trainer(self, config: dict[str, Any], callbacks: list[Callback]) -> Any:
        if config.get("logger") is False:
            # LearningRateMonitor refuses to run without a logger; there is nothing to log the rate to anyway.
            callbacks = [c for c in callbacks if not isinstance(c, LearningRateMonitor)]
        configured = config.get("callbacks") or []
        configured = list(configured) if isinstance(configured, (list, tuple)) else [configured]
        # A config that also lists one of these callbacks in trainer.callbacks (say a LearningRateMonitor) keeps
        # its own; the section's copy would log the same keys twice.
        callbacks = [c for c in callbacks if not any(type(c) is type(other) for other in configured)]
        if config.get("enable_progress_bar", True) is not False and not any(
            isinstance(c, ProgressBar) for c in configured + callbacks
        ):
            from samlight.callbacks.progress import SamlightProgressBar

            callbacks = [*callbacks, SamlightProgressBar()]
        if config.get("enable_model_summary", True) is not False and not any(
            isinstance(c, ModelSummary) for c in configured + callbacks
        ):
            from samlight.callbacks.parameter_summary import ParameterSummary

            callbacks = [*callbacks, ParameterSummary()]
        if _uses_chart_logger(config.get("logger")):
            from samlight.callbacks.click_curve import ClickCurve

            callbacks = [*callbacks, ClickCurve()]
        return super()._instantiate_trainer(config, callbacks)


def _uses_chart_logger(logger: Any) -> bool:
    """W&B or TensorBoard: the loggers ClickCurve draws its mIoU-vs-clicks chart on."""
    from lightning.pytorch.loggers import TensorBoardLogger, WandbLogger

    loggers = logger if isinstance(logger, (list, tuple)) else [logger]
    return any(isinstance(lg, (WandbLogger, TensorBoardLogger)) for lg in loggers)


def _config_files(argv: Sequence[str]) -> list[str]:
    files = []
    for i, arg in enumerate(argv):
        if arg in ("-c", "--config") and i + 1 < len(argv):
            files.append(argv[i + 1])
        elif arg.startswith("--config="):
            files.append(arg.split("=", 1)[1])
    return files


def _default_logger(trainer: Any, config_files: Sequence[str]) -> None:
    """Give `trainer.logger: true` (Lightning's default) samlight's layout: `<root>/<first config's name>/version_k`.

    A W&B logger without `save_dir` saves under the run root too, so its checkpoints and panels sit beside the
    other runs instead of in the working directory.
    """
    from jsonargparse import Namespace

    root = trainer.get("default_root_dir") or DEFAULT_ROOT_DIR
    logger = trainer.get("logger")
    if logger is True or logger is None:
        name = Path(config_files[0]).stem if config_files else "samlight"
        trainer["logger"] = Namespace(
            class_path="lightning.pytorch.loggers.CSVLogger", init_args=Namespace(save_dir=root, name=name)
        )
    elif isinstance(logger, Namespace) and str(logger.get("class_path", "")).endswith("WandbLogger"):
        init_args = logger.get("init_args")
        if init_args is not None and not init_args.get("save_dir"):
            init_args["save_dir"] = root


def _resume_latest_version(trainer: Any) -> None:
    """`--ckpt_path last`: continue in the newest `version_k` that holds checkpoints, not a fresh empty one.

    Lightning looks for `last` in the checkpoint directory of the *current* logger version; a CSV or TensorBoard
    logger without an explicit version would start `version_{k+1}` and resume nothing. Runs with an explicit
    logger version (or W&B run id) are left alone.
    """
    logger = trainer.get("logger")
    class_path = str(logger.get("class_path", "")) if hasattr(logger, "get") else ""
    if not class_path.endswith(("CSVLogger", "TensorBoardLogger")):
        return
    init_args = logger.get("init_args")
    if init_args is None or init_args.get("version") is not None:
        return
    root = Path(init_args.get("save_dir") or trainer.get("default_root_dir") or DEFAULT_ROOT_DIR)
    name = init_args.get("name") or "lightning_logs"
    candidates = [
        d
        for d in (root / name).glob("version_*")
        if d.name[8:].isdigit() and any((d / "checkpoints").glob("*"))
    ]
    if candidates:
        latest = max(candidates, key=lambda d: int(d.name[8:]))
        init_args["version"] = int(latest.name[8:])
        print(f"samlight: --ckpt_path last resumes in {latest}")
