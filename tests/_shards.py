"""Test helpers for shards: tiny numbered shards to stream, and reading converted shards back (straight from the
tars, and through SA1BDataModule)."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import webdataset as wds
from PIL import Image
from pycocotools import mask as mask_utils

from samlight.datamodules.tools.shards import SA1BShardWriter


def read_shards(folder: Path) -> dict[str, dict]:
    """key -> {"json": record, "masks": M x H x W bool, "image": H x W x 3 uint8}, read straight from the tars."""
    urls = sorted(str(p) for p in folder.glob("*.tar"))
    samples = {}
    for sample in wds.WebDataset(urls, shardshuffle=False, empty_check=False):
        record = json.loads(sample["json"])
        rles = [a["segmentation"] for a in record["annotations"]]
        masks = mask_utils.decode(rles).transpose(2, 0, 1).astype(bool) if rles else np.zeros((0,), bool)
        image = np.asarray(Image.open(io.BytesIO(sample["jpg"])))
        samples[sample["__key__"]] = {"json": record, "masks": masks, "image": image}
    return samples


def stream_datamodule(folder: Path, image_size: int) -> dict[str, dict]:
    """key -> {"masks": n x S x S bool, "labels": [...], "info": {...}}: what training sees, via SA1BDataModule."""
    from samlight.datamodules.sa1b import SA1BDataModule

    urls = sorted(str(p) for p in folder.glob("*.tar"))
    dm = SA1BDataModule(train_urls=None, val_urls=urls, batch_size=2, num_workers=0, image_size=image_size)
    dm.setup("validate")
    seen = {}
    for batch in dm.val_dataloader():
        for i, meta in enumerate(batch.meta):
            assert meta["key"] not in seen, f"{meta['key']} streamed twice"
            valid = batch.mask_valid[i]
            seen[meta["key"]] = {
                "masks": batch.masks[i][valid].numpy(),
                "labels": meta["mask_labels"],
                "info": meta["image_info"],
            }
    return seen


def write_numbered_shards(root, num_images: int, per_shard: int, *, num_masks: int = 2) -> list[str]:
    """Shards `sa-00000k.tar` of `per_shard` 16 x 24 images each, keys img_000, img_001, ... in shard order.

    Each image has `num_masks` (2 or 3) fixed masks: the top half, the left 5 columns and, as the third, a
    block in the middle.
    """
    rng = np.random.default_rng(0)
    with SA1BShardWriter(root, max_samples=per_shard) as writer:
        for i in range(num_images):
            image = rng.integers(0, 255, size=(16, 24, 3), dtype=np.uint8)
            masks = np.zeros((3, 16, 24), bool)
            masks[0, :8], masks[1, :, :5], masks[2, 4:9, 6:20] = True, True, True
            writer.write(f"img_{i:03d}", image, masks=masks[:num_masks])
    return [str(p) for p in writer.shards]
