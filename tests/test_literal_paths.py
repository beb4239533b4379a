"""Every path a user gives is read literally (issue 30): a run folder named ``r*`` or ``r[1]`` is
that folder, not a pattern (DuckDB and fsspec glob what they are given); ``~r`` is a folder
named so, not user r's home."""

from __future__ import annotations

import fsspec
import pytest

from tests.test_sweep_folder import write
from workbench.cli import main
from workbench.files import targets
from workbench.runs.query import query
from workbench.runs.sweep import run_sweep

COUNT = "select count(*) as n, count(distinct run) as runs from results"


@pytest.fixture(scope="module")
def runs(tiny_dirs, tmp_path_factory):
    """Three run folders whose names are glob patterns matching one another's parts."""
    root = tmp_path_factory.mktemp("literal")
    cfg = write(root, tiny_dirs["llama"])
    for name in ("r1", "r[1]", "r*", "~r"):
        run_sweep(cfg, root / name, progress=False, log=lambda *_: None)
    return root


@pytest.mark.parametrize("name", ["r[1]", "r*", "~r"])
@pytest.mark.parametrize("read_only", [False, True])
def test_a_query_reads_the_run_folder_it_is_given_and_no_other(runs, name, read_only, monkeypatch):
    monkeypatch.chdir(runs)
    one = query(COUNT, ["r1"], read_only=read_only)
    assert query(COUNT, [name], read_only=read_only).to_dict("records") == one.to_dict("records")


def test_the_report_and_the_cli_query_read_literally(runs, monkeypatch, capsys):
    monkeypatch.chdir(runs)
    capsys.readouterr()
    assert main(["query", COUNT, "--runs", "r*"]) == 0
    star = capsys.readouterr().out
    assert main(["query", COUNT, "--runs", "r1"]) == 0
    assert star == capsys.readouterr().out
    assert main(["report", "r*", "--out", "star.html"]) == 0 and (runs / "star.html").is_file()


def test_a_model_named_like_a_home_folder_is_read_literally(tiny_dirs, tmp_path, monkeypatch, capsys):
    import shutil

    monkeypatch.chdir(tmp_path)
    args = ["probe", "entropy", "--n-prompts", "2", "--no-progress", "--out", "e.parquet", "--model"]
    assert main([*args, "~nobody-here"]) == 2
    err = capsys.readouterr().err
    assert "unknown model '~nobody-here'" in err and "internal error" not in err
    shutil.copytree(tiny_dirs["llama"], tmp_path / "~m")
    assert main([*args, "~m"]) == 0


def test_url_listings_read_the_folder_literally():
    fs = fsspec.filesystem("memory")
    for name in ("r1", "r[1]"):
        fs.pipe_file(f"/literal/{name}/parts/{name}.parquet", b"x")
        fs.pipe_file(f"/literal/{name}/c/circuit.json", b"{}")
    assert targets.list_names("memory://literal/r[1]/parts", ".parquet") == ["r[1].parquet"]
    assert targets.glob("memory://literal/r[1]", "*/circuit.json") == ["memory://literal/r[1]/c/circuit.json"]
    fs.rm("/literal", recursive=True)
