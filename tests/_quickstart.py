"""Arguments for a few-step quickstart run on a demo set of the test's own (dashboard tests share them)."""

from __future__ import annotations

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
