"""The one tidy results table, and writing it to Parquet atomically.

Every probe's output is long format: one row per (model, dataset, probe, metric, layer, head)
with the value and ``n``, the number of items averaged. Parquet files carry the run's metadata
(model, dataset, versions, seed, config) under the ``workbench`` key of the file's key-value
metadata, as JSON.

Writes go to a temporary file in the destination folder, are flushed to disk and renamed into
place (:mod:`workbench.fileio`), so a crash or Ctrl-C never leaves a partial file under the final
name; the file gets the mode a normal new file gets. Results files and run folders may also be
fsspec URLs (``s3://bucket/runs/a``): :mod:`workbench.runfs` writes, lists and reads them.
"""
from __future__ import annotations

import json
import os
import platform
import tempfile
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from workbench import runfs
from workbench.errors import WorkbenchError

COLUMNS = ["model", "dataset", "probe", "metric", "layer", "head", "value", "n"]
# Optional keys of per-item rows (e.g. T-VHD per generated token: layer = head = -1, one row per
# (item, step), the step's token text in ``token``); absent (NA) on per-head rows.
ITEM_COLUMNS = ["item", "step", "token"]
META_KEY = b"workbench"
SCHEMA_VERSION = 1


@dataclass
class ProbeResult:
    """What every probe returns, whatever its kind.

    ``table``: the probe's rows (``probe, metric, layer, head, value, n`` and, for per-item rows,
    ``item, step, token``); ``summary``: JSON-able facts recorded in the result file's metadata
    (accuracy, answers, skipped items, ...); ``lines``: what the CLI prints about the run, one
    sentence each, formatted by the probe itself.
    """

    probe: str
    table: pd.DataFrame
    summary: dict[str, Any] = field(default_factory=dict)
    lines: list[str] = field(default_factory=list)


def head_rows(metric: str, value: Any, n: Any) -> pd.DataFrame:
    """Tidy rows ``metric, layer, head, value, n`` for one ``[layer, head]`` tensor of values
    (``n``: a tensor of the same shape or one count for every head)."""
    import torch

    value = torch.as_tensor(value).detach().double().cpu()
    n_t = torch.as_tensor(n).expand_as(value).cpu()
    layer, head = torch.meshgrid(torch.arange(value.shape[0]), torch.arange(value.shape[1]), indexing="ij")
    return pd.DataFrame(
        {
            "metric": metric,
            "layer": layer.flatten().numpy(),
            "head": head.flatten().numpy(),
            "value": value.flatten().numpy(),
            "n": n_t.flatten().numpy().astype("int64"),
        }
    )


def tidy(df: pd.DataFrame, model: str, dataset: str) -> pd.DataFrame:
    """Add run identity columns and fix column order and dtypes."""
    out = df.copy()
    out["model"] = model
    out["dataset"] = dataset
    extra = [c for c in ITEM_COLUMNS if c in out.columns]
    out = out[COLUMNS + extra]
    types = {"layer": "int64", "head": "int64", "value": "float64", "n": "int64"}
    types.update({c: t for c, t in (("item", "string"), ("step", "Int64"), ("token", "string")) if c in extra})
    return out.astype(types)


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


def check_writable(path: str | Path) -> runfs.Target:
    """Fail early (before any model runs) when ``path`` (a path or an fsspec URL) cannot be written."""
    if runfs.is_url(str(path)):
        return runfs.check_writable(str(path))
    path = Path(path)
    if path.exists() and path.is_dir():
        raise WorkbenchError(f"output {path} is a directory", "give a file name ending in .parquet")
    parent = path.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write-test-", dir=parent)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise WorkbenchError(f"cannot write to {path}: {exc.strerror or exc}", "choose a writable --out path") from None
    return path


def write_parquet(df: pd.DataFrame, path: str | Path, metadata: dict[str, Any]) -> runfs.Target:
    """Write ``df`` with ``metadata`` to ``path`` (a path or an fsspec URL) atomically
    (:func:`workbench.fileio.atomic_write`, :func:`workbench.runfs.write_file`)."""
    path = check_writable(path)
    table = pa.Table.from_pandas(df, preserve_index=False)
    meta = dict(table.schema.metadata or {})
    meta[META_KEY] = json.dumps(metadata, default=str).encode()
    table = table.replace_schema_metadata(meta)
    return runfs.write_file(path, lambda f: pq.write_table(table, f))


def read_table(path: runfs.Target) -> pa.Table:
    """The Arrow table of a Parquet file (a URL's bytes are read first: parts are small)."""
    return pq.read_table(pa.BufferReader(runfs.read_bytes(path)) if runfs.is_url(str(path)) else path)


