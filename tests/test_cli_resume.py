"""`--ckpt_path last` continues in the newest run directory that holds checkpoints."""

from __future__ import annotations

from jsonargparse import Namespace

from samlight.cli.dashboards import _resume_latest_version


def _trainer_config(root, version=None):
    return Namespace(
        default_root_dir=str(root),
        logger=Namespace(
            class_path="lightning.pytorch.loggers.CSVLogger",
            init_args=Namespace(save_dir=str(root), name="quickstart", version=version),
        ),
    )


def test_last_picks_newest_version_with_checkpoints(tmp_path):
    for k, has_ckpt in [(0, True), (2, True), (3, False), (10, False)]:
        d = tmp_path / "quickstart" / f"version_{k}" / "checkpoints"
        d.mkdir(parents=True)
        if has_ckpt:
            (d / "last.ckpt").write_bytes(b"x")
    trainer = _trainer_config(tmp_path)
    _resume_latest_version(trainer)
    assert trainer.logger.init_args.version == 2


def test_explicit_version_and_fresh_root_are_left_alone(tmp_path):
    trainer = _trainer_config(tmp_path, version=7)
    _resume_latest_version(trainer)
    assert trainer.logger.init_args.version == 7
    fresh = _trainer_config(tmp_path / "empty")
    _resume_latest_version(fresh)
    assert fresh.logger.init_args.version is None
