"""`samlight data convert --format coco`: a COCO instances json (polygons, RLE, crowd regions) plus its images.

Every annotation becomes one SA-1B mask (compressed RLE) that keeps its `category_id`, `iscrowd` and COCO id.
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from pycocotools import mask as mask_utils

from samlight.datamodules.decode import rle_counts
from samlight.datamodules.tools.convert import ConvertSummary, FormatAdapter, Sample, SkipInput
from samlight.datamodules.tools.convert_folder import read_image, unique_key
from samlight.datamodules.tools.shards import annotations_from_rles


class CocoAdapter(FormatAdapter):
    """A COCO instances json; one input per image entry."""

    images_help = "folder the json's file_name entries are under"
    desc = "convert coco"

    @staticmethod
    def add_arguments(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--annotations", required=True, type=Path, help="COCO instances json file")
        parser.add_argument(
            "--crowd",
            choices=("keep", "drop"),
            default="keep",
            help="crowd regions (iscrowd=1): keep them as masks flagged iscrowd=1, or drop them (default keep)",
        )
        parser.add_argument(
            "--category-ids",
            type=int,
            nargs="+",
            default=None,
            help="keep only annotations of these category ids",
        )

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.categories = set(args.category_ids) if args.category_ids else None
        self.used_keys: set[str] = set()
        self.by_image: dict[Any, list[dict[str, Any]]] = defaultdict(list)
        self.images: list[dict[str, Any]] = []

    def inputs(self, summary: ConvertSummary) -> list[tuple[str, dict[str, Any]]]:
        coco = _load_json(self.args.annotations)
        for ann in coco.get("annotations", []):
            self.by_image[ann.get("image_id")].append(ann)
        self.images = coco.get("images", [])
        return [(str(info.get("file_name", info.get("id"))), info) for info in self.images]

    def samples(self, info: dict[str, Any], summary: ConvertSummary) -> Iterator[Sample]:
        name = str(info.get("file_name", info.get("id")))
        anns = self.by_image.get(info.get("id"), [])
        pixels, annotations, image_info = _convert_image(info, anns, self.args, self.categories, summary)
        if not annotations:
            summary.skip("no annotations", name, f"{Path(name).name} has no usable annotation")
            return
        yield Sample(unique_key(Path(name).with_suffix("").as_posix(), self.used_keys), pixels, annotations,
                     image_info)  # fmt: skip

    def finish(self, summary: ConvertSummary) -> None:
        known = {info.get("id") for info in self.images}
        orphans = sum(len(anns) for image_id, anns in self.by_image.items() if image_id not in known)
        if orphans:
            summary.skip(
                "annotations without image entry", str(self.args.annotations), f"{orphans} annotations"
            )


def _load_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError) as err:
        raise SystemExit(f"--annotations {path}: cannot read COCO json: {err}") from err
    if not isinstance(data, dict) or "images" not in data:
        raise SystemExit(f"--annotations {path}: not a COCO json (no 'images' list)")
    return data


def _convert_image(
    info: dict[str, Any],
    anns: list[dict[str, Any]],
    args: argparse.Namespace,
    categories: set[int] | None,
    summary: ConvertSummary,
) -> tuple[Any, list[dict[str, Any]], dict[str, Any]]:
    """One COCO image -> (JPEG bytes or H x W x 3 uint8 pixels, SA-1B annotations (maybe none), json image info)."""
    path = args.images / str(info.get("file_name", ""))
    if not path.is_file():
        raise SkipInput("missing image file", f"{path} does not exist")
    image, jpeg = read_image(path)
    height, width = image.shape[:2]
    if (info.get("height"), info.get("width")) not in ((height, width), (None, None)):
        raise SkipInput(
            "size mismatch",
            f"json says {info.get('height')}x{info.get('width')}, file {path} is {height}x{width}",
        )
    rles, extra = [], []
    for ann in anns:
        if categories is not None and ann.get("category_id") not in categories:
            continue
        crowd = int(ann.get("iscrowd", 0))
        if crowd and args.crowd == "drop":
            summary.drop_masks("iscrowd", 1)
            continue
        try:
            rle = segmentation_to_rle(ann.get("segmentation"), height, width)
        except (TypeError, ValueError, KeyError, IndexError) as err:
            summary.skip("malformed segmentation", f"{path.name} annotation {ann.get('id')}", str(err))
            continue
        if int(mask_utils.area(rle)) < args.min_area:
            summary.drop_masks("below --min-area", 1)
            continue
        rles.append(rle)
        extra.append({"category_id": ann.get("category_id"), "iscrowd": crowd, "coco_id": ann.get("id")})
    image_info = {k: v for k, v in info.items() if k not in ("file_name",)}
    image_info.update(
        source_file=str(info.get("file_name")), coco_image_id=info.get("id"), height=height, width=width
    )
    image_info.pop("id", None)
    return (jpeg if jpeg is not None else image), annotations_from_rles(rles, extra=extra), image_info


def segmentation_to_rle(segmentation: Any, height: int, width: int) -> dict[str, Any]:
    """One compressed RLE {"size": [H, W], "counts": bytes} from a COCO segmentation.

    Accepts a polygon list (several parts are merged into one mask), an uncompressed RLE (counts as a list of
    run lengths, as crowd regions use) or a compressed RLE (counts as a string).
    """
    if isinstance(segmentation, list):
        polygons = [p for p in segmentation if isinstance(p, list) and len(p) >= 6]
        if not polygons:
            raise ValueError("polygon segmentation has no part with 3 or more points")
        return mask_utils.merge(mask_utils.frPyObjects(polygons, height, width))
    if isinstance(segmentation, dict) and "counts" in segmentation and "size" in segmentation:
        size = [int(v) for v in segmentation["size"]]
        if size != [height, width]:
            raise ValueError(f"RLE size {size} does not match the image {height}x{width}")
        counts = segmentation["counts"]
        if isinstance(counts, list):
            if sum(counts) != height * width:
                raise ValueError(f"uncompressed RLE covers {sum(counts)} pixels, image has {height * width}")
            return mask_utils.frPyObjects(segmentation, height, width)
        if isinstance(counts, str | bytes):
            rle_counts(segmentation)  # validates the runs before pycocotools' unchecked C code sees them
            return {"size": size, "counts": counts.encode("ascii") if isinstance(counts, str) else counts}
    raise ValueError(f"unsupported segmentation of type {type(segmentation).__name__}")
