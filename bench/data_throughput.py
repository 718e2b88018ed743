"""Data loading throughput per CPU core: samlight's decode path vs a straightforward loader, on SA-1B-sized inputs.

Writes its own SA-1B-like shard (about 1500 x 2250 JPEGs with about 100 RLE masks each) to a temporary folder,
prepares a copy with `samlight data prepare`, and measures images per CPU-second in one process with one thread
for:
  (a) baseline: full-size PIL decode, every mask decoded with pycocotools, image (bilinear) and every mask
      (nearest-exact, uint8) resized with torch interpolate to the model size, normalised and padded, then up to
      `max_masks` masks kept;
  (b) samlight on the raw shard: `decode_sa1b_sample` as a training worker runs it (reduced-size JPEG decode, only
      the sampled masks decoded, straight into the loss frame: S/4 soft targets, uint8);
  (c) samlight on the prepared shard: the same function on `samlight data prepare` output;
  (b-eval), (c-eval): the same with the full S x S masks that validation keeps (the evaluation protocol).
All read the shard through the same tar reader. Ratios are against (a), measured in the same run. "MB/img" is
what one image puts into the batch (image float32 + masks or targets), i.e. what is collated, pinned and copied
to the device.

    python bench/data_throughput.py [--images 16] [--masks 100] [--repeats 3]
"""

from __future__ import annotations

import os

# One core, one thread: set before torch/numpy start their thread pools.
for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
    os.environ[_var] = "1"

import argparse  # noqa: E402
import io  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from PIL import Image  # noqa: E402
from pycocotools import mask as mask_utils  # noqa: E402

from samlight.datamodules.decode import decode_sa1b_sample  # noqa: E402
from samlight.datamodules.tools.convert import ConvertSummary  # noqa: E402
from samlight.datamodules.tools.prepare import iter_samples, prepare_shard  # noqa: E402
from samlight.datamodules.tools.shards import SA1BShardWriter, annotations_from_rles  # noqa: E402
from samlight.modeling.transforms import PIXEL_MEAN, PIXEL_STD, get_preprocess_shape  # noqa: E402

MEAN = torch.tensor(PIXEL_MEAN).view(3, 1, 1)
STD = torch.tensor(PIXEL_STD).view(3, 1, 1)


# ---------------------------------------------------------------------------------------------- inputs


