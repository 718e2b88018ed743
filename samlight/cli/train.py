"""LightningCLI for `samlight fit|validate|test|predict`.

Shared by several parts of samlight: keep edits surgical. The model section configures `SamModule`; the data
section takes any LightningDataModule by `class_path` (SA1BDataModule in the shipped configs).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from importlib import resources

from lightning.pytorch import LightningDataModule
from lightning.pytorch.cli import LightningCLI

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
    config key check; see samlight/cli/dashboards.py)."""


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
