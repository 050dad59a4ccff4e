"""Resumable HTTP downloads of the IXI archives.

Bytes are appended to ``FILE.part``; a retry after a cut connection asks the
server for the rest with an HTTP ``Range`` header, and the file is renamed to
its final name only when its size equals the size the server announced (and
the known size, where one is given). A server that ignores ``Range`` is
handled by starting over.
"""

from __future__ import annotations

import http.client
import re
import socket
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Iterable

from mmdm.data.layout import DatasetError

#: The public address of IXI (brain-development.org); override with ``--base-url``.
IXI_BASE_URL = "http://biomedic.doc.ic.ac.uk/brain-development/downloads/IXI/"
#: What `mmdm data ixi --download` fetches: one tarball per modality and the demographics sheet.
IXI_FILES: tuple[str, ...] = ("IXI-T1.tar", "IXI-T2.tar", "IXI-PD.tar", "IXI-MRA.tar", "IXI.xls")
#: Optional table of known sizes in bytes (file name -> size). Left empty on purpose: the study
#: has no verified sizes of the public files; the server's Content-Length is checked instead.
#: Users may pass their own table (``expected_sizes``) to pin the files they expect.
KNOWN_SIZES: dict[str, int] = {}

_CONTENT_RANGE = re.compile(r"bytes\s+(\d+)-(\d+)/(\d+|\*)")
_CUT = (http.client.IncompleteRead, http.client.RemoteDisconnected, ConnectionError, socket.timeout,
        TimeoutError, urllib.error.URLError)


class DownloadError(DatasetError):
    """A download that did not complete; the message says what to do."""


class SizeMismatchError(DownloadError):
    """The bytes received do not match the size the server announced or the known size."""


def _total_from_headers(resp: http.client.HTTPResponse) -> tuple[int | None, int]:
    """(total size, offset the body starts at) from a 200 or 206 response."""
    if resp.status == 206:
        m = _CONTENT_RANGE.match(resp.headers.get("Content-Range", ""))
        if not m:
            raise DownloadError(f"{resp.url}: the server answered a range request without a valid "
                                f"Content-Range header ({resp.headers.get('Content-Range')!r})")
        start = int(m.group(1))
        total = None if m.group(3) == "*" else int(m.group(3))
        return total, start
    length = resp.headers.get("Content-Length")
    return (int(length) if length is not None else None), 0


