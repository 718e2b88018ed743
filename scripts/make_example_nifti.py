"""Write a small synthetic CT data set for docs/finetune-medical.md: NIfTI volumes, label volumes, a prompt file.

    python scripts/make_example_nifti.py --out example_ct

Writes `OUT/train/{images,labels}/case_00N.nii.gz` (nnU-Net style `_0000` image names), `OUT/val/...`, and
`OUT/prompts.json` (boxes per axial slice around the "liver" of the first validation case, in the slice frame of
`samlight data convert --format nifti`). Values are Hounsfield units: air, a soft-tissue body, a bright liver
(label 1), a darker kidney (label 2) and a bone ring, with noise; volumes are stored in LPS orientation, as
scanners often write them, so the converter has to reorient.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np


def make_case(rng: np.random.Generator, shape: tuple[int, int, int]) -> tuple[np.ndarray, np.ndarray]:
    """One volume (X x Y x Z, HU) and its labels (0 background, 1 liver, 2 kidney)."""
    x, y, z = np.meshgrid(*(np.linspace(-1, 1, n) for n in shape), indexing="ij")
    volume = np.full(shape, -1000.0, dtype=np.float32)
    body = (x / 0.9) ** 2 + (y / 0.7) ** 2 < 1
    volume[body] = 30.0
    ring = body & ((x / 0.8) ** 2 + (y / 0.6) ** 2 > 0.85)
    volume[ring] = 700.0
    labels = np.zeros(shape, dtype=np.uint8)
    cx, cy, r = rng.uniform(-0.35, -0.15), rng.uniform(-0.2, 0.2), rng.uniform(0.25, 0.35)
    liver = ((x - cx) / r) ** 2 + ((y - cy) / (0.8 * r)) ** 2 + (z / 0.7) ** 2 < 1
    kx, ky = rng.uniform(0.25, 0.4), rng.uniform(-0.2, 0.2)
    kidney = ((x - kx) / 0.12) ** 2 + ((y - ky) / 0.18) ** 2 + (z / 0.5) ** 2 < 1
    volume[liver] = 120.0
    volume[kidney] = -20.0
    labels[liver] = 1
    labels[kidney] = 2
    volume += rng.normal(0, 15, shape).astype(np.float32)
    return volume, labels


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("example_ct"))
    parser.add_argument("--train", type=int, default=4, help="training cases")
    parser.add_argument("--val", type=int, default=1, help="validation cases")
    parser.add_argument("--shape", type=int, nargs=3, default=(96, 96, 24), help="X Y Z voxels")
    args = parser.parse_args()

    import nibabel as nib

    from samlight.datamodules.tools.volumes import canonical, slice_plane

    rng = np.random.default_rng(0)
    affine = np.diag([-0.8, -0.8, 2.5, 1.0])  # LPS-stored: x and y flipped against RAS
    affine[:3, 3] = [38.0, 38.0, -30.0]
    for split, count, start in (("train", args.train, 0), ("val", args.val, args.train)):
        for i in range(start, start + count):
            volume, labels = make_case(rng, tuple(args.shape))
            (args.out / split / "images").mkdir(parents=True, exist_ok=True)
            (args.out / split / "labels").mkdir(parents=True, exist_ok=True)
            nib.save(
                nib.Nifti1Image(volume, affine), args.out / split / "images" / f"case_{i:03d}_0000.nii.gz"
            )
            nib.save(nib.Nifti1Image(labels, affine), args.out / split / "labels" / f"case_{i:03d}.nii.gz")

    # Boxes around label 1 on every other axial slice of the first validation case, in the converter's frame.
    case = args.out / "val" / "labels" / f"case_{args.train:03d}.nii.gz"
    labels = np.asarray(canonical(nib.load(case)).dataobj)
    slices = {}
    for k in range(0, labels.shape[2], 2):
        ys, xs = np.nonzero(slice_plane(labels, "axial", k) == 1)
        if len(xs):
            slices[str(k)] = [[int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1]]
    lines = ",\n".join(f"    {json.dumps(k)}: {json.dumps(v)}" for k, v in slices.items())
    text = (
        '{\n  "axis": "axial",\n  "intensity": {"window": "soft-tissue"},\n  "slices": {\n'
        + lines
        + "\n  }\n}\n"
    )
    json.loads(text)  # one box list per line for reading, still plain JSON
    (args.out / "prompts.json").write_text(text)
    print(f"wrote {args.train} training and {args.val} validation volumes and {args.out / 'prompts.json'}")


if __name__ == "__main__":
    main()
