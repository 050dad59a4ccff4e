"""Every view of two syntheses of one validation subject beside its target: the haze check by eye.

Usage (after `mmdm synthesize` of the subject with each run, e.g. the haze-fusion sweep's `full` and
`full-fusion-residual` points at 5 sampling steps):

    python benchmarks/haze_views.py TARGET.nii.gz A.nii.gz B.nii.gz --out views.png

Rows: the target (divided by its maximum), then each synthesis; columns: the middle axial,
sagittal and coronal slices, the axial MIP and an axial slice near the end of the stack (slice 2),
on one grey scale. Prints each synthesis's background bias (mean prediction - target where the
target is below 0.05) and the share of those voxels above 0.1 (the measures of mmdm.study.haze).
"""
from __future__ import annotations

import argparse
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import nibabel as nib  # noqa: E402
import numpy as np  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("target")
    ap.add_argument("synth", nargs="+")
    ap.add_argument("--out", default="views.png")
    args = ap.parse_args()
    t = nib.load(args.target).get_fdata()
    vols = {"target": t / t.max()}
    for p in args.synth:
        vols[Path(p).name.removesuffix(".nii.gz")] = nib.load(p).get_fdata()
    bg = vols["target"] < 0.05
    for k, v in list(vols.items())[1:]:
        d = (v - vols["target"])[bg]
        print(f"{k}: background bias {d.mean():+.4f}, background voxels above 0.1: {(v[bg] > 0.1).mean():.1%}")
    X, Y, Z = t.shape
    names = ["axial mid", "sagittal mid", "coronal mid", "axial MIP", "axial slice 2 (stack end)"]
    fig, ax = plt.subplots(len(vols), 5, figsize=(20, 3.7 * len(vols)))
    for i, (k, v) in enumerate(vols.items()):
        views = [v[:, :, Z // 2].T, v[X // 2].T, v[:, Y // 2].T, v.max(2).T, v[:, :, 2].T]
        for j, (im, n) in enumerate(zip(views, names)):
            ax[i, j].imshow(im, cmap="gray", vmin=0, vmax=1.0 if j == 3 else 0.6, origin="lower")
            ax[i, j].set_title(f"{k}: {n}")
            ax[i, j].axis("off")
    plt.tight_layout()
    plt.savefig(args.out, dpi=60)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
