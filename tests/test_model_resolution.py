"""Every model of a sweep is resolved before anything is moved or written (issue 30, bugs 1 and 5).

A hub id that is not in the local hub cache is looked up on the hub. Here the hub is unreachable,
so a typo fails with the network named; with a hub that answers (a loopback server standing in
for the Hugging Face API: the only thing replaced is the network), an unknown id is the user's
error, a server error is the hub's, and a refused connection is the network's.
"""

from __future__ import annotations

import http.server
import json
import os
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from tests.test_sweep_folder import write
from workbench.cli import main
from workbench.models.loading import hub_unreachable_reason


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.skipif(hub_unreachable_reason() is None, reason="the hub is reachable from here")
def test_a_model_typo_on_a_rerun_moves_and_rewrites_nothing(tiny_dirs, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))  # nothing cached under the typo
    cfg = write(tmp_path, tiny_dirs["llama"])
    run = tmp_path / "run"
    assert main(["sweep", str(cfg), "--out", str(run), "--no-progress"]) == 0
    before = _snapshot(run)
    typo = tmp_path / "typo.toml"
    typo.write_text(cfg.read_text().replace(json.dumps(str(tiny_dirs["llama"])), '"tiny-lama"'))
    assert "tiny-lama" in typo.read_text()
    capsys.readouterr()
    assert main(["sweep", str(typo), "--out", str(run), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert (
        "unknown model 'tiny-lama'" in err
        and str(typo) in err
        and "cannot be reached" in err
        and "Traceback" not in err
    )
    assert _snapshot(run) == before, "a failed re-run moved or rewrote files of the finished run"


@pytest.mark.skipif(hub_unreachable_reason() is None, reason="the hub is reachable from here")
def test_an_unknown_model_in_a_new_folder_leaves_no_folder(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    cfg = tmp_path / "s.toml"
    cfg.write_text('models = ["some-org/no-such-model"]\nprobes = ["entropy"]\n[datasets.prose]\nn_prompts = 2\n')
    assert main(["sweep", str(cfg), "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert "unknown model 'some-org/no-such-model'" in err and str(cfg) in err
    assert not (tmp_path / "run").exists()


class _FakeHub(http.server.BaseHTTPRequestHandler):
    """The hub's model-info endpoint: ``known/model`` exists, ``broken/model`` is a server error,
    anything else is the hub's "repository not found"."""

    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        if self.path.startswith("/api/models/known/model"):
            body, status, headers = json.dumps({"id": "known/model", "sha": "0" * 40}).encode(), 200, {}
        elif self.path.startswith("/api/models/broken/model"):
            body, status, headers = b"upstream failure", 500, {}
        else:
            body, status, headers = b'{"error": "Repository not found"}', 404, {"X-Error-Code": "RepoNotFound"}
        self.send_response(status)
        for k, v in {"Content-Type": "application/json", "Content-Length": str(len(body)), **headers}.items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args) -> None:
        """Quiet."""


@pytest.fixture()
def fake_hub():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _FakeHub)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


_IDENTITY = """
import sys
from workbench.errors import WorkbenchError
from workbench.models.loading import model_identity
try:
    print("ok", model_identity(sys.argv[1])["kind"])
except WorkbenchError as exc:
    print("error", exc.message, "|", exc.fix)
"""


def _identity(name: str, endpoint: str, tmp_path: Path) -> str:
    env = {**os.environ, "HF_ENDPOINT": endpoint, "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "0"}
    done = subprocess.run([sys.executable, "-c", _IDENTITY, name], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def test_a_hub_that_answers_tells_a_typo_from_its_own_failure(fake_hub, tmp_path):
    assert _identity("known/model", fake_hub, tmp_path) == "ok hub"
    unknown = _identity("some-org/tiny-lama", fake_hub, tmp_path)
    assert unknown.startswith("error unknown model 'some-org/tiny-lama'") and "hub has no such model" in unknown
    broken = _identity("broken/model", fake_hub, tmp_path)
    assert broken.startswith("error the Hugging Face hub could not look up 'broken/model'") and "hub's side" in broken


def test_a_refused_connection_is_the_network(tmp_path):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    got = _identity("some-org/model", f"http://127.0.0.1:{port}", tmp_path)
    assert got.startswith("error could not reach the Hugging Face hub") and "network" in got


def test_a_local_folder_rewritten_with_the_same_sizes_and_times_is_a_new_model(tiny_dirs, tmp_path):
    """Sweeps reuse parts by model identity: it is judged by content, never by size and time."""
    import shutil

    from workbench.models.loading import model_identity

    folder = tmp_path / "model"
    shutil.copytree(tiny_dirs["llama"], folder)
    before = model_identity(str(folder))
    weights = max((p for p in folder.iterdir() if p.suffix in (".safetensors", ".bin")), key=lambda p: p.stat().st_size)
    st = weights.stat()
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF  # one byte of the weights, same size
    weights.write_bytes(bytes(data))
    os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert weights.stat().st_size == st.st_size and weights.stat().st_mtime_ns == st.st_mtime_ns
    assert model_identity(str(folder))["sha256"] != before["sha256"]
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    assert model_identity(str(folder)) == before, "the same content must be the same model"
