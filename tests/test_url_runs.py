"""Run folders at fsspec URLs (issue 14): a sweep into ``memory://`` (fsspec's real in-process
store; to workbench an object store: one PUT per part, a move is a copy and a delete) equals the
same sweep into a local folder, resumes without recomputing, recomputes a damaged part, sets
aside the parts of an earlier config, and reads back through load_results, query and report.
``file://`` and a file system that is neither local nor an object store write through a
temporary name. (The cross-process case, a Ray sweep into a ``file://`` URL, is in
tests/test_executors.py.)"""

from __future__ import annotations

import hashlib
import json
import os
import stat
import uuid
from typing import Callable

import fsspec
import pandas as pd
import pytest

from tests.test_sweep_folder import write
from workbench.cli import main
from workbench.errors import WorkbenchError
from workbench.files import targets
from workbench.runs.load import load_results
from workbench.runs.query import query
from workbench.runs.sweep import run_sweep
from workbench.runs.views import read_views

KEYS = ["model", "dataset", "probe", "metric", "layer", "head"]
MEM = fsspec.filesystem("memory")


def rows(run) -> pd.DataFrame:
    return load_results(run).sort_values(KEYS).reset_index(drop=True)


def quiet(*_) -> None:
    pass


@pytest.fixture(scope="module")
def local(tiny_dirs, tmp_path_factory):
    """The config, and the same sweep into a local folder: the reference."""
    root = tmp_path_factory.mktemp("urlruns")
    cfg = write(root, tiny_dirs["llama"])  # the sweep-folder tests' config: prose + repeated-random
    run_sweep(cfg, root / "local", progress=False, log=quiet)
    return cfg, root / "local"


@pytest.fixture
def mem():
    """A fresh ``memory://`` folder (the store is global to the process): its URL, removed after."""
    root = f"wb-{uuid.uuid4().hex[:10]}"
    yield f"memory://{root}"
    if MEM.exists(f"/{root}"):
        MEM.rm(f"/{root}", recursive=True)


def files(url: str) -> dict[str, bytes]:
    """Every object under ``url`` by its path below it."""
    base = targets.filesystem(url)[1].rstrip("/")
    return {p[len(base) + 1 :]: MEM.cat_file(p) for p in MEM.find(base)}


def check_sweep_equals_local_and_resumes(cfg, ref, run: str, read: Callable[[str], dict[str, bytes]]) -> None:
    """The sweep ``cfg`` into the URL ``run``: exactly the local run ``ref``'s parts plus run.json,
    sweep.json and views.parquet, a manifest with each part's and the views' size and SHA-256, the
    same rows and views; a second sweep
    resumes with nothing recomputed or rewritten. ``read(url)``: every object under ``url`` by
    its path below it, read afresh from the store (tests/test_s3_runs.py reads an S3 bucket)."""
    summary = run_sweep(cfg, run, progress=False, log=quiet)
    assert summary["ran"] == 3 and summary["parts"] == f"{run}/parts"
    stored = read(run)
    parts = sorted(k for k in stored if k.startswith("parts/"))
    assert parts == sorted(f"parts/{p.name}" for p in (ref / "parts").iterdir())
    assert (ref / "views.parquet").is_file()
    assert set(stored) == {*parts, "run.json", "sweep.json", "views.parquet"}, "no temporary or probe object left"
    manifest = json.loads(stored["run.json"])
    for p in parts:
        entry = manifest["parts"][p.removeprefix("parts/")]
        assert entry["size"] == len(stored[p]) and entry["sha256"] == hashlib.sha256(stored[p]).hexdigest()
    views = manifest["views"]
    assert views["size"] == len(stored["views.parquet"])
    assert views["sha256"] == hashlib.sha256(stored["views.parquet"]).hexdigest()
    pd.testing.assert_frame_equal(rows(run), rows(ref))
    pd.testing.assert_frame_equal(read_views(run), read_views(ref))
    said: list[str] = []
    again = run_sweep(cfg, run, progress=False, log=said.append)
    assert again["ran"] == 0 and again["skipped"] == 3 and "resuming: 3 of 3 units already done" in said
    assert read(run) == stored, "nothing recomputed or rewritten (a recomputed part has new timing metadata)"


def test_a_sweep_into_a_url_equals_the_local_one_and_resumes_without_recomputing(local, mem):
    cfg, ref = local
    check_sweep_equals_local_and_resumes(cfg, ref, f"{mem}/run", files)


