"""Atomic file writes with the mode a normal new file gets.

Every output (results, reports, prompt and pair files, sweep configs) is written to a temporary
file in the destination folder, flushed to disk and renamed into place, so a crash or Ctrl-C
never leaves a partial file under the final name. ``mkstemp`` creates its file 0600 and the
rename keeps that mode, so the temp file's mode is set first to what ``open(path, "w")`` would
give: the existing file's mode when overwriting, else ``0o666 & ~umask``.

Outputs that may be fsspec URLs (run folders, reports, single results files) go through
:mod:`workbench.files.targets`, which uses :func:`atomic_write` for local paths and ``file://`` URLs.
"""

from __future__ import annotations

import contextlib
import os
import stat
import tempfile
import threading
from pathlib import Path
from typing import BinaryIO, Callable, Iterator

from workbench.errors import WorkbenchError

_umask_lock = threading.Lock()


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


@contextlib.contextmanager
def _replacing(path: Path) -> Iterator[str]:
    """A temporary file beside ``path`` that becomes ``path`` when the block ends without error:
    fsync, the normal new-file mode, rename, fsync of the folder. On any error the temporary file
    is removed and ``path`` is untouched; an OS error (unwritable folder, disk full) is a
    :class:`WorkbenchError`."""
    if path.is_dir():
        raise WorkbenchError(f"cannot write {path}: it is a directory", "give a file name")
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as exc:
        raise WorkbenchError(f"cannot write {path}: {exc.strerror or exc}", "choose a writable output path") from None
    os.close(fd)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, new_file_mode(path))
        os.replace(tmp, path)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if isinstance(exc, OSError):
            raise WorkbenchError(
                f"cannot write {path}: {exc.strerror or exc}", "free some space or choose another output path"
            ) from None
        raise
    _fsync_dir(path.parent)


def atomic_write(path: str | Path, write: Callable[[BinaryIO], object]) -> Path:
    """Write ``path`` through ``write(binary_file)`` atomically: temp file in the same folder,
    fsync, normal mode, rename. On any error the temp file is removed and ``path`` is untouched;
    an OS error (unwritable folder, disk full, ``path`` a folder) is a :class:`WorkbenchError`."""
    path = Path(path)
    with _replacing(path) as tmp, open(tmp, "wb") as f:
        write(f)
    return path


def atomic_write_named(path: str | Path, write: Callable[[str], object]) -> Path:
    """:func:`atomic_write` for libraries that write to a file *name* (``safetensors.save_file``):
    ``write(temporary_name)``, then the same fsync, mode and rename."""
    path = Path(path)
    with _replacing(path) as tmp:
        write(tmp)
    return path


def atomic_write_text(path: str | Path, text: str, encoding: str = "utf-8") -> Path:
    """:func:`atomic_write` of one string."""
    data = text.encode(encoding)
    return atomic_write(path, lambda f: f.write(data))


def file_in_the_way(folder: str | os.PathLike) -> Path | None:
    """The nearest existing ancestor of ``folder`` (or ``folder`` itself) when it is a file, not a
    folder: what makes ``mkdir`` fail with "File exists" or "Not a directory"."""
    for p in (Path(folder), *Path(folder).parents):
        if p.exists():
            return None if p.is_dir() else p
    return None


def check_folder(folder: str | os.PathLike, what: str = "--out", file: str | os.PathLike | None = None) -> Path:
    """``folder``, refused with one :class:`WorkbenchError` when it or a folder above it is a file
    (commands call it before their model loads). ``what`` names the option to change in the fix
    line; ``file``, the file the folder is for, is what the error says cannot be written."""
    folder = Path(folder)
    blocker = file_in_the_way(folder)
    if blocker is not None:
        raise WorkbenchError(
            f"cannot write to {file if file is not None else folder}: {blocker} is a file, not a folder",
            f"choose another {what} (or move {blocker} away)",
        )
    return folder


def make_folder(folder: str | os.PathLike, what: str = "--out", file: str | os.PathLike | None = None) -> Path:
    """``folder`` and its parents, created as needed (:func:`check_folder` first); an unwritable
    place is one :class:`WorkbenchError` naming it (never a bare ``NotADirectoryError``)."""
    folder = check_folder(folder, what, file)
    shown = file if file is not None else folder
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise WorkbenchError(f"cannot write to {shown}: {exc.strerror or exc}", f"choose a writable {what}") from None
    return folder


class Locked(Exception):
    """:func:`file_lock` with ``wait=False`` found the lock held by another process."""


@contextlib.contextmanager
def file_lock(path: str | os.PathLike, wait: bool = True) -> Iterator[None]:
    """An exclusive lock on the file ``path`` (created if absent) for the block: POSIX ``flock``,
    released when the block ends or the process dies. ``wait=False`` raises :class:`Locked` at
    once instead of waiting. Where ``flock`` does not exist (Windows) there is no lock."""
    try:
        import fcntl
    except ImportError:
        yield
        return
    with open(path, "a+b") as f:
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            raise Locked(str(path)) from None
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


WRITER_LOCK = ".writer.lock"  # in a run folder or a store while it is written


@contextlib.contextmanager
def one_writer(folder: str | os.PathLike, busy: str, fix: str) -> Iterator[None]:
    """The block as ``folder``'s only writer (its :data:`WRITER_LOCK`, released when the block ends
    or the process dies); when another writer holds it, one :class:`WorkbenchError` (``busy``,
    ``fix``) at once, before anything is moved or written."""
    try:
        with file_lock(Path(folder) / WRITER_LOCK, wait=False):
            yield
    except Locked:
        raise WorkbenchError(busy, fix) from None
