"""The data engine: `samlight data annotate` (2 CPU processes, resume, crash safety, --keep-existing) and
`samlight data evaluate` (exact numbers on constructed overlaps)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils

from samlight.cli.data import main as data_main
from samlight.datamodules.tools.shards import SA1BShardWriter
from tests._shards import read_shards, stream_datamodule
from tests._trained import scene

AMG_ARGS = ["--points-per-side", "6", "--pred-iou-thresh", "0.2", "--stability-score-thresh", "0.2"]
ANN_FIELDS = {
    "id",
    "segmentation",
    "bbox",
    "area",
    "predicted_iou",
    "stability_score",
    "point_coords",
    "crop_box",
}


def _image_folder(root: Path) -> tuple[Path, list[str]]:
    """7 images of every supported kind (RGB jpg, RGBA png, gray png, 16-bit tif, tall jpg) and one corrupt file.

    Returns the folder and the expected SA-1B keys of the readable images (sorted file order)."""
    rng = np.random.default_rng(0)
    folder = root / "images"
    (folder / "sub").mkdir(parents=True)
    rgb = [scene(rng, 160)[0] for _ in range(6)]
    Image.fromarray(rgb[0]).save(folder / "a.jpg")
    Image.fromarray(np.dstack([rgb[1], np.full(rgb[1].shape[:2], 200, np.uint8)])).save(folder / "b.png")
    Image.fromarray(rgb[2].mean(2).astype(np.uint8)).save(folder / "c.png")
    Image.fromarray(rgb[3][..., 0].astype(np.uint16) * 250).save(folder / "d.tif")  # 16-bit gray
    (folder / "e.jpg").write_bytes(b"not a jpeg at all")
    Image.fromarray(rgb[4][:, :120]).save(folder / "sub" / "f.jpg")
    Image.fromarray(rgb[5]).save(folder / "sub" / "g.png")
    # Sorted paths: a.jpg b.png c.png d.tif e.jpg sub/f.jpg sub/g.png -> keys sa_1..sa_7; e.jpg (sa_5) is bad.
    return folder, ["sa_1", "sa_2", "sa_3", "sa_4", "sa_6", "sa_7"]


def _annotate_cli(*args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "samlight.cli.main", "data", "annotate", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
@pytest.mark.timeout(1200)  # two runs of two processes each; about a minute on an idle 2-core machine
def test_annotate_two_processes_covers_each_image_once_and_resumes(tmp_path, trained_tiny_checkpoint):
    folder, keys = _image_folder(tmp_path)
    out = tmp_path / "out"
    args = ["--checkpoint", str(trained_tiny_checkpoint), "--images", str(folder), "--output", str(out)]
    args += ["--images-per-shard", "2", "--devices", "2", "--accelerator", "cpu", "--workers", "1", *AMG_ARGS]
    run = _annotate_cli(*args)
    assert run.returncode == 0, run.stdout + run.stderr
    summary = json.loads((out / "annotate-summary.json").read_text())
    assert (
        summary["images"] == 6 and summary["shards_written"] == 4 and summary["skipped"] == {"unreadable": 1}
    )
    assert any("e.jpg" in name for name in summary["skipped_inputs"])
    assert "e.jpg" in run.stdout and "images/s" in run.stdout
    assert sorted(p.name for p in out.iterdir() if p.suffix == ".tar") == [
        f"sa-{i:06d}.tar" for i in range(4)
    ]
    assert not list(out.glob("*.tmp"))

    samples = read_shards(out)  # a dict by key: duplicates are counted from the tar members below
    member_keys = [
        m.split(".")[0] for p in sorted(out.glob("*.tar")) for m in _tar_names(p) if m.endswith(".json")
    ]
    assert sorted(member_keys) == sorted(keys), "every readable image exactly once across both ranks"
    assert summary["auto_masks"] == sum(len(s["json"]["annotations"]) for s in samples.values()) > 0
    for key, s in samples.items():
        info = s["json"]["image"]
        assert info["file_name"] == f"{key}.jpg" and info["image_id"] == int(key.split("_")[1])
        assert s["image"].shape == (info["height"], info["width"], 3)
        for ann in s["json"]["annotations"]:
            assert ANN_FIELDS <= ann.keys() and ann["source"] == "auto"
            assert ann["segmentation"]["size"] == [info["height"], info["width"]]
    assert samples["sa_6"]["image"].shape[:2] == (160, 120)

    # What training sees: SA1BDataModule streams the shards as they are.
    streamed = stream_datamodule(out, image_size=256)
    assert sorted(streamed) == sorted(k for k in keys if len(samples[k]["json"]["annotations"]))

    # A re-run finds every shard done and annotates nothing.
    mtimes = {p.name: p.stat().st_mtime_ns for p in out.glob("*.tar")}
    again = _annotate_cli(*args)
    assert again.returncode == 0, again.stdout + again.stderr
    resumed = json.loads((out / "annotate-summary.json").read_text())
    assert resumed["images"] == 0 and resumed["shards_already_done"] == 4
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("*.tar")} == mtimes


def _tar_names(path: Path) -> list[str]:
    import tarfile

    with tarfile.open(path) as tar:
        return tar.getnames()


def test_killed_run_leaves_only_tmp_and_rerun_completes(tmp_path, trained_tiny_checkpoint, monkeypatch):
    """A crash in the middle of a unit leaves that unit as .tmp only; the next run redoes exactly it."""
    import samlight.inference.automatic_mask_generator as amg

    folder, keys = _image_folder(tmp_path)
    out = tmp_path / "out"
    args = ["annotate", "--checkpoint", str(trained_tiny_checkpoint), "--images", str(folder)]
    args += ["--output", str(out), "--images-per-shard", "4", "--devices", "1", "--accelerator", "cpu"]
    args += ["--workers", "0", "--no-progress", *AMG_ARGS]
    real = amg.SamAutomaticMaskGenerator.generate_batch
    calls = []

    def crash_on_sixth(self, images):
        calls.append(1)
        if len(calls) == 6:
            raise RuntimeError("simulated kill")
        return real(self, images)

    monkeypatch.setattr(amg.SamAutomaticMaskGenerator, "generate_batch", crash_on_sixth)
    with pytest.raises(RuntimeError, match="simulated kill"):
        data_main(args)
    # Unit 0 (sa_1..sa_4) finished; unit 1 (sa_5 bad, sa_6 written, crash on sa_7) is only a .tmp.
    assert sorted(p.name for p in out.glob("*.tar")) == ["sa-000000.tar"]
    assert [p.name for p in out.glob("*.tmp")] == ["sa-000001.tar.tmp"]
    monkeypatch.setattr(amg.SamAutomaticMaskGenerator, "generate_batch", real)
    assert data_main(args) == 0
    summary = json.loads((out / "annotate-summary.json").read_text())
    assert summary["images"] == 2 and summary["shards_already_done"] == 1 and summary["shards_written"] == 1
    assert sorted(read_shards(out)) == sorted(keys)
    assert not list(out.glob("*.tmp"))


def test_empty_or_all_bad_input_is_an_error(tmp_path, trained_tiny_checkpoint, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    base = [
        "annotate",
        "--checkpoint",
        str(trained_tiny_checkpoint),
        "--devices",
        "1",
        "--accelerator",
        "cpu",
    ]
    base += ["--workers", "0", "--no-progress"]
    with pytest.raises(SystemExit, match="no images"):
        data_main([*base, "--images", str(empty), "--output", str(tmp_path / "o1")])
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "x.png").write_bytes(b"\x89PNG broken")
    assert data_main([*base, "--images", str(bad), "--output", str(tmp_path / "o2")]) == 1
    assert "x.png" in capsys.readouterr().out


def test_keep_existing_keeps_human_masks_and_adds_only_free_auto_masks(tmp_path, trained_tiny_checkpoint):
    rng = np.random.default_rng(3)
    src = tmp_path / "human"
    with SA1BShardWriter(src, prefix="human") as writer:
        for i in range(3):
            image, masks = scene(rng, 256)
            writer.write(f"img_{i}", image, masks=masks[:3])  # people labelled three objects of each image
    out = tmp_path / "out"
    args = ["annotate", "--checkpoint", str(trained_tiny_checkpoint), "--images", f"{src}/human-000000.tar"]
    args += ["--output", str(out), "--keep-existing", "--overlap-thresh", "0.3", "--devices", "1"]
    args += ["--accelerator", "cpu", "--workers", "0", "--no-progress", *AMG_ARGS]
    assert data_main(args) == 0
    summary = json.loads((out / "annotate-summary.json").read_text())
    human_in, annotated = read_shards(src), read_shards(out)
    assert sorted(annotated) == sorted(human_in) and (out / "human-000000.tar").exists()
    assert summary["kept_masks"] == 9 and summary["auto_dropped_overlap"] > 0 and summary["auto_masks"] > 0
    for key, s in annotated.items():
        anns = s["json"]["annotations"]
        human = [a for a in anns if a["source"] == "human"]
        auto = [a for a in anns if a["source"] == "auto"]
        assert [a["segmentation"] for a in human] == [
            a["segmentation"] for a in human_in[key]["json"]["annotations"]
        ]
        assert [a["id"] for a in anns] == list(range(len(anns)))
        if auto:
            rle = [
                {"size": a["segmentation"]["size"], "counts": a["segmentation"]["counts"].encode()}
                for a in anns
            ]
            ious = mask_utils.iou(rle[len(human) :], rle[: len(human)], [0] * len(human))
            assert np.asarray(ious).max() <= 0.3
    # Without --keep-existing the human masks are replaced by automatic ones.
    args2 = [a if a != str(out) else str(tmp_path / "out2") for a in args if a != "--keep-existing"]
    assert data_main(args2) == 0
    replaced = read_shards(tmp_path / "out2")
    assert all(a["source"] == "auto" for s in replaced.values() for a in s["json"]["annotations"])


def _box_mask(rows: slice, cols: slice, hw=(20, 20)) -> np.ndarray:
    m = np.zeros(hw, dtype=bool)
    m[rows, cols] = True
    return m


def test_evaluate_exact_numbers(tmp_path, capsys):
    """GT A, B, C; predictions: A exactly (IoU 1), B cut to 80% (0.8), C cut to 60% (0.6), D where no GT is,
    and a human mask (excluded from scoring); a second image exists in the predictions only."""
    image = np.zeros((20, 20, 3), np.uint8)
    a, b, c = (
        _box_mask(slice(0, 10), slice(0, 10)),
        _box_mask(slice(10, 20), slice(0, 10)),
        _box_mask(slice(0, 10), slice(10, 20)),
    )
    with SA1BShardWriter(tmp_path / "gt") as w:
        w.write("sa_1", image, masks=np.stack([a, b, c]))
    preds = np.stack(
        [
            a,
            _box_mask(slice(12, 20), slice(0, 10)),
            _box_mask(slice(0, 10), slice(10, 16)),
            _box_mask(slice(10, 20), slice(10, 20)),
            c,
        ]
    )
    from samlight.datamodules.tools.shards import annotations_from_masks

    anns = annotations_from_masks(preds)
    for ann, source in zip(anns, ["auto"] * 4 + ["human"]):
        ann["source"] = source
    with SA1BShardWriter(tmp_path / "pred") as w:
        w.write("sa_1", image, annotations=anns)
        w.write("sa_2", image, masks=a[None])
    report = tmp_path / "eval.json"
    assert (
        data_main(
            [
                "evaluate",
                "--pred",
                str(tmp_path / "pred"),
                "--gt",
                str(tmp_path / "gt"),
                "--json",
                str(report),
            ]
        )
        == 0
    )
    r = json.loads(report.read_text())
    assert r["images"] == 1 and r["pred_masks"] == 4 and r["gt_masks"] == 3
    assert r["recall"] == pytest.approx({"0.5": 1.0, "0.75": 2 / 3, "0.9": 1 / 3})
    assert r["precision"] == pytest.approx({"0.5": 3 / 4, "0.75": 2 / 4, "0.9": 1 / 4})
    assert r["pred_share_iou_above"] == pytest.approx({"0.9": 1 / 4, "0.75": 2 / 4})
    assert r["gt_mean_best_iou"] == pytest.approx((1 + 0.8 + 0.6) / 3)
    assert r["only_in_pred"] == ["sa_2"] and r["only_in_gt"] == []
    out = capsys.readouterr().out
    assert "recall" in out and "sa_2" in out
    # With the human mask scored too, C is matched exactly: recall@0.9 = 2/3.
    data_main(
        [
            "evaluate",
            "--pred",
            str(tmp_path / "pred"),
            "--gt",
            str(tmp_path / "gt"),
            "--all-sources",
            "--json",
            str(report),
        ]
    )
    assert json.loads(report.read_text())["recall"]["0.9"] == pytest.approx(2 / 3)
