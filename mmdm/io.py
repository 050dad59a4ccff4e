"""Atomic file writes and NIfTI helpers.

Every file the study writes goes through these helpers: content is written to a
temporary file in the destination folder, flushed, then renamed over the target,
so an interrupted process never leaves a half-written file under the final name.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator

import numpy as np

PathLike = str | os.PathLike


def current_umask() -> int:
    """The process's umask, read without changing it where the system allows (Linux:
    ``/proc/self/status``; elsewhere set and restored at once)."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    old = os.umask(0o022)
    os.umask(old)
    return old


@contextlib.contextmanager
def atomic_path(path: PathLike, suffix: str | None = None) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; rename it to ``path`` on success.

    The temporary name keeps the final suffix (e.g. ``.nii.gz``) so that writers
    that infer the format from the extension work. On error the temporary file
    is removed and ``path`` is left untouched. The file gets the permissions of any
    newly created file (0666 less the process's umask), not ``mkstemp``'s private 0600,
    so records on shared storage stay readable by the group as the user intends.
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
        os.chmod(tmp_path, 0o666 & ~current_umask())
        os.replace(tmp_path, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp_path.unlink()
        raise


# ----------------------------------------------------------------------------
# output checks and error messages

#: the file name endings of a NIfTI volume the package writes
NIFTI_SUFFIXES = (".nii.gz", ".nii")


def same_file(a: PathLike, b: PathLike) -> bool:
    """Whether ``a`` and ``b`` are one file on disk (same device and inode: also through a
    symbolic or hard link). False when either does not exist."""
    try:
        sa, sb = os.stat(a), os.stat(b)
    except OSError:
        return False
    return (sa.st_dev, sa.st_ino) == (sb.st_dev, sb.st_ino)


def _existing_ancestor(path: Path) -> Path:
    p = path.absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def check_output_path(path: PathLike, inputs: Any = (), nbytes: int = 0, what: str = "output",
                      suffixes: tuple[str, ...] | None = NIFTI_SUFFIXES) -> Path:
    """Refuse an output path before any work is done on it.

    Raises ``ValueError`` when ``path`` does not end in one of ``suffixes``, is a directory,
    or is one of ``inputs`` (compared by device and inode, so a symbolic or hard link to an
    input counts as that input); ``PermissionError`` when its folder (or the nearest existing
    parent that would hold it) cannot be written; ``OSError`` (ENOSPC) when that file system has
    less than ``nbytes`` free. Every message says what to do.
    """
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{what} {path} is a directory; give a file name inside it, e.g. {path / 'tof.nii.gz'}")
    if suffixes and not any(path.name.endswith(s) for s in suffixes):
        raise ValueError(f"{what} {path}: the file name must end in {' or '.join(suffixes)} "
                         "(the format is taken from it); e.g. tof.nii.gz")
    for src in inputs:
        if same_file(path, src):
            raise ValueError(f"{what} {path} is the input file {src} (the same file on disk, perhaps through a link); "
                             "writing it would destroy the input. Choose another output path.")
    folder = _existing_ancestor(path.parent)
    if not folder.is_dir():
        raise ValueError(f"{what} {path}: {folder} is not a directory; choose an output path in a directory")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise PermissionError(errno.EACCES, f"{what} {path}: cannot write in {folder} (permission denied or a "
                              "read-only file system); choose a directory you can write to")
    if nbytes:
        free = shutil.disk_usage(folder).free
        if free < nbytes:
            raise OSError(errno.ENOSPC, f"{what} {path}: only {free / 2**20:.1f} MiB free on the file system of "
                          f"{folder}, about {nbytes / 2**20:.1f} MiB needed; free some space or write elsewhere")
    return path


def os_error_message(e: OSError) -> str:
    """One line that says what went wrong with a file and what to do about it."""
    if e.errno is not None and e.strerror and e.strerror != os.strerror(e.errno):
        return e.strerror  # a message written by this package: OSError(errno, what to do)
    where = f" {e.filename}" if e.filename else ""
    hints = {
        errno.ENOSPC: f"no space left on the device writing{where}: free disk space (or write to another disk), "
                      "then run the command again (training continues with --resume)",
        errno.EDQUOT: f"disk quota exceeded writing{where}: free space in your quota or write elsewhere",
        errno.EACCES: f"permission denied:{where}: choose a file or directory you can read/write, or fix its "
                      "permissions",
        errno.EPERM: f"operation not permitted:{where}: choose a file or directory you own",
        errno.EROFS: f"read-only file system:{where}: write to a directory on a writable disk",
        errno.ENOENT: f"no such file or directory:{where}: check the path",
        errno.EISDIR: f"is a directory:{where}: give a file path",
        errno.ENOTDIR: f"not a directory:{where}: check the path",
    }
    if e.errno in hints:
        return hints[e.errno]
    return f"{e.strerror or e}{':' + where if where else ''}" if e.strerror else str(e)


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
