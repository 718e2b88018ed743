"""Write a small synthetic satellite data set for docs/finetune-satellite.md: GeoTIFF scenes, label rasters, prompts.

    python scripts/make_example_geotiff.py --out example_sat

Writes `OUT/train/{images,labels}/scene_N.tif` and `OUT/val/...`: 4-band uint16 scenes (blue, green, red,
near-infrared; 10 m pixels in UTM 33N) of fields with bright rectangular buildings, a nodata (0) border, and
instance label rasters (one id per building); plus `OUT/prompts.geojson`: a click on some buildings and a box around
others of the first validation scene, in map coordinates.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np


def make_scene(rng: np.random.Generator, size: int, buildings: int) -> tuple[np.ndarray, np.ndarray, list]:
    """Scene (4 x H x W uint16), instance labels (H x W uint16) and building boxes (col0, row0, col1, row1)."""
    rows, cols = np.mgrid[0:size, 0:size]
    fields = (np.sin(rows / 37.0) + np.cos(cols / 53.0)) * 300
    scene = np.stack([800 + fields, 1000 + fields, 900 + fields, 2500 - fields]).astype(np.float32)
    labels = np.zeros((size, size), dtype=np.uint16)
    boxes = []
    for i in range(1, buildings + 1):
        h, w = rng.integers(12, 40, 2)
        r, c = rng.integers(20, size - 60, 2)
        if labels[r - 4 : r + h + 4, c - 4 : c + w + 4].any():
            continue  # keep buildings apart, as in a real town
        labels[r : r + h, c : c + w] = i
        scene[:3, r : r + h, c : c + w] = rng.uniform(2600, 3200)
        scene[3, r : r + h, c : c + w] = 1500
        boxes.append((int(c), int(r), int(c + w), int(r + h)))
    scene += rng.normal(0, 60, scene.shape)
    scene = np.clip(scene, 1, 65535).astype(np.uint16)
    scene[:, :, :8] = 0  # nodata border (outside the satellite swath)
    return scene, labels, boxes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("example_sat"))
    parser.add_argument("--size", type=int, default=600, help="scene side in pixels")
    parser.add_argument("--train", type=int, default=3)
    parser.add_argument("--val", type=int, default=1)
    args = parser.parse_args()

    import rasterio
    from rasterio.transform import from_origin, xy

    rng = np.random.default_rng(0)
    transform = from_origin(500000.0, 4_650_000.0, 10.0, 10.0)
    profile = {
        "driver": "GTiff",
        "width": args.size,
        "height": args.size,
        "crs": "EPSG:32633",
        "transform": transform,
    }
    first_val = None
    for split, count in (("train", args.train), ("val", args.val)):
        for i in range(count):
            scene, labels, boxes = make_scene(rng, args.size, buildings=40)
            for sub in ("images", "labels"):
                (args.out / split / sub).mkdir(parents=True, exist_ok=True)
            with rasterio.open(
                args.out / split / "images" / f"scene_{i}.tif",
                "w",
                count=4,
                dtype="uint16",
                nodata=0,
                **profile,
            ) as dst:
                dst.write(scene)
            with rasterio.open(
                args.out / split / "labels" / f"scene_{i}.tif", "w", count=1, dtype="uint16", **profile
            ) as dst:
                dst.write(labels, 1)
            if split == "val" and first_val is None:
                first_val = boxes

    features = []
    for n, (c0, r0, c1, r1) in enumerate(first_val[:8]):
        if n % 2 == 0:  # a click in the middle of the building
            x, y = xy(transform, (r0 + r1) / 2, (c0 + c1) / 2, offset="ul")
            geometry = {"type": "Point", "coordinates": [x, y]}
        else:  # a box drawn around it, as a polygon in map coordinates
            ring = [
                xy(transform, r, c, offset="ul")
                for c, r in ((c0, r0), (c1, r0), (c1, r1), (c0, r1), (c0, r0))
            ]
            geometry = {"type": "Polygon", "coordinates": [[list(p) for p in ring]]}
        features.append({"type": "Feature", "properties": {"label": 1}, "geometry": geometry})
    collection = {
        "type": "FeatureCollection",
        "crs": {"type": "name", "properties": {"name": "EPSG:32633"}},
        "features": features,
    }
    (args.out / "prompts.geojson").write_text(json.dumps(collection, indent=1))
    print(f"wrote {args.train} training and {args.val} validation scenes and {args.out / 'prompts.geojson'}")


if __name__ == "__main__":
    main()
