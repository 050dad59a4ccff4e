"""Safe extraction of the IXI tarballs.

Every member of an archive is checked before anything is written: absolute
paths, ``..`` components, symbolic and hard links, device files and FIFOs are
refused, and so is a member whose resolved destination would fall outside the
target folder (e.g. through a symlink already in it). Only regular files are
written, by streaming their bytes (owners, modes and times from the archive are
ignored), each to a temporary name that is renamed when complete.
"""

from __future__ import annotations

import os
import re
import shutil
import tarfile
from pathlib import Path, PurePosixPath
from typing import Callable

from mmdm.data.layout import DatasetError
from mmdm.io import atomic_path


class UnsafeArchiveError(DatasetError):
    """An archive member that could write outside the target folder or is not a plain file."""


_DRIVE = re.compile(r"^[A-Za-z]:")


def check_member(member: tarfile.TarInfo, target: str | Path, archive: str | Path = "") -> Path | None:
    """Destination of a safe member (``None`` for a directory entry); raise for an unsafe one."""
    name = member.name
    where = f"{archive}: member '{name}'"
    advice = "Refusing to extract this archive; check where it came from and download it again."
    if name.startswith(("/", "\\")) or _DRIVE.match(name) or os.path.isabs(name):
        raise UnsafeArchiveError(f"{where} has an absolute path. {advice}")
    parts = PurePosixPath(name.replace("\\", "/")).parts
    if ".." in parts:
        raise UnsafeArchiveError(f"{where} contains a '..' component (it would write outside the target). {advice}")
    if member.issym() or member.islnk():
        raise UnsafeArchiveError(f"{where} is a {'symbolic' if member.issym() else 'hard'} link "
                                 f"(to '{member.linkname}'); IXI archives hold plain files only. {advice}")
    if member.isdev():
        raise UnsafeArchiveError(f"{where} is a device file or FIFO. {advice}")
    if not (member.isfile() or member.isdir()):
        raise UnsafeArchiveError(f"{where} is not a regular file or folder (type {member.type!r}). {advice}")
    root = Path(target).resolve()
    dest = (root / Path(*parts)).resolve() if parts else root
    if dest != root and root not in dest.parents:
        raise UnsafeArchiveError(f"{where} would be written to {dest}, outside {root}. {advice}")
    return None if member.isdir() else dest


def scan_archive(path: str | Path, target: str | Path = ".") -> list[tarfile.TarInfo]:
    """Read the member list of a tar archive and check every member (see :func:`check_member`)."""
    path = Path(path)
    try:
        with tarfile.open(path, "r:*") as tf:
            members = tf.getmembers()
    except FileNotFoundError:
        raise DatasetError(f"{path}: archive not found. Download it with `mmdm data ixi --download DIR`.") from None
    except (tarfile.TarError, EOFError, OSError) as e:
        raise DatasetError(f"{path}: not a readable tar archive, or truncated ({type(e).__name__}: {e}). "
                           "Delete it and download it again.") from e
    for m in members:
        check_member(m, target, path)
    return members


def extract_members(path: str | Path, target: str | Path,
                    select: Callable[[tarfile.TarInfo], bool] | None = None,
                    progress: bool = False) -> list[Path]:
    """Extract the regular-file members chosen by ``select`` (default: all) into ``target``.

    Every member of the archive is checked first; one unsafe member refuses the
    whole archive before anything is written. A destination that already holds
    a file of the member's size is kept (so an interrupted extraction resumes).
    """
    from tqdm import tqdm

    path, target = Path(path), Path(target)
    target.mkdir(parents=True, exist_ok=True)
    members = scan_archive(path, target)
    chosen = [m for m in members if m.isfile() and (select is None or select(m))]
    written: list[Path] = []
    try:
        with tarfile.open(path, "r:*") as tf:
            for m in tqdm(chosen, desc=f"extract {path.name}", unit="file", disable=not progress):
                dest = check_member(m, target, path)
                assert dest is not None
                if dest.is_file() and dest.stat().st_size == m.size:
                    written.append(dest)
                    continue
                src = tf.extractfile(m)
                if src is None:  # pragma: no cover - isfile() members always have data
                    continue
                with src, atomic_path(dest) as tmp, open(tmp, "wb") as out:
                    shutil.copyfileobj(src, out, length=1 << 20)
                size = dest.stat().st_size
                if size != m.size:
                    dest.unlink()
                    raise DatasetError(f"{path}: member '{m.name}' is truncated in the archive "
                                       f"({size} of {m.size} bytes). Delete the archive and download it again.")
                written.append(dest)
    except (tarfile.TarError, EOFError) as e:
        raise DatasetError(f"{path}: the archive ends early or is corrupt ({type(e).__name__}: {e}). "
                           "Delete it and download it again.") from e
    return written

