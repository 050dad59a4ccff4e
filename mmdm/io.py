"""Atomic file writes and NIfTI helpers.

Every file the study writes goes through these helpers: content is written to a
temporary file in the destination folder, flushed, then renamed over the target,
so an interrupted process never leaves a half-written file under the final name.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Iterator

import numpy as np

PathLike = str | os.PathLike


@contextlib.contextmanager
def atomic_path(path: PathLike, suffix: str | None = None) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; rename it to ``path`` on success.

    The temporary name keeps the final suffix (e.g. ``.nii.gz``) so that writers
    that infer the format from the extension work. On error the temporary file
    is removed and ``path`` is left untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if suffix is None:
        suffix = "".join(path.suffixes) or ".tmp"
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name.split('.')[0]}.", suffix=suffix, dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        with open(tmp_path, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp_path, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp_path.unlink()
        raise


def write_text(path: PathLike, text: str) -> Path:
    """Atomically write a text file."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return Path(path)


def write_json(path: PathLike, obj: Any, indent: int = 2) -> Path:
    """Atomically write JSON (numpy scalars and paths are converted)."""

    def default(o: Any) -> Any:
        if isinstance(o, np.generic):
            return o.item()
        if isinstance(o, np.ndarray):
            return o.tolist()
        if isinstance(o, Path):
            return str(o)
        raise TypeError(f"not JSON serialisable: {type(o).__name__}")

    return write_text(path, json.dumps(obj, indent=indent, default=default, sort_keys=False) + "\n")


#: NIfTI ``descrip`` of a synthesised TOF-MRA (``mmdm synthesize``, ``mmdm evaluate-run``): its values
#: are ``scale`` times the TOF intensity as a fraction of the volume's maximum.
TOF_FRACTION_DESCRIP = "mmdm synthesis: TOF / TOF max x {scale!r}"
_TOF_FRACTION_PREFIX = TOF_FRACTION_DESCRIP.split("{")[0]


def tof_fraction_descrip(scale: float = 1.0) -> str:
    """The ``descrip`` that declares a volume's values as ``scale`` x (TOF / TOF max)."""
    return TOF_FRACTION_DESCRIP.format(scale=float(scale))


def declared_tof_scale(descrip: str | bytes) -> float | None:
    """The ``scale`` a NIfTI ``descrip`` declares (:data:`TOF_FRACTION_DESCRIP`), or None."""
    text = descrip.decode("ascii", "replace") if isinstance(descrip, bytes) else str(descrip)
    text = text.rstrip("\x00").strip()
    if not text.startswith(_TOF_FRACTION_PREFIX):
        return None
    try:
        return float(text[len(_TOF_FRACTION_PREFIX):])
    except ValueError:
        return None


def save_nifti(path: PathLike, data: np.ndarray, affine: np.ndarray, header: Any | None = None,
               dtype: Any = np.float32, descrip: str | None = None) -> Path:
    """Atomically save ``data`` as NIfTI-1 with ``affine`` (qform and sform both set).

    Setting both codes to 1 (scanner) makes 3D Slicer and ITK-SNAP place the
    image exactly where nibabel says it is. ``descrip`` (at most 80 bytes)
    goes into the header's description field.
    """
    import nibabel as nib

    arr = np.asarray(data, dtype=dtype)
    img = nib.Nifti1Image(arr, np.asarray(affine, dtype=np.float64), header=header)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    img.header.set_xyzt_units("mm", "sec")
    img.set_data_dtype(dtype)
    if descrip is not None:
        if len(descrip.encode()) > 80:
            raise ValueError(f"NIfTI descrip holds at most 80 bytes, got {descrip!r}")
        img.header["descrip"] = descrip
    with atomic_path(path) as tmp:
        nib.save(img, str(tmp))
    return Path(path)
