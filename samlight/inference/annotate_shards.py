"""`samlight data annotate`: the data engine's automatic stage, SAM's masks for a folder of images or for shards.

The work is cut into units, one per output shard (a fixed run of sorted image files, or one input shard), and
unit u goes to data worker u mod (ranks x workers): every image is annotated exactly once, on one machine or
many, with the launchers Lightning knows (`--devices`, `--num-nodes`, torchrun, SLURM). `Trainer.predict` runs the
generator; a writer callback streams each unit into `<name>.tar.tmp` and renames it when the unit is complete,
so a finished shard is never rewritten (a re-run resumes after the last one) and a killed run leaves no tar
that looks complete.

`--keep-existing` is the semi-automatic stage: shards that already hold (human) masks keep them, and only the
automatic masks that overlap none of them (mask IoU at most `--overlap-thresh`) are added. Every annotation
carries `"source"`: `"auto"` or `"human"`.
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import os
import re
import tarfile
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

log = logging.getLogger("samlight.inference.annotate")

AMG_DEFAULTS = dict(
    points_per_side=32,
    points_per_batch=64,
    pred_iou_thresh=0.88,
    stability_score_thresh=0.95,
    box_nms_thresh=0.7,
    crop_n_layers=0,
    crop_n_points_downscale_factor=1,
    min_mask_region_area=0,
)


@dataclass(frozen=True)
class Unit:
    """One output shard's worth of input: image files (folder input) or one input shard.

    Attributes:
        index: position in the plan (decides the worker); name: output tar file name.
        files: (key, path) of each image, folder input; shard: the input shard's URL, shard input.
    """

    index: int
    name: str
    files: tuple[tuple[str, str], ...] = ()
    shard: str | None = None


def plan_units(inputs: Sequence[str], images_per_shard: int) -> list[Unit]:
    """Units for `inputs`: folders (images found recursively, sorted) and/or shard URLs (braces, globs)."""
    from samlight.datamodules.tools.convert_folder import IMAGE_SUFFIXES
    from samlight.datamodules.urls import expand_urls

    files: list[Path] = []
    shards: list[str] = []
    for spec in inputs:
        path = Path(spec)
        if path.is_dir():
            files += sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        elif path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES:
            files.append(path)
        elif ".tar" in spec:
            shards += expand_urls(spec)
        else:
            raise SystemExit(f"--images {spec}: not a folder, an image file or a .tar shard URL")
    if not files and not shards:
        raise SystemExit(
            f"--images {' '.join(inputs)}: no images ({', '.join(IMAGE_SUFFIXES)}) and no shards found"
        )
    units = []
    for start in range(0, len(files), images_per_shard):
        chunk = files[start : start + images_per_shard]
        # SA-1B keys: sa_<n>, n counting images in sorted order from 1 (stable across re-runs of the same input).
        keyed = tuple((f"sa_{start + i + 1}", str(p)) for i, p in enumerate(chunk))
        units.append(Unit(index=len(units), name=f"sa-{len(units):06d}.tar", files=keyed))
    names = [Path(re.sub(r"^pipe:.*\s", "", u)).name for u in shards]
    if len(set(names)) != len(names):
        raise SystemExit("--images: two input shards share a file name; their outputs would collide")
    offset = len(units)
    units += [Unit(index=offset + i, name=n, shard=u) for i, (n, u) in enumerate(zip(names, shards))]
    return units


def _rank_world() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


class UnitDataset(IterableDataset):
    """Items of the units this rank and worker own and that have no finished output shard yet.

    Each image is one item {"unit", "key", "image" (H x W x 3 uint8), "jpeg" (bytes to store, or None),
    "info", "existing" (annotations to keep)}; a bad one is an item with "skip" = (reason, where, detail);
    every unit ends with {"unit", "end": True, "counts": {reason: n}} (skips counted while reading a shard).
    """

    def __init__(self, units: list[Unit], output: Path, keep_existing: bool) -> None:
        self.units = units
        self.output = output
        self.keep_existing = keep_existing

    def owned(self) -> list[Unit]:
        rank, world = _rank_world()
        info = get_worker_info()
        wid, nw = (info.id, info.num_workers) if info is not None else (0, 1)
        slot, slots = rank * nw + wid, world * nw
        return [u for u in self.units if u.index % slots == slot and not (self.output / u.name).exists()]

    def __iter__(self) -> Iterator[dict[str, Any]]:
        for unit in self.owned():
            if unit.shard is None:
                for key, path in unit.files:
                    yield self._file_item(unit, key, Path(path))
                yield {"unit": unit.index, "end": True, "counts": {}}
            else:
                yield from self._shard_items(unit)

    def _file_item(self, unit: Unit, key: str, path: Path) -> dict[str, Any]:
        from samlight.datamodules.tools.convert_folder import SkipInput, read_image

        try:
            image, jpeg = read_image(path)
        except SkipInput as err:
            return {"unit": unit.index, "key": key, "skip": (err.reason, str(path), str(err))}
        info = {
            "image_id": int(key.split("_")[1]),
            "source_file": str(path),
            "height": image.shape[0],
            "width": image.shape[1],
        }
        return {"unit": unit.index, "key": key, "image": image, "jpeg": jpeg, "info": info, "existing": []}

    def _shard_items(self, unit: Unit) -> Iterator[dict[str, Any]]:
        from PIL import Image

        from samlight.datamodules.sa1b_reader import SkipCounter, iter_shard

        counter = SkipCounter()
        for sample in iter_shard(unit.shard, counter):
            where = f"{unit.shard} key {sample.key!r}"
            try:
                record = json.loads(sample.members["json"])
                info = dict(record["image"])
                with Image.open(io.BytesIO(sample.image)) as img:
                    image = np.asarray(img.convert("RGB"))
                existing = list(record.get("annotations", [])) if self.keep_existing else []
            except Exception as err:  # a corrupt sample costs that sample only
                yield {"unit": unit.index, "key": sample.key, "skip": ("corrupt sample", where, repr(err))}
                continue
            for ann in existing:
                ann.setdefault("source", "human")
            yield {
                "unit": unit.index,
                "key": sample.key,
                "image": image,
                "jpeg": sample.image,
                "info": info,
                "existing": existing,
            }
        yield {"unit": unit.index, "end": True, "counts": counter.take()}


@dataclass
class AnnotateStats:
    """What one rank did; summed over ranks for the summary."""

    images: int = 0
    masks: int = 0
    kept: int = 0
    dropped_overlap: int = 0
    shards: int = 0
    skipped: Counter = field(default_factory=Counter)
    skipped_names: list[str] = field(default_factory=list)

    def add(self, other: AnnotateStats) -> None:
        self.images += other.images
        self.masks += other.masks
        self.kept += other.kept
        self.dropped_overlap += other.dropped_overlap
        self.shards += other.shards
        self.skipped.update(other.skipped)
        self.skipped_names += other.skipped_names


def _build_module(checkpoint: str, variant: str | None, amg: dict[str, Any], overlap_thresh: float):
    import lightning.pytorch as pl

    from samlight import SamAutomaticMaskGenerator, build_sam
    from samlight.modeling.checkpoint import infer_variant, load_state_dict

    class AnnotateModule(pl.LightningModule):
        """Runs the automatic mask generator on each batch of items; annotations come back as SA-1B dicts."""

        def __init__(self) -> None:
            super().__init__()
            name = variant or infer_variant(load_state_dict(checkpoint))
            if name is None:
                raise SystemExit(f"--checkpoint {checkpoint}: cannot tell the SAM variant; pass --variant")
            self.sam = build_sam(name, checkpoint=checkpoint).eval()

        def predict_step(self, batch: list[dict[str, Any]], batch_idx: int) -> list[dict[str, Any]]:
            generator = SamAutomaticMaskGenerator(self.sam, output_mode="coco_rle", **amg)
            todo = [item for item in batch if "image" in item]
            if not todo:  # only end-of-unit markers and skipped inputs
                return batch
            for item, records in zip(todo, generator.generate_batch([it["image"] for it in todo])):
                item["annotations"], item["dropped"] = _merge(item["existing"], records, overlap_thresh)
                if item["jpeg"] is not None:
                    del item["image"]  # the original JPEG bytes go into the shard; the pixels are not needed
            return batch

    return AnnotateModule()


def _merge(
    existing: list[dict[str, Any]], records: list[dict[str, Any]], overlap_thresh: float
) -> tuple[list[dict[str, Any]], int]:
    """Kept annotations, then the automatic ones overlapping none of them (IoU <= overlap_thresh); ids renumbered.

    Returns:
        annotations, number of automatic masks dropped for overlapping a kept one.
    """
    from pycocotools import mask as mask_utils

    auto = [
        {
            "segmentation": r["segmentation"],
            "bbox": [float(v) for v in r["bbox"]],
            "area": int(r["area"]),
            "predicted_iou": float(r["predicted_iou"]),
            "stability_score": float(r["stability_score"]),
            "point_coords": r["point_coords"],
            "crop_box": [float(v) for v in r["crop_box"]],
            "source": "auto",
        }
        for r in records
    ]
    dropped = 0
    if existing and auto:
        kept_rles = [_as_rle(a["segmentation"]) for a in existing]
        ious = mask_utils.iou([_as_rle(a["segmentation"]) for a in auto], kept_rles, [0] * len(kept_rles))
        free = np.asarray(ious).reshape(len(auto), len(kept_rles)).max(1) <= overlap_thresh
        dropped = int((~free).sum())
        auto = [a for a, ok in zip(auto, free) if ok]
    out = list(existing) + auto
    for i, ann in enumerate(out):
        ann["id"] = i
    return out, dropped


def _as_rle(seg: dict[str, Any]) -> dict[str, Any]:
    counts = seg["counts"]
    return {
        "size": list(seg["size"]),
        "counts": counts.encode("ascii") if isinstance(counts, str) else counts,
    }


def _writer_callback(output: Path, units: list[Unit], progress: bool):
    from lightning.pytorch.callbacks import BasePredictionWriter

    from samlight.datamodules.tools.shards import SA1BShardWriter

    class ShardWriterCallback(BasePredictionWriter):
        """Streams each unit's samples into its shard; the tar gets its final name only when the unit ends."""

        def __init__(self) -> None:
            super().__init__(write_interval="batch")
            self.stats = AnnotateStats()
            self.open: dict[int, SA1BShardWriter] = {}
            self.bar = None

        def on_predict_start(self, trainer, pl_module) -> None:
            self.start = time.perf_counter()
            if progress and trainer.is_global_zero:
                from tqdm import tqdm

                self.bar = tqdm(desc="annotate (rank 0)", unit="img")

        def write_on_batch_end(self, trainer, pl_module, prediction, batch_indices, batch, batch_idx, dl_idx):
            for item in prediction:
                self._consume(item)

        def _consume(self, item: dict[str, Any]) -> None:
            unit = units[item["unit"]]
            if item.get("end"):
                for reason, n in item["counts"].items():
                    self.stats.skipped[reason] += n
                    self.stats.skipped_names.append(f"{unit.shard}: {n} x {reason}")
                self._finish(unit)
                return
            if "skip" in item:
                reason, where, detail = item["skip"]
                log.warning("samlight data annotate: skipped (%s) %s: %s", reason, where, detail)
                self.stats.skipped[reason] += 1
                self.stats.skipped_names.append(f"{where} ({reason})")
                return
            writer = self.open.get(unit.index)
            if writer is None:
                writer = self.open[unit.index] = SA1BShardWriter(
                    output, pattern=unit.name, max_samples=1 << 62, max_bytes=1 << 62
                )
            anns = item["annotations"]
            image = item["jpeg"] if item["jpeg"] is not None else item["image"]  # JPEG bytes or RGB pixels
            writer.write(item["key"], image, annotations=anns, image_info=item["info"])
            human = sum(a.get("source") == "human" for a in anns)
            self.stats.images += 1
            self.stats.kept += human
            self.stats.masks += len(anns) - human
            self.stats.dropped_overlap += item["dropped"]
            if self.bar is not None:
                self.bar.update(1)
                self.bar.set_postfix(masks=self.stats.masks)

        def _finish(self, unit: Unit) -> None:
            writer = self.open.pop(unit.index, None)
            if writer is not None:
                writer.close()  # renames <name>.tmp -> <name>
            else:  # every image of the unit was skipped: an empty shard still records the unit as done
                tmp = output / f"{unit.name}.tmp"
                with tarfile.open(tmp, "w"):
                    pass
                os.replace(tmp, output / unit.name)
            self.stats.shards += 1

        def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
            # Close the unfinished tars without renaming them: they stay <name>.tmp and the next run redoes them.
            for writer in self.open.values():
                writer._writer.close()
            self.open.clear()

        def on_predict_end(self, trainer, pl_module) -> None:
            if self.open:  # a unit without its end marker means a data loader bug; never rename its tar
                raise RuntimeError(f"units {sorted(self.open)} did not finish; their shards stay .tmp")
            if self.bar is not None:
                self.bar.close()
            self.elapsed = time.perf_counter() - self.start
            gathered = [self.stats]
            if torch.distributed.is_available() and torch.distributed.is_initialized():
                gathered = [None] * torch.distributed.get_world_size()
                torch.distributed.all_gather_object(gathered, self.stats)
            total = AnnotateStats()
            for s in gathered:
                total.add(s)
            self.total = total

    return ShardWriterCallback()


