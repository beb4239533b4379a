"""Run folders on a real S3 protocol: moto's S3 server on loopback, reached through s3fs (the
client our users' ``s3://`` URLs load). ``memory://`` (tests/test_url_runs.py) is fsspec's own
in-process store; this one speaks HTTP, signs requests, lists with prefixes and delimiters,
caches listings in the client and has no rename, so it checks what an object store does that
``memory://`` does not. Nothing is mocked but the network: the server answers on 127.0.0.1.

Skipped when moto or s3fs is not installed (both are in the ``dev`` extra)."""

from __future__ import annotations

import contextlib
import uuid

import pandas as pd
import pytest

pytest.importorskip("moto.server")
pytest.importorskip("s3fs")

from tests import loopback_s3  # noqa: E402
from tests.test_sweep_folder import write  # noqa: E402
from tests.test_url_runs import check_sweep_equals_local_and_resumes, quiet, rows  # noqa: E402
from workbench.cli import main  # noqa: E402
from workbench.files import targets  # noqa: E402
from workbench.runs.load import load_results
from workbench.runs.query import query  # noqa: E402
from workbench.runs.sweep import run_sweep  # noqa: E402


@pytest.fixture(scope="module")
def s3():
    """The loopback S3 server (tests/loopback_s3.py) with fsspec configured to reach it (as a
    user's ``FSSPEC_S3_ENDPOINT_URL`` would), and an s3fs file system on it."""
    import fsspec

    with loopback_s3.loopback_s3() as server, s3_config(server.endpoint):
        server.fs = fsspec.filesystem("s3")
        yield server


@contextlib.contextmanager
def s3_config(endpoint: str, **extra):
    """fsspec's s3 settings pointed at ``endpoint`` for the block (test credentials), then restored."""
    import fsspec
    import s3fs

    saved = dict(fsspec.config.conf.get("s3", {}))
    fsspec.config.conf["s3"] = {
        "endpoint_url": endpoint,
        "key": "testing",
        "secret": "testing",
        "client_kwargs": {"region_name": "us-east-1"},
        **extra,
    }
    s3fs.S3FileSystem.clear_instance_cache()
    try:
        yield
    finally:
        fsspec.config.conf["s3"] = saved
        s3fs.S3FileSystem.clear_instance_cache()


@pytest.fixture(scope="module")
def local(tiny_dirs, tmp_path_factory):
    root = tmp_path_factory.mktemp("s3runs")
    cfg = write(root, tiny_dirs["llama"])
    run_sweep(cfg, root / "local", progress=False, log=quiet)
    return cfg, root / "local"


def objects(fs, url: str) -> dict[str, bytes]:
    """Every object under ``url`` by its key below it, read afresh from the server."""
    fs.invalidate_cache()
    base = url.removeprefix("s3://").rstrip("/")
    return {k[len(base) + 1 :]: fs.cat_file(k) for k in fs.find(base)}


def test_a_sweep_into_s3_equals_the_local_one_and_resumes_without_recomputing(s3, local):
    cfg, ref = local
    check_sweep_equals_local_and_resumes(cfg, ref, f"{s3.bucket()}/runs/a", lambda url: objects(s3.fs, url))


def test_a_damaged_part_on_s3_is_set_aside_by_copy_and_delete_and_recomputed(s3, local):
    cfg, ref = local
    run = f"{s3.bucket()}/run"
    run_sweep(cfg, run, progress=False, log=quiet)
    name = next(n for n in targets.list_names(f"{run}/parts", ".parquet") if "__prose__sink__" in n)
    key = f"{run.removeprefix('s3://')}/parts/{name}"
    damaged = s3.fs.cat_file(key)[:100]
    s3.fs.pipe_file(key, damaged)  # written by another client: this process's listing cache knows nothing of it
    summary = run_sweep(cfg, run, progress=False, log=quiet)
    assert summary["ran"] == 1 and summary["set_aside_corrupt"] == 1
    stored = objects(s3.fs, run)
    aside = [k for k in stored if k.startswith("superseded/") and k.endswith(f"/corrupt/{name}")]
    assert len(aside) == 1 and stored[aside[0]] == damaged, "the damaged part is kept aside, not deleted"
    assert sorted(k for k in stored if k.startswith("parts/")) == sorted(
        f"parts/{p.name}" for p in (ref / "parts").iterdir()
    )
    pd.testing.assert_frame_equal(rows(run), rows(ref))
    assert run_sweep(cfg, run, progress=False, log=quiet)["ran"] == 0


