"""A small synthetic SA-1B-format set (coloured shapes on textured backgrounds), written on first use.

Used by `configs/quickstart.yaml` (`train_urls: demo`) and the tests, so samlight trains out of the box with no
download. Written once per parameter set into `$SAMLIGHT_CACHE/demo-v2/...` (default `~/.cache/samlight`),
atomically, so concurrent first uses (several ranks, several test processes) never see a half-written set.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from samlight.datamodules.tools.shards import SA1BShardWriter, annotations_from_masks

DEMO_VERSION = "demo-v2"  # v1 (until 2026-12): 3-8 freely occluding shapes per image
SHAPE_LABELS = {"ellipse": 1, "rectangle": 2, "polygon": 3}


def default_cache_dir() -> Path:
    """`$SAMLIGHT_CACHE` if set, else `~/.cache/samlight`."""
    return Path(os.environ.get("SAMLIGHT_CACHE") or Path.home() / ".cache" / "samlight")


def make_demo_shards(
    root: str | os.PathLike | None = None,
    *,
    num_train: int = 64,
    num_val: int = 16,
    image_size: tuple[int, int] = (240, 320),
    samples_per_shard: int = 16,
    seed: int = 0,
) -> tuple[list[str], list[str]]:
    """Write (or reuse) the demo shards and return (train_urls, val_urls).

    Args:
        root: cache directory (default `default_cache_dir()`); the set lives in a subfolder named after the
            parameters, so different sizes never overwrite each other.
        num_train, num_val: number of images per split.
        image_size: (H, W) of each image; every second image is transposed (portrait) so padding is exercised.
        samples_per_shard: images per tar (small, so 2 ranks x 2 workers each get whole shards).
        seed: the set is a deterministic function of all the arguments.
    Returns:
        sorted shard paths of the train and the val split.
    """
    base = Path(root) if root is not None else default_cache_dir()
    name = f"{DEMO_VERSION}-{num_train}-{num_val}-{image_size[0]}x{image_size[1]}-{samples_per_shard}-s{seed}"
    final = base / DEMO_VERSION / name
    manifest = final / "manifest.json"
    if not manifest.exists():
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=final.parent))
        try:
            _write_set(tmp, num_train, num_val, image_size, samples_per_shard, seed)
            try:
                os.rename(tmp, final)  # atomic; fails when another process finished first
            except OSError:
                if not manifest.exists():
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    listing = json.loads(manifest.read_text())
    return [str(final / p) for p in listing["train"]], [str(final / p) for p in listing["val"]]


def _write_set(
    out: Path, num_train: int, num_val: int, size: tuple[int, int], per_shard: int, seed: int
) -> None:
    rng = np.random.default_rng(seed)
    listing = {}
    for split, count in (("train", num_train), ("val", num_val)):
        with SA1BShardWriter(out / split, prefix=f"demo-{split}", max_samples=per_shard) as writer:
            for i in range(count):
                hw = size if i % 2 == 0 else size[::-1]
                image, masks, labels = synthetic_scene(hw, rng)
                annotations = annotations_from_masks(masks)
                for annotation, label in zip(annotations, labels):
                    # Shape type as the label id, so per-label metrics have something to report on the demo.
                    annotation["category_id"] = label
                writer.write(
                    f"{split}_{i:05d}", image, annotations=annotations, image_info={"source": "samlight-demo"}
                )
        listing[split] = sorted(str(p.relative_to(out)) for p in writer.shards)
    (out / "manifest.json").write_text(json.dumps(listing, indent=1))


def synthetic_scene(
    size: tuple[int, int],
    rng: np.random.Generator,
    *,
    num_shapes: tuple[int, int] = (14, 28),
    radius: tuple[float, float] = (0.07, 0.16),
    max_overlap: float = 0.4,
    min_area: float = 0.013,
) -> tuple[np.ndarray, np.ndarray, list[int]]:
    """One dense scene: a textured background crowded with coloured shapes, each annotated mask one whole piece.

    Shapes are placed one after another, a later one on top; a placement is redrawn when more than `max_overlap`
    of the new shape would cover earlier ones. A shape becomes a mask only if its visible part is in one piece and
    covers at least `min_area` of the image, as an annotator would mark it; the rest stay in the picture
    unlabelled. Dense and whole on purpose (docs/training.md#the-quickstart): the quickstart's first version drew
    3-8 freely occluding shapes, 16% of its masks were in pieces, and a tiny model from random init learnt them
    slowly (held-out 1-click mIoU 0.345 after 600 steps); more whole masks per image is what it learns from.

    Args:
        size: (H, W).
        rng: randomness.
        num_shapes: (low, high) shapes to place, high exclusive; placements that keep failing are dropped.
        radius: (low, high) of each shape's half-axes as fractions of the image width / height.
        max_overlap: largest fraction of a new shape that may lie on earlier shapes.
        min_area: smallest visible area of an annotated shape, as a fraction of the image.
    Returns:
        (image H x W x 3 uint8, visible instance masks M x H x W bool, shape label per mask).
    """
    from scipy import ndimage

    h, w = size
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    # Background: two random colours blended along a random direction, plus low-frequency stripes and noise.
    c0, c1 = rng.uniform(40, 215, size=(2, 3)).astype(np.float32)
    angle = rng.uniform(0, np.pi)
    t = ((np.cos(angle) * xx / w + np.sin(angle) * yy / h + 1) / 2)[..., None]
    stripes = 12 * np.sin(xx / rng.uniform(6, 20) + yy / rng.uniform(6, 20))
    image = c0 * (1 - t) + c1 * t + stripes[..., None]
    image += 6 * rng.standard_normal(size=(h, w, 3), dtype=np.float32)
    owner = np.full((h, w), -1, dtype=np.int32)
    labels: list[int] = []
    target = int(rng.integers(*num_shapes))
    for _ in range(target * 30):
        if len(labels) == target:
            break
        kind = rng.choice(list(SHAPE_LABELS))
        shape = _shape_mask(kind, h, w, rng, radius)
        if (owner[shape] >= 0).sum() > max_overlap * shape.sum():
            continue
        colour = rng.uniform(0, 255, size=3).astype(np.float32)
        shade = 1 + 0.15 * np.sin(xx[shape] / rng.uniform(3, 9))  # a little texture inside the object
        image[shape] = colour * shade[:, None]
        owner[shape] = len(labels)
        labels.append(SHAPE_LABELS[kind])
    image = np.clip(image, 0, 255).astype(np.uint8)
    if not labels:
        return image, np.zeros((0, h, w), dtype=bool), []
    masks = np.stack([owner == i for i in range(len(labels))])  # M x H x W, visible parts only
    keep = (masks.sum(axis=(1, 2)) >= min_area * h * w) & np.array([ndimage.label(m)[1] == 1 for m in masks])
    return image, masks[keep], [lab for lab, k in zip(labels, keep) if k]


def _shape_mask(
    kind: str, h: int, w: int, rng: np.random.Generator, radius: tuple[float, float]
) -> np.ndarray:
    canvas = Image.new("1", (w, h), 0)
    draw = ImageDraw.Draw(canvas)
    cx, cy = rng.uniform(0.1, 0.9) * w, rng.uniform(0.1, 0.9) * h
    rx, ry = rng.uniform(*radius) * w, rng.uniform(*radius) * h
    if kind == "ellipse":
        draw.ellipse([cx - rx, cy - ry, cx + rx, cy + ry], fill=1)
    elif kind == "rectangle":
        draw.rectangle([cx - rx, cy - ry, cx + rx, cy + ry], fill=1)
    else:
        angles = np.sort(rng.uniform(0, 2 * np.pi, size=int(rng.integers(3, 8))))
        radius = rng.uniform(0.5, 1.0, size=angles.size)
        points = [(cx + rx * r * np.cos(a), cy + ry * r * np.sin(a)) for a, r in zip(angles, radius)]
        draw.polygon(points, fill=1)
    return np.asarray(canvas, dtype=bool)


def nuclei_scene(
    size: tuple[int, int],
    rng: np.random.Generator,
    *,
    num_nuclei: int = 35,
    diameter: tuple[float, float] = (20.0, 30.0),
    touching: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """One fluorescence-microscopy-like field: many small bright nuclei on a dark, uneven background.

    Nuclei are ellipses `diameter` px across with a textured interior, blurred edges (the optics' point spread)
    and shot + read noise, in 12-bit counts stored as uint16, as a camera writes them: most of the 16-bit range
    is empty, which is what a viewer or a converter has to stretch.

    Args:
        size: (H, W).
        rng: randomness.
        num_nuclei: nuclei to place (attempts that fail are dropped, so some fields hold fewer).
        diameter: (min, max) of each nucleus' axes in pixels.
        touching: False (default): isolated nuclei, at least 2 px apart. True: nuclei press against each other
            as in confluent cultures and tissue: a new one may overlap earlier ones and keeps only the free
            pixels (at least 50, in one piece), so neighbours share borders.
    Returns:
        (image H x W uint16, instance labels H x W uint16: 0 background, 1..K one nucleus each).
    """
    from scipy import ndimage

    h, w = size
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    labels = np.zeros((h, w), dtype=np.uint16)
    signal = np.zeros((h, w), dtype=np.float32)
    placed = 0
    for _ in range(num_nuclei * 20):
        if placed == num_nuclei:
            break
        ry, rx = rng.uniform(*diameter, size=2) / 2
        cy, cx = rng.uniform(0, h), rng.uniform(0, w)
        theta = rng.uniform(0, np.pi)
        dy, dx = yy - cy, xx - cx
        u = (np.cos(theta) * dx + np.sin(theta) * dy) / rx
        v = (-np.sin(theta) * dx + np.cos(theta) * dy) / ry
        inside = u**2 + v**2 <= 1.0
        if touching:
            inside &= labels == 0  # pressed against its neighbours: the earlier nuclei keep their pixels
        elif (labels[ndimage.binary_dilation(inside, iterations=2)] > 0).any():
            continue  # isolated nuclei: a gap of 2 px
        if inside.sum() < 50 or (touching and ndimage.label(inside)[1] != 1):
            continue  # too small, or cut in two by its neighbours
        placed += 1
        labels[inside] = placed
        # Chromatin texture: brightness varies by nucleus and, a little, inside it.
        brightness = rng.uniform(600, 2400)
        texture = 1 + 0.2 * np.sin(xx[inside] / rng.uniform(2, 5) + rng.uniform(0, 6)) * np.cos(
            yy[inside] / rng.uniform(2, 5)
        )
        signal[inside] = brightness * texture
    signal = ndimage.gaussian_filter(signal, sigma=1.2)  # point spread: nuclei have soft edges
    background = 150 + 80 * (xx / w) + 60 * np.sin(yy / h * np.pi)  # uneven illumination
    counts = rng.poisson(np.clip(signal + background, 0, None)).astype(np.float32)
    counts += rng.normal(0, 8, size=(h, w))  # camera read noise
    image = np.clip(counts, 0, 4095).astype(np.uint16)
    return image, labels


def write_nuclei_folder(
    root: str | os.PathLike,
    *,
    num_images: int = 4,
    image_size: tuple[int, int] = (256, 256),
    num_nuclei: int = 35,
    diameter: tuple[float, float] = (20.0, 30.0),
    touching: bool = False,
    seed: int = 0,
) -> tuple[Path, Path]:
    """Write a folder of 16-bit nuclei TIFFs and uint16 instance-label TIFFs (`nuclei_scene`), as a microscope
    export would look: `root/images/field_000.tif`, `root/labels/field_000.tif`, ...

    Feed it to `samlight data convert --format folder --images root/images --masks root/labels`.

    Returns:
        (images folder, labels folder).
    """
    import tifffile

    rng = np.random.default_rng(seed)
    images, labels = Path(root) / "images", Path(root) / "labels"
    images.mkdir(parents=True, exist_ok=True)
    labels.mkdir(parents=True, exist_ok=True)
    for i in range(num_images):
        image, label = nuclei_scene(
            image_size, rng, num_nuclei=num_nuclei, diameter=diameter, touching=touching
        )
        tifffile.imwrite(images / f"field_{i:03d}.tif", image)
        tifffile.imwrite(labels / f"field_{i:03d}.tif", label)
    return images, labels
