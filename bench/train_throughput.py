"""Training throughput and MFU of SamModule under Lightning, with and without activation checkpointing.

Runs `Trainer.fit` on synthetic batches (random rectangles as masks, fully valid, so every slot is useful work)
with the `Throughput` callback, once per configuration in the same process, and prints step time, images/s,
masks/s, TFLOP/s, MFU (known GPUs only) and peak memory, plus each configuration's step time as a ratio to the
first (the baseline: no activation checkpointing).

    python bench/train_throughput.py --variant vit_b --masks 64 --rounds 11              # 1 GPU, bf16
    python bench/train_throughput.py --variant tiny --masks 16 --rounds 3 --accelerator cpu --precision 32-true
    torchrun --nproc-per-node 8 bench/train_throughput.py --variant vit_h --strategy fsdp --devices 8
    torchrun --nproc-per-node 8 bench/train_throughput.py --variant vit_b --strategy ddp --devices 8
"""

from __future__ import annotations

import argparse
import time

import torch
from lightning.pytorch import Callback, Trainer
from torch.utils.data import DataLoader, IterableDataset

from samlight.callbacks.throughput import Throughput
from samlight.datamodules.batch import SegmentationBatch
from samlight.prompts.clicks import CorrectiveClicks
from samlight.training.module import SamModule


class SyntheticBatches(IterableDataset):
    """Endless SegmentationBatches of `images` x `masks` random rectangles at S x S (built once, on the CPU)."""

    def __init__(self, *, images: int, masks: int, size: int) -> None:
        g = torch.Generator().manual_seed(0)
        corners = torch.randint(0, size // 2, (images, masks, 2), generator=g)
        extents = torch.randint(size // 16, size // 2, (images, masks, 2), generator=g)
        ys = torch.arange(size)[None, None, :, None]
        xs = torch.arange(size)[None, None, None, :]
        y0, x0 = corners[..., 0, None, None], corners[..., 1, None, None]
        y1, x1 = y0 + extents[..., 0, None, None], x0 + extents[..., 1, None, None]
        self.batch = SegmentationBatch(
            images=torch.randn(images, 3, size, size, generator=g),
            masks=(ys >= y0) & (ys < y1) & (xs >= x0) & (xs < x1),  # B x M x S x S
            mask_valid=torch.ones(images, masks, dtype=torch.bool),
            original_sizes=torch.full((images, 2), size),
            input_sizes=torch.full((images, 2), size),
        )

    def __iter__(self):
        while True:
            yield self.batch


def measure(args: argparse.Namespace, *, activation_checkpointing: bool) -> dict[str, float]:
    clicks = CorrectiveClicks(num_clicks=max(args.rounds - 3, 0), mask_only_rounds=min(2, args.rounds - 1))
    # timm's per-block checkpointing: the same switch as fsdp_options.activation_checkpointing under FSDP.
    overrides = {"grad_checkpointing": activation_checkpointing}
    module = SamModule(variant=args.variant, model_overrides=overrides, clicks=clicks)
    strategy = {"fsdp": "samlight.scale.strategy.FSDP2Strategy", "ddp": "ddp"}.get(args.strategy, "auto")
    if strategy == "samlight.scale.strategy.FSDP2Strategy":
        from samlight.scale.strategy import FSDP2Strategy

        strategy = FSDP2Strategy(save_distributed_checkpoint=True)
    throughput = Throughput(log_every_n_steps=args.steps - args.warmup)
    trainer = Trainer(
        accelerator=args.accelerator,
        devices=args.devices,
        strategy=strategy,
        precision=args.precision,
        max_steps=args.steps,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[_WarmupReset(args.warmup, throughput), throughput],
    )
    data = DataLoader(
        SyntheticBatches(images=args.images, masks=args.masks, size=module.model.image_size), batch_size=None
    )
    trainer.fit(module, train_dataloaders=data)
    return throughput.metrics


class _WarmupReset(Callback):
    """Restarts the measured window after `warmup` steps (first steps include allocator and autotuning warm-up)."""

    def __init__(self, warmup: int, target: Throughput) -> None:
        self.warmup, self.target = warmup, target

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.warmup:
            if pl_module.device.type == "cuda":
                torch.cuda.synchronize(pl_module.device)
                torch.cuda.reset_peak_memory_stats(pl_module.device)
            self.target._reset_window()
            self.target._last_logged_step = self.warmup


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--variant", default="vit_b")
    parser.add_argument("--images", type=int, default=1, help="images per device per step")
    parser.add_argument("--masks", type=int, default=64, help="masks per image")
    parser.add_argument(
        "--rounds", type=int, default=11, help="decoder rounds (paper: 1 + 8 clicks + 2 = 11)"
    )
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--warmup", type=int, default=4)
    parser.add_argument("--accelerator", default="auto")
    parser.add_argument("--devices", type=int, default=1)
    parser.add_argument("--strategy", choices=["single", "ddp", "fsdp"], default="single")
    parser.add_argument("--precision", default="bf16-mixed")
    parser.add_argument(
        "--no-ac-baseline-only", action="store_true", help="skip the activation-checkpointing run"
    )
    args = parser.parse_args()
    if args.steps <= args.warmup:
        parser.error("--steps must exceed --warmup")
    device = (
        torch.cuda.get_device_name() if torch.cuda.is_available() and args.accelerator != "cpu" else "CPU"
    )
    print(f"# {args.variant}, {args.images} image(s) x {args.masks} masks x {args.rounds} rounds, {args.strategy}, "
          f"{args.precision}, device: {device}, torch {torch.__version__}")  # fmt: skip
    results = []
    for ac in (False, True)[: 1 if args.no_ac_baseline_only else 2]:
        start = time.perf_counter()
        metrics = measure(args, activation_checkpointing=ac)
        results.append((ac, metrics))
        print(f"  (run took {time.perf_counter() - start:.0f} s)")
    base = results[0][1]["throughput/step_time_s"]
    print(
        "| activation ckpt | step time (s) | ratio vs baseline | images/s | masks/s | TFLOP/s/device | MFU | peak mem (GiB) |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for ac, m in results:
        mem = m.get("throughput/peak_memory_gib", m.get("throughput/peak_rss_gib", float("nan")))
        mfu = f"{m['throughput/mfu']:.1%}" if "throughput/mfu" in m else "n/a"
        print(
            f"| {'on' if ac else 'off'} | {m['throughput/step_time_s']:.3f} | {m['throughput/step_time_s'] / base:.2f} "
            f"| {m['throughput/images_per_sec']:.2f} | {m['throughput/masks_per_sec']:.1f} "
            f"| {m.get('throughput/tflops_per_device', 0):.3f} | {mfu} | {mem:.2f} |"
        )


if __name__ == "__main__":
    main()
