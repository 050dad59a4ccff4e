"""Loading and validating NIfTI volumes, and per-volume intensity normalisation.

Every check here raises :class:`~mmdm.data.layout.DatasetError` with the file's
path and what to do, so a bad dataset fails on the first read with a message
rather than deep inside training.
"""

from __future__ import annotations

import gzip
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mmdm.data.layout import DatasetError


@dataclass
class Volume:
    """A 3D image with its affine (voxel -> RAS mm)."""

    data: np.ndarray  # float32, (X, Y, Z), Z axial
    affine: np.ndarray  # 4x4
    path: Path | None = None

    @property
    def spacing(self) -> tuple[float, float, float]:
        return tuple(float(s) for s in np.sqrt((self.affine[:3, :3] ** 2).sum(axis=0)))


def load_volume(path: str | Path, allow_empty: bool = False) -> Volume:
    """Read one NIfTI volume as float32 and validate it.

    Accepted: 3D images, or 4D images whose 4th dimension is 1 (squeezed).
    Rejected with a clear message: a missing, unreadable or truncated file; a
    2D image or a true 4D series; NaN or infinite voxels; an all-zero volume
    (unless ``allow_empty``).
    """
    import nibabel as nib

    path = Path(path)
    if not path.exists():
        raise DatasetError(f"{path}: file not found. Check the dataset layout "
                           "(DIR/sub-XXX/anat/sub-XXX_<modality>.nii.gz) or rebuild the dataset.")
    try:
        img = nib.load(str(path))
        data = np.asarray(img.dataobj, dtype=np.float32)
    except (EOFError, OSError, zlib.error, gzip.BadGzipFile, ValueError,
            nib.filebasedimages.ImageFileError) as e:
        raise DatasetError(f"{path}: unreadable or truncated NIfTI file ({type(e).__name__}: {e}). "
                           "Re-create or re-download this file.") from e
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise DatasetError(f"{path}: expected a 3D volume, got a {data.ndim}D image of shape {data.shape}. "
                           "Give one 3D volume per modality (split 4D series into volumes; "
                           "2D images cannot be used for 2.5D windows).")
    bad = ~np.isfinite(data)
    if bad.any():
        raise DatasetError(f"{path}: {int(bad.sum())} NaN or infinite voxel(s). "
                           "Fix the file (e.g. replace them with 0 via nibabel) and run `mmdm data check` again.")
    if not allow_empty and not np.any(data):
        raise DatasetError(f"{path}: the volume is all zeros. Re-create this file or remove the subject "
                           "from the dataset and from splits.json.")
    return Volume(data=data, affine=np.asarray(img.affine, dtype=np.float64), path=path)


def check_same_grid(volumes: dict[str, Volume], subject: str = "", atol: float = 1e-3) -> None:
    """All modalities of a subject must share one shape and one affine."""
    items = list(volumes.items())
    ref_name, ref = items[0]
    for name, vol in items[1:]:
        if vol.data.shape != ref.data.shape:
            raise DatasetError(
                f"subject {subject}: {name} has shape {vol.data.shape} ({vol.path}) but {ref_name} has "
                f"{ref.data.shape} ({ref.path}). All modalities must be registered and resampled onto one "
                "grid (the TOF-MRA's), e.g. with `mmdm data ixi` or SimpleITK.")
        if not np.allclose(vol.affine, ref.affine, atol=atol):
            raise DatasetError(
                f"subject {subject}: the affine of {name} ({vol.path}) differs from that of {ref_name} "
                f"({ref.path}):\n{vol.affine}\nvs\n{ref.affine}\nResample all modalities onto the same grid.")


@dataclass
class NormConfig:
    """Per-volume intensity normalisation to [-1, 1].

    ``max`` (the authors' code): x / max(x), mapped to [-1, 1].
    ``percentile``: clip to the [low, high] percentiles of the non-zero voxels, then scale.
    ``minmax``: (x - min) / (max - min), mapped to [-1, 1].
    """

    method: str = "max"
    percentile_low: float = 0.5
    percentile_high: float = 99.5


def normalise(x: np.ndarray, cfg: NormConfig = NormConfig()) -> tuple[np.ndarray, dict]:
    """Map ``x`` to [-1, 1]; returns the array and the parameters needed to invert it."""
    if cfg.method == "max":
        lo, hi = 0.0, float(x.max())
    elif cfg.method == "minmax":
        lo, hi = float(x.min()), float(x.max())
    elif cfg.method == "percentile":
        nz = x[x != 0]
        nz = nz if nz.size else x.ravel()
        lo, hi = (float(v) for v in np.percentile(nz, [cfg.percentile_low, cfg.percentile_high]))
        lo = min(lo, 0.0)
    else:
        raise ValueError(f"unknown normalisation '{cfg.method}'; choose max, minmax or percentile")
    if hi <= lo:
        raise DatasetError(f"cannot normalise a constant volume (low {lo}, high {hi})")
    y = np.clip((x - lo) / (hi - lo), 0.0, 1.0) if cfg.method == "percentile" else (x - lo) / (hi - lo)
    return (2.0 * y - 1.0).astype(np.float32), {"method": cfg.method, "low": lo, "high": hi}


def denormalise(y: np.ndarray, params: dict) -> np.ndarray:
    """Inverse of :func:`normalise` (up to the clipping of the percentile method)."""
    return ((np.asarray(y, dtype=np.float32) + 1.0) / 2.0 * (params["high"] - params["low"]) + params["low"]).astype(np.float32)
