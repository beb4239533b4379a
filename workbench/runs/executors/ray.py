"""The Ray executor: a sweep's (model, dataset) groups as Ray tasks (``pip install 'attention-head-workbench[ray]'``).

``workbench sweep CONFIG --executor ray [--address HOST:PORT]`` connects to the cluster at
``--address`` (or ``RAY_ADDRESS``; with neither, Ray starts a local instance), submits one task
per group with the resources of the config's ``[executor]`` table (``cpus``, ``gpus``,
``memory``) and records each part in the driver as its task returns.

- **Shared parts folder.** A task writes its parts itself (:func:`workbench.runs.group.run_group`:
  atomic rename on a file system, one PUT per part on an object store), so the run folder must
  be one every worker sees: a local disk on one machine; across machines a shared file system
  (NFS, Lustre, a mounted bucket) or an fsspec URL (``s3://``, ``gs://``, ``file:///shared/...``;
  each worker needs the URL's package and credentials). Not ``memory://``: it lives in one
  process. Only the driver writes ``run.json``.
- **Worker death.** A task whose worker process dies is retried by Ray (``retries``, default 3).
  The retry recomputes the whole group and overwrites the same keyed part files atomically, and
  the driver records a group's parts only when its task returned, so rows are neither lost nor
  duplicated. A task that fails with an error (bad input) is not retried: the sweep stops with
  that error, keeps every part already recorded, and the next run resumes.
- **Environment.** Workers inherit their environment from the node that started them; the
  driver's ``WORKBENCH_*`` variables travel with the job (``runtime_env``).
- **Tokens.** A cluster started with ``RAY_AUTH_MODE=token`` admits a driver only with the same
  ``RAY_AUTH_TOKEN`` (or ``~/.ray/auth_token``); a wrong token is one clear error.
"""

from __future__ import annotations

import os
import re
import socket
import time
from pathlib import Path
from typing import Any, Callable

from workbench.errors import WorkbenchError

PIP = "pip install 'attention-head-workbench[ray]'"
TEST_DIR = "WORKBENCH_RAY_TEST_DIR"  # tests: tasks note their pid there, and may hold before working


def _import_ray():
    try:
        import ray
    except ImportError:
        raise WorkbenchError("--executor ray needs Ray, which is not installed", PIP) from None
    return ray


def _host_port(address: str) -> tuple[str, int] | None:
    m = re.fullmatch(r"(?:ray://)?\[?([^\]]+?)\]?:(\d+)", address.strip())
    return (m.group(1), int(m.group(2))) if m else None


def check_reachable(address: str, timeout: float = 5.0) -> None:
    """Fail at once, with the fix, when nothing listens at a ``host:port`` address."""
    hp = _host_port(address)
    if hp is None:
        if address != "auto":
            raise WorkbenchError(
                f"--address {address!r} is not host:port", "e.g. --address 127.0.0.1:6379 (the head node's GCS address)"
            )
        return
    try:
        conn = socket.create_connection(hp, timeout=timeout)
    except OSError as exc:
        raise WorkbenchError(
            f"no Ray cluster answers at {address} ({exc.strerror or exc})",
            "start one (`ray start --head --port PORT`) and pass its address, "
            "or drop --address to run on a local Ray instance",
        ) from None
    with conn:
        if os.environ.get("RAY_USE_TLS", "0").lower() in ("0", "", "false") and not _speaks_grpc(conn, timeout):
            raise WorkbenchError(
                f"something listens at {address}, but it is not a Ray cluster (no gRPC answer within {timeout:g} s)",
                "pass the head node's GCS address (`ray start --head` prints it; default port 6379)",
            )


# The HTTP/2 client preface and an empty SETTINGS frame: what a gRPC client sends first.
_H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"


def _speaks_grpc(conn: socket.socket, timeout: float) -> bool:
    """Whether the server on ``conn`` answers the HTTP/2 preface with a SETTINGS frame, as Ray's
    GCS (a gRPC server) does at once. A port that accepts connections but is something else says
    nothing or something else; without this, ``ray.init`` waits on it for minutes."""
    conn.settimeout(timeout)
    try:
        conn.sendall(_H2_PREFACE)
        head = b""
        while len(head) < 9:
            chunk = conn.recv(9 - len(head))
            if not chunk:
                return False
            head += chunk
    except OSError:  # timeout, reset
        return False
    return head[3] == 0x04  # the frame type: SETTINGS


def _check_token(ray: Any, address: str) -> None:
    """Ask the cluster's GCS who we are before ``ray.init`` (which retries a refused token for 20 s)."""
    try:
        from ray._raylet import GcsClient
        from ray.exceptions import AuthenticationError
    except ImportError:  # another Ray layout: ray.init reports it
        return
    try:
        GcsClient(address=address).cluster_id
    except AuthenticationError:
        raise WorkbenchError(
            f"the Ray cluster at {address} refused this driver's authentication token",
            "set RAY_AUTH_TOKEN (or ~/.ray/auth_token) to the cluster's token: `ray get-auth-token` on its head node",
        ) from None
    except Exception:
        return


