"""Running a sweep: validate the config, reconcile the run folder, hand the missing units to an
executor (:mod:`workbench.runs.executors`: in this process, or as Ray tasks), record each part,
then store the pattern views of each role's strongest head (:mod:`workbench.runs.views`).
"""

from __future__ import annotations

import contextlib
import json
import shutil
import sys
from pathlib import Path
from typing import Any, Callable, Iterator

from workbench.errors import Interrupted
from workbench.files import targets
from workbench.files.atomic import make_folder, one_writer
from workbench.files.lease import url_writer
from workbench.runs.config import SweepConfig, Unit, load_config
from workbench.runs.folder import RunFolder


def plan(cfg: SweepConfig, todo: list[Unit]) -> list[list[Unit]]:
    """The units to compute, grouped by (model, dataset), models kept together (one load each)."""
    groups: dict[tuple[str, str], list[Unit]] = {}
    for u in todo:
        groups.setdefault((u.model, u.dataset), []).append(u)
    return list(groups.values())


def prepare(
    cfg: SweepConfig, out_dir: str | Path, log: Callable[[str], None] = print
) -> tuple[RunFolder, list[Unit], list[Unit], dict[str, int]]:
    """Reconcile the run folder (a path or an fsspec URL) with the validated config and record the
    config: what to compute. Called with the folder's writer lock held (:func:`writing`)."""
    from workbench.runs.parquet import check_writable

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
    return folder, units, todo, moved


@contextlib.contextmanager
def writing(out_dir: str | Path) -> Iterator[None]:
    """One writer per run folder: the sweep holds ``.writer.lock`` in a local run folder from the
    first move to the last part (a run folder at a URL, a lease object:
    :func:`workbench.files.lease.url_writer`); a second sweep into it stops at once, before it
    moves or writes anything."""
    busy, fix = (
        "is being written by another sweep right now",
        "wait for that sweep to finish (then re-run to resume), or choose another --out",
    )
    if targets.is_url(str(out_dir)):
        with url_writer(str(out_dir), f"run folder {out_dir} {busy}", fix):
            yield
        return
    folder = make_folder(out_dir, "--out folder")
    with one_writer(folder, f"run folder {folder} {busy}", fix):
        yield


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
    targets.check_url(str(out_dir))  # an unknown protocol or a missing package (s3fs): one error, nothing written
    cfg = load_config(config_path)  # every problem of the config, every model resolved: before anything is written
    new = not targets.is_url(str(out_dir)) and not Path(out_dir).exists()
    try:
        with writing(out_dir):
            return _run(cfg, out_dir, runner, executor, config_path, progress, log)
    except BaseException:
        if new:
            remove_if_empty(Path(out_dir))
        raise


def remove_if_empty(folder: Path) -> None:
    """A run folder this sweep created and that holds no part (the executor could not start, the
    first group failed at once) is removed whole: a failure leaves no folder behind."""
    if folder.is_dir() and not any((folder / "parts").glob("*.parquet")):
        shutil.rmtree(folder, ignore_errors=True)


def _run(
    cfg: SweepConfig,
    out_dir: str | Path,
    runner: Any,
    executor: str,
    config_path: str | Path,
    progress: bool,
    log: Callable[[str], None],
) -> dict[str, Any]:
    """The body of :func:`run_sweep` under the writer lock: reconcile, run what is missing, record."""
    folder, units, todo, moved = prepare(cfg, out_dir, log)
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
    summary["views"] = _views(cfg, folder, len(units), log, getattr(runner, "loaded", None))
    return summary


def _views(
    cfg: SweepConfig, folder: RunFolder, n_units: int, log: Callable[[str], None], loaded: tuple[str, Any] | None
) -> str:
    """The run folder's pattern views (:func:`workbench.runs.views.update_views`), after every unit
    is saved; an interrupt here leaves the parts and no half-written ``views.parquet``. ``loaded``:
    the (name, model) an in-process executor ran last, used instead of loading it again."""
    from workbench.runs.views import update_views

    try:
        return update_views(cfg, folder, log, loaded)
    except KeyboardInterrupt:
        raise Interrupted(
            f"interrupted while computing the pattern views: all {n_units} units are saved in {folder.out}",
            "re-run the same command: it computes only the views",
        ) from None
