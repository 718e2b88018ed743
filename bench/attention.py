"""One global-attention ViT block, forward + backward, on CPU: timm's N x N bias vs samlight's folded bias.

Both variants run the same timm `Block` (ViT-B dims by default: 768 wide, 12 heads, 64 x 64 tokens = a 1024
input), the same weights and input; only the attention class differs (timm's `Attention`, which passes the
decomposed relative-position bias as a dense (B*heads) x N x N mask, or `samlight.modeling.attention.
RelPosAttention`). Each variant runs in its own process so its peak resident memory is its own.

    python bench/attention.py [--dim 768 --heads 12 --grid 64 --repeats 2 --threads 2]
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import time


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def run_one(variant: str, dim: int, heads: int, grid: int, repeats: int, threads: int) -> dict:
    """Build the block, then time `repeats` forward+backward passes; peak memory above the set-up state."""
    import torch
    from timm.models.vision_transformer_sam import Block

    from samlight.modeling.attention import use_rel_pos_attention
    from samlight.modeling.image_encoder import _official_mlp

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    block = Block(
        dim, heads, use_rel_pos=True, window_size=0, input_size=(grid, grid), mlp_layer=_official_mlp
    )
    if variant == "samlight":
        use_rel_pos_attention(block)
    x = torch.randn(1, grid, grid, dim, requires_grad=True)
    base = _rss_mib()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        block(x).square().mean().backward()
        times.append(time.perf_counter() - start)
        block.zero_grad(set_to_none=True)
        x.grad = None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB -> MiB on Linux
    return {"variant": variant, "seconds": min(times), "peak_mib": peak - base}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dim", type=int, default=768)
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--grid", type=int, default=64, help="tokens per side (input size / 16)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--child", choices=["timm", "samlight"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(run_one(args.child, args.dim, args.heads, args.grid, args.repeats, args.threads)))
        return
    rows = []
    for variant in ("timm", "samlight"):
        cmd = [sys.executable, __file__, "--child", variant] + [
            f"--{k}={getattr(args, k)}" for k in ("dim", "heads", "grid", "repeats", "threads")
        ]
        rows.append(json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout))
    import torch

    n = args.grid**2
    print(
        f"{platform.processor() or platform.machine()}, torch {torch.__version__}, {args.threads} threads; "
        f"one global block fwd+bwd, dim {args.dim}, {args.heads} heads, N = {args.grid}^2 = {n}, best of "
        f"{args.repeats}; timm's bias alone: {args.heads * n * n * 4 / 2**20:.0f} MiB float32"
    )
    base = rows[0]
    print(f"{'attention':10s} {'s/iter':>8s} {'peak MiB':>9s} {'time vs timm':>13s} {'memory vs timm':>15s}")
    for row in rows:
        print(
            f"{row['variant']:10s} {row['seconds']:8.2f} {row['peak_mib']:9.0f} "
            f"{row['seconds'] / base['seconds']:12.2f}x {row['peak_mib'] / base['peak_mib']:14.2f}x"
        )


if __name__ == "__main__":
    main()
