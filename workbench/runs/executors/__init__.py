"""Executors: who runs a sweep's (model, dataset) groups.

A sweep (:mod:`workbench.runs.config`) validates its config and reconciles its run folder in the
driver (:func:`workbench.runs.sweep.prepare`), plans the groups (:func:`workbench.runs.sweep.plan`), and
hands them to an executor. The executor runs :func:`workbench.runs.group.run_group` for each group,
wherever it likes, and calls ``record(info)`` in the driver for every part a group wrote; the
driver records it in ``run.json``. ``parts_dir`` is a ``Path`` or an fsspec URL string
(:mod:`workbench.files.targets`). Parts are keyed and written atomically by ``run_group``
itself, so an executor that runs a group twice (a retry after a worker died) overwrites the
same file with the same rows, never adds a second copy.

==========  =========================================  ==========================================
name        module                                     runs groups
==========  =========================================  ==========================================
``local``   :mod:`workbench.runs.executors.local`           in this process, one model load per model
``ray``     :mod:`workbench.runs.executors.ray`             as Ray tasks on a cluster (optional extra)
==========  =========================================  ==========================================

A new executor is one module with a class like these, named in :data:`EXECUTORS` or registered
by a package under the ``workbench.runs.executors`` entry-point group; nothing else changes.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Protocol

from workbench.errors import WorkbenchError

if TYPE_CHECKING:
    from workbench.runs.config import SweepConfig, Unit

# Third-party executors register under this entry-point group (its name predates the runs/ folder).
ENTRY_POINTS = "workbench.executors"
EXECUTORS: dict[str, str] = {
    "local": "workbench.runs.executors.local:LocalExecutor",
    "ray": "workbench.runs.executors.ray:RayExecutor",
}


class Executor(Protocol):
    """What :func:`workbench.runs.sweep.run_sweep` needs of an executor."""

    name: str

    def run(
        self,
        cfg: SweepConfig,
        groups: list[list[Unit]],
        parts_dir: str | Path,
        record: Callable[[dict[str, Any]], None],
        *,
        config_path: str,
        progress: bool,
        log: Callable[[str], None],
    ) -> None:
        """Run every group; call ``record(info)`` in this process for each part written."""


def executor_names() -> dict[str, str]:
    """Every executor by name: the built-in ones and those of installed packages."""
    found = dict(EXECUTORS)
    try:
        from importlib.metadata import entry_points

        for ep in entry_points(group=ENTRY_POINTS):
            found.setdefault(ep.name, ep.value)
    except Exception:  # a broken third-party entry point must not hide the built-in executors
        pass
    return found


def get_executor(name: str, **options: Any) -> Executor:
    """The executor ``name``, constructed with ``options`` (e.g. ``address`` for Ray); it checks
    what it needs (a package, a reachable cluster) here, before the sweep writes anything."""
    names = executor_names()
    if name not in names:
        raise WorkbenchError(f"unknown executor {name!r}", f"choose from: {', '.join(names)}")
    module, _, attr = names[name].partition(":")
    cls = getattr(importlib.import_module(module), attr)
    return cls(**options)
