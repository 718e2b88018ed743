"""The house: import layering (import-linter contracts), every class_path in configs/ and docs/ resolves, and
every shipped config instantiates its model, data module and trainer."""

from __future__ import annotations

import importlib
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
import check_layers  # noqa: E402

CLASS_PATH = re.compile(r"""class_path["']?\s*[:=]\s*["']?([A-Za-z_][\w.]*)""")


def _copy_tree(tmp_path: Path) -> Path:
    """The files check_layers reads (pyproject.toml and the package folders), copied so a test may edit them."""
    dest = tmp_path / "repo"
    dest.mkdir()
    (dest / "pyproject.toml").write_text((ROOT / "pyproject.toml").read_text())
    for folder in ("samlight", "prompts", "datamodules", "callbacks", "configs"):
        subprocess.run(["cp", "-r", str(ROOT / folder), str(dest / folder)], check=True)
    return dest


def test_import_layers_are_kept() -> None:
    result = check_layers.check()
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout


@pytest.mark.parametrize(
    "module,back_import",
    [
        ("samlight/modeling/sam.py", "import samlight.training.loss"),  # model -> training
        ("datamodules/collate.py", "import samlight.training.module"),  # data -> training
        ("prompts/point.py", "import samlight.inference.predictor"),  # prompts -> inference
    ],
)
def test_a_back_import_breaks_the_contracts(tmp_path: Path, module: str, back_import: str) -> None:
    repo = _copy_tree(tmp_path)
    path = repo / module
    path.write_text(path.read_text() + f"\n{back_import}  # deliberate back-import\n")
    result = check_layers.check(repo)
    assert result.returncode != 0
    assert "BROKEN" in result.stdout and back_import.split()[-1] in result.stdout


def _class_paths() -> list[tuple[str, str]]:
    found = []
    for path in sorted([*ROOT.glob("configs/*.yaml"), *ROOT.glob("docs/*.md"), ROOT / "README.md"]):
        for name in CLASS_PATH.findall(path.read_text()):
            found.append((path.relative_to(ROOT).as_posix(), name))
    return sorted(set(found))


def test_configs_and_docs_name_class_paths() -> None:
    names = {name for _, name in _class_paths()}
    # A regex that matches nothing would make the next test pass vacuously.
    assert {"samlight.training.optim.AdamWRecipe", "samlight.prompts.point.PointPrompt"} <= names


@pytest.mark.parametrize("where,name", _class_paths(), ids=lambda x: x)
def test_every_class_path_resolves(where: str, name: str) -> None:
    module, _, attr = name.rpartition(".")
    assert module, f"{where}: class_path {name!r} is not a dotted path"
    try:
        obj = getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as e:
        pytest.fail(f"{where}: class_path {name!r} does not resolve ({e})")
    assert isinstance(obj, type), f"{where}: {name} is not a class"


def _is_base(path: Path) -> bool:
    import yaml

    content = yaml.safe_load(path.read_text()) or {}
    return "data" in content or "variant" in (content.get("model") or {})


CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_config_instantiates(path: Path, tmp_path: Path, monkeypatch) -> None:
    """Model, data module and trainer are built from the config (on the meta device: vit_h allocates nothing)."""
    from lightning.pytorch import LightningDataModule

    from samlight.cli.train import SamlightCLI
    from samlight.training.module import SamModule

    monkeypatch.setattr(sys, "argv", ["samlight"])
    monkeypatch.setenv("WANDB_MODE", "offline")
    quickstart = ROOT / "configs" / "quickstart.yaml"
    configs = [path] if _is_base(path) else [quickstart, path]
    args = [a for c in configs for a in ("--config", str(c))]
    args += ["--model.checkpoint=null", f"--trainer.default_root_dir={tmp_path}"]
    with torch.device("meta"):
        cli = SamlightCLI(
            SamModule,
            LightningDataModule,
            subclass_mode_data=True,
            args=args,
            run=False,
            save_config_kwargs={"overwrite": True},
            parser_kwargs={"parser_mode": "omegaconf"},
        )
    assert isinstance(cli.model, SamModule)
    assert isinstance(cli.datamodule, LightningDataModule)
    assert cli.trainer.max_steps > 0 or cli.trainer.max_epochs
    assert type(cli.model.optimizer_recipe).__name__ == "AdamWRecipe"