def _as_list(batch: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Collate: the items as they are (images differ in size; the generator takes a list)."""
    return batch


def run(args: argparse.Namespace) -> int:
    import lightning.pytorch as pl

    output = Path(args.output)
    output.mkdir(parents=True, exist_ok=True)
    units = plan_units(args.images, args.images_per_shard)
    done = [u for u in units if (output / u.name).exists()]
    amg = {k: getattr(args, k) for k in AMG_DEFAULTS}
    module = _build_module(args.checkpoint, args.variant, amg, args.overlap_thresh)
    writer = _writer_callback(output, units, progress=not args.no_progress)
    trainer = pl.Trainer(
        accelerator=args.accelerator,
        devices=args.devices,
        num_nodes=args.num_nodes,
        precision=args.precision,
        callbacks=[writer],
        logger=False,
        enable_progress_bar=False,  # the writer's bar counts images, Lightning's would count batches
        enable_model_summary=False,
        enable_checkpointing=False,
        use_distributed_sampler=False,  # the dataset splits units across ranks itself
    )
    loader = DataLoader(
        UnitDataset(units, output, args.keep_existing),
        batch_size=args.batch_size,
        num_workers=args.workers,
        collate_fn=_as_list,
    )
    trainer.predict(module, loader, return_predictions=False)
    if not trainer.is_global_zero:
        return 0
    total, elapsed = writer.total, writer.elapsed
    summary = {
        "images": total.images,
        "auto_masks": total.masks,
        "masks_per_image": round(total.masks / max(total.images, 1), 2),
        "kept_masks": total.kept,
        "auto_dropped_overlap": total.dropped_overlap,
        "shards_written": total.shards,
        "shards_already_done": len(done),
        "skipped": dict(total.skipped),
        "skipped_inputs": total.skipped_names[:50],
        "images_per_s": round(total.images / elapsed, 3) if elapsed > 0 else None,
        "seconds": round(elapsed, 1),
    }
    (output / "annotate-summary.json").write_text(json.dumps(summary, indent=2))
    skipped = ", ".join(f"{n} {r}" for r, n in total.skipped.items()) or "none"
    print(
        f"samlight data annotate: {total.images} images, {total.masks} automatic masks "
        f"({summary['masks_per_image']} per image), {total.kept} kept, {total.dropped_overlap} automatic masks "
        f"dropped for overlap; {total.shards} shards written, {len(done)} already done; skipped: {skipped}; "
        f"{summary['images_per_s']} images/s -> {output}"
    )
    for name in total.skipped_names[:20]:
        print(f"  skipped: {name}")
    if total.images == 0 and total.shards > 0:
        print("samlight data annotate: error: no image could be annotated (see the skipped inputs above)")
        return 1
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="samlight data annotate",
        description="Annotate images (a folder: jpg/png/tif, 8/16-bit, gray, RGBA) or SA-1B shards with SAM's "
        "automatic mask generator; writes SA-1B shards (<name>.tar: sa_N.jpg + sa_N.json). Re-runs resume.",
    )
    p.add_argument("--checkpoint", required=True, help="official .pth, Lightning .ckpt or safetensors")
    p.add_argument("--variant", help="SAM variant (default: inferred from the checkpoint)")
    p.add_argument("--images", required=True, nargs="+", help="folders, image files or shard URLs")
    p.add_argument("--output", required=True, help="folder for the shards and annotate-summary.json")
    p.add_argument("--images-per-shard", type=int, default=100, help="folder input: images per output shard")
    amg = p.add_argument_group("automatic mask generator (the official options)")
    for name, default in AMG_DEFAULTS.items():
        amg.add_argument("--" + name.replace("_", "-"), type=type(default), default=default)
    p.add_argument(
        "--keep-existing",
        action="store_true",
        help="shard input: keep the shards' masks (source 'human') and add only automatic masks not overlapping them",
    )
    p.add_argument(
        "--overlap-thresh",
        type=float,
        default=0.5,
        help="--keep-existing: an automatic mask with IoU above this with a kept mask is dropped (default 0.5)",
    )
    p.add_argument("--batch-size", type=int, default=1, help="images per generator call")
    p.add_argument("--workers", type=int, default=2, help="data loader workers per rank (decode images)")
    p.add_argument("--accelerator", default="auto")
    p.add_argument("--devices", default="auto", help="devices per node (e.g. 2; on CPU: processes with gloo)")
    p.add_argument("--num-nodes", type=int, default=1)
    p.add_argument("--precision", default="32-true", help="e.g. bf16-mixed on GPUs")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def main(argv: Sequence[str]) -> int:
    args = build_parser().parse_args(list(argv))
    if args.devices != "auto":
        args.devices = int(args.devices) if args.devices.isdigit() else args.devices
    if args.images_per_shard < 1:
        raise SystemExit("--images-per-shard must be at least 1")
    return run(args)
