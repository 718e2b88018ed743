"""A misspelt or unknown config key stops `samlight fit` before any work, naming the key and the nearest valid one."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import yaml

from samlight.cli.train import run_cli


def _config(tmp_path: Path, **sections) -> str:
    base = {
        "trainer": {"max_steps": 1, "accelerator": "cpu"},
        "model": {"variant": "tiny"},
        "data": {
            "class_path": "samlight.datamodules.SA1BDataModule",
            "init_args": {"train_urls": str(tmp_path / "none-{000..001}.tar"), "batch_size": 2},
        },
    }
    for key, value in sections.items():
        base[key] = {**base.get(key, {}), **value}
    path = tmp_path / f"config{len(list(tmp_path.glob('config*.yaml')))}.yaml"
    path.write_text(yaml.safe_dump(base))
    return str(path)


def _fails(args: list[str], capsys, monkeypatch, tmp_path: Path) -> str:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["samlight"])
    with pytest.raises(SystemExit) as exit_info:
        run_cli(args)
    assert exit_info.value.code == 2
    assert not (tmp_path / "runs").exists()  # nothing started: no run directory
    return capsys.readouterr().err


def test_valid_config_passes_the_check(tmp_path: Path, capsys, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["samlight"])
    with pytest.raises(SystemExit) as exit_info:
        run_cli(
            [
                "fit",
                "--config",
                _config(tmp_path),
                "--trainer.max_steps=2",
                "--panels.num_images=2",
                "--print_config",
            ]
        )
    assert exit_info.value.code in (0, None)
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["trainer"]["max_steps"] == 2
    assert printed["panels"]["num_images"] == 2  # the always-on sections exist
    assert printed["lr_monitor"]["logging_interval"] == "step"
    assert "data_health" in printed


def test_misspelt_key_in_config_file(tmp_path: Path, capsys, monkeypatch) -> None:
    config = _config(tmp_path, trainer={"max_step": 3})
    err = _fails(["fit", "--config", config], capsys, monkeypatch, tmp_path)
    assert "'trainer.max_step'" in err and "did you mean 'trainer.max_steps'" in err
    assert config in err  # says where


def test_misspelt_keys_are_all_reported(tmp_path: Path, capsys, monkeypatch) -> None:
    config = _config(
        tmp_path,
        data={"init_args": {"train_urls": "x.tar", "batch_sise": 2}},
        model={"checkpoint_round": True},
        panles={"num_images": 2},
    )
    err = _fails(["fit", "--config", config, "--trainr.max_steps=1"], capsys, monkeypatch, tmp_path)
    assert "'data.init_args.batch_sise'" in err and "'data.init_args.batch_size'" in err
    assert "'model.checkpoint_round'" in err and "'model.checkpoint_rounds'" in err
    assert "'panles'" in err and "'panels'" in err
    assert "'trainr.max_steps' (in command line)" in err and "'trainer.max_steps'" in err


def test_unknown_key_in_nested_class_section(tmp_path: Path, capsys, monkeypatch) -> None:
    callbacks = [
        {"class_path": "lightning.pytorch.callbacks.EarlyStopping", "init_args": {"monitr": "val/miou@1"}}
    ]
    config = _config(tmp_path, trainer={"callbacks": callbacks})
    err = _fails(["fit", "--config", config], capsys, monkeypatch, tmp_path)
    assert "'trainer.callbacks[0].init_args.monitr'" in err
    assert "'trainer.callbacks[0].init_args.monitor'" in err


def test_misspelt_command_line_key_of_a_class_section(tmp_path: Path, capsys, monkeypatch) -> None:
    err = _fails(["fit", "--config", _config(tmp_path), "--data.batchsize=4"], capsys, monkeypatch, tmp_path)
    assert "'data.batchsize'" in err and "'data.batch_size'" in err


def test_add_on_config_keeps_base_class_path(tmp_path: Path, capsys, monkeypatch) -> None:
    """An add-on config may set init_args without class_path; the base file's class decides what is valid."""
    base = _config(tmp_path)
    addon = tmp_path / "addon.yaml"
    addon.write_text(yaml.safe_dump({"data": {"init_args": {"batch_size": 4, "num_workrs": 0}}}))
    err = _fails(["fit", "--config", base, "--config", str(addon)], capsys, monkeypatch, tmp_path)
    assert "'data.init_args.num_workrs'" in err and "'data.init_args.num_workers'" in err
    assert "batch_size'" not in err.split("did you mean")[0]


class _Captured(Exception):
    pass


def _fit_parser():
    """The real `samlight fit` parser, captured before anything is parsed."""
    from lightning.pytorch import LightningDataModule

    from samlight.cli.train import SamlightCLI
    from samlight.training.module import SamModule

    class Capture(SamlightCLI):
        def parse_arguments(self, parser, args):
            raise _Captured(self._subcommand_parsers["fit"])

    with pytest.raises(_Captured) as captured:
        Capture(SamModule, LightningDataModule, subclass_mode_data=True, args=["fit"])
    return captured.value.args[0]


def test_every_shipped_config_passes_the_check() -> None:
    """No false alarms: each shipped config (add-ons merged after the quickstart) has only valid keys."""
    from samlight.cli.config_check import find_unknown_keys

    parser = _fit_parser()
    configs = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))
    assert configs
    quickstart = str(configs[0].parent / "quickstart.yaml")
    for config in configs:
        args = ["--config", quickstart, "--config", str(config)]
        assert find_unknown_keys(parser, args) == [], config.name


def test_configs_doc_covers_every_shipped_config() -> None:
    repo = Path(__file__).resolve().parents[1]
    doc = (repo / "docs" / "configs.md").read_text()
    for config in sorted((repo / "configs").glob("*.yaml")):
        assert f"## `configs/{config.name}`" in doc, (
            f"docs/configs.md has no section for configs/{config.name}: run python scripts/gen_configs_doc.py"
        )


def test_class_chosen_on_the_command_line(tmp_path: Path, capsys, monkeypatch) -> None:
    config = _config(tmp_path)
    args = ["fit", "--config", config, "--data=lightning.pytorch.demos.boring_classes.BoringDataModule"]
    err = _fails([*args, "--data.init_args.batch_size=2"], capsys, monkeypatch, tmp_path)
    assert "'data.init_args.batch_size'" in err  # BoringDataModule takes no batch_size