def _hold_for_tests(units: list) -> None:
    """Tests kill a task's worker: note this process's pid, and on the first attempt of a group
    whose ``hold-GROUP`` file exists, wait (up to 2 minutes) so the kill lands mid-task."""
    folder = os.environ.get(TEST_DIR)
    if not folder:
        return
    group = re.sub(r"[^A-Za-z0-9._-]+", "-", f"{Path(units[0].model).name}__{units[0].dataset}")
    d = Path(folder)
    attempt = len(list(d.glob(f"{group}.*.pid")))
    (d / f"{group}.{attempt}.pid").write_text(str(os.getpid()))
    if attempt == 0 and (d / f"hold-{group}").exists():
        deadline = time.time() + 120
        while time.time() < deadline:
            time.sleep(0.05)


def run_group_task(cfg: Any, units: list, parts_dir: str, config_path: str) -> list[dict[str, Any]]:
    """One Ray task: one (model, dataset) group, its parts written to the shared ``parts_dir``."""
    from workbench.runs.group import run_group

    _hold_for_tests(units)
    return run_group(cfg, units, parts_dir, progress=False, config_path=config_path)


class RayExecutor:
    name = "ray"

    def __init__(self, address: str | None = None) -> None:
        self.ray = _import_ray()
        self.address = address or os.environ.get("RAY_ADDRESS") or None
        if self.address:
            check_reachable(self.address)
            if _host_port(self.address):
                _check_token(self.ray, self.address)

    def _connect(self, log: Callable[[str], None]) -> bool:
        """Connect (or start a local instance); True when this call did, so it disconnects."""
        ray = self.ray
        if ray.is_initialized():
            return False
        env = {k: v for k, v in os.environ.items() if k.startswith("WORKBENCH_")}
        kwargs: dict[str, Any] = {"log_to_driver": False, "configure_logging": False}
        if env:
            kwargs["runtime_env"] = {"env_vars": env}
        if not self.address:
            kwargs["include_dashboard"] = False
        try:
            ray.init(address=self.address, **kwargs)
        except Exception as exc:  # Ray raises plain Exception, RuntimeError, ConnectionError ... for these
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            if not self.address:  # a local instance that did not come up (Ray waits 30 s for its raylet)
                raise WorkbenchError(
                    f"a local Ray instance did not start: {first}",
                    "on a loaded machine start one yourself, which waits as long as it needs "
                    "(`ray start --head`), and pass --address 127.0.0.1:6379; or use --executor local",
                ) from None
            raise WorkbenchError(
                f"cannot connect to the Ray cluster at {self.address}: {first}",
                "check the address and RAY_AUTH_TOKEN, or drop --address to run on a local Ray instance",
            ) from None
        log(
            f"ray: connected to {self.address or 'a local Ray instance'} "
            f"({int(ray.cluster_resources().get('CPU', 0))} CPUs)"
        )
        return True

    def run(
        self,
        cfg,
        groups: list,
        parts_dir: str | Path,
        record: Callable[[dict[str, Any]], None],
        *,
        config_path: str,
        progress: bool,
        log: Callable[[str], None],
    ) -> None:
        from workbench.files import targets

        ray = self.ray
        if targets.process_local(parts_dir):
            raise WorkbenchError(
                f"{parts_dir} lives in this process's memory, and Ray tasks run in other processes",
                "give a run folder every worker sees: a shared path, or a file://, s3:// or gs:// URL",
            )
        if not groups:
            return
        owned = self._connect(log)
        res = dict(cfg.executor or {})
        options: dict[str, Any] = {
            "num_cpus": res.get("cpus", 1),
            "num_gpus": res.get("gpus", 0),
            "max_retries": res.get("retries", 3),
            "retry_exceptions": False,
        }
        if res.get("memory"):
            options["memory"] = int(res["memory"])
        task = ray.remote(run_group_task).options(**options)
        try:
            shared = str(
                targets.absolute(parts_dir)
            )  # a relative path or file:// URL means nothing in a worker's folder
            pending = {task.remote(cfg, g, shared, config_path): g for g in groups}
            while pending:
                done, _ = ray.wait(list(pending), num_returns=1)
                for ref in done:
                    group = pending.pop(ref)
                    try:
                        infos = ray.get(ref)
                    except Exception as exc:
                        for other in pending:
                            ray.cancel(other)
                        raise self._failure(exc, group, options["max_retries"]) from None
                    for info in infos:
                        record(info)
        finally:
            if owned:
                ray.shutdown()

    def _failure(self, exc: BaseException, group: list, retries: int) -> WorkbenchError:
        cause = getattr(exc, "cause", None)
        if isinstance(cause, WorkbenchError):
            return cause
        what = f"{group[0].model} / {group[0].dataset}"
        name = type(exc).__name__
        if "WorkerCrashed" in name or "NodeDied" in name or "OutOfMemory" in name:
            return WorkbenchError(
                f"the Ray worker running {what} died {retries + 1} times ({name})",
                "see the Ray logs (memory?); re-run the sweep to resume: finished parts are kept",
            )
        first = str(cause or exc).strip().splitlines()[-1] if str(cause or exc).strip() else name
        return WorkbenchError(
            f"the Ray task for {what} failed: {first}",
            "see the error above; re-run the sweep to resume (finished parts are kept)",
        )