def read_parquet(path: str | Path) -> tuple[pd.DataFrame, dict[str, Any]]:
    """Read a results file (a path or an fsspec URL) and its metadata."""
    path = runfs.as_target(path)
    if not runfs.is_file(path):
        raise WorkbenchError(f"results file {path} does not exist", "check the path")
    try:
        table = read_table(path)
    except (pa.ArrowInvalid, OSError) as exc:
        raise WorkbenchError(f"{path} is not a readable Parquet file: {exc}", "re-run the probe that wrote it") from None
    raw = (table.schema.metadata or {}).get(META_KEY)
    return table.to_pandas(), (json.loads(raw) if raw else {})


def top_heads(df: pd.DataFrame, k: int = 5) -> pd.DataFrame:
    """The ``k`` highest-valued heads for each (probe, metric); per-item rows (layer -1) are not heads."""
    ranked = df[df["layer"] >= 0].dropna(subset=["value"]).sort_values("value", ascending=False)
    return ranked.groupby(["probe", "metric"], sort=False).head(k).sort_values(["probe", "metric", "value"], ascending=[True, True, False])


def part_files(run_dir: str | Path) -> list[runfs.Target]:
    """The Parquet parts of a sweep run folder (or a single results file), a path or an fsspec URL."""
    run_dir = runfs.as_target(run_dir)
    if runfs.is_file(run_dir):
        return [run_dir]
    if not runfs.is_dir(run_dir):
        raise WorkbenchError(f"run folder {run_dir} does not exist", "give the --out folder of a `workbench sweep`")
    parts = runfs.join(run_dir, "parts")
    folder = parts if runfs.is_dir(parts) else run_dir
    files = [runfs.join(folder, n) for n in runfs.list_names(folder, ".parquet")]
    if not files:
        raise WorkbenchError(f"{run_dir} holds no results (no parts/*.parquet)", "run `workbench sweep CONFIG --out` into it first")
    return files


def _nullable(dtype) -> Any:
    """The dtype an optional column gets when some parts lack it: missing values as <NA>
    without changing the type (an int column stays integer, not float)."""
    kind = getattr(dtype, "kind", None)
    if kind in ("i", "u"):
        return "Int64"
    if kind == "b":
        return "boolean"
    if kind in ("O", "U", "T") or str(dtype) in ("str", "string"):
        return "string"
    return dtype  # float (NaN), datetimes (NaT) and extension dtypes hold missing values already


OPTIONAL_TYPES = {"item": "string", "step": "Int64", "token": "string"}


def union_frames(frames: list[pd.DataFrame]) -> pd.DataFrame:
    """Concatenate result tables with different column sets (item-probe parts carry item / step /
    token, patching outputs component / position / ld / ...): COLUMNS first, then every other
    column in the order first seen, each with one dtype whatever the order of the parts."""
    extra: dict[str, Any] = {}
    for df in frames:
        for c in df.columns:
            if c not in COLUMNS and c not in extra:
                extra[c] = OPTIONAL_TYPES.get(c, _nullable(df[c].dtype))
    aligned = []
    for df in frames:
        df = df.copy()
        for c, dtype in extra.items():
            if c not in df.columns:
                df[c] = pd.Series(index=df.index, dtype=dtype)  # all missing, of the right type
            else:
                try:
                    df[c] = df[c].astype(dtype)
                except (TypeError, ValueError):  # the same name with other types: keep as written
                    pass
        aligned.append(df[COLUMNS + list(extra)])
    return pd.concat(aligned, ignore_index=True)


def load_results(run_dir: str | Path, with_metadata: bool = False):
    """All parts of a run as one tidy DataFrame (and, optionally, each part's metadata).

    Parts written by an incompatible version (missing columns, other schema version) are
    refused with a message naming the file.
    """
    frames, metas = [], []
    for f in part_files(run_dir):
        df, meta = read_parquet(f)
        missing = [c for c in COLUMNS if c not in df.columns]
        version = meta.get("schema_version")
        if missing or (version is not None and version != SCHEMA_VERSION):
            raise WorkbenchError(
                f"{f} was written by an incompatible workbench version (schema {version}, missing columns {missing or 'none'})",
                "re-run the sweep into a new folder with this version",
            )
        frames.append(df)
        metas.append({"file": str(f), **meta})
    table = union_frames(frames)
    return (table, metas) if with_metadata else table


