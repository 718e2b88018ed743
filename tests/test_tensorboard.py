"""The quickstart with configs/tensorboard.yaml writes TensorBoard event files holding the scalar metrics, the
mask panels as images and the mIoU-vs-clicks curve, read back with tensorboard's EventAccumulator."""

from __future__ import annotations

import io
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("tensorboard")
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402

from samlight.cli.train import default_config_path, run_cli  # noqa: E402
from tests._quickstart import SHORT_RUN, own_demo_shards  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_quickstart_logs_panels_and_click_curve_to_tensorboard(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(sys, "argv", ["samlight"])
    monkeypatch.chdir(tmp_path)
    run_cli(
        [
            "fit",
            "--config",
            default_config_path(),
            "--config",
            str(REPO / "configs" / "tensorboard.yaml"),
            *SHORT_RUN,
            *own_demo_shards(tmp_path),
            f"--trainer.logger.init_args.save_dir={tmp_path / 'runs'}",
        ]
    )
    run = tmp_path / "runs" / "quickstart" / "version_0"
    assert list(run.glob("events.out.tfevents.*")), f"no event file in {run}: {list(run.iterdir())}"
    events = EventAccumulator(str(run), size_guidance={"images": 0, "scalars": 0, "tensors": 0})
    events.Reload()
    tags = events.Tags()

    assert {"train/loss", "val/miou@1"} <= set(tags["scalars"]), tags["scalars"]
    # SHORT_RUN: 2 panel images, prompts point and box, one validation at step 2.
    want = {f"panels/{prompt}/image{i}" for prompt in ("point", "box") for i in (0, 1)}
    assert want <= set(tags["images"]), tags["images"]
    for tag in want:
        (image,) = events.Images(tag)
        assert image.step == 2
        sheet = np.asarray(Image.open(io.BytesIO(image.encoded_image_string)).convert("RGB"))
        # The same three-tile sheet (ground truth | first prompt | last click) as the PNG written beside it.
        prompt, name = tag.split("/")[1:]
        png = np.asarray(Image.open(run / "panels" / "step_2" / f"{prompt}_{name}.png").convert("RGB"))
        assert sheet.shape == png.shape and np.array_equal(sheet, png), tag

    curve = [t for t in tags["scalars"] if t.startswith("val/miou_vs_clicks/")]
    assert {"val/miou_vs_clicks/point/step_2", "val/miou_vs_clicks/box/step_2"} <= set(curve), curve
    # The x axis is the click count and each value the mIoU the module logged for that count.
    by_clicks = {p.step: p.value for p in events.Scalars("val/miou_vs_clicks/point/step_2")}
    assert set(by_clicks) >= {1, 2}, by_clicks
    for clicks in (1, 2):
        (logged,) = events.Scalars(f"val/point/miou@{clicks}")
        assert by_clicks[clicks] == pytest.approx(logged.value)
    # The same numbers as a table in the Text tab.
    (table,) = events.Tensors("val/miou_vs_clicks/text_summary")
    text = table.tensor_proto.string_val[0].decode()
    assert f"| point | 1 | {by_clicks[1]:.4f} |" in text, text
