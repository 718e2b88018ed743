"""Helpers for tests that run the quickstart: few-step run arguments, an own demo set, the printed mIoU curve."""

from __future__ import annotations

import re
from pathlib import Path

# A few steps of the quickstart: tiny images, few masks, one validation batch at the end.
SHORT_RUN = [
    "--trainer.max_steps=2",
    "--trainer.val_check_interval=2",
    "--trainer.limit_val_batches=1",
    "--trainer.num_sanity_val_steps=0",
    "--trainer.log_every_n_steps=1",
    "--trainer.enable_progress_bar=false",
    "--trainer.accelerator=cpu",
    "--trainer.devices=1",
    "--data.init_args.batch_size=2",
    "--data.init_args.num_workers=0",
    "--data.init_args.max_masks=4",
    "--panels.num_images=2",
    "--panels.num_clicks=2",
    "--panels.max_masks_per_image=3",
]


def own_demo_shards(tmp_path: Path) -> list[str]:
    """A small demo set of this test's own (not the shared ~/.cache one, which other tests may be writing)."""
    from samlight.datamodules.demo import make_demo_shards

    train, val = make_demo_shards(tmp_path / "demo", num_train=8, num_val=4, samples_per_shard=4)
    return [f"--data.init_args.train_urls={'::'.join(train)}", f"--data.init_args.val_urls={'::'.join(val)}"]


_MIOU_LINE = re.compile(r"1-click mIoU \(point\) (?:before training|step (\d+)): ([0-9.]+)")


def printed_miou_curve(out: str) -> dict[int, float]:
    """The held-out 1-click mIoU a `samlight fit` run printed, by step (0 = before training)."""
    return {int(step or 0): float(value) for step, value in _MIOU_LINE.findall(out)}
