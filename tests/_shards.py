"""Test helpers that read converted shards back: straight from the tars, and through SA1BDataModule."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import webdataset as wds
from PIL import Image
from pycocotools import mask as mask_utils


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
