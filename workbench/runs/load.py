"""Loading results at rest: a results file or every part of a run folder, as one table."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa

from workbench.errors import WorkbenchError, first_line
from workbench.files import targets
from workbench.protocol.table import COLUMNS
from workbench.runs.parquet import SCHEMA_VERSION, read_parquet, read_table


def part_files(run_dir: str | Path) -> list[targets.Target]:
    """The Parquet parts of a sweep run folder (or a single results file), a path or an fsspec URL."""
    run_dir = targets.as_target(run_dir)
    if targets.is_file(run_dir):
        return [run_dir]
    if not targets.is_dir(run_dir):
        raise WorkbenchError(f"run folder {run_dir} does not exist", "give the --out folder of a `workbench sweep`")
    parts = targets.join(run_dir, "parts")
    folder = parts if targets.is_dir(parts) else run_dir
    files = [targets.join(folder, n) for n in targets.list_names(folder, ".parquet")]
    if not files:
        raise WorkbenchError(
            f"{run_dir} holds no results (no parts/*.parquet)", "run `workbench sweep CONFIG --out` into it first"
        )
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
                f"{f} was written by an incompatible workbench version "
                f"(schema {version}, missing columns {missing or 'none'})",
                "re-run the sweep into a new folder with this version",
            )
        frames.append(df)
        metas.append({"file": str(f), **meta})
    table = union_frames(frames)
    return (table, metas) if with_metadata else table


def url_run_table(run: str) -> pa.Table:
    """Every part of the run folder at the fsspec URL ``run`` as one Arrow table, columns united
    by name (as DuckDB's ``union_by_name``); a part that does not read is a WorkbenchError."""
    tables = []
    for f in part_files(run):
        try:
            tables.append(read_table(f).replace_schema_metadata(None))
        except (pa.ArrowInvalid, OSError) as exc:
            raise WorkbenchError(
                f"cannot load the results of {run}: {f}: {first_line(exc)}", "re-run the sweep that wrote them"
            ) from None
    try:
        return pa.concat_tables(tables, promote_options="permissive")
    except pa.ArrowException as exc:  # one column name with types that do not unite
        raise WorkbenchError(
            f"cannot load the results of {run}: {first_line(exc)}", "re-run the sweep that wrote them"
        ) from None
