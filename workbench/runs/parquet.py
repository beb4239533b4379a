"""The results table on disk: Parquet files with the run's metadata, written atomically.

Parquet files carry the run's metadata (schema version, creation time, package versions and
what the caller adds) under the ``workbench`` key of the schema metadata. Writes go through
:func:`workbench.files.targets.write_file`, so a path or an fsspec URL is written whole or not at
all.
"""

from __future__ import annotations

import json
import os
import platform
import tempfile
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from workbench.errors import WorkbenchError
from workbench.files import targets
from workbench.files.atomic import make_folder

META_KEY = b"workbench"


SCHEMA_VERSION = 1


def versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for pkg in ("attention-head-workbench", "torch", "transformers", "transformer-lens", "pandas", "pyarrow"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    return out


def run_metadata(**fields: Any) -> dict[str, Any]:
    return {
        "schema_version": SCHEMA_VERSION,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "versions": versions(),
        **fields,
    }


def check_writable(path: str | Path) -> targets.Target:
    """Fail early (before any model runs) when ``path`` (a path or an fsspec URL) cannot be written."""
    if targets.is_url(str(path)):
        return targets.check_writable(str(path))
    path = Path(path)
    if path.exists() and path.is_dir():
        raise WorkbenchError(f"output {path} is a directory", "give a file name ending in .parquet")
    parent = make_folder(path.parent, "--out path", file=path)
    try:
        fd, probe = tempfile.mkstemp(prefix=".write-test-", dir=parent)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise WorkbenchError(f"cannot write to {path}: {exc.strerror or exc}", "choose a writable --out path") from None
    return path


def write_parquet(df: pd.DataFrame, path: str | Path, metadata: dict[str, Any]) -> targets.Target:
    """Write ``df`` with ``metadata`` to ``path`` (a path or an fsspec URL) atomically
    (:func:`workbench.files.atomic.atomic_write`, :func:`workbench.files.targets.write_file`)."""
    path = check_writable(path)
    table = pa.Table.from_pandas(df, preserve_index=False)
    meta = dict(table.schema.metadata or {})
    meta[META_KEY] = json.dumps(metadata, default=str).encode()
    table = table.replace_schema_metadata(meta)
    return targets.write_file(path, lambda f: pq.write_table(table, f))


def read_table(path: targets.Target) -> pa.Table:
    """The Arrow table of a Parquet file (a URL's bytes are read first: parts are small)."""
    return pq.read_table(pa.BufferReader(targets.read_bytes(path)) if targets.is_url(str(path)) else path)


def read_parquet(path: str | Path) -> tuple[pd.DataFrame, dict[str, Any]]:
    """Read a results file (a path or an fsspec URL) and its metadata."""
    path = targets.as_target(path)
    if not targets.is_file(path):
        raise WorkbenchError(f"results file {path} does not exist", "check the path")
    try:
        table = read_table(path)
    except (pa.ArrowInvalid, OSError) as exc:
        raise WorkbenchError(
            f"{path} is not a readable Parquet file: {exc}", "re-run the probe that wrote it"
        ) from None
    raw = (table.schema.metadata or {}).get(META_KEY)
    return table.to_pandas(), (json.loads(raw) if raw else {})
