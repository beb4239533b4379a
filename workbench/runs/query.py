"""SQL over run folders and results files (DuckDB), with a read-only mode for SQL from someone else."""

from __future__ import annotations

import contextlib
import threading
from glob import escape as glob_escape
from pathlib import Path
from typing import Any, Iterator

import pandas as pd

from workbench.errors import WorkbenchError, first_line
from workbench.files import targets
from workbench.runs.load import part_files, url_run_table


def _sql_string(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def _results_sql(runs: list[str | Path], con: Any) -> tuple[str, list[str]]:
    """One ``read_parquet([...], union_by_name = true)`` per local run (parts may have different
    columns), stacked by column name, each with the run folder in a ``run`` column. A URL run
    is read through fsspec into an Arrow table registered on ``con`` (DuckDB reads no URL
    itself); returns the SQL and the names registered."""
    selects, registered = [], []
    for i, run in enumerate(runs):
        if targets.is_url(str(run)):
            registered.append(f"_url_run_{i}")
            con.register(registered[-1], url_run_table(str(run)))
            selects.append(f"SELECT *, {_sql_string(str(run))} AS run FROM {registered[-1]}")
            continue
        # DuckDB globs every path it is given and expands a leading ~: an absolute path with
        # *, ? and [ escaped is read literally (a run folder named r* is not every r... folder)
        files = ", ".join(_sql_string(glob_escape(str(Path(f).absolute()))) for f in part_files(run))
        selects.append(
            f"SELECT *, {_sql_string(str(Path(run)))} AS run FROM read_parquet([{files}], union_by_name = true)"
        )
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


# Bounds of a --read-only query (SQL from someone else) unless the caller sets others.
READ_ONLY_TIMEOUT = 60.0  # seconds
READ_ONLY_MEMORY = "1GB"  # DuckDB's memory_limit


def query(
    sql: str,
    runs: list[str | Path],
    read_only: bool = False,
    timeout: float | None = None,
    memory_limit: str | None = None,
) -> pd.DataFrame:
    """Run SQL over the results of one or more runs with DuckDB.

    The table is called ``results``: every part of every run in ``runs`` (folders, results files
    or fsspec URLs of either), columns united by name (absent ones are NULL), plus a ``run``
    column (the run folder).

    By default the SQL runs with the user's rights: DuckDB can read and write any file the user
    can (``COPY ... TO``, ``read_csv``, ``ATTACH``, extensions). ``read_only=True`` is for SQL
    from someone else: the runs' rows are first copied into an in-memory table, then external
    access is disabled and the configuration locked (:data:`READ_ONLY_SETTINGS`), so the SQL
    can read only ``results`` and cannot touch files, the network or extensions; and it is bounded
    in time (``timeout`` seconds, default :data:`READ_ONLY_TIMEOUT`) and memory (``memory_limit``,
    default :data:`READ_ONLY_MEMORY`), so ``select count(*) from range(1e11)`` stops. Either bound
    can be given for any query.
    """
    import duckdb

    if not runs:
        raise WorkbenchError("no runs to query", "give one or more run folders with --runs")
    fix = (
        "write one SQL statement over the table `results`, "
        'e.g. "select probe, metric, layer, head, value from results limit 10"'
    )
    if not sql.strip():
        raise WorkbenchError("no SQL statement given (the query is empty)", fix)
    if read_only:
        timeout = READ_ONLY_TIMEOUT if timeout is None else timeout
        memory_limit = memory_limit or READ_ONLY_MEMORY
    con = duckdb.connect(config={"python_enable_replacements": False})  # never read Python variables by name
    try:
        _prepare(con, runs, read_only, memory_limit)
        try:
            with _deadline(con, timeout):
                result = con.execute(sql)
                if result is None:  # only comments
                    raise WorkbenchError("no SQL statement given (the query holds only comments)", fix)
                return result.df()
        except duckdb.InterruptException:
            raise WorkbenchError(
                f"query stopped after {timeout:g} s, its time limit",
                "raise the limit (--timeout SECONDS), or ask for less: filter, aggregate, add a limit",
            ) from None
        except duckdb.Error as exc:
            columns = [r[0] for r in con.execute("SELECT column_name FROM (DESCRIBE results)").fetchall()]
            raise WorkbenchError(
                f"query failed: {first_line(exc)}", "the table is `results` with columns " + ", ".join(columns)
            ) from None
    finally:
        con.close()


def _prepare(con: Any, runs: list[str | Path], read_only: bool, memory_limit: str | None) -> None:
    """The table ``results`` on ``con`` (a view, or with ``read_only`` an in-memory copy with the
    sources unregistered), the memory limit, and the read-only settings last (they lock the
    configuration)."""
    import duckdb

    table, registered = _results_sql(runs, con)
    try:
        if read_only:
            con.execute(f"CREATE TABLE results AS {table}")
            for name in registered:  # the SQL sees `results` only
                con.unregister(name)
        else:
            con.execute(f"CREATE VIEW results AS {table}")
    except duckdb.Error as exc:
        raise WorkbenchError(
            f"cannot load the results of {', '.join(map(str, runs))}: {first_line(exc)}",
            "re-run the sweep that wrote them",
        ) from None
    if memory_limit:
        try:
            con.execute("SET memory_limit = ?", [memory_limit])
        except duckdb.Error as exc:
            raise WorkbenchError(
                f"memory limit {memory_limit!r}: {first_line(exc)}", "give a size such as 4GB"
            ) from None
    if read_only:
        for setting in READ_ONLY_SETTINGS:
            con.execute(setting)


@contextlib.contextmanager
def _deadline(con: Any, seconds: float | None) -> Iterator[None]:
    """Interrupt ``con``'s running statement after ``seconds`` (DuckDB has no statement timeout of
    its own); None: no limit."""
    if not seconds:
        yield
        return
    timer = threading.Timer(seconds, con.interrupt)
    timer.daemon = True
    timer.start()
    try:
        yield
    finally:
        timer.cancel()