def test_a_sweep_into_a_new_file_url_folder_equals_the_local_one(local, tmp_path):
    """A file:// URL names a local folder: the sweep makes it (its writer lock lives in it; the
    lock once looked for the folder before it existed), writes through fsspec, and resumes."""
    cfg, ref = local
    folder = tmp_path / "new" / "run"

    def read(url: str) -> dict[str, bytes]:
        return {str(f.relative_to(folder)): f.read_bytes() for f in folder.rglob("*") if f.is_file()
                and f.name != ".writer.lock"}

    check_sweep_equals_local_and_resumes(cfg, ref, folder.as_uri(), read)


def test_a_damaged_part_under_a_url_is_set_aside_and_recomputed(local, mem):
    cfg, ref = local
    run = f"{mem}/run"
    run_sweep(cfg, run, progress=False, log=quiet)
    name = next(n for n in targets.list_names(f"{run}/parts", ".parquet") if "__prose__sink__" in n)
    good = MEM.cat_file(targets.filesystem(f"{run}/parts/{name}")[1])
    damaged = good[: len(good) // 2]
    MEM.pipe_file(targets.filesystem(f"{run}/parts/{name}")[1], damaged)  # a truncated upload, a bad copy
    said: list[str] = []
    summary = run_sweep(cfg, run, progress=False, log=said.append)
    assert summary["ran"] == 1 and summary["set_aside_corrupt"] == 1
    assert any("unreadable or damaged" in s and f"{run}/superseded/" in s for s in said), said
    aside = [k for k in files(run) if k.startswith("superseded/") and k.endswith(f"/corrupt/{name}")]
    assert len(aside) == 1 and files(run)[aside[0]] == damaged, "the damaged part is kept aside, not deleted"
    moves = json.loads(files(run)["run.json"])["set_aside"]
    assert [(m["part"], m["why"], m["to"]) for m in moves] == [(name, "corrupt", f"{run}/{aside[0]}")]
    pd.testing.assert_frame_equal(rows(run), rows(ref))
    # a damaged part with no record (run.json lost) is found by reading it
    MEM.rm(targets.filesystem(f"{run}/run.json")[1])
    MEM.pipe_file(targets.filesystem(f"{run}/parts/{name}")[1], b"PAR1 not really")
    summary = run_sweep(cfg, run, progress=False, log=quiet)
    assert summary["ran"] == 1 and summary["set_aside_corrupt"] == 1
    pd.testing.assert_frame_equal(rows(run), rows(ref))
    assert run_sweep(cfg, run, progress=False, log=quiet)["ran"] == 0, "now everything is sound"


def test_a_changed_config_sets_the_parts_of_the_earlier_one_aside(local, mem, tmp_path, capsys):
    cfg, ref = local
    run = f"{mem}/run"
    assert main(["sweep", str(cfg), "--out", run, "--no-progress"]) == 0
    changed = tmp_path / "s.toml"
    changed.write_text(cfg.read_text().replace("n_prompts = 3", "n_prompts = 5"))
    capsys.readouterr()
    assert main(["sweep", str(changed), "--out", run, "--no-progress"]) == 0
    err = capsys.readouterr().err
    assert "set aside 2 part(s) of an earlier config" in err and f"{run}/superseded/" in err
    after = rows(run)
    assert not after.duplicated(KEYS).any(), "one version of each unit"
    assert (after[after.probe == "sink"].n == 5).all()
    pd.testing.assert_frame_equal(after[after.probe == "induction"], rows(ref)[lambda d: d.probe == "induction"])
    stored = files(run)
    assert len([k for k in stored if k.startswith("superseded/") and "/stale/" in k]) == 2
    assert len([k for k in stored if k.startswith("parts/")]) == 3
    assert (
        query("select count(*) as n from results where probe = 'sink'", [run]).n.iloc[0] == 2 * 3 * 4
    )  # no stale rows


def test_load_results_query_and_report_read_a_url_run(local, mem, tmp_path, capsys):
    cfg, ref = local
    run = f"{mem}/run"
    run_sweep(cfg, run, progress=False, log=quiet)
    sql = "select * exclude (run) from results order by model, dataset, probe, metric, layer, head"
    for read_only in (False, True):
        pd.testing.assert_frame_equal(query(sql, [run], read_only=read_only), query(sql, [ref], read_only=read_only))
    both = query("select run, count(*) as n from results group by run order by n, run", [ref, run], read_only=True)
    assert sorted(both.run) == sorted([str(ref), run]) and both.n.nunique() == 1
    # read-only still refuses files, and sees no table but `results`
    secret = tmp_path / "secret.csv"
    secret.write_text("password\nhunter2\n")
    for bad in (f"select * from read_csv('{secret}')", "select * from _url_run_0"):
        with pytest.raises(WorkbenchError, match="query failed"):
            query(bad, [run], read_only=True)
    assert main(["query", "select count(*) as n from results", "--runs", run, "--read-only"]) == 0
    assert str(len(rows(ref))) in capsys.readouterr().out
    # report: from the URL to a local file, and to a URL
    assert main(["report", run, "--out", str(tmp_path / "r.html")]) == 0
    page = (tmp_path / "r.html").read_text()
    assert "Attention-head report: run" in page and "prose" in page
    assert main(["report", run, "--out", f"{mem}/report.html"]) == 0
    assert f"report -> {mem}/report.html" in capsys.readouterr().out
    assert files(mem)["report.html"].decode().count("Attention-head report: run") == page.count(
        "Attention-head report: run"
    )
    # URLs in a report config are kept as given, not joined to the config's folder
    conf = tmp_path / "conf" / "report.toml"
    conf.parent.mkdir()
    conf.write_text(f'runs = ["{run}"]\nout = "{mem}/from-config.html"\n')
    assert main(["report", "--config", str(conf)]) == 0
    assert "from-config.html" in files(mem) and [p.name for p in conf.parent.iterdir()] == ["report.toml"]


def test_a_probe_writes_its_results_file_to_a_url(tiny_dirs, mem, capsys):
    out = f"{mem}/probe/entropy.parquet"
    assert (
        main(
            [
                "probe",
                "entropy",
                "--model",
                str(tiny_dirs["llama"]),
                "--dataset",
                "prose",
                "--n-prompts",
                "2",
                "--out",
                out,
                "--no-progress",
            ]
        )
        == 0
    )
    assert set(files(mem)) == {"probe/entropy.parquet"}
    table = load_results(out)
    assert set(table.metric) == {"entropy", "entropy_norm"} and len(table) == 2 * 3 * 4


# -- how a URL write stays atomic ------------------------------------------------------------------
def test_a_failed_write_leaves_nothing_on_an_object_store(mem):
    def boom(f):
        f.write(b"half")
        raise RuntimeError("disk on fire")

    with pytest.raises(RuntimeError):
        targets.write_file(f"{mem}/x.bin", boom)
    assert not MEM.exists(targets.filesystem(mem)[1])
    targets.write_text(f"{mem}/x.bin", "whole")
    assert targets.read_bytes(f"{mem}/x.bin") == b"whole" and targets.size(f"{mem}/x.bin") == 5


def test_a_file_url_is_written_by_rename_with_the_normal_mode(tmp_path, monkeypatch):
    old = os.umask(0o027)
    try:
        url = (tmp_path / "deep" / "a.txt").as_uri()
        targets.write_text(url, "hello")
    finally:
        os.umask(old)
    out = tmp_path / "deep" / "a.txt"
    assert out.read_text() == "hello" and stat.S_IMODE(out.stat().st_mode) == 0o640
    assert [p.name for p in (tmp_path / "deep").iterdir()] == ["a.txt"], "no temporary file left"
    monkeypatch.chdir(tmp_path)  # a relative file:// URL is made absolute before it travels to a worker
    assert targets.absolute("file://deep/a.txt") == f"file://{tmp_path}/deep/a.txt"


def test_a_file_system_that_is_not_an_object_store_writes_a_temporary_name_then_moves(tmp_path):
    """fsspec's DirFileSystem over the local disk: neither the local file system nor an object
    store, so the generic path runs: a temporary name in the same folder, then ``mv``."""
    from fsspec.implementations.dirfs import DirFileSystem
    from fsspec.implementations.local import LocalFileSystem

    fs = DirFileSystem(path=str(tmp_path), fs=LocalFileSystem())
    assert not targets.writes_whole_objects(fs)
    targets.write_to_fs(fs, "sub/a.bin", lambda f: f.write(b"data"))
    assert (tmp_path / "sub" / "a.bin").read_bytes() == b"data"
    assert sorted(p.name for p in (tmp_path / "sub").iterdir()) == ["a.bin"], "the temporary name is gone"

    def boom(f):
        raise RuntimeError("no")

    with pytest.raises(RuntimeError):
        targets.write_to_fs(fs, "sub/b.bin", boom)
    assert sorted(p.name for p in (tmp_path / "sub").iterdir()) == ["a.bin"]


def test_url_helpers_keep_urls_whole():
    assert targets.is_url("s3://b/k") and targets.is_url("memory://x") and targets.is_url("simplecache::s3://b/k")
    assert not targets.is_url("runs/a") and not targets.is_url("C:/runs/a") and not targets.is_url("/tmp/s3:/x")
    assert targets.join("s3://b/runs/", "parts", "a.parquet") == "s3://b/runs/parts/a.parquet"
    assert targets.name("s3://b/runs/a/") == "a" and targets.as_target("s3://b//x") == "s3://b//x"
    assert targets.process_local("memory://x") and not targets.process_local("file:///x")
