"""Loading and querying results whose parts have different column sets; query errors; the
read-only query mode for untrusted SQL (issue 10, items 1, 7 and 10)."""

from __future__ import annotations

import warnings
from pathlib import Path

import pandas as pd
import pytest

from workbench.errors import WorkbenchError
from workbench.protocol.table import tidy
from workbench.runs.load import load_results
from workbench.runs.parquet import write_parquet
from workbench.runs.query import query

README_QUERY = "select probe, metric, layer, head, value from results order by value desc limit 10"


def _per_head(model: str = "m") -> pd.DataFrame:
    rows = [
        {"probe": "entropy", "metric": "entropy", "layer": layer, "head": h, "value": 0.1 * (2 * layer + h), "n": 4}
        for layer in range(2)
        for h in range(2)
    ]
    return tidy(pd.DataFrame(rows), model, "prose")


def _per_item(model: str = "m") -> pd.DataFrame:
    rows = [
        {
            "probe": "vhd",
            "metric": "t_vhd",
            "layer": -1,
            "head": -1,
            "value": v,
            "n": 1,
            "item": "a",
            "step": s,
            "token": t,
        }
        for s, (v, t) in enumerate([(0.9, " red"), (0.05, "</s>")])
    ]
    return tidy(pd.DataFrame(rows), model, "shapes")


def _patching(model: str = "m") -> pd.DataFrame:
    """What `workbench patch` writes: the COLUMNS plus component / position / ld / CIs / receiver."""
    return pd.DataFrame(
        {
            "model": model,
            "dataset": "ioi",
            "probe": "patch-activation",
            "metric": "logit_diff",
            "layer": [0, 1],
            "head": [0, 1],
            "value": [-0.5, 0.25],
            "n": 8,
            "component": "z",
            "position": [-1, 3],
            "ld": [1.5, 2.0],
            "receiver": "logits",
        }
    )


def make_run(folder: Path, order: tuple[str, ...] = ("a", "b", "c"), model: str = "m") -> Path:
    frames = {"a": _per_head(model), "b": _per_item(model), "c": _patching(model)}
    for name in order:
        write_parquet(frames[name], folder / "parts" / f"{name}.parquet", {"schema_version": 1})
    return folder


@pytest.mark.parametrize("order", [("a", "b", "c"), ("c", "b", "a"), ("b", "a")])
def test_load_results_unions_parts_with_different_columns(tmp_path, order):
    make_run(tmp_path / "run", order)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no pandas FutureWarning about all-NA columns in concat
        df = load_results(tmp_path / "run")
    assert len(df) == 4 + 2 + (2 if "c" in order else 0)
    assert list(df.columns[:8]) == ["model", "dataset", "probe", "metric", "layer", "head", "value", "n"]
    # the optional columns have one dtype whatever the order of the parts
    assert str(df["step"].dtype) == "Int64" and str(df["item"].dtype) == "string" and str(df["token"].dtype) == "string"
    if "c" in order:
        assert str(df["position"].dtype) == "Int64" and df["ld"].dtype == "float64"
        assert df.loc[df.probe == "patch-activation", "position"].tolist() == [-1, 3]
        assert df.loc[df.probe != "patch-activation", "position"].isna().all()
    assert df.loc[df.probe == "vhd", "token"].tolist() == [" red", "</s>"]
    assert df.loc[df.probe == "entropy", "step"].isna().all()


def test_readme_query_on_mixed_parts(tmp_path):
    make_run(tmp_path / "run")
    df = query(README_QUERY, [tmp_path / "run"])
    assert list(df.columns) == ["probe", "metric", "layer", "head", "value"]
    assert len(df) == 8 and df.value.tolist() == sorted(df.value, reverse=True)
    assert df.value.iloc[0] == pytest.approx(0.9)
    items = query("select item, step, token from results where probe = 'vhd' order by step", [tmp_path / "run"])
    assert items.token.tolist() == [" red", "</s>"]


