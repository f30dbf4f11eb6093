"""Small synthetic CT scans for trying the ``volume`` dataset plugin: ``python examples/volumes/make_volumes.py DIR``.

Writes three "sites" of chest-CT-like phantoms (a body, two lungs, spherical nodules), each a folder layout that
real datasets use:

- ``DIR/site_a/imagesTr/*.nii.gz`` + ``labelsTr/*.nii.gz``: label maps (Medical Segmentation Decathlon layout),
  stored left-right flipped (an LAS file, as many converters write them) at 0.8 x 0.8 x 2.5 mm;
- ``DIR/site_b/scans/*.nii.gz`` + ``annotations.csv``: a LUNA16-style CSV (``seriesuid, coordX, coordY, coordZ,
  diameter_mm``, world millimetres in LPS as LUNA16 writes them), RAS at 0.7 x 0.7 x 2.0 mm, noisier;
- ``DIR/site_c/imagesTr`` + ``labelsTr``: an MR-like contrast (arbitrary units, no Hounsfield scale: use
  ``intensity: percentile``).

Each scan is 64 x 64 x 24 voxels (``--size``, ``--slices``) with 1-2 nodules of 8-16 mm; ``--scans`` per site
(default 16), ``--seed``. ``examples/configs/volumes.yaml`` runs megatron on them.
"""
from __future__ import annotations

import argparse
import csv
from pathlib import Path

import nibabel as nib
import numpy as np

AIR_HU, TISSUE_HU, LUNG_HU, NODULE_HU = -1000.0, 40.0, -800.0, 30.0
#: nodule diameters drawn uniformly: 8-16 mm spans 11-23 px of a 64 px scan at 0.7 mm, 23-46 px at input 128,
#: large enough for a tiny detector trained from scratch for a few CPU minutes (real nodules start at 3 mm)
NODULE_DIAMETER_MM = (8.0, 16.0)
SITES = {
    # name: (voxel spacing mm, x flipped on disk, noise sd, annotation kind, MR-like contrast)
    "site_a": ((0.8, 0.8, 2.5), True, 15.0, "labels", False),
    "site_b": ((0.7, 0.7, 2.0), False, 35.0, "csv", False),
    "site_c": ((0.9, 0.9, 3.0), False, 10.0, "labels", True),
}


def affine_of(spacing: tuple[float, float, float], shape: tuple[int, int, int], flip_x: bool) -> np.ndarray:
    affine = np.diag([*spacing, 1.0])
    affine[:3, 3] = -np.asarray(spacing) * (np.asarray(shape) - 1) / 2  # the scan centred on the world origin
    if flip_x:
        affine[0, 0] = -spacing[0]
        affine[0, 3] = -affine[0, 3]
    return affine


def phantom(shape: tuple[int, int, int], spacing, rng: np.random.Generator, n_nodules: int):
    """HU volume, label map and the nodules (centre voxel, diameter mm), on the RAS voxel grid."""
    i, j, k = np.meshgrid(*[np.arange(n, dtype=np.float64) for n in shape], indexing="ij")
    cx, cy = (shape[0] - 1) / 2, (shape[1] - 1) / 2
    body = ((i - cx) / (0.45 * shape[0])) ** 2 + ((j - cy) / (0.36 * shape[1])) ** 2 <= 1
    lungs = [((i - cx - s * 0.2 * shape[0]) / (0.17 * shape[0])) ** 2 + ((j - cy) / (0.3 * shape[1])) ** 2 <= 1
             for s in (-1, 1)]
    hu = np.where(body, TISSUE_HU, AIR_HU)
    lung = lungs[0] | lungs[1]
    hu[lung] = LUNG_HU
    label = np.zeros(shape, np.uint8)
    nodules = []
    lung_voxels = np.argwhere(lung & (k >= 3) & (k <= shape[2] - 4))
    for _ in range(n_nodules):
        centre = lung_voxels[rng.integers(len(lung_voxels))] + rng.uniform(-0.4, 0.4, 3)
        diameter = float(rng.uniform(*NODULE_DIAMETER_MM))
        dist = np.sqrt(((i - centre[0]) * spacing[0]) ** 2 + ((j - centre[1]) * spacing[1]) ** 2
                       + ((k - centre[2]) * spacing[2]) ** 2)
        inside = dist <= diameter / 2
        hu[inside] = NODULE_HU
        label[inside] = 1
        nodules.append((centre, diameter))
    return hu, label, nodules


def write_site(out: Path, name: str, scans: int, size: int, slices: int, rng: np.random.Generator) -> None:
    spacing, flip_x, noise, kind, mr_like = SITES[name]
    shape = (size, size, slices)
    affine = affine_of(spacing, shape, flip_x)
    image_dir = out / name / ("scans" if kind == "csv" else "imagesTr")
    image_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    for n in range(scans):
        scan_id = f"{name}_{n:03d}"
        hu, label, nodules = phantom(shape, spacing, rng, int(rng.integers(1, 3)))
        values = hu + rng.normal(0, noise, shape)
        if mr_like:  # arbitrary units: tissue bright, lungs dark, a scanner-dependent gain
            values = (values + 1000.0) * rng.uniform(0.5, 2.0)
        stored = values[::-1] if flip_x else values  # the file keeps the flipped order its affine describes
        nib.save(nib.Nifti1Image(np.rint(stored).astype(np.int16), affine), image_dir / f"{scan_id}.nii.gz")
        if kind == "labels":
            (out / name / "labelsTr").mkdir(exist_ok=True)
            nib.save(nib.Nifti1Image(label[::-1] if flip_x else label, affine),
                     out / name / "labelsTr" / f"{scan_id}.nii.gz")
        for centre, diameter in nodules:
            stored_voxel = np.array([shape[0] - 1 - centre[0], centre[1], centre[2]]) if flip_x else centre
            ras = affine @ np.r_[stored_voxel, 1.0]
            rows.append([scan_id, -ras[0], -ras[1], ras[2], diameter])  # LPS, as LUNA16
    if kind == "csv":
        with open(out / name / "annotations.csv", "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["seriesuid", "coordX", "coordY", "coordZ", "diameter_mm"])
            writer.writerows([[r[0], *(f"{v:.3f}" for v in r[1:])] for r in rows])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("out", type=Path, help="output folder")
    parser.add_argument("--scans", type=int, default=16, help="scans per site (default 16)")
    parser.add_argument("--size", type=int, default=64, help="in-plane voxels (default 64)")
    parser.add_argument("--slices", type=int, default=24, help="slices per scan (default 24)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    rng = np.random.default_rng(args.seed)
    for name in SITES:
        write_site(args.out, name, args.scans, args.size, args.slices, rng)
    print(f"wrote {len(SITES)} sites x {args.scans} scans to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
