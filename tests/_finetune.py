"""The shipped fine-tuning configs as `samlight fit --print_config` resolves them, and the recipe they share."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from samlight.cli.main import main


def printed_config(name: str, capsys: pytest.CaptureFixture) -> dict[str, Any]:
    """configs/`name` as LightningCLI resolves it (defaults filled in)."""
    config = Path(__file__).resolve().parents[1] / "configs" / name
    with pytest.raises(SystemExit):
        main(["fit", "--config", str(config), "--print_config"])
    return yaml.safe_load(capsys.readouterr().out)


def assert_finetune_recipe(parsed: dict[str, Any]) -> None:
    """From the official ViT-B checkpoint, box + point prompts, the paper's loss (focal 20, dice 1, IoU 1), bf16."""
    model = parsed["model"]
    assert model["variant"] == "vit_b" and model["checkpoint"].endswith("sam_vit_b_01ec64.pth")
    assert {p["class_path"].rsplit(".", 1)[-1] for p in model["prompts"]} == {"BoxPrompt", "PointPrompt"}
    loss = model["loss"]["init_args"]
    assert (loss["focal_weight"], loss["dice_weight"], loss["iou_weight"]) == (20.0, 1.0, 1.0)
    assert parsed["trainer"]["precision"] == "bf16-mixed"
