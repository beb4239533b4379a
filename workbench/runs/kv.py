"""``workbench kv``'s run folder: one part per (model, task, length, protocol), resumable.

A KV-policy grid is the same kind of run as a sweep: its parts sit in ``OUT/parts/`` with their
checksums in ``OUT/run.json`` (:class:`workbench.runs.folder.RunFolder`), each unit's key hashes
everything its numbers depend on (the model's identity, the grid's parameters, the scores the
selectors read), so a re-run computes only what is missing, sets aside parts of an earlier
config, and a killed run loses at most the unit it was computing. Rows carry the results
columns every run has (``probe = "kv"``, ``dataset`` = ``niah`` or ``prose``, ``layer = head =
-1``) beside the grid's own (:data:`workbench.kv.grid.COLUMNS`), so ``query`` and ``report``
read them with everything else.

Everything that can be wrong with the input (unknown selector, budget outside (0, 1], fewer
kept tokens than sink + recent, lengths beyond the model's context, scores missing for some
heads) fails in :func:`plan_kv` before the run folder is touched.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import pandas as pd

from workbench.errors import WorkbenchError
from workbench.files import targets
from workbench.kv.grid import COLUMNS, GridSpec, Point, check_lengths, check_loss, check_points, grid_points, run_unit
from workbench.kv.policy import geometry
from workbench.runs.config import Unit
from workbench.runs.folder import RunFolder


@dataclass
class KVPlan:
    """A validated grid on one model: its points and units."""

    model_name: str
    model: Any
    spec: GridSpec
    points: list[Point]
    units: list[tuple[Unit, str, int, str]]  # (unit, task, length, protocol)


def _frame_digest(frame: pd.DataFrame | None) -> str | None:
    if frame is None:
        return None
    cols = [c for c in ("model", "probe", "metric", "layer", "head", "value") if c in frame.columns]
    return hashlib.sha256(pd.util.hash_pandas_object(frame[cols], index=False).values.tobytes()).hexdigest()[:16]


def plan_kv(
    model_name: str, spec: GridSpec, scores: dict[str, pd.DataFrame | None], model: Any = None, **load: Any
) -> KVPlan:
    """Load the model, build every grid point and check every input; nothing is written."""
    from workbench.models.loading import load_model, model_identity
    from workbench.runs.parquet import SCHEMA_VERSION

    if model is None:
        model = load_model(model_name, **load)
    if model.is_causal is not True:
        raise WorkbenchError(
            f"{model_name} has no KV cache to compress (it is not a causal language model)",
            "run workbench kv on a decoder model, e.g. smollm2-135m or gemma3-270m",
        )
    geom = geometry(model)
    points = grid_points(spec, geom, scores)
    lengths = spec.lengths if "niah" in spec.tasks else []
    check_lengths(model, lengths)
    for n in lengths:
        check_points(points, n // 2)  # a context is at least half its niah length (needle and question are short)
    if "loss" in spec.tasks:
        check_loss(model, spec)
        check_points(points, spec.loss_length - spec.loss_tail)
    base = {
        "model": model_identity(model_name) if model_name else {},
        "spec": spec.model_dump(),
        "scores": {k: _frame_digest(v) for k, v in sorted(scores.items())},
        "schema": SCHEMA_VERSION,
    }
    units = []
    todo = [("niah", n, p) for n in lengths for p in spec.protocols]
    todo += [("loss", spec.loss_length, "question-agnostic")] if "loss" in spec.tasks else []
    for task, n, protocol in todo:
        identity = json.dumps({**base, "task": task, "length": n, "protocol": protocol}, sort_keys=True, default=str)
        unit = Unit(model_name, "niah" if task == "niah" else "prose", f"kv-{task}-{n}-{protocol}", identity)
        units.append((unit, task, n, protocol))
    return KVPlan(model_name, model, spec, points, units)


def tidy_kv(frame: pd.DataFrame, model_name: str, task: str) -> pd.DataFrame:
    """A unit's rows with the results columns every run has."""
    out = frame.assign(model=model_name, dataset="niah" if task == "niah" else "prose", probe="kv", layer=-1, head=-1)
    extra = [c for c in ("item", "response") if c in out.columns]
    return out[["dataset", "probe", "layer", "head", *COLUMNS, *extra]]


def run_kv(plan: KVPlan, out: str | Path, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Compute every unit of ``plan`` that has no sound part in ``out`` yet (one writer at a
    time); returns a summary."""
    from workbench.runs.sweep import remove_if_empty

    new = not targets.is_url(str(out)) and not Path(out).exists()
    try:
        return _run_kv(plan, out, log)
    except BaseException:
        if new:  # a failure leaves no folder behind (as a sweep's)
            remove_if_empty(Path(out))
        raise


def _run_kv(plan: KVPlan, out: str | Path, log: Callable[[str], None]) -> dict[str, Any]:
    from workbench.runs.parquet import check_writable, run_metadata, write_parquet
    from workbench.runs.sweep import writing

    targets.check_url(str(out))
    check_writable(targets.join(targets.join(targets.as_target(out), "parts"), "probe.parquet"))
    with writing(out):
        folder = RunFolder(out)
        sound, _ = folder.reconcile([u for u, *_ in plan.units], log)
        todo = [x for x in plan.units if x[0].filename not in sound]
        if len(todo) < len(plan.units):
            log(f"resuming: {len(plan.units) - len(todo)} of {len(plan.units)} units already done")
        for unit, task, n, protocol in todo:
            t0 = time.perf_counter()
            rows = tidy_kv(run_unit(plan.model, plan.spec, plan.points, task, n, protocol), plan.model_name, task)
            meta = run_metadata(
                model=plan.model.describe(),
                config={"kv": plan.spec.model_dump(), "task": task, "length": n, "protocol": protocol},
                unit=json.loads(unit.identity),
                timing={"seconds": round(time.perf_counter() - t0, 3)},
            )
            path = targets.join(folder.parts, unit.filename)
            write_parquet(rows, path, meta)
            folder.record({"filename": unit.filename, "size": targets.size(path), "sha256": targets.sha256(path)})
            log(f"{task} {n} {protocol}: {len(rows)} rows in {time.perf_counter() - t0:.0f} s")
    return {"units": len(plan.units), "ran": len(todo), "out": str(out)}


def kv_grid(
    model: str | Any,
    out: str | Path,
    scores: dict[str, pd.DataFrame | None] | None = None,
    log: Callable[[str], None] = print,
    **spec: Any,
) -> pd.DataFrame:
    """The Python door to ``workbench kv``: run the grid ``spec`` (:class:`GridSpec` fields) on
    ``model`` (a name or a loaded model) into the run folder ``out`` (resumable), and return its
    rows. ``scores``: selector -> its scores table (tidy rows of the probe it reads)."""
    from workbench.protocol.params import validate_options
    from workbench.runs.load import load_results

    loaded = None if isinstance(model, str) else model
    name = model if isinstance(model, str) else model.name
    grid = validate_options(GridSpec, spec, "kv", "see workbench.kv.grid.GridSpec for the fields and their ranges")
    run_kv(plan_kv(name, grid, scores or {}, model=loaded), out, log)
    return load_results(out)
