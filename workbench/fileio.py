"""Atomic file writes with the mode a normal new file gets.

Every output (results, reports, prompt and pair files, sweep configs) is written to a temporary
file in the destination folder, flushed to disk and renamed into place, so a crash or Ctrl-C
never leaves a partial file under the final name. ``mkstemp`` creates its file 0600 and the
rename keeps that mode, so the temp file's mode is set first to what ``open(path, "w")`` would
give: the existing file's mode when overwriting, else ``0o666 & ~umask``.
"""
from __future__ import annotations

import contextlib
import os
import re
import stat
import tempfile
import threading
from pathlib import Path
from typing import BinaryIO, Callable

from workbench.errors import WorkbenchError

_umask_lock = threading.Lock()
_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.\-]+:/")  # s3://..., gs://..., file://...; Path() folds "//" to "/"


def refuse_url(path: str | os.PathLike, what: str = "output") -> None:
    """Outputs are file-system paths: run folders are kept sound by temporary files renamed into
    place and by moving superseded parts aside, written for file systems, not for object stores
    reached through fsspec (s3://, gs://, ...). Say so instead of creating a folder named "s3:"."""
    if _URL.match(str(path)):
        raise WorkbenchError(
            f"{what} {str(path)!r} is a URL; outputs must be file-system paths (results are written to a temporary file and renamed "
            "into place, run folders are reconciled by moving files, and fsspec URLs are not supported yet)",
            "mount the bucket (s3fs, gcsfuse, blobfuse) or use a shared file system (NFS, Lustre) and give its path",
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
