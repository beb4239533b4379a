"""One writer per run folder at an object-store URL: a lease object taken by a conditional PUT.

A local run folder has :func:`workbench.files.atomic.one_writer` (``flock``, released by the
kernel when the process dies). An object store has no lock, but S3 (and GCS, Azure, fsspec's
memory store) can create an object only if it does not exist yet: fsspec's ``open(path, "xb")``
sends ``If-None-Match: *``. The writer creates ``.writer.lock`` that way, so of two sweeps
starting at once exactly one gets it; the other stops before it moves or writes anything and is
told who holds the folder.

A process killed with the lease held cannot delete it, so the holder renews it (rewrites its
``renewed`` time) every :data:`RENEW_S` seconds from a daemon thread. A lease not renewed for
:data:`STALE_S` seconds is stale: the next writer deletes it and takes the folder with a new
conditional PUT (two writers that find the same stale lease at the same instant: one wins the
PUT, the other is refused). A clock that is wrong by more than ``STALE_S - RENEW_S`` between
machines would break the staleness test; the refusal names the holder's host, pid and last
renewal, so a person can judge.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import threading
import time
import uuid
from pathlib import Path
from typing import Iterator

from workbench.errors import WorkbenchError
from workbench.files.atomic import one_writer
from workbench.files.targets import filesystem, remote

LEASE = ".writer.lock"
RENEW_S = 60.0
STALE_S = 600.0


def _body(owner: str, started: float) -> bytes:
    return json.dumps(
        {"owner": owner, "host": socket.gethostname(), "pid": os.getpid(), "started": started, "renewed": time.time()}
    ).encode()


def _read(fs, path: str) -> dict | None:
    try:
        return json.loads(fs.cat_file(path))
    except FileNotFoundError:
        return None
    except (ValueError, UnicodeDecodeError):
        return {}  # unreadable: treat as held, renewed never (stale)


def _create(fs, path: str, body: bytes) -> bool:
    """Create ``path`` holding ``body`` only if it does not exist; whether this call created it."""
    try:
        with fs.open(path, "xb") as f:
            f.write(body)
        return True
    except FileExistsError:
        return False


def _holder(lease: dict) -> str:
    renewed = lease.get("renewed")
    ago = f"{time.time() - renewed:.0f} s ago" if isinstance(renewed, (int, float)) else "never"
    return f"held by pid {lease.get('pid', '?')} on {lease.get('host', '?')}, last renewed {ago}"


def _renew(fs, path: str, owner: str, started: float, stop: threading.Event) -> None:
    while not stop.wait(RENEW_S):
        with contextlib.suppress(Exception):  # a renewal that fails is retried; staleness takes 10 of them
            lease = _read(fs, path)
            if not lease or lease.get("owner") != owner:
                return  # taken over (we were stale): nothing of ours to renew
            fs.pipe_file(path, _body(owner, started))


@contextlib.contextmanager
def url_writer(folder: str, busy: str, fix: str) -> Iterator[None]:
    """The block as the only writer of the run folder at URL ``folder`` (its :data:`LEASE`
    object, renewed while the block runs and deleted when it ends); when a live lease is held by
    another writer, one :class:`WorkbenchError` (``busy``, the holder, ``fix``) at once. A
    ``file://`` URL is a local folder and takes the local lock instead."""
    fs, root = filesystem(folder)
    if "file" in fs.protocol or "local" in fs.protocol:
        Path(root).mkdir(parents=True, exist_ok=True)  # the lock file lives in it (a new run folder)
        with one_writer(root, busy, fix):
            yield
        return
    path = root.rstrip("/") + "/" + LEASE
    owner, started = uuid.uuid4().hex, time.time()
    with remote("taking the run folder's writer lease", folder):
        if not _create(fs, path, _body(owner, started)):
            lease = _read(fs, path) or {}
            renewed = lease.get("renewed")
            if isinstance(renewed, (int, float)) and time.time() - renewed < STALE_S:
                raise WorkbenchError(f"{busy} ({_holder(lease)})", fix)
            with contextlib.suppress(FileNotFoundError):
                fs.rm_file(path)  # stale: its writer stopped renewing it STALE_S ago
            if not _create(fs, path, _body(owner, started)):
                raise WorkbenchError(f"{busy} ({_holder(_read(fs, path) or {})})", fix)
    stop = threading.Event()
    renewer = threading.Thread(target=_renew, args=(fs, path, owner, started, stop), daemon=True)
    renewer.start()
    try:
        yield
    finally:
        stop.set()
        renewer.join(timeout=5)
        with contextlib.suppress(Exception):
            lease = _read(fs, path)
            if lease and lease.get("owner") == owner:
                fs.rm_file(path)
