"""Run folders and result files on a local path or an fsspec URL: the few operations they need.

A *target* is a local path (a ``Path``) or a URL (a ``str``: ``s3://bucket/runs/a``,
``gs://...``, ``file:///shared/runs/a``, ``memory://runs/a``), resolved with
:func:`fsspec.core.url_to_fs`. A run folder needs four things of its storage: write a file so
that no reader ever sees half of it, read a file's bytes (size, SHA-256), list
``parts/*.parquet``, and move a file aside. Local paths take exactly the code they always took
(:func:`workbench.files.atomic.atomic_write`: temp file, fsync, the normal file mode, rename;
``shutil.move``); only URLs go through fsspec.

How a URL write stays atomic depends on the file system behind it (:func:`write_file`):

- ``file://``: the local file system, so the local atomic write (temp + rename, modes, fsync).
- object stores (:data:`OBJECT_STORES`: S3, GCS, Azure Blob, fsspec's in-memory store): an
  object PUT is atomic per object (a multipart upload is invisible until it completes), so the
  file is written to its final key directly; a temp key plus a "rename" (copy + delete) would
  only add a second, non-atomic step.
- any other fsspec file system (SFTP, HDFS, SMB, ...): a write may be visible while it runs,
  so it goes to a temporary name in the same folder and is moved into place.

A move on an object store is a copy and a delete (:func:`move`); the run folder records in its
``run.json`` what it moved where.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import shutil
import uuid
from glob import escape as glob_escape
from pathlib import Path
from typing import IO, Any, BinaryIO, Callable, Iterator, Union

from workbench.errors import WorkbenchError, first_line
from workbench.files.atomic import atomic_write
from workbench.files.hashing import sha256_stream

Target = Union[str, Path]
# s3://..., gs://..., file://..., memory://...; chained URLs (simplecache::s3://...) too. Two
# letters at least, so a Windows drive (C:/) is a path. Path() folds "//" to "/": test the string.
_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.\-]+:(?:/|:[A-Za-z])")
OBJECT_STORES = frozenset({"s3", "s3a", "gs", "gcs", "az", "abfs", "abfss", "oss", "memory"})
PROCESS_LOCAL = frozenset({"memory"})  # URLs only the process that wrote them can read


def is_url(target: Any) -> bool:
    """Whether ``target`` names an fsspec URL rather than a local path."""
    return isinstance(target, str) and bool(_URL.match(target))


def as_target(target: str | os.PathLike) -> Target:
    """A URL stays a string (``Path`` would fold its ``//``); anything else becomes a ``Path``."""
    text = os.fspath(target)
    return text if is_url(text) else Path(text)


def _protocol(url: str) -> str:
    return url.split("::")[0].split("://")[0].split(":")[0].lower()


def filesystem(url: str) -> tuple[Any, str]:
    """The fsspec file system of ``url`` and the path inside it; an unknown protocol or a
    protocol whose package is not installed is one :class:`WorkbenchError` naming the fix."""
    from fsspec.core import url_to_fs
    from fsspec.registry import known_implementations

    protocol = _protocol(url)
    try:
        return url_to_fs(url)
    except ImportError as exc:
        module = str(known_implementations.get(protocol, {}).get("class", "")).split(".")[0]
        named = re.search(r"\"([A-Za-z0-9_.-]+)\"|install ([A-Za-z0-9_.-]+)", str(exc), re.I)
        package = module if module and module != "fsspec" else (named and (named.group(1) or named.group(2)))
        raise WorkbenchError(
            f"{url!r}: {protocol}:// URLs need a package that is not installed ({exc})",
            f"pip install {package}" if package else "install the fsspec implementation for this protocol",
        ) from None
    except ValueError as exc:
        if "protocol not known" in str(exc).lower():
            raise WorkbenchError(
                f"{url!r}: unknown URL protocol {protocol!r}",
                "give a local path, or a URL fsspec knows (s3://, gs://, az://, file://, ...)",
            ) from None
        raise WorkbenchError(f"{url!r} is not a usable URL: {exc}", "check the URL") from None


URL_ACCEPTED = (
    "sweep run folders (sweep --out, query --runs, report RUN), report --out and the .parquet --out of probe, "
    "patch, reinforce and retrieval-ablation"
)


def refuse_url(path: str | os.PathLike, what: str = "output", why: str = "it is written as local files") -> None:
    """An output that must be a file-system path (``why`` says for what) given as an fsspec URL
    (s3://, gs://, ...): one error naming what does take URLs, instead of a folder named "s3:"."""
    if is_url(os.fspath(path)):
        raise WorkbenchError(
            f"{what} {os.fspath(path)!r} is a URL, and this output must be a file-system path: {why}",
            "give a local or shared file-system path (NFS, Lustre, a mounted bucket); "
            f"fsspec URLs are accepted by {URL_ACCEPTED}",
        )


def check_url(url: str) -> None:
    """Fail now (before any model loads) when ``url``'s file system cannot be used."""
    if is_url(url):
        filesystem(url)


def _is_local_fs(fs: Any) -> bool:
    from fsspec.implementations.local import LocalFileSystem

    return isinstance(fs, LocalFileSystem)


def writes_whole_objects(fs: Any) -> bool:
    """An object store: a write becomes visible whole, when it completes (see the module doc)."""
    protocols = (fs.protocol,) if isinstance(fs.protocol, str) else tuple(fs.protocol)
    return bool(OBJECT_STORES.intersection(protocols))


def process_local(target: Target) -> bool:
    """``memory://``: private to this process; another process (a Ray worker) sees nothing."""
    return is_url(target) and _protocol(str(target)) in PROCESS_LOCAL


def join(base: Target, *names: str) -> Target:
    """``base / name / ...`` for a path, ``base/name/...`` for a URL."""
    if isinstance(base, Path) or not is_url(base):
        return Path(base).joinpath(*names)
    return "/".join([base.rstrip("/"), *names])


def name(target: Target) -> str:
    """The last component: a file's name or a folder's."""
    return target.name if isinstance(target, Path) else str(target).rstrip("/").rsplit("/", 1)[-1]


def absolute(target: Target) -> Target:
    """What another process on another machine can open: an absolute path, or a URL (a
    ``file://`` URL made absolute, as it would otherwise be read relative to each worker's folder)."""
    if not is_url(target):
        return Path(target).resolve()
    fs, path = filesystem(str(target))
    return "file://" + path if _is_local_fs(fs) and "::" not in str(target) else target


def _fresh(url: str) -> tuple[Any, str]:
    """:func:`filesystem`, with any cached listing of the path dropped: object-store file systems
    (s3fs, gcsfs) cache listings per process, and parts are written by other processes (Ray
    workers), so a listing from before they ran must not answer after."""
    fs, path = filesystem(url)
    fs.invalidate_cache(path)
    return fs, path


def exists(target: Target) -> bool:
    if not is_url(target):
        return Path(target).exists()
    with remote("read", target):
        fs, path = _fresh(str(target))
        return bool(fs.exists(path))


def is_file(target: Target) -> bool:
    if not is_url(target):
        return Path(target).is_file()
    with remote("read", target):
        fs, path = _fresh(str(target))
        return bool(fs.isfile(path))


def is_dir(target: Target) -> bool:
    if not is_url(target):
        return Path(target).is_dir()
    with remote("read", target):
        fs, path = _fresh(str(target))
        return bool(fs.isdir(path))


def list_names(folder: Target, suffix: str) -> list[str]:
    """The sorted names of the files directly in ``folder`` that end in ``suffix``."""
    if not is_url(folder):
        folder = Path(folder)
        return [p.name for p in sorted(folder.glob(f"*{suffix}"))] if folder.is_dir() else []
    with remote("list", folder):
        fs, path = _fresh(str(folder))
        if not fs.isdir(path):
            return []
        found = fs.ls(path, detail=False)  # not a glob: a folder named r[1] is read literally
    return sorted(n for n in (p.rstrip("/").rsplit("/", 1)[-1] for p in found) if n.endswith(suffix))


def glob(base: Target, pattern: str) -> list[Target]:
    """The files under ``base`` that match ``pattern`` (``*/circuit.json``); ``base`` is read
    literally (a folder named ``r[1]`` or ``r*`` is that folder), only ``pattern`` is a pattern."""
    if not is_url(base):
        return sorted(Path(base).glob(pattern))
    with remote("list", base):
        fs, path = _fresh(str(base))
        root = path.rstrip("/")
        found = sorted(fs.glob(f"{glob_escape(root)}/{pattern}"))
    return [join(base, *p[len(root) + 1 :].split("/")) for p in found if p.startswith(root + "/")]


@contextlib.contextmanager
def open_read(target: Target) -> Iterator[BinaryIO]:
    if not is_url(target):
        with open(target, "rb") as f:
            yield f
        return
    with remote("read", target):
        fs, path = filesystem(str(target))
        f = fs.open(path, "rb")
    with f:
        yield f


def read_bytes(target: Target) -> bytes:
    if not is_url(target):
        return Path(target).read_bytes()
    with remote("read", target):
        fs, path = filesystem(str(target))
        return bytes(fs.cat_file(path))


def size(target: Target) -> int:
    if not is_url(target):
        return Path(target).stat().st_size
    with remote("read", target):
        fs, path = filesystem(str(target))
        return int(fs.size(path))


def sha256(target: Target) -> str:
    """The file's SHA-256 (:mod:`workbench.files.hashing`), local or at a URL."""
    with open_read(target) as f:
        return sha256_stream(f)


def _fs_error(what: str, target: Target, exc: BaseException) -> WorkbenchError:
    """A failure of a remote file system, said as what it is: the storage service or the network
    to it answered with an error (not a bug of the workbench)."""
    detail = getattr(exc, "strerror", None) or first_line(exc)
    return WorkbenchError(
        f"cannot {what} {target}: the storage service or the network to it failed ({type(exc).__name__}: {detail})",
        "check the URL, your credentials (fsspec reads them from the environment and its config), "
        "that the bucket exists and that its endpoint can be reached",
    )


@contextlib.contextmanager
def remote(what: str, target: Target) -> Iterator[None]:
    """Every failure of a URL's file system inside the block but a missing file (which callers
    handle) becomes one :class:`WorkbenchError` naming the storage service or the network."""
    try:
        yield
    except (FileNotFoundError, WorkbenchError):
        raise
    except Exception as exc:
        raise _fs_error(what, target, exc) from None


def write_file(target: Target, write: Callable[[IO[bytes]], object]) -> Target:
    """Write ``target`` through ``write(binary_file)`` so that no reader sees half of it (see the
    module doc for how, per file system); an error leaves ``target`` as it was."""

    if not is_url(target):
        return atomic_write(target, write)
    fs, path = filesystem(str(target))
    write_to_fs(fs, path, write, str(target))
    return target


def write_to_fs(fs: Any, path: str, write: Callable[[IO[bytes]], object], shown: str | None = None) -> None:
    """:func:`write_file` on an fsspec file system: the local one by temp file and rename (with
    the normal file mode), an object store by one PUT of the whole file, any other by a temporary
    name moved into place."""

    if _is_local_fs(fs):
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, write)
        return
    buffer = io.BytesIO()
    write(buffer)  # the bytes first: a failing writer leaves nothing behind, not even a temp file
    data = buffer.getvalue()
    if writes_whole_objects(fs):
        try:
            with fs.open(path, "wb") as f:
                f.write(data)
        except Exception as exc:
            raise _fs_error("write", shown or path, exc) from None
        return
    parent, _, leaf = path.rpartition("/")
    tmp = f"{parent}/" * bool(parent) + f".{leaf}.{uuid.uuid4().hex[:12]}.tmp"
    try:
        if parent:
            fs.makedirs(parent, exist_ok=True)
        with fs.open(tmp, "wb") as f:
            f.write(data)
        fs.mv(tmp, path)
    except Exception as exc:
        with contextlib.suppress(Exception):
            fs.rm(tmp)
        raise _fs_error("write", shown or path, exc) from None


