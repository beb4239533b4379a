"""Atomic file writes with the mode a normal new file gets.

Every output (results, reports, prompt and pair files, sweep configs) is written to a temporary
file in the destination folder, flushed to disk and renamed into place, so a crash or Ctrl-C
never leaves a partial file under the final name. ``mkstemp`` creates its file 0600 and the
rename keeps that mode, so the temp file's mode is set first to what ``open(path, "w")`` would
give: the existing file's mode when overwriting, else ``0o666 & ~umask``.

Outputs that may be fsspec URLs (run folders, reports, single results files) go through
:mod:`workbench.runfs`, which uses :func:`atomic_write` for local paths and ``file://`` URLs.
"""
from __future__ import annotations

import contextlib
import os
import stat
import tempfile
import threading
from pathlib import Path
from typing import BinaryIO, Callable

from workbench.errors import WorkbenchError

_umask_lock = threading.Lock()
URL_OUTPUTS = "sweep run folders (sweep --out, query --runs, report RUN), report --out and the .parquet --out of probe, patch, reinforce and retrieval-ablation"


def refuse_url(path: str | os.PathLike, what: str = "output", why: str = "it is written as local files") -> None:
    """An output that must be a file-system path (``why`` says for what) given as an fsspec URL
    (s3://, gs://, ...): one error naming what does take URLs, instead of a folder named "s3:"."""
    from workbench.runfs import is_url

    if is_url(os.fspath(path)):
        raise WorkbenchError(
            f"{what} {os.fspath(path)!r} is a URL, and this output must be a file-system path: {why}",
            f"give a local or shared file-system path (NFS, Lustre, a mounted bucket); fsspec URLs are accepted by {URL_OUTPUTS}",
        )


def current_umask() -> int:
    """The process umask, read without changing it (Linux: ``/proc/self/status``); elsewhere it
    is set and put back at once, under a lock, as no call reads it without setting it."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    with _umask_lock:
        mask = os.umask(0o022)
        os.umask(mask)
    return mask


def new_file_mode(path: str | Path) -> int:
    """The permission bits ``open(path, "w")`` would leave ``path`` with."""
    try:
        st = os.stat(path)
        if stat.S_ISREG(st.st_mode):
            return stat.S_IMODE(st.st_mode)
    except OSError:
        pass
    return 0o666 & ~current_umask()


def _fsync_dir(folder: Path) -> None:
    """Make the rename itself durable (best effort: not every platform opens folders)."""
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def atomic_write(path: str | Path, write: Callable[[BinaryIO], object]) -> Path:
    """Write ``path`` through ``write(binary_file)`` atomically: temp file in the same folder,
    fsync, normal mode, rename. On any error the temp file is removed and ``path`` is untouched;
    an OS error (unwritable folder, disk full, ``path`` a folder) is a :class:`WorkbenchError`."""
    path = Path(path)
    if path.is_dir():
        raise WorkbenchError(f"cannot write {path}: it is a directory", "give a file name")
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as exc:
        raise WorkbenchError(f"cannot write {path}: {exc.strerror or exc}", "choose a writable output path") from None
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
            os.fchmod(f.fileno(), new_file_mode(path))
        os.replace(tmp, path)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if isinstance(exc, OSError):
            raise WorkbenchError(f"cannot write {path}: {exc.strerror or exc}", "free some space or choose another output path") from None
        raise
    _fsync_dir(path.parent)
    return path


def atomic_write_text(path: str | Path, text: str, encoding: str = "utf-8") -> Path:
    """:func:`atomic_write` of one string."""
    data = text.encode(encoding)
    return atomic_write(path, lambda f: f.write(data))
