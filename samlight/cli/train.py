"""LightningCLI for `samlight fit|validate|test|predict`.

Shared by several parts of samlight: keep edits surgical. The model section configures `SamModule`; the data
section takes any LightningDataModule by `class_path` (SA1BDataModule in the shipped configs).

Every run gets, whatever configs are merged: atomic checkpoint writes (`AtomicCheckpointIO` unless a plugin or the
strategy brings its own CheckpointIO), `PreemptionCheckpoint` (a `last.ckpt` whenever the run ends; not with
`trainer.enable_checkpointing: false`), and a
`--ckpt_path last` that resumes from the newest *loadable* checkpoint (never from zero while one exists; with none
loadable it stops unless `--allow_fresh_start=true`).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from importlib import resources
from typing import Any

from lightning.pytorch import LightningDataModule
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.plugins.io import TorchCheckpointIO

from samlight.cli.dashboards import DashboardsCLIMixin


def default_config_path() -> str:
    """Path of the quickstart config shipped inside the package (the embedded default of `samlight fit`)."""
    return str(resources.files("samlight.configs") / "quickstart.yaml")


def _wants_default_config(args: Sequence[str]) -> bool:
    if not args or args[0] != "fit":
        return False
    return not any(a == "--config" or a.startswith("--config=") or a in ("-c", "-h", "--help") for a in args)


class SamlightCLI(DashboardsCLIMixin, LightningCLI):
    """LightningCLI with samlight's defaults (the mixin: panels/data_health/lr_monitor sections, run directory,
    config key check; see samlight/cli/dashboards.py), plus safe checkpoints and resume (module docstring)."""

    def _prepare_subcommand_parser(self, klass: type, subcommand: str, **kwargs: Any) -> Any:
        parser = super()._prepare_subcommand_parser(klass, subcommand, **kwargs)
        if subcommand == "fit":
            parser.add_argument(
                "--allow_fresh_start",
                type=bool,
                default=False,
                help="With --ckpt_path last: train from scratch when checkpoints exist but none can be loaded "
                "(default: stop with an error that lists them).",
            )
        return parser

    def instantiate_classes(self) -> None:
        from samlight.training.module import initial_weights_deferred

        config = self.config.get(str(self.subcommand), self.config)
        ckpt_path = config.get("ckpt_path") if self.subcommand is not None else None
        # A run restored from a checkpoint gets its weights from it: the start weights (model.checkpoint) are not
        # read. `fit` resolves "last" itself and loads them if there is nothing to restore (see `fit`).
        if ckpt_path and (self.subcommand == "fit" or ckpt_path != "last"):
            with initial_weights_deferred():
                super().instantiate_classes()
        else:
            super().instantiate_classes()

    def _instantiate_trainer(self, config: dict[str, Any], callbacks: list[Any]) -> Any:
        from samlight.callbacks.preemption import PreemptionCheckpoint
        from samlight.scale.checkpoint_io import AtomicCheckpointIO

        configured = config.get("callbacks") or []
        configured = list(configured) if isinstance(configured, (list, tuple)) else [configured]
        wants_checkpoints = config.get("enable_checkpointing", True) is not False
        if wants_checkpoints and not any(
            isinstance(c, PreemptionCheckpoint) for c in configured + list(callbacks)
        ):
            callbacks = [*callbacks, PreemptionCheckpoint()]
        trainer = super()._instantiate_trainer(config, callbacks)
        # Lightning's default CheckpointIO streams into the target file: a kill mid-write truncates last.ckpt.
        if type(trainer.strategy.checkpoint_io) is TorchCheckpointIO:
            trainer.strategy.checkpoint_io = AtomicCheckpointIO()
        return trainer

    def fit(self, model: Any, datamodule: Any = None, ckpt_path: str | None = None, **kwargs: Any) -> None:
        if ckpt_path == "last":
            from samlight.scale.resume import resolve_last_checkpoint

            config = self.config.get("fit", self.config)
            ckpt_path = resolve_last_checkpoint(
                self.trainer, allow_fresh_start=bool(config.get("allow_fresh_start"))
            )
        if ckpt_path is None and callable(getattr(model, "load_start_weights", None)):
            model.load_start_weights()  # deferred in instantiate_classes, and nothing to restore
        self.trainer.fit(model, datamodule=datamodule, ckpt_path=ckpt_path, **kwargs)


def run_cli(args: Sequence[str] | None = None) -> SamlightCLI:
    from samlight.training.module import SamModule

    args = list(sys.argv[1:] if args is None else args)
    if _wants_default_config(args):
        print(f"samlight: no --config given, using the built-in quickstart ({default_config_path()})")
        args[1:1] = ["--config", default_config_path()]
    # Hand LightningCLI `None` when the arguments are exactly the command line: it warns when given both.
    cli_args = None if args == sys.argv[1:] else args
    return SamlightCLI(
        SamModule,
        LightningDataModule,
        subclass_mode_data=True,
        args=cli_args,
        save_config_kwargs={"overwrite": True},
        parser_kwargs={"parser_mode": "omegaconf"},
    )
