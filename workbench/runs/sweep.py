"""Running a sweep: validate the config, reconcile the run folder, hand the missing units to an
executor (:mod:`workbench.runs.executors`: in this process, or as Ray tasks) and record each part.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, Callable

from workbench.errors import Interrupted
from workbench.files import targets
from workbench.runs.config import SweepConfig, Unit, load_config
from workbench.runs.folder import RunFolder


def plan(cfg: SweepConfig, todo: list[Unit]) -> list[list[Unit]]:
    """The units to compute, grouped by (model, dataset), models kept together (one load each)."""
    groups: dict[tuple[str, str], list[Unit]] = {}
    for u in todo:
        groups.setdefault((u.model, u.dataset), []).append(u)
    return list(groups.values())


def prepare(
    config_path: str | Path, out_dir: str | Path, log: Callable[[str], None] = print
) -> tuple[SweepConfig, RunFolder, list[Unit], list[Unit], dict[str, int]]:
    """Validate, reconcile the run folder (a path or an fsspec URL) with the config, record the
    config: what to compute."""
    from workbench.runs.parquet import check_writable

    targets.check_url(str(out_dir))  # an unknown protocol or a missing package (s3fs): one error, nothing written
    cfg = load_config(config_path)  # raises before anything is written
    folder = RunFolder(out_dir)
    check_writable(targets.join(folder.parts, "probe.parquet"))
    units = cfg.units()
    sound, moved = folder.reconcile(units, log)
    targets.write_text(
        targets.join(folder.out, "sweep.json"),
        json.dumps({**cfg.raw, "_units": {u.filename: json.loads(u.identity) for u in units}}, indent=1, default=str),
    )
    todo = [u for u in units if u.filename not in sound]
    if len(todo) < len(units):
        log(f"resuming: {len(units) - len(todo)} of {len(units)} units already done")
    return cfg, folder, units, todo, moved


def run_sweep(
    config_path: str | Path,
    out_dir: str | Path,
    progress: bool = True,
    log: Callable[[str], None] = print,
    executor: str = "local",
    address: str | None = None,
) -> dict[str, Any]:
    """Run every unit that has no sound part yet on ``executor`` (:mod:`workbench.runs.executors`:
    ``local``, in this process; ``ray``, as tasks on a cluster at ``address``); returns a summary."""
    from workbench.runs.executors import get_executor

    runner = get_executor(executor, address=address)  # a missing package or cluster fails before anything is written
    cfg, folder, units, todo, moved = prepare(config_path, out_dir, log)
    summary = {
        "units": len(units),
        "skipped": len(units) - len(todo),
        "ran": 0,
        "parts": str(folder.parts),
        "executor": executor,
        **{f"set_aside_{k}": v for k, v in moved.items()},
    }
    overall = None
    if progress:
        from tqdm.auto import tqdm

        overall = tqdm(total=len(units), initial=len(units) - len(todo), desc="sweep", unit="unit", file=sys.stderr)

    def record(info: dict[str, Any]) -> None:
        folder.record(info)
        summary["ran"] += 1
        if overall is not None:
            overall.update(1)

    try:
        runner.run(cfg, plan(cfg, todo), folder.parts, record, config_path=str(config_path), progress=progress, log=log)
    except KeyboardInterrupt:
        wanted = {u.filename for u in units}
        saved = sum(
            name in wanted for name in targets.list_names(folder.parts, ".parquet")
        )  # parts are whole or absent
        raise Interrupted(
            f"interrupted: {saved} of {len(units)} units saved in {folder.out}",
            "re-run the same command to resume: saved units are not computed again",
        ) from None
    finally:
        if overall is not None:
            overall.close()
    return summary
