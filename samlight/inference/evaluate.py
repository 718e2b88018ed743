"""`samlight data evaluate`: how good are automatic masks, against ground-truth shards of the same images.

Per image, predicted and ground-truth masks are compared by mask IoU (pycocotools, on the RLEs as stored):
- recall@t / precision@t: one-to-one matching (the assignment maximising total IoU), a pair counts at threshold t
  when its IoU exceeds t; recall = matched GT / all GT, precision = matched predictions / all predictions;
- the paper's check (sec. 4, "mask quality"): the share of automatic masks whose best-matching GT mask has
  IoU above 0.9 and above 0.75;
- masks per image on both sides, and mean best IoU of each GT mask.
Images are paired by sample key; images found on one side only are counted and named.
"""

from __future__ import annotations

import argparse
import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from pycocotools import mask as mask_utils
from scipy.optimize import linear_sum_assignment

log = logging.getLogger("samlight.inference.evaluate")

THRESHOLDS = (0.5, 0.75, 0.9)


def read_annotations(spec: str, only_auto: bool = False) -> dict[str, list[dict[str, Any]]]:
    """key -> the sample's RLE segmentations, for every sample of the shards at `spec` (folder or URLs).

    Args:
        only_auto: keep only annotations marked "source": "auto" (or without a source).
    """
    from samlight.datamodules.sa1b_reader import SkipCounter, iter_shard
    from samlight.datamodules.urls import expand_urls

    path = Path(spec)
    urls = sorted(str(p) for p in path.glob("*.tar")) if path.is_dir() else expand_urls(spec)
    if not urls:
        raise SystemExit(f"{spec}: no .tar shards found")
    out: dict[str, list[dict[str, Any]]] = {}
    counter = SkipCounter()
    for url in urls:
        for sample in iter_shard(url, counter):
            try:
                anns = json.loads(sample.members["json"])["annotations"]
            except (ValueError, KeyError) as err:
                log.warning(
                    "samlight data evaluate: skipped %s key %r: unreadable json (%s)", url, sample.key, err
                )
                continue
            if only_auto:
                anns = [a for a in anns if a.get("source", "auto") == "auto"]
            if sample.key in out:
                raise SystemExit(f"{spec}: sample key {sample.key!r} appears twice (second in {url})")
            out[sample.key] = [_rle(a["segmentation"]) for a in anns]
    return out


def _rle(seg: dict[str, Any]) -> dict[str, Any]:
    counts = seg["counts"]
    if isinstance(counts, list):  # uncompressed RLE
        h, w = seg["size"]
        return mask_utils.frPyObjects(seg, h, w)
    return {
        "size": list(seg["size"]),
        "counts": counts.encode("ascii") if isinstance(counts, str) else counts,
    }


def mask_ious(pred: list[dict[str, Any]], gt: list[dict[str, Any]]) -> np.ndarray:
    """P x G mask IoU between compressed RLEs (an empty side gives an empty matrix)."""
    if not pred or not gt:
        return np.zeros((len(pred), len(gt)))
    return np.asarray(mask_utils.iou(pred, gt, [0] * len(gt)), dtype=np.float64).reshape(len(pred), len(gt))


def evaluate(pred: dict[str, list], gt: dict[str, list]) -> dict[str, Any]:
    """The metrics over the images present on both sides (see the module docstring)."""
    keys = sorted(pred.keys() & gt.keys())
    matched = {t: 0 for t in THRESHOLDS}
    n_pred = n_gt = 0
    best_pred: list[float] = []  # best IoU of each predicted mask with any GT mask
    best_gt: list[float] = []  # best IoU of each GT mask with any predicted mask
    for key in keys:
        ious = mask_ious(pred[key], gt[key])
        n_pred += ious.shape[0]
        n_gt += ious.shape[1]
        if ious.size == 0:
            best_pred += [0.0] * ious.shape[0]
            best_gt += [0.0] * ious.shape[1]
            continue
        best_pred += ious.max(1).tolist()
        best_gt += ious.max(0).tolist()
        rows, cols = linear_sum_assignment(ious, maximize=True)
        pair = ious[rows, cols]
        for t in THRESHOLDS:
            matched[t] += int((pair > t).sum())
    best_pred_a = np.asarray(best_pred)
    return {
        "images": len(keys),
        "pred_masks": n_pred,
        "gt_masks": n_gt,
        "pred_masks_per_image": n_pred / max(len(keys), 1),
        "gt_masks_per_image": n_gt / max(len(keys), 1),
        "recall": {str(t): matched[t] / n_gt if n_gt else 0.0 for t in THRESHOLDS},
        "precision": {str(t): matched[t] / n_pred if n_pred else 0.0 for t in THRESHOLDS},
        "pred_share_iou_above": {
            str(t): float((best_pred_a > t).mean()) if n_pred else 0.0 for t in (0.9, 0.75)
        },
        "gt_mean_best_iou": float(np.mean(best_gt)) if best_gt else 0.0,
        "only_in_pred": sorted(pred.keys() - gt.keys()),
        "only_in_gt": sorted(gt.keys() - pred.keys()),
    }


def format_report(r: dict[str, Any]) -> str:
    lines = [
        f"images {r['images']}: {r['pred_masks']} predicted masks ({r['pred_masks_per_image']:.1f}/image), "
        f"{r['gt_masks']} ground-truth ({r['gt_masks_per_image']:.1f}/image)",
        "IoU threshold      " + "  ".join(f"{t:>6}" for t in r["recall"]),
        "recall             " + "  ".join(f"{v:6.3f}" for v in r["recall"].values()),
        "precision          " + "  ".join(f"{v:6.3f}" for v in r["precision"].values()),
        f"automatic masks with best-match IoU > 0.9: {r['pred_share_iou_above']['0.9']:.1%}, "
        f"> 0.75: {r['pred_share_iou_above']['0.75']:.1%}; mean best IoU per GT mask {r['gt_mean_best_iou']:.3f}",
    ]
    for side in ("only_in_pred", "only_in_gt"):
        if r[side]:
            lines.append(f"{len(r[side])} images {side.replace('_', ' ')} (not compared): {r[side][:10]}")
    return "\n".join(lines)


def main(argv: Sequence[str]) -> int:
    p = argparse.ArgumentParser(
        prog="samlight data evaluate",
        description="Recall/precision of predicted (automatic) masks against ground-truth masks, both SA-1B shards.",
    )
    p.add_argument("--pred", required=True, help="shards with predicted masks (folder or URLs)")
    p.add_argument(
        "--gt", required=True, help="shards with ground-truth masks of the same images (same keys)"
    )
    p.add_argument(
        "--all-sources", action="store_true", help="also score annotations marked source 'human' in --pred"
    )
    p.add_argument("--json", help="also write the metrics to this file")
    args = p.parse_args(list(argv))
    result = evaluate(read_annotations(args.pred, only_auto=not args.all_sources), read_annotations(args.gt))
    if result["images"] == 0:
        raise SystemExit(
            f"no sample key is in both --pred {args.pred} and --gt {args.gt}; nothing to compare"
        )
    print(format_report(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 0