def synthetic_image(height: int, width: int, rng: np.random.Generator) -> np.ndarray:
    """H x W x 3 uint8: smooth colour regions plus texture, so the JPEG is about SA-1B's size (~0.5-1 MB)."""
    coarse = rng.integers(0, 255, (height // 64 + 2, width // 64 + 2, 3), dtype=np.uint8)
    smooth = np.asarray(Image.fromarray(coarse).resize((width, height), Image.BICUBIC), dtype=np.int16)
    noise = rng.normal(0, 10, (height, width, 1)).astype(np.int16)
    return np.clip(smooth + noise, 0, 255).astype(np.uint8)


def synthetic_rles(height: int, width: int, count: int, rng: np.random.Generator) -> list[dict]:
    """`count` ellipse masks of SA-1B-like sizes (many small, a few large), as compressed RLE."""
    rles = []
    for _ in range(count):
        # Log-uniform radius: from ~10 px to a third of the short side, like SA-1B's spread of object sizes.
        ry, rx = np.exp(rng.uniform(np.log(10), np.log(height / 3), size=2))
        cy, cx = rng.uniform(0, height), rng.uniform(0, width)
        y0, y1 = int(max(cy - ry, 0)), int(min(cy + ry + 1, height))
        x0, x1 = int(max(cx - rx, 0)), int(min(cx + rx + 1, width))
        mask = np.zeros((height, width), dtype=np.uint8, order="F")
        yy, xx = np.ogrid[y0:y1, x0:x1]
        mask[y0:y1, x0:x1] = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1
        rle = mask_utils.encode(mask)
        rles.append(rle)
    return rles


def write_inputs(folder: Path, *, images: int, masks: int, height: int, width: int, seed: int = 0) -> Path:
    """One raw SA-1B-format shard with `images` samples; returns its path."""
    rng = np.random.default_rng(seed)
    with SA1BShardWriter(folder, prefix="sa", max_samples=images) as writer:
        for i in range(images):
            image = synthetic_image(height, width, rng)
            rles = synthetic_rles(height, width, masks, rng)
            writer.write(f"sa_{i}", image, annotations=annotations_from_rles(rles), quality=90)
    return writer.shards[0]


# ---------------------------------------------------------------------------------------------- loaders


def baseline_loader(jpg: bytes, record_bytes: bytes, *, image_size: int, max_masks: int, rng) -> tuple:
    """What a first implementation does: decode everything at full size, resize everything with torch.

    Returns image 3 x S x S float and masks M x S x S bool, the same frame as samlight's path.
    """
    image = np.array(Image.open(io.BytesIO(jpg)).convert("RGB"))  # H x W x 3, full-size decode
    record = json.loads(record_bytes)
    height, width = image.shape[:2]
    h, w = get_preprocess_shape(height, width, image_size)
    tensor = torch.from_numpy(image).permute(2, 0, 1)[None].float()  # 1 x 3 x H x W
    tensor = F.interpolate(tensor, size=(h, w), mode="bilinear", align_corners=False, antialias=True)[0]
    padded = torch.zeros(3, image_size, image_size)
    padded[:, :h, :w] = (tensor - MEAN) / STD
    annotations = record["annotations"]
    decoded = torch.from_numpy(mask_utils.decode([a["segmentation"] for a in annotations]))  # H x W x M uint8
    # Nearest-exact on uint8 gives the same masks as samlight's path and is torch's cheapest resize for them.
    resized = F.interpolate(decoded.permute(2, 0, 1)[None], size=(h, w), mode="nearest-exact")[0]  # M x h x w
    areas = torch.tensor([float(a["area"]) for a in annotations])
    keep = torch.nonzero(areas <= 0.9 * height * width).flatten()
    keep = keep[torch.from_numpy(rng.permutation(keep.numel()))[:max_masks]]
    masks = torch.zeros(keep.numel(), image_size, image_size, dtype=torch.bool)
    masks[:, :h, :w] = resized[keep].bool()
    return padded, masks


def samlight_loader(jpg: bytes, record_bytes: bytes, *, image_size: int, max_masks: int, rng) -> tuple:
    """A training worker's decode: masks as S/4 soft targets (M x S/4 x S/4 uint8)."""
    sample = decode_sa1b_sample(
        jpg, record_bytes, image_size=image_size, max_masks=max_masks, rng=rng, mask_frame="targets"
    )
    return sample.image, sample.mask_targets


def samlight_eval_loader(jpg: bytes, record_bytes: bytes, *, image_size: int, max_masks: int, rng) -> tuple:
    """The same with full-resolution masks (M x S x S bool), as validation keeps them."""
    sample = decode_sa1b_sample(
        jpg, record_bytes, image_size=image_size, max_masks=max_masks, rng=rng, mask_frame="input"
    )
    return sample.image, sample.masks


def measure(shard: Path, loader: Callable, *, image_size: int, max_masks: int, repeats: int) -> dict:
    """Best-of-`repeats` pass over the shard: images per CPU-second (process time) and per wall-second."""
    best_cpu, best_wall, count, masks, nbytes = float("inf"), float("inf"), 0, 0, 0
    for repeat in range(repeats):
        rng = np.random.default_rng(repeat)
        summary = ConvertSummary()
        cpu0, wall0 = time.process_time(), time.perf_counter()
        count = masks = nbytes = 0
        for sample in iter_samples(str(shard), summary):
            image, sample_masks = loader(
                sample.image, sample.members["json"], image_size=image_size, max_masks=max_masks, rng=rng
            )
            count += 1
            masks += sample_masks.shape[0]
            nbytes += image.nbytes + sample_masks.nbytes
        best_cpu = min(best_cpu, time.process_time() - cpu0)
        best_wall = min(best_wall, time.perf_counter() - wall0)
        if summary.num_skipped:
            raise RuntimeError(f"benchmark shard has skipped samples: {summary.skipped}")
    return {
        "images": count,
        "masks_per_image": masks / max(count, 1),
        "mb_per_image": nbytes / max(count, 1) / 1e6,
        "cpu_s": best_cpu,
        "wall_s": best_wall,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--masks", type=int, default=100)
    parser.add_argument("--height", type=int, default=1500)
    parser.add_argument("--width", type=int, default=2250)
    parser.add_argument("--image-size", type=int, default=1024)
    parser.add_argument("--max-masks", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)

    with tempfile.TemporaryDirectory(prefix="samlight-bench-") as tmp:
        tmp = Path(tmp)
        start = time.perf_counter()
        raw = write_inputs(
            tmp / "raw", images=args.images, masks=args.masks, height=args.height, width=args.width
        )
        print(f"wrote {args.images} images of {args.height}x{args.width} with {args.masks} masks each "
              f"({raw.stat().st_size / args.images / 1e6:.2f} MB per sample) in {time.perf_counter() - start:.1f} s")  # fmt: skip
        cpu0 = time.process_time()
        prepared = prepare_shard(
            str(raw), tmp / "prepared", image_size=args.image_size, quality=90, name=raw.name, bar=False
        )
        prepare_cpu = time.process_time() - cpu0
        prepared_shard = prepared.shards[0]
        print(f"prepared in {prepare_cpu:.1f} CPU-s ({prepare_cpu / args.images:.2f} CPU-s per image, once); "
              f"{prepared_shard.stat().st_size / args.images / 1e6:.2f} MB per sample")  # fmt: skip

        kwargs = {"image_size": args.image_size, "max_masks": args.max_masks, "repeats": args.repeats}
        rows = [
            ("(a) baseline: full decode + all masks + torch resize", measure(raw, baseline_loader, **kwargs)),
            ("(b) samlight training path, raw SA-1B shard", measure(raw, samlight_loader, **kwargs)),
            ("(c) samlight training path, prepared shard", measure(prepared_shard, samlight_loader, **kwargs)),
            ("(b-eval) full-res masks, raw shard", measure(raw, samlight_eval_loader, **kwargs)),
            ("(c-eval) full-res masks, prepared shard", measure(prepared_shard, samlight_eval_loader, **kwargs)),
        ]
    base = rows[0][1]["images"] / rows[0][1]["cpu_s"]
    print(
        f"\n{platform.processor() or platform.machine()}, torch {torch.__version__}, 1 thread, best of {args.repeats}"
    )
    print(f"{'loader':55s} {'img/CPU-s':>10s} {'img/wall-s':>11s} {'masks/img':>10s} {'MB/img':>7s} {'vs (a)':>7s}")  # fmt: skip
    for name, row in rows:
        per_cpu = row["images"] / row["cpu_s"]
        per_wall = row["images"] / row["wall_s"]
        print(
            f"{name:55s} {per_cpu:10.2f} {per_wall:11.2f} {row['masks_per_image']:10.1f} "
            f"{row['mb_per_image']:7.1f} {per_cpu / base:6.1f}x"
        )


if __name__ == "__main__":
    main()