def write_text(target: Target, text: str, encoding: str = "utf-8") -> Target:
    data = text.encode(encoding)
    return write_file(target, lambda f: f.write(data))


def move(src: Target, dest: Target) -> None:
    """Move a file: a rename on a file system, a copy then a delete on an object store (fsspec's
    ``mv``), so a crash in between leaves the file in both places, never in neither."""
    if not is_url(src):
        Path(dest).parent.mkdir(parents=True, exist_ok=True)
        shutil.move(str(src), dest)
        return
    fs, path = filesystem(str(src))
    _, dest_path = filesystem(str(dest))
    try:
        if not writes_whole_objects(fs):
            fs.makedirs(dest_path.rpartition("/")[0], exist_ok=True)
        fs.mv(path, dest_path)
    except Exception as exc:
        raise _fs_error("move", src, exc) from None


def check_writable(target: str) -> str:
    """Fail early (before any model runs) when the URL ``target`` cannot be written: its file
    system resolves, it is not a folder, and a probe file next to it can be written and removed."""
    fs, path = filesystem(target)
    try:
        folder = fs.isdir(path)
    except Exception as exc:
        raise _fs_error("write to", target, exc) from None
    if folder:
        raise WorkbenchError(f"output {target} is a directory", "give a file name")
    parent = path.rpartition("/")[0]
    probe = f"{parent}/" * bool(parent) + f".write-test-{uuid.uuid4().hex[:12]}"
    try:
        if not writes_whole_objects(fs) and parent:
            fs.makedirs(parent, exist_ok=True)
        with fs.open(probe, "wb") as f:
            f.write(b"")
        fs.rm(probe)
    except Exception as exc:
        raise _fs_error("write to", target, exc) from None
    return target
