"""Every YAML in configs/ parses through the CLI (add-on configs merged after the quickstart), and the SA-1B
configs carry the paper's recipe."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import yaml

from samlight.cli.main import main

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
QUICKSTART = CONFIGS / "quickstart.yaml"


def _is_base(path: Path) -> bool:
    """A base config defines the model or the data; add-ons (strategies, loggers) only adjust a run."""
    content = yaml.safe_load(path.read_text()) or {}
    return isinstance(content, dict) and ("data" in content or "variant" in (content.get("model") or {}))


def _print_config(capsys, *configs: Path) -> dict:
    args = ["fit"]
    for config in configs:
        args += ["--config", str(config)]
    with pytest.raises(SystemExit) as exit_info:
        main([*args, "--print_config"])
    out = capsys.readouterr().out
    assert exit_info.value.code in (0, None), out
    return yaml.safe_load(out)


@pytest.fixture(autouse=True)
def _no_pytest_argv(monkeypatch):
    monkeypatch.setattr(sys, "argv", ["samlight"])


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.name)
def test_config_parses(path, capsys):
    configs = (path,) if _is_base(path) else (QUICKSTART, path)
    parsed = _print_config(capsys, *configs)
    assert parsed["model"]["variant"] in ("tiny", "vit_b", "vit_l", "vit_h")
    assert "class_path" in parsed["data"]


@pytest.mark.parametrize(
    "variant,layer_decay,drop_path", [("vit_b", 0.6, 0.6), ("vit_l", 0.8, 0.4), ("vit_h", 0.8, 0.4)]
)
def test_sa1b_configs_follow_the_paper(variant, layer_decay, drop_path, capsys):
    parsed = _print_config(capsys, CONFIGS / f"sa1b_{variant}.yaml")
    model = parsed["model"]
    assert model["optimizer"]["class_path"] == "samlight.training.optim.AdamWRecipe"
    opt = model["optimizer"]["init_args"]
    assert opt["lr"] == pytest.approx(8e-4) and opt["weight_decay"] == pytest.approx(0.1)
    assert opt["warmup_steps"] == 250 and opt["lr_milestones"] == [60000, 86666]
    assert opt["lr_gamma"] == pytest.approx(0.1) and parsed["trainer"]["max_steps"] == 90000
    assert opt["layer_decay"] == pytest.approx(layer_decay) and tuple(opt["betas"]) == (0.9, 0.999)
    assert model["model_overrides"]["drop_path_rate"] == pytest.approx(drop_path)
    assert model["clicks"]["init_args"] == {"num_clicks": 8, "mask_only_rounds": 2, "mode": "uniform"}
    assert [p["class_path"].rsplit(".", 1)[-1] for p in model["prompts"]] == ["PointPrompt", "BoxPrompt"]
    assert model["prompt_weights"] == [0.5, 0.5]
    assert model["prompts"][1]["init_args"] == {"noise_std": 0.1, "max_noise": 20.0}
    loss = model["loss"]["init_args"]
    assert (loss["focal_weight"], loss["dice_weight"], loss["iou_weight"]) == (20.0, 1.0, 1.0)
    data = parsed["data"]["init_args"]
    assert (
        data["max_masks"] == 64 and data["image_size"] == 1024 and data["max_mask_area"] == pytest.approx(0.9)
    )
    assert parsed["trainer"]["precision"] == "bf16-mixed"
