"""One directory per run: `<save_dir>/<name>/<version>/` holds config.yaml, checkpoints/ and panels/.

Lightning's `ModelCheckpoint` already writes to `<save_dir>/<name>/<version>/checkpoints` for every logger (CSV:
`version_k`; W&B: the run id), but `trainer.log_dir` points elsewhere for W&B, so config.yaml and the mask panels
would land in another folder. `run_dir` reproduces the checkpoint rule, and `SaveRunConfig` writes config.yaml there.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import jsonargparse
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.cli import SaveConfigCallback
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities import rank_zero_info


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(p) for p in text.split(".")[:2] if p.isdigit())


# Keep null values in the saved config (it must reproduce the run); jsonargparse renamed the switch in 4.49.
_KEEP_NONE = {"skip_unset": False} if _version(jsonargparse.__version__) >= (4, 49) else {"skip_none": False}


def run_dir(trainer: Trainer) -> Path:
    """The run's directory (the parent of the default checkpoint directory).

    Reads the first logger's `version` lazily, so call it on rank zero only (it does not broadcast); with no
    logger it is `trainer.default_root_dir`.
    """
    if not trainer.loggers:
        return Path(trainer.default_root_dir)
    logger = trainer.loggers[0]
    save_dir = logger.save_dir if logger.save_dir is not None else trainer.default_root_dir
    version = logger.version
    version = version if isinstance(version, str) else f"version_{version}"
    return Path(save_dir) / str(logger.name) / version


class SaveRunConfig(SaveConfigCallback):
    """Write the full parsed config to `run_dir(trainer)/config.yaml` and hand it to the logger.

    The logger receives the config as hyperparameters (W&B shows it in the run's Config tab); with W&B a
    copy of config.yaml is also put into the run's files (`samlight-config.yaml`), so `wandb sync` uploads it.
    """

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if self.already_saved:
            return
        if trainer.is_global_zero:
            directory = run_dir(trainer)
            directory.mkdir(parents=True, exist_ok=True)
            path = directory / self.config_filename
            if path.exists() and not self.overwrite:
                raise RuntimeError(
                    f"{path} exists: this run directory belongs to an earlier run. Pick another logger "
                    "name/version, or delete the file."
                )
            self.parser.save(self.config, str(path), **_KEEP_NONE, overwrite=True, multifile=self.multifile)
            rank_zero_info(f"samlight: run directory {directory} (config.yaml, checkpoints/, panels/)")
            self._to_logger(trainer, path)
            self.already_saved = True
        # Every rank must agree, or a second `fit` in the same process would save on some ranks only.
        self.already_saved = trainer.strategy.broadcast(self.already_saved)

    def _to_logger(self, trainer: Trainer, path: Path) -> None:
        if trainer.logger is None:
            return
        config = json.loads(self.parser.dump(self.config, **_KEEP_NONE, format="json"))
        trainer.logger.log_hyperparams(_strip_internal(config))
        if isinstance(trainer.logger, WandbLogger):
            # Files in the run's files dir are uploaded with it (also by `wandb sync`). A copy, not `wandb.save`:
            # that links the file under its own name, and W&B writes its own config.yaml through such a link.
            shutil.copyfile(path, Path(trainer.logger.experiment.dir) / "samlight-config.yaml")


def _strip_internal(config: dict[str, Any]) -> dict[str, Any]:
    """Drop jsonargparse bookkeeping keys (`__path__`, `config`) that mean nothing on a dashboard."""
    return {k: v for k, v in config.items() if k not in ("config", "__path__")}