def test_query_report_and_a_probe_file_on_s3(s3, local, tiny_dirs, tmp_path, capsys):
    cfg, ref = local
    bucket = s3.bucket()
    run = f"{bucket}/run"
    assert main(["sweep", str(cfg), "--out", run, "--no-progress"]) == 0
    sql = "select * exclude (run) from results order by model, dataset, probe, metric, layer, head"
    for read_only in (False, True):
        pd.testing.assert_frame_equal(query(sql, [run], read_only=read_only), query(sql, [ref], read_only=read_only))
    assert main(["report", run, "--out", f"{bucket}/report.html"]) == 0
    page = objects(s3.fs, bucket)["report.html"].decode()
    assert "Attention-head report: run" in page and "prose" in page
    out = f"{bucket}/probe/entropy.parquet"
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
    table = load_results(out)
    assert set(table.metric) == {"entropy", "entropy_norm"} and len(table) == 2 * 3 * 4
    capsys.readouterr()
    # a bucket that does not exist: one error naming the fix, no traceback
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
                f"s3://no-such-bucket-{uuid.uuid4().hex[:8]}/e.parquet",
                "--no-progress",
            ]
        )
        != 0
    )
    err = capsys.readouterr().err
    assert "error:" in err and "Traceback" not in err


@pytest.fixture()
def unreachable_s3():
    """fsspec pointed at an S3 endpoint where nothing listens (as with no network, or a wrong
    endpoint): the client's own errors, from a real connection attempt."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with s3_config(f"http://127.0.0.1:{port}", config_kwargs={"retries": {"max_attempts": 1}, "connect_timeout": 2}):
        yield


@pytest.mark.parametrize(
    "argv",
    [
        ["query", "select count(*) from results", "--runs", "s3://bucket/runs/a"],
        ["report", "s3://bucket/runs/a", "--out", "{tmp}/r.html"],
    ],
)
def test_reading_runs_from_an_unreachable_store_is_the_network_not_an_internal_error(
    unreachable_s3, tmp_path, capsys, argv
):
    """Issue 30, bug 11: query and report at an s3:// URL that cannot be reached ended in
    'internal error: EndpointConnectionError'; a sweep to it already said what happened."""
    assert main([a.replace("{tmp}", str(tmp_path)) for a in argv]) == 2
    err = capsys.readouterr().err
    assert "internal error" not in err and "Traceback" not in err, err
    assert "the storage service or the network to it failed" in err and "fix:" in err, err
    assert not (tmp_path / "r.html").exists()


def _lease(renewed_ago: float) -> bytes:
    import json
    import time

    return json.dumps(
        {"owner": "other", "host": "elsewhere", "pid": 4242, "renewed": time.time() - renewed_ago}
    ).encode()


def test_one_writer_per_s3_run_folder_by_a_conditional_put(s3, local, capsys):
    """Issue 30, 'one writer per run folder', on an object store: a second sweep into a folder
    whose lease is live stops before it moves or writes anything, naming the holder; a lease its
    writer stopped renewing long ago (a killed sweep) is taken over; a finished sweep leaves none."""
    from workbench.files import lease

    cfg, ref = local
    run = f"{s3.bucket()}/run"
    key = f"{run.removeprefix('s3://')}/{lease.LEASE}"
    assert main(["sweep", str(cfg), "--out", run, "--no-progress"]) == 0
    assert lease.LEASE not in objects(s3.fs, run), "a finished sweep leaves its lease behind"
    s3.fs.pipe_file(key, _lease(renewed_ago=5))
    before = objects(s3.fs, run)
    changed = cfg.parent / "changed.toml"
    changed.write_text(cfg.read_text().replace("n_prompts = 3", "n_prompts = 2"))
    assert changed.read_text() != cfg.read_text()
    capsys.readouterr()
    assert main(["sweep", str(changed), "--out", run, "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "being written by another sweep" in err and "pid 4242 on elsewhere" in err and "Traceback" not in err
    assert objects(s3.fs, run) == before, "a refused sweep moved or wrote something"
    s3.fs.pipe_file(key, _lease(renewed_ago=lease.STALE_S + 1))
    assert main(["sweep", str(cfg), "--out", run, "--no-progress"]) == 0
    assert lease.LEASE not in objects(s3.fs, run)


def test_of_two_writers_taking_one_s3_lease_exactly_one_gets_it(s3):
    from workbench.errors import WorkbenchError
    from workbench.files.lease import url_writer

    run = f"{s3.bucket()}/leased"
    with url_writer(run, "busy", "wait"):
        with pytest.raises(WorkbenchError, match="busy"):
            with url_writer(run, "busy", "wait"):
                pass
    with url_writer(run, "busy", "wait"):  # released: free again
        pass