def test_query_uses_every_run(tmp_path):
    make_run(tmp_path / "a", ("a", "b"), model="m1")
    make_run(tmp_path / "b", ("c", "a"), model="m2")  # other parts, other columns
    df = query(
        "select run, model, count(*) as n from results group by all order by run", [tmp_path / "a", tmp_path / "b"]
    )
    assert df.run.tolist() == [str(tmp_path / "a"), str(tmp_path / "b")]
    assert df.model.tolist() == ["m1", "m2"] and df.n.tolist() == [6, 6]
    one = query("select count(*) as n from results", [tmp_path / "b"])
    assert one.n.tolist() == [6]
    # a quote in the folder name does not break the SQL that loads it
    odd = make_run(tmp_path / "it's", ("a",))
    assert query("select distinct run from results", [odd]).run.tolist() == [str(odd)]


def test_query_needs_a_run(tmp_path):
    with pytest.raises(WorkbenchError, match="--runs"):
        query("select 1", [])


@pytest.mark.parametrize("sql", ["", "   ", "\n\t", "-- only a comment", "/* nothing */"])
def test_empty_sql_is_a_workbench_error(tmp_path, sql):
    make_run(tmp_path / "run", ("a",))
    with pytest.raises(WorkbenchError, match="no SQL statement") as err:
        query(sql, [tmp_path / "run"])
    assert "select" in (err.value.fix or "")


@pytest.mark.parametrize(
    "sql, kind",
    [
        ("selec * from results", "Parser Error"),
        ("select nope from results", "Binder Error"),
        ("select * from nope", "Catalog Error"),
        ("select 'a'::int", "Conversion Error"),
        ("select range(10000000000)", "Invalid Input Error"),
        ("select error('boom')", "boom"),
    ],
)
def test_duckdb_errors_are_one_line_workbench_errors(tmp_path, sql, kind):
    make_run(tmp_path / "run", ("a",))
    for read_only in (False, True):
        with pytest.raises(WorkbenchError) as err:
            query(sql, [tmp_path / "run"], read_only=read_only)
        assert err.value.message.startswith("query failed: ") and kind in err.value.message
        assert "\n" not in err.value.message
        assert "results" in err.value.fix


# -- read-only mode for untrusted SQL --------------------------------------------------------
@pytest.fixture
def run(tmp_path) -> Path:
    return make_run(tmp_path / "run")


def test_read_only_mode_runs_normal_selects(run, tmp_path):
    make_run(tmp_path / "other", ("a",), model="m2")
    df = query(README_QUERY, [run, tmp_path / "other"], read_only=True)
    assert len(df) == 10 and df.value.tolist() == sorted(df.value, reverse=True)
    n = query(
        "select run, count(*) n from results group by run order by run", [run, tmp_path / "other"], read_only=True
    )
    assert n.n.tolist() == [4, 8]  # other, run
    agg = query(
        "with t as (select metric, avg(value) v from results group by metric) select * from t order by metric",
        [run],
        read_only=True,
    )
    assert agg.metric.tolist() == ["entropy", "logit_diff", "t_vhd"]


def test_default_mode_can_read_files(run, tmp_path):
    """The default mode runs with the user's rights (documented): it can read files."""
    (tmp_path / "x.csv").write_text("a\n1\n")
    assert query(f"select * from read_csv('{tmp_path / 'x.csv'}')", [run]).a.tolist() == [1]


