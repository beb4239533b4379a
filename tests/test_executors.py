"""Sweeps on executors: the [executor] table, Ray missing or unreachable, and a real local Ray
cluster (started here with `ray start --head`, token authentication, loopback only) whose parts
equal the local executor's row for row, also into a file:// URL and when the worker running a
task is killed, and into an ``s3://`` bucket of moto's S3 server on loopback (workers configured
the way a user's nodes are: the standard AWS variables in the environment the cluster starts
with)."""

from __future__ import annotations

import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pandas as pd
import pytest

from tests import loopback_s3
from workbench.cli import main
from workbench.errors import WorkbenchError
from workbench.runs.config import load_config
from workbench.runs.load import load_results
from workbench.runs.sweep import run_sweep
from workbench.runs.views import read_views

REPO = Path(__file__).resolve().parents[1]
CONFIG = """models = ["{model}"]
probes = ["entropy", "sink", "induction"]
[executor]
cpus = 1
memory = "200MB"
retries = 2
[datasets.prose]
n_prompts = 6
[datasets.repeated-random]
n_prompts = 4
period = 8
"""


def sorted_rows(df: pd.DataFrame) -> pd.DataFrame:
    return df.sort_values(["model", "dataset", "probe", "metric", "layer", "head"]).reset_index(drop=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def sweep_config(tiny_dirs, tmp_path_factory):
    root = tmp_path_factory.mktemp("sweep")
    cfg = root / "s.toml"
    cfg.write_text(CONFIG.format(model=tiny_dirs["llama"]))
    run_sweep(cfg, root / "local", progress=False, log=lambda *_: None)
    return cfg, root / "local"


def test_the_executor_table_is_validated_and_kept_out_of_the_keys(sweep_config, tmp_path):
    cfg_path, _ = sweep_config
    cfg = load_config(cfg_path)
    assert cfg.executor == {"cpus": 1, "memory": 200_000_000, "retries": 2}
    plain = tmp_path / "plain.toml"
    plain.write_text(
        "\n".join(
            line
            for line in cfg_path.read_text().splitlines()
            if line.split(" ")[0] not in ("[executor]", "cpus", "memory", "retries")
        )
    )
    assert [u.filename for u in load_config(plain).units()] == [u.filename for u in cfg.units()]
    for table, message in (
        ("gpus = -1", "[executor].gpus: must be >= 0"),
        ("cpus = true", "[executor].cpus: expected a number"),
        ("retries = 1.5", "[executor].retries: expected a whole number"),
        ('memory = "8 parsecs"', "[executor].memory: must be bytes or a size"),
        ("nodes = 3", "[executor]: unknown key 'nodes'"),
    ):
        bad = tmp_path / "bad.toml"
        head, _, tail = cfg_path.read_text().partition("[executor]\n")
        bad.write_text(head + "[executor]\n" + table + "\n" + tail[tail.index("[datasets") :])
        with pytest.raises(WorkbenchError, match=re.escape(message)):
            load_config(bad)
    big = tmp_path / "big.toml"
    big.write_text(cfg_path.read_text().replace('"200MB"', '"2GiB"'))
    assert load_config(big).executor["memory"] == 2 * 2**30


def test_without_ray_the_error_names_the_pip_command(sweep_config, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray -> ImportError
    cfg, _ = sweep_config
    assert main(["sweep", str(cfg), "--out", str(tmp_path / "run"), "--executor", "ray"]) == 2
    err = capsys.readouterr().err
    assert "--executor ray needs Ray" in err and "pip install 'attention-head-workbench[ray]'" in err
    assert not (tmp_path / "run").exists()


def test_an_unreachable_ray_address_is_one_error(sweep_config, tmp_path, capsys):
    pytest.importorskip("ray")
    cfg, _ = sweep_config
    t0 = time.time()
    assert (
        main(
            [
                "sweep",
                str(cfg),
                "--out",
                str(tmp_path / "run"),
                "--executor",
                "ray",
                "--address",
                f"127.0.0.1:{free_port()}",
            ]
        )
        == 2
    )
    err = capsys.readouterr().err
    assert "no Ray cluster answers at 127.0.0.1:" in err and "ray start --head" in err and "Traceback" not in err
    assert time.time() - t0 < 30 and not (tmp_path / "run").exists()
    assert main(["sweep", str(cfg), "--out", str(tmp_path / "run"), "--executor", "ray", "--address", "nonsense"]) == 2
    assert "is not host:port" in capsys.readouterr().err


@pytest.mark.parametrize("reply", [b"", b"HTTP/1.1 400 Bad Request\r\n\r\n"])
def test_a_port_that_is_not_ray_is_one_error_not_a_hang(sweep_config, tmp_path, capsys, reply):
    """Issue 30, bug 4: --address at a port that accepts TCP but is not Ray (a silent server, or
    an HTTP/1 one) hung for minutes in ray.init and ignored SIGTERM; now the gRPC handshake that
    Ray's GCS answers at once is checked first, and nothing is written."""
    pytest.importorskip("ray")
    cfg, _ = sweep_config
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    held = []

    def serve() -> None:
        while True:
            try:
                conn, _ = server.accept()
            except OSError:
                return
            conn.sendall(reply)
            held.append(conn)  # keep it open, saying nothing more

    threading.Thread(target=serve, daemon=True).start()
    try:
        address = f"127.0.0.1:{server.getsockname()[1]}"
        argv = ["sweep", str(cfg), "--out", str(tmp_path / "run"), "--executor", "ray", "--address", address]
        assert main(argv) == 2
    finally:
        server.close()
        for conn in held:
            conn.close()
    err = capsys.readouterr().err
    assert f"something listens at {address}, but it is not a Ray cluster" in err and "Traceback" not in err, err
    assert not (tmp_path / "run").exists()


def test_a_local_ray_that_does_not_start_says_so_and_leaves_no_folder(sweep_config, tmp_path, capsys, monkeypatch):
    """Issue 30, bug 4: on a loaded machine a local Ray start can time out (Ray waits 30 s for its
    raylet and raises a bare Exception); that was "internal error" and left run.json and
    sweep.json. Simulated here by Ray's own exception from ray.init."""
    ray = pytest.importorskip("ray")

    def timed_out(*args, **kwargs):
        raise Exception(
            "The current node timed out during startup. This could happen because some of the raylet "
            "failed to startup or the GCS has become overloaded."
        )

    monkeypatch.setattr(ray, "init", timed_out)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    cfg, _ = sweep_config
    assert main(["sweep", str(cfg), "--out", str(tmp_path / "run"), "--executor", "ray", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "a local Ray instance did not start: The current node timed out during startup" in err
    assert "ray start --head" in err and "internal error" not in err
    assert not (tmp_path / "run").exists()


# -- a real cluster ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def s3_endpoint():
    """The loopback S3 server (tests/loopback_s3.py), or None when moto / s3fs are not installed."""
    if not loopback_s3.available():
        yield None
        return
    with loopback_s3.loopback_s3() as s3:
        yield s3


@pytest.fixture(scope="module")
def ray_cluster(s3_endpoint):
    """`ray start --head --block` on loopback with a random token; stopped by its process group
    (our own processes only: `ray stop --force` would stop every Ray on the machine). Its workers
    reach the loopback S3 server when there is one."""
    pytest.importorskip("ray")
    ray_bin = Path(sys.executable).parent / "ray"
    if not ray_bin.exists():
        pytest.skip(f"no ray executable next to {sys.executable}")
    token = secrets.token_hex(16)
    port = free_port()
    temp = tempfile.mkdtemp(prefix="ray", dir="/tmp")  # short: Ray's socket paths live under it
    env = {
        **os.environ,
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN": token,
        "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep),
        **(s3_endpoint.env if s3_endpoint else {}),
    }
    log = open(Path(temp) / "start.log", "w")
    proc = subprocess.Popen(
        [
            str(ray_bin),
            "start",
            "--head",
            "--block",
            f"--port={port}",
            "--node-ip-address=127.0.0.1",
            "--disable-usage-stats",
            "--include-dashboard=false",
            "--num-cpus=2",
            "--object-store-memory=100000000",
            f"--temp-dir={temp}",
        ],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )

    def stop() -> None:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # whatever the cluster left in its own session
        except ProcessLookupError:
            pass
        log.close()
        shutil.rmtree(temp, ignore_errors=True)

    try:
        deadline = time.time() + 180
        while "Ray runtime started" not in (Path(temp) / "start.log").read_text():
            if proc.poll() is not None or time.time() > deadline:
                raise RuntimeError("ray start failed:\n" + (Path(temp) / "start.log").read_text()[-3000:])
            time.sleep(0.2)
        yield {"address": f"127.0.0.1:{port}", "token": token}
    finally:
        stop()


def driver(cluster: dict, *argv: str, token: str | None = None, **env: str) -> subprocess.CompletedProcess:
    """`workbench sweep ... --executor ray --address ADDR` in its own process (Ray reads its auth
    settings once per process), with the cluster's token unless another is given."""
    full = {
        **os.environ,
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN": token or cluster["token"],
        "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep),
        **env,
    }
    full.pop("RAY_ADDRESS", None)
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "workbench",
            "sweep",
            *map(str, argv),
            "--executor",
            "ray",
            "--address",
            cluster["address"],
            "--no-progress",
        ],
        env=full,
        capture_output=True,
        text=True,
        timeout=900,
    )


def test_a_ray_sweep_equals_the_local_one_row_for_row(sweep_config, ray_cluster, tmp_path):
    cfg, local = sweep_config
    out = tmp_path / "ray"
    done = driver(ray_cluster, cfg, "--out", out)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "6 units: 6 run now, 0 already done" in done.stdout
    assert sorted(p.name for p in (out / "parts").iterdir()) == sorted(p.name for p in (local / "parts").iterdir())
    pd.testing.assert_frame_equal(sorted_rows(load_results(out)), sorted_rows(load_results(local)))
    # the driver computes the pattern views, as the local executor does
    pd.testing.assert_frame_equal(read_views(out), read_views(local))
    views = (out / "views.parquet").read_bytes()
    # resumes the same way: nothing left to run, the views fresh
    again = driver(ray_cluster, cfg, "--out", out)
    assert again.returncode == 0 and "0 run now, 6 already done" in again.stdout, again.stderr[-3000:]
    assert (out / "views.parquet").read_bytes() == views


def test_a_ray_sweep_into_a_file_url_equals_the_local_one(sweep_config, ray_cluster, tmp_path):
    """The run folder as an fsspec URL: each task, in its own worker process, writes its parts
    through fsspec (file://: a temporary file renamed into place); the rows equal the local
    executor's and a re-run resumes."""
    cfg, local = sweep_config
    folder = tmp_path / "ray-url"
    url = folder.as_uri()  # file:///tmp/...
    done = driver(ray_cluster, cfg, "--out", url)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"6 units: 6 run now, 0 already done -> {url}/parts" in done.stdout
    assert sorted(p.name for p in (folder / "parts").iterdir()) == sorted(p.name for p in (local / "parts").iterdir())
    pd.testing.assert_frame_equal(sorted_rows(load_results(url)), sorted_rows(load_results(local)))
    again = driver(ray_cluster, cfg, "--out", url)
    assert again.returncode == 0 and "0 run now, 6 already done" in again.stdout, again.stderr[-3000:]


def test_a_ray_sweep_into_s3_equals_the_local_one(sweep_config, ray_cluster, s3_endpoint, tmp_path, monkeypatch):
    """Every worker writes its parts to the bucket itself, through s3fs; the driver lists them,
    writes run.json and resumes from the bucket. The rows equal the local executor's."""
    if s3_endpoint is None:
        pytest.skip("moto and s3fs are not installed")
    import s3fs

    cfg, local = sweep_config
    bucket = s3_endpoint.bucket("wb-ray").removeprefix("s3://")
    url = f"s3://{bucket}/runs/ray"
    done = driver(ray_cluster, cfg, "--out", url, **s3_endpoint.env)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"6 units: 6 run now, 0 already done -> {url}/parts" in done.stdout
    keys = sorted(o["Key"] for o in s3_endpoint.client.list_objects_v2(Bucket=bucket)["Contents"])
    parts = sorted(f"runs/ray/parts/{p.name}" for p in (local / "parts").iterdir())
    stored = sorted([*parts, "runs/ray/run.json", "runs/ray/sweep.json", "runs/ray/views.parquet"])
    assert keys == stored, "no temporary object left; the driver wrote the pattern views"
    for k, v in s3_endpoint.env.items():
        monkeypatch.setenv(k, v)
    s3fs.S3FileSystem.clear_instance_cache()
    try:
        pd.testing.assert_frame_equal(sorted_rows(load_results(url)), sorted_rows(load_results(local)))
    finally:
        s3fs.S3FileSystem.clear_instance_cache()
    again = driver(ray_cluster, cfg, "--out", url, **s3_endpoint.env)
    assert again.returncode == 0 and "0 run now, 6 already done" in again.stdout, again.stderr[-3000:]


def test_a_memory_url_is_refused_for_ray(sweep_config, ray_cluster):
    cfg, _ = sweep_config
    done = driver(ray_cluster, cfg, "--out", "memory://wb/run")
    assert (
        done.returncode == 2 and "lives in this process's memory" in done.stderr and "Traceback" not in done.stderr
    ), done.stderr[-3000:]


def test_a_killed_worker_is_retried_without_losing_or_duplicating_rows(sweep_config, ray_cluster, tmp_path):
    cfg, local = sweep_config
    hooks = tmp_path / "hooks"
    hooks.mkdir()
    group = "llama__prose"
    (hooks / f"hold-{group}").write_text("")  # its first attempt waits for the kill
    killed: list[int] = []

    def killer() -> None:
        deadline = time.time() + 600
        pidfile = hooks / f"{group}.0.pid"
        while time.time() < deadline and not pidfile.exists():
            time.sleep(0.05)
        time.sleep(0.2)
        pid = int(pidfile.read_text())
        os.kill(pid, signal.SIGKILL)
        killed.append(pid)

    t = threading.Thread(target=killer, daemon=True)
    t.start()
    out = tmp_path / "ray"
    done = driver(ray_cluster, cfg, "--out", out, WORKBENCH_RAY_TEST_DIR=str(hooks))
    t.join(timeout=5)
    assert done.returncode == 0, done.stderr[-3000:]
    assert killed, "the task's worker was not killed"
    retry = int((hooks / f"{group}.1.pid").read_text())
    assert retry != killed[0] and not (hooks / f"{group}.2.pid").exists()
    assert "6 units: 6 run now" in done.stdout
    assert sorted(p.name for p in (out / "parts").iterdir()) == sorted(p.name for p in (local / "parts").iterdir())
    pd.testing.assert_frame_equal(sorted_rows(load_results(out)), sorted_rows(load_results(local)))


def test_a_wrong_token_is_refused(sweep_config, ray_cluster, tmp_path):
    cfg, _ = sweep_config
    done = driver(ray_cluster, cfg, "--out", tmp_path / "run", token=secrets.token_hex(16))
    assert done.returncode == 2
    assert (
        "error: the Ray cluster at 127.0.0.1:" in done.stderr
        and "refused this driver's authentication token" in done.stderr
    )
    assert "fix: set RAY_AUTH_TOKEN" in done.stderr and "Traceback" not in done.stderr
    assert not (tmp_path / "run").exists()


def test_a_task_that_fails_on_bad_input_is_one_error_not_retried(ray_cluster, tiny_dirs, tmp_path):
    """The context length is known only once a task loads the model: its WorkbenchError comes back
    to the driver as the same one error line, and no part is recorded."""
    cfg = tmp_path / "niah.toml"
    cfg.write_text(
        f'models = ["{tiny_dirs["llama"]}"]\nprobes = ["entropy"]\n[executor]\nretries = 3\n'
        "[datasets.niah]\nn_prompts = 2\ncontext_len = [1000]\n"
    )
    done = driver(ray_cluster, cfg, "--out", tmp_path / "run")
    assert done.returncode == 2, done.stderr[-3000:]
    assert (
        "error: context length 1000 exceeds the model's context of 256" in done.stderr
        and "Traceback" not in done.stderr
    )
    assert not list((tmp_path / "run" / "parts").glob("*.parquet"))