def download_file(url: str, dest: str | Path, expected_size: int | None = None, retries: int = 5,
                  timeout: float = 60.0, backoff: float = 1.0, chunk_size: int = 1 << 20,
                  progress: bool = True) -> Path:
    """Download ``url`` to ``dest`` with resume, retries, a progress bar and a size check.

    A complete ``dest`` (of ``expected_size`` when given) is kept as is. Bytes
    already in ``dest.part`` are not fetched again. Raises
    :class:`SizeMismatchError` when the size announced by the server differs
    from ``expected_size``, when it changes between attempts, or when more bytes
    arrive than announced; :class:`DownloadError` when the server refuses the
    request or the connection is cut more than ``retries`` times in a row.
    """
    from tqdm import tqdm

    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    if dest.exists():
        size = dest.stat().st_size
        if expected_size is None or size == expected_size:
            return dest
        raise SizeMismatchError(f"{dest}: exists with {size} bytes but {expected_size} are expected. "
                                "Delete it and run the download again.")
    part = dest.with_name(dest.name + ".part")
    total: int | None = None
    failures = 0
    bar = None
    try:
        while True:
            offset = part.stat().st_size if part.exists() else 0
            if total is not None and offset == total:
                break
            req = urllib.request.Request(url, headers={"User-Agent": "mmdm-study"})
            if offset:
                req.add_header("Range", f"bytes={offset}-")
            try:
                resp = urllib.request.urlopen(req, timeout=timeout)
            except urllib.error.HTTPError as e:
                if e.code == 416 and offset:  # the part file already holds everything (or more)
                    crange = e.headers.get("Content-Range", "")
                    m = re.match(r"bytes\s+\*/(\d+)", crange)
                    if m and int(m.group(1)) == offset:
                        total = offset
                        break
                    raise SizeMismatchError(
                        f"{url}: the server refuses to resume at byte {offset} ({crange or 'no size given'}); "
                        f"{part} is longer than the file on the server. Delete {part} and run again.") from e
                raise DownloadError(f"{url}: HTTP {e.code} {e.reason}. Check the address (--base-url) and "
                                    "that the file exists there.") from e
            except _CUT as e:
                failures += 1
                if failures > retries:
                    raise DownloadError(f"{url}: could not connect after {retries} retries ({e}). Check the "
                                        f"network and run the same command again: the download resumes.") from e
                time.sleep(backoff * failures)
                continue
            with resp:
                got_total, start = _total_from_headers(resp)
                if start != offset:  # 200 (server ignored Range) or a different range: start over
                    if start != 0:
                        raise DownloadError(f"{url}: asked for bytes from {offset}, the server sent from {start}")
                    part.unlink(missing_ok=True)
                    offset = 0
                if got_total is not None:
                    if expected_size is not None and got_total != expected_size:
                        raise SizeMismatchError(
                            f"{url}: the server announces {got_total} bytes but {expected_size} are expected. "
                            "The file on the server may have changed; check the address, or update the "
                            "expected size.")
                    if total is not None and got_total != total:
                        raise SizeMismatchError(
                            f"{url}: the size changed between attempts ({total} -> {got_total} bytes); the file "
                            f"on the server changed during the download. Delete {part} and run again.")
                    total = got_total
                if bar is None:
                    bar = tqdm(total=total, initial=offset, unit="B", unit_scale=True, unit_divisor=1024,
                               desc=dest.name, disable=not progress)
                else:
                    bar.n = offset
                    bar.refresh()
                try:
                    with open(part, "ab") as out:
                        while True:
                            block = resp.read(chunk_size)
                            if not block:
                                break
                            out.write(block)
                            bar.update(len(block))
                            failures = 0
                except _CUT as e:
                    failures += 1
                    if failures > retries:
                        raise DownloadError(f"{url}: the connection was cut {failures} times in a row ({e}). "
                                            "Run the same command again: the download resumes.") from e
                    time.sleep(backoff * failures)
                    continue
            size = part.stat().st_size if part.exists() else 0
            if total is None:  # no size announced: trust the end of the stream
                total = size
                break
            if size > total:
                raise SizeMismatchError(f"{url}: received {size} bytes but the server announced {total}. "
                                        f"Delete {part} and run again.")
            if size < total:  # connection closed early without an error: resume
                failures += 1
                if failures > retries:
                    raise DownloadError(f"{url}: the transfer stopped at {size} of {total} bytes {failures} "
                                        "times in a row. Run the same command again: the download resumes.")
                time.sleep(backoff * failures)
                continue
            break
    finally:
        if bar is not None:
            bar.close()
    size = part.stat().st_size if part.exists() else 0
    if expected_size is not None and size != expected_size:
        raise SizeMismatchError(f"{url}: received {size} bytes but {expected_size} are expected. "
                                f"Delete {part} and run again.")
    if not part.exists():  # an empty file
        part.touch()
    part.replace(dest)
    return dest


def fetch_ixi(dest_dir: str | Path, base_url: str = IXI_BASE_URL, files: Iterable[str] = IXI_FILES,
              expected_sizes: dict[str, int] | None = None, skip: Iterable[str] = (), progress: bool = True,
              **kwargs) -> dict[str, Path]:
    """Download the IXI files into ``dest_dir`` (resumable); returns name -> local path.

    ``skip``: names not to fetch (e.g. archives already extracted).
    """
    sizes = {**KNOWN_SIZES, **(expected_sizes or {})}
    dest_dir = Path(dest_dir)
    out: dict[str, Path] = {}
    skipped = set(skip)
    for name in files:
        if name in skipped:
            continue
        url = base_url.rstrip("/") + "/" + name
        out[name] = download_file(url, dest_dir / name, expected_size=sizes.get(name), progress=progress, **kwargs)
    return out
