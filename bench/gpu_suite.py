"""The GPU suite: SAM training speed at the paper's setting, in one command that finishes within 8 minutes.

For vit_b and vit_h at 64 masks x 11 rounds (8 corrective clicks + 2 mask-only rounds), bf16 autocast, with and
without `torch.compile` and per-block activation checkpointing, prints one table row per configuration:
images/s, MFU (model FLOPs counted by `samlight.training.flops` over the device's peak dense bf16 FLOP/s),
peak memory, and the data-wait share (time the step waited for its batch, out of the step time). Batches come
from samlight's real training data path (`decode_sa1b_sample` on SA-1B-sized JPEG + RLE bytes generated here,
S/4 targets, in DataLoader workers), so the data-wait share is that of the real decode. Then, when
`samlight.SamAutomaticMaskGenerator` exists, the automatic mask generator's time per image.

Configurations run cheapest first and each has a time budget; what does not fit in `--budget` seconds is
printed as skipped, never left half-measured.

    python bench/gpu_suite.py                 # on one GPU (budget 420 s of measurement, ~8 min in all)
    python bench/gpu_suite.py --smoke         # on CPU: tiny variant, 1 step per configuration (the CI test)
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import io
import itertools
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset

from samlight.datamodules.collate import collate_samples
from samlight.datamodules.decode import decode_sa1b_sample
from samlight.prompts.clicks import CorrectiveClicks
from samlight.training.flops import count_variant_flops, peak_bf16_flops
from samlight.training.module import SamModule


def _synthetic_inputs():
    """bench/data_throughput.py's SA-1B-like image and mask generators (one definition of the test data)."""
    path = Path(__file__).with_name("data_throughput.py")
    spec = importlib.util.spec_from_file_location("_samlight_data_throughput", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.synthetic_image, module.synthetic_rles


class DecodedStream(IterableDataset):
    """Endless training samples decoded by samlight's worker path from a few in-memory SA-1B records."""

    def __init__(self, *, samples: int, height: int, width: int, masks: int, image_size: int, max_masks: int):
        from PIL import Image

        synthetic_image, synthetic_rles = _synthetic_inputs()
        rng = np.random.default_rng(0)
        self.records = []
        for _ in range(samples):
            buf = io.BytesIO()
            Image.fromarray(synthetic_image(height, width, rng)).save(buf, format="JPEG", quality=90)
            annotations = [
                {"id": i, "area": float(r["area"]), "segmentation": {"size": r["size"], "counts": r["counts"]}}
                for i, r in enumerate(_with_area(synthetic_rles(height, width, masks, rng)))
            ]
            record = {"image": {"height": height, "width": width}, "annotations": annotations}
            self.records.append((buf.getvalue(), json.dumps(record).encode()))
        self.image_size, self.max_masks = image_size, max_masks

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        rng = np.random.default_rng(0 if info is None else info.id)
        for jpg, record in itertools.cycle(self.records):
            yield decode_sa1b_sample(jpg, record, image_size=self.image_size, max_masks=self.max_masks, rng=rng)


def _with_area(rles: list[dict]) -> list[dict]:
    from pycocotools import mask as mask_utils

    return [
        {"size": r["size"], "counts": r["counts"].decode(), "area": float(mask_utils.area(r))} for r in rles
    ]


@dataclass
class Config:
    variant: str
    compile: bool
    checkpointing: bool

    @property
    def name(self) -> str:
        return f"{self.variant} compile={'on' if self.compile else 'off'} ckpt={'on' if self.checkpointing else 'off'}"


def run_config(cfg: Config, args: argparse.Namespace, device: torch.device, loader: DataLoader) -> dict:
    """Warm up, then time `args.steps` optimizer steps; every number from this configuration's own run."""
    torch.manual_seed(0)
    clicks = CorrectiveClicks(num_clicks=args.rounds - 3, mask_only_rounds=2)  # rounds = 1 + clicks + 2
    module = SamModule(
        variant=cfg.variant,
        model_overrides={"grad_checkpointing": cfg.checkpointing, **_size_override(args)},
        clicks=clicks,
        compile=cfg.compile,
    ).to(device)
    if cfg.compile:
        module.model.image_encoder.compile()  # in place: parameter names unchanged
    optimizer = torch.optim.AdamW(module.parameters(), lr=1e-5, fused=device.type == "cuda")
    autocast = (
        torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()
    )
    batches = iter(loader)

    def step() -> tuple[float, float]:
        start = time.perf_counter()
        batch = next(batches).to(device)
        waited = time.perf_counter() - start  # the loader's queue plus the host-to-device copy
        with autocast:
            loss = module.training_step(batch, 0)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return waited, start

    for _ in range(args.warmup + (2 if cfg.compile else 0)):
        step()
    _sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    wait, start = 0.0, time.perf_counter()
    for _ in range(args.steps):
        wait += step()[0]
    _sync(device)
    elapsed = time.perf_counter() - start
    images = args.steps * args.batch_size
    flops = count_variant_flops(cfg.variant, **_size_override(args)).training_step(
        images=args.batch_size, masks=args.batch_size * args.masks, rounds=args.rounds
    )
    peak = peak_bf16_flops(device)
    achieved = flops * args.steps / elapsed
    return {
        "images_per_s": images / elapsed,
        "tflops": achieved / 1e12,
        "mfu": achieved / peak if peak else None,
        "peak_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
        "data_wait": wait / elapsed,
    }


def _size_override(args: argparse.Namespace) -> dict:
    return {"image_size": args.image_size} if args.image_size != 1024 else {}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def amg_seconds_per_image(args: argparse.Namespace, device: torch.device) -> float | str:
    """Mean `generate` time on a synthetic image, or why it was not measured."""
    try:
        from samlight import SamAutomaticMaskGenerator
    except ImportError:
        return "not measured: samlight.SamAutomaticMaskGenerator is not available in this build"
    from samlight import build_sam

    synthetic_image, _ = _synthetic_inputs()
    image = synthetic_image(args.height // 2, args.width // 2, np.random.default_rng(0))
    model = build_sam(args.variants[0], **_size_override(args)).to(device).eval()
    generator = SamAutomaticMaskGenerator(model, points_per_side=4 if args.smoke else 32)
    with torch.inference_mode():
        generator.generate(image)  # warm-up
        _sync(device)
        start = time.perf_counter()
        for _ in range(args.amg_images):
            generator.generate(image)
        _sync(device)
    return (time.perf_counter() - start) / args.amg_images


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="CPU, tiny variant, 1 step: checks the suite runs")
    parser.add_argument("--variants", nargs="+", default=["vit_b", "vit_h"])
    parser.add_argument("--masks", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=11)
    parser.add_argument("--batch-size", type=int, default=1, help="images per step (paper: 1 per GPU)")
    parser.add_argument("--image-size", type=int, default=1024)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--workers", type=int, default=max((os.cpu_count() or 2) - 2, 1))
    parser.add_argument("--budget", type=float, default=420.0, help="seconds; later configurations are skipped")
    parser.add_argument("--height", type=int, default=1500)
    parser.add_argument("--width", type=int, default=2250)
    parser.add_argument("--amg-images", type=int, default=3)
    args = parser.parse_args(argv)
    if args.smoke:
        args.variants, args.masks, args.rounds, args.image_size = ["tiny"], 4, 3, 256
        args.warmup, args.steps, args.workers, args.height, args.width, args.amg_images = 0, 1, 0, 300, 450, 1
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = torch.device("cpu" if args.smoke or not torch.cuda.is_available() else "cuda")
    if device.type == "cpu" and not args.smoke:
        print("no CUDA device: run with --smoke on CPU, or on a GPU machine", file=sys.stderr)
        return 2
    began = time.perf_counter()
    stream = DecodedStream(
        samples=4, height=args.height, width=args.width, masks=100 if not args.smoke else 8,
        image_size=args.image_size, max_masks=args.masks,
    )  # fmt: skip
    loader = DataLoader(
        stream,
        batch_size=args.batch_size,
        collate_fn=collate_samples,
        num_workers=args.workers,
        pin_memory=device.type == "cuda",
        persistent_workers=args.workers > 0,
        prefetch_factor=4 if args.workers else None,
    )
    # Cheapest first, so a tight budget still measures the baseline of each variant.
    configs = [
        Config(v, compile=c, checkpointing=a)
        for c in ((False,) if args.smoke else (False, True))  # compiling on a CPU takes minutes
        for v in args.variants
        for a in (False, True)
    ]
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU (smoke)"
    print(f"device: {name}; torch {torch.__version__}; {args.masks} masks x {args.rounds} rounds, "
          f"{args.batch_size} image(s)/step, {args.image_size} px, bf16={device.type == 'cuda'}")  # fmt: skip
    header = f"{'configuration':34s} {'img/s':>7s} {'TFLOP/s':>8s} {'MFU':>6s} {'peak GiB':>9s} {'data wait':>10s}"
    print(header)
    for cfg in configs:
        if time.perf_counter() - began > args.budget:
            print(f"{cfg.name:34s} skipped: over the {args.budget:.0f} s budget")
            continue
        try:
            row = run_config(cfg, args, device, loader)
        except torch.OutOfMemoryError:
            torch.cuda.empty_cache()
            print(f"{cfg.name:34s} out of memory")
            continue
        mfu = f"{row['mfu']:6.1%}" if row["mfu"] is not None else f"{'n/a':>6s}"
        peak = f"{row['peak_gib']:9.1f}" if row["peak_gib"] is not None else f"{'n/a':>9s}"
        print(
            f"{cfg.name:34s} {row['images_per_s']:7.2f} {row['tflops']:8.1f} {mfu} {peak} {row['data_wait']:10.1%}"
        )
        if device.type == "cuda":
            torch.cuda.empty_cache()
    amg = amg_seconds_per_image(args, device)
    print(f"AMG ({args.variants[0]}): " + (f"{amg:.3f} s per image" if isinstance(amg, float) else amg))
    print(f"suite time: {time.perf_counter() - began:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