def _sql_string(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def url_run_table(run: str) -> pa.Table:
    """Every part of the run folder at the fsspec URL ``run`` as one Arrow table, columns united
    by name (as DuckDB's ``union_by_name``); a part that does not read is a WorkbenchError."""
    tables = []
    for f in part_files(run):
        try:
            tables.append(read_table(f).replace_schema_metadata(None))
        except (pa.ArrowInvalid, OSError) as exc:
            raise WorkbenchError(f"cannot load the results of {run}: {f}: {_one_line(exc)}", "re-run the sweep that wrote them") from None
    try:
        return pa.concat_tables(tables, promote_options="permissive")
    except pa.ArrowException as exc:  # one column name with types that do not unite
        raise WorkbenchError(f"cannot load the results of {run}: {_one_line(exc)}", "re-run the sweep that wrote them") from None


def _results_sql(runs: list[str | Path], con: Any) -> tuple[str, list[str]]:
    """One ``read_parquet([...], union_by_name = true)`` per local run (parts may have different
    columns), stacked by column name, each with the run folder in a ``run`` column. A URL run
    is read through fsspec into an Arrow table registered on ``con`` (DuckDB reads no URL
    itself); returns the SQL and the names registered."""
    selects, registered = [], []
    for i, run in enumerate(runs):
        if runfs.is_url(str(run)):
            registered.append(f"_url_run_{i}")
            con.register(registered[-1], url_run_table(str(run)))
            selects.append(f"SELECT *, {_sql_string(str(run))} AS run FROM {registered[-1]}")
            continue
        files = ", ".join(_sql_string(str(f)) for f in part_files(run))
        selects.append(f"SELECT *, {_sql_string(str(Path(run)))} AS run FROM read_parquet([{files}], union_by_name = true)")
    return " UNION ALL BY NAME ".join(selects), registered


# Applied, in this order, before untrusted SQL runs: no file or network access, no extension
# installed or loaded (autoloading would read the extension folder), no Python variable read
# by name, and then the configuration is locked so the SQL cannot set any of them back.
READ_ONLY_SETTINGS = (
    "SET enable_external_access = false",
    "SET allow_community_extensions = false",
    "SET autoinstall_known_extensions = false",
    "SET autoload_known_extensions = false",
    "SET lock_configuration = true",
)


def _one_line(exc: BaseException) -> str:
    return next((line.strip() for line in str(exc).splitlines() if line.strip()), type(exc).__name__)


def query(sql: str, runs: list[str | Path], read_only: bool = False) -> pd.DataFrame:
    """Run SQL over the results of one or more runs with DuckDB.

    The table is called ``results``: every part of every run in ``runs`` (folders, results files
    or fsspec URLs of either), columns united by name (absent ones are NULL), plus a ``run``
    column (the run folder).

    By default the SQL runs with the user's rights: DuckDB can read and write any file the user
    can (``COPY ... TO``, ``read_csv``, ``ATTACH``, extensions). ``read_only=True`` is for SQL
    from someone else: the runs' rows are first copied into an in-memory table, then external
    access is disabled and the configuration locked (:data:`READ_ONLY_SETTINGS`), so the SQL
    can read only ``results`` and cannot touch files, the network or extensions.
    """
    import duckdb

    if not runs:
        raise WorkbenchError("no runs to query", "give one or more run folders with --runs")
    fix = "write one SQL statement over the table `results`, e.g. \"select probe, metric, layer, head, value from results limit 10\""
    if not sql.strip():
        raise WorkbenchError("no SQL statement given (the query is empty)", fix)
    con = duckdb.connect(config={"python_enable_replacements": False})  # never read Python variables by name
    try:
        table, registered = _results_sql(runs, con)
        try:
            if read_only:
                con.execute(f"CREATE TABLE results AS {table}")
                for name in registered:  # the SQL sees `results` only
                    con.unregister(name)
                for setting in READ_ONLY_SETTINGS:
                    con.execute(setting)
            else:
                con.execute(f"CREATE VIEW results AS {table}")
        except duckdb.Error as exc:
            raise WorkbenchError(f"cannot load the results of {', '.join(map(str, runs))}: {_one_line(exc)}",
                                 "re-run the sweep that wrote them") from None
        try:
            result = con.execute(sql)
            if result is None:  # only comments
                raise WorkbenchError("no SQL statement given (the query holds only comments)", fix)
            return result.df()
        except duckdb.Error as exc:
            columns = [r[0] for r in con.execute("SELECT column_name FROM (DESCRIBE results)").fetchall()]
            raise WorkbenchError(f"query failed: {_one_line(exc)}", "the table is `results` with columns " + ", ".join(columns)) from None
    finally:
        con.close()
