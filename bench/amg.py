"""Automatic mask generation time: samlight's generator vs the official `segment_anything` one, same CPU, same
weights, same settings, same output (mask counts and masks checked), measured in the same run.

The model is samlight's `tiny` SAM with a briefly trained decoder (tests/_trained.py, or --checkpoint), loaded
strictly into both implementations, so the comparison is the generator, not the network size: with vit_h on a
CPU the image encoder alone takes seconds and is the same code on both sides.

    OMP_NUM_THREADS=1 python bench/amg.py                      # 512 x 768 scene, 32 x 32 points, 4 settings
    python bench/amg.py --size 1024 1536 --repeats 3 --checkpoint tiny.pth
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from segment_anything import SamAutomaticMaskGenerator as OfficialGenerator  # noqa: E402

from samlight import SamAutomaticMaskGenerator, build_sam, save_official  # noqa: E402
from tests._official import official_sam  # noqa: E402
from tests._trained import scene, train_tiny  # noqa: E402

SETTINGS = {
    "plain": dict(crop_n_layers=0, min_mask_region_area=0),
    "cleanup": dict(crop_n_layers=0, min_mask_region_area=100),
    "crops": dict(crop_n_layers=1, min_mask_region_area=0),
    "crops+cleanup": dict(crop_n_layers=1, min_mask_region_area=100),
}


def big_scene(h: int, w: int, seed: int) -> np.ndarray:
    """An h x w image tiled from 256 px synthetic scenes (objects of the size the tiny model learnt)."""
    rng = np.random.default_rng(seed)
    rows = [np.concatenate([scene(rng)[0] for _ in range(-(-w // 256))], 1) for _ in range(-(-h // 256))]
    return np.ascontiguousarray(np.concatenate(rows, 0)[:h, :w])


def timed(generator, image: np.ndarray, repeats: int) -> tuple[float, list]:
    """Best wall time of `generator.generate(image)` over `repeats` runs, and its output."""
    best, out = float("inf"), None
    for _ in range(repeats):
        t = time.perf_counter()
        out = generator.generate(image)
        best = min(best, time.perf_counter() - t)
    return best, out


def same_output(ours: list[dict], theirs: list[dict]) -> float:
    """Lowest best-match mask IoU of the official masks against ours (1.0 = identical sets)."""
    if len(ours) != len(theirs):
        raise AssertionError(f"samlight returned {len(ours)} masks, official {len(theirs)}")
    if not theirs:
        return 1.0
    a = np.stack([r["segmentation"] for r in ours]).reshape(len(ours), -1).astype(np.float32)
    b = np.stack([r["segmentation"] for r in theirs]).reshape(len(theirs), -1).astype(np.float32)
    inter = b @ a.T
    iou = inter / np.maximum(b.sum(1)[:, None] + a.sum(1)[None] - inter, 1)
    return float(iou.max(1).min())


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--size", type=int, nargs=2, default=(512, 768), metavar=("H", "W"))
    parser.add_argument("--points-per-side", type=int, default=32)
    parser.add_argument("--pred-iou-thresh", type=float, default=0.2)
    parser.add_argument("--stability-score-thresh", type=float, default=0.2)
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--checkpoint", help="official-layout tiny weights (default: train the decoder now)")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        ckpt = args.checkpoint or save_official(train_tiny(), Path(tmp) / "tiny.pth")
        ours_model = build_sam("tiny", checkpoint=ckpt).eval().to(args.device)
        official_model = official_sam("tiny", ckpt).to(args.device)
    image = big_scene(*args.size, seed=1)
    print(
        f"image {args.size[0]} x {args.size[1]}, {args.points_per_side}^2 points, tiny SAM, device {args.device}, "
        f"torch threads {torch.get_num_threads()}, best of {args.repeats}"
    )
    print(f"{'setting':>15} {'masks':>6} {'official s':>11} {'samlight s':>11} {'ratio':>7} {'min IoU':>8}")
    for name in args.settings:
        settings = dict(
            points_per_side=args.points_per_side,
            pred_iou_thresh=args.pred_iou_thresh,
            stability_score_thresh=args.stability_score_thresh,
            **SETTINGS[name],
        )
        official = OfficialGenerator(official_model, **settings)
        ours = SamAutomaticMaskGenerator(ours_model, **settings)
        t_off, r_off = timed(official, image, args.repeats)
        t_ours, r_ours = timed(ours, image, args.repeats)
        match = same_output(r_ours, r_off)
        ratio = t_off / t_ours
        print(
            f"{name:>15} {len(r_off):>6} {t_off:>11.3f} {t_ours:>11.3f} {ratio:>6.1f}x {match:>8.4f}",
            flush=True,
        )


if __name__ == "__main__":
    main()