@pytest.mark.parametrize(
    "sql",
    [
        "COPY results TO '{tmp}/leak.csv'",
        "COPY (select * from results) TO '{tmp}/leak.parquet' (FORMAT parquet)",
        "EXPORT DATABASE '{tmp}/leak'",
        "select * from read_csv('{secret}')",
        "select * from read_text('{secret}')",
        "select * from read_blob('{secret}')",
        "select * from '{secret}'",
        "select * from read_parquet('{run}/parts/a.parquet')",
        "select * from glob('{tmp}/*')",
        "ATTACH '{tmp}/leak.db' AS leak",
        "INSTALL httpfs",
        "LOAD httpfs",
        "LOAD '{tmp}/evil.duckdb_extension'",
        "SET enable_external_access = true",
        "RESET enable_external_access",
        "SET lock_configuration = false",
        "PRAGMA enable_external_access = true",
        "SET allow_community_extensions = true",
        "SET autoinstall_known_extensions = true",
        "SET python_enable_replacements = true",
        "select * from results; COPY results TO '{tmp}/leak2.csv'",
    ],
)
def test_read_only_mode_refuses_file_access(run, tmp_path, sql):
    secret = tmp_path / "secret.csv"
    secret.write_text("password\nhunter2\n")
    before = sorted(p.name for p in tmp_path.iterdir())
    with pytest.raises(WorkbenchError, match="query failed"):
        query(sql.format(tmp=tmp_path, secret=secret, run=run), [run], read_only=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing written


def test_read_only_mode_hides_python_variables(run):
    """DuckDB's Python replacement scans would read any DataFrame in the caller's frames by name."""
    secret_frame = pd.DataFrame({"password": ["hunter2"]})  # the point: it is in scope
    with pytest.raises(WorkbenchError, match="query failed"):
        query("select * from secret_frame", [run], read_only=True)
    assert len(secret_frame) == 1


@pytest.mark.parametrize("read_only", [False, True])
def test_an_unreadable_part_is_a_workbench_error(tmp_path, read_only):
    run = make_run(tmp_path / "run", ("a", "b"))
    part = run / "parts" / "b.parquet"
    part.write_bytes(part.read_bytes()[:-30])  # truncated: no footer
    with pytest.raises(WorkbenchError, match="cannot load the results of") as err:
        query(README_QUERY, [run], read_only=read_only)
    assert "b.parquet" in err.value.message and "\n" not in err.value.message


def test_query_cli_takes_repeated_runs_and_a_read_only_flag(tmp_path, capsys):
    """`--runs A --runs B` uses both runs; `--read-only` refuses file access from the command line."""
    from workbench.cli import main

    make_run(tmp_path / "a", model="ma")
    make_run(tmp_path / "b", model="mb")
    rc = main(
        [
            "query",
            "select distinct model from results order by model",
            "--runs",
            str(tmp_path / "a"),
            "--runs",
            str(tmp_path / "b"),
        ]
    )
    out = capsys.readouterr().out
    assert rc == 0 and "ma" in out and "mb" in out
    rc = main(["query", README_QUERY, "--runs", str(tmp_path / "a")])
    assert rc == 0 and "entropy" in capsys.readouterr().out
    secret = tmp_path / "secret.csv"
    secret.write_text("x\nsecret-content-q7z\n")  # a value no temp path can contain
    rc = main(["query", f"select * from read_csv('{secret}')", "--runs", str(tmp_path / "a"), "--read-only"])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("error:") and "secret-content-q7z" not in err


def test_read_only_queries_are_bounded_in_time_and_memory(run, capsys):
    """Issue 30, bug 9: --read-only is for SQL from someone else, which may not end or may want all
    the memory there is. A statement that would run for hours stops at the time limit; one that
    wants more memory than the limit fails; both are one error, and the limits can be changed."""
    from workbench.cli import main
    from workbench.runs.query import READ_ONLY_MEMORY, READ_ONLY_TIMEOUT

    assert READ_ONLY_TIMEOUT and READ_ONLY_MEMORY  # the defaults exist (60 s, 1 GB)
    forever = "select count(*) from range(100000000000) t(i) where i % 7 = 3"
    assert main(["query", forever, "--runs", str(run), "--read-only", "--timeout", "0.5"]) == 2
    err = capsys.readouterr().err
    assert "query stopped after 0.5 s, its time limit" in err and "--timeout" in err
    greedy = "select list(i) from range(200000000) t(i)"  # ~1.6 GB of list
    assert main(["query", greedy, "--runs", str(run), "--read-only", "--memory-limit", "50MB"]) == 2
    assert "query failed: Out of Memory" in capsys.readouterr().err
    assert main(["query", "select 1", "--runs", str(run), "--memory-limit", "lots"]) == 2
    assert "memory limit 'lots'" in capsys.readouterr().err
    with pytest.raises(WorkbenchError, match="time limit"):
        query(forever, [run], timeout=0.5)  # bounds apply to any query when given
