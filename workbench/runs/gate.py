"""``workbench gate``'s run folder: head gates fit on one task, their roles and the causal checks.

Three units, each one part in ``OUT/parts/`` (:class:`workbench.runs.folder.RunFolder`), resumable:

1. ``gate-fit``: the fit (:func:`circuits.gating.fit.fit_head_gates`) as tidy rows
   (:func:`circuits.gating.roles.gate_frame`: gates per stage and initialisation, roles, the loss
   per update);
2. ``gate-check`` (``check=True``, needs the three stages): closing heads by consensus role
   against random heads, and the ``check_ks`` strongest facilitating heads (by G-) against as
   many random ones (:func:`circuits.gating.checks.closing_check`), metrics ``check_nll`` and
   ``check_delta_nll`` with columns ``closed``, ``n_closed``, ``seed``;
3. ``gate-patching`` (IOI only, ``patching=True``): path patching's direct effect of every head
   (``direct_effect`` rows per head) and the agreement (``agree_overlap``, ``agree_spearman``,
   ``agree_top_facilitating``; signed: ``agree_spearman_signed``, ``agree_supporting_facilitating``
   and ``agree_opposing_interfering``, whose ``n_closed`` is how many top heads support / oppose).

A unit's key hashes the model's identity and every setting its numbers depend on, so a re-run
computes only what is missing. Everything that can be wrong with the input (unknown task or
stage, zero updates, empty targets, examples longer than the context, a family without a head
edit point) fails in :func:`plan_gate`, before the folder is touched.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import pandas as pd
from pydantic import Field

from circuits.gating.fit import GateSpec
from circuits.gating.gates import check_gateable
from circuits.gating.tasks import GateExample, make_task
from workbench.files import targets
from workbench.runs.config import Unit
from workbench.runs.folder import RunFolder


class GateRunSpec(GateSpec):
    """A ``workbench gate`` run: the fit (:class:`GateSpec`), the task and the checks."""

    task: str = Field("ioi", description="ioi, niah, aba, or a JSONL file of {text, target}")
    n: int = Field(64, ge=1, description="examples of a built-in task")
    task_seed: int = Field(0, ge=0, description="the built-in task's examples")
    context_len: int = Field(256, ge=16, description="niah context length (tokens)")
    check: bool = Field(True, description="close heads by role against random heads")
    n_random: int = Field(5, ge=1, description="random-head draws of the closing check")
    patching: bool = Field(True, description="IOI: compare with path patching's direct effects")
    top_k: int = Field(10, ge=1, description="heads compared with path patching")
    check_ks: list[int] = Field([5, 10, 20], description="graded check: the k strongest facilitating heads vs k random")

    def fit_spec(self) -> GateSpec:
        return GateSpec(**{k: getattr(self, k) for k in GateSpec.model_fields})


@dataclass
class GatePlan:
    model_name: str
    model: Any
    spec: GateRunSpec
    examples: list[GateExample]
    units: list[tuple[Unit, str]]  # (unit, kind)


def _task_name(spec: GateRunSpec) -> str:
    return Path(spec.task).stem if spec.task.endswith(".jsonl") else spec.task


def plan_gate(model_name: str, spec: GateRunSpec, model: Any = None, **load: Any) -> GatePlan:
    """Load the model, build the task and check every input; nothing is written."""
    from workbench.models.loading import load_model, model_identity
    from workbench.runs.parquet import SCHEMA_VERSION

    if model is None:
        model = load_model(model_name, **load)
    check_gateable(model)
    examples = make_task(spec.task, model.tokenizer, spec.n, spec.task_seed, model.n_ctx, spec.context_len)
    task = _task_name(spec)
    fit_keys = sorted(GateSpec.model_fields)
    data = hashlib.sha256(json.dumps([[*ex.ids, -ex.n_target] for ex in examples]).encode()).hexdigest()
    base = {"model": model_identity(model_name) if model_name else {}, "schema": SCHEMA_VERSION, "data": data}
    fit_id = {**base, "fit": {k: getattr(spec, k) for k in fit_keys}}
    units = [(Unit(model_name, task, "gate-fit", json.dumps(fit_id, sort_keys=True, default=str)), "fit")]
    has_roles = {"positive", "negative"} <= set(spec.stages)
    if spec.check and has_roles:
        ident = {**fit_id, "check": {"n_random": spec.n_random, "ks": spec.check_ks, "random_irrelevant": True}}
        units.append((Unit(model_name, task, "gate-check", json.dumps(ident, sort_keys=True, default=str)), "check"))
    if spec.patching and spec.task == "ioi" and has_roles:
        ident = {**fit_id, "patching": {"top_k": spec.top_k, "signed": True}}
        units.append(
            (Unit(model_name, task, "gate-patching", json.dumps(ident, sort_keys=True, default=str)), "patching")
        )
    return GatePlan(model_name, model, spec, examples, units)


def _check_rows(plan: GatePlan, fit_rows: pd.DataFrame) -> pd.DataFrame:
    from circuits.gating.checks import as_tensor, closing_check
    from circuits.gating.roles import consensus_grid

    m = plan.model
    roles = consensus_grid(fit_rows, m.n_layers, m.n_heads)
    g_neg = as_tensor(fit_rows, "gate_mean", "negative", m.n_layers, m.n_heads).numpy()
    frame = closing_check(
        m, plan.examples, roles, plan.spec.n_random, plan.spec.seed, strength=g_neg, ks=plan.spec.check_ks
    )
    return frame.assign(metric="check_" + frame.metric, layer=-1, head=-1)


def _patching_rows(plan: GatePlan, fit_rows: pd.DataFrame) -> pd.DataFrame:
    from circuits.gating.checks import as_tensor, direct_effects, patching_agreement
    from circuits.gating.roles import consensus_grid
    from circuits.tasks import ioi

    m = plan.model
    pairs = ioi(m.tokenizer, n=plan.spec.n, seed=plan.spec.task_seed)
    direct = direct_effects(m, pairs)
    roles = consensus_grid(fit_rows, m.n_layers, m.n_heads)
    g_neg = as_tensor(fit_rows, "gate_mean", "negative", m.n_layers, m.n_heads).numpy()
    agree = patching_agreement(direct, g_neg, roles, plan.spec.top_k)
    rows = [
        {"layer": int(r.layer), "head": int(r.head), "metric": "direct_effect", "value": float(r.value)}
        for r in direct.itertuples()
    ]
    names = {
        "overlap": "agree_overlap",
        "spearman": "agree_spearman",
        "top_patch_facilitating": "agree_top_facilitating",
        "spearman_signed": "agree_spearman_signed",
        "top_supporting_facilitating": "agree_supporting_facilitating",
        "top_opposing_interfering": "agree_opposing_interfering",
    }
    of = {"agree_supporting_facilitating": agree["top_supporting"], "agree_opposing_interfering": agree["top_opposing"]}
    for key, name in names.items():
        rows.append(
            {
                "layer": -1,
                "head": -1,
                "metric": name,
                "value": float(agree[key]),
                "n_closed": of.get(name, plan.spec.top_k),
            }
        )
    return pd.DataFrame(rows)


def _tidy(rows: pd.DataFrame, plan: GatePlan) -> pd.DataFrame:
    from circuits.gating.roles import COLUMNS

    out = rows.assign(model=plan.model_name, dataset=_task_name(plan.spec), probe="gate", n=len(plan.examples))
    for col, default in (
        ("stage", ""),
        ("init", -1),
        ("update", -1),
        ("role", ""),
        ("closed", ""),
        ("n_closed", -1),
        ("seed", -1),
    ):
        out[col] = out[col].fillna(default) if col in out.columns else default
    return out[[*COLUMNS, "closed", "n_closed", "seed"]]


def run_gate(plan: GatePlan, out: str | Path, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Compute every unit of ``plan`` without a sound part in ``out``; returns a summary."""
    from workbench.runs.sweep import remove_if_empty

    new = not targets.is_url(str(out)) and not Path(out).exists()
    try:
        return _run_gate(plan, out, log)
    except BaseException:
        if new:  # a failure leaves no folder behind
            remove_if_empty(Path(out))
        raise


def _fit_rows(plan: GatePlan, log: Callable[[str], None]) -> pd.DataFrame:
    from circuits.gating.fit import fit_head_gates
    from circuits.gating.roles import gate_frame

    every = max(1, (plan.spec.updates + 2 * plan.spec.reg_updates) // 20)

    def progress(rec: dict[str, Any]) -> None:
        if rec["update"] % every == 0:
            log(f"  {rec['stage']} update {rec['update']}: nll {rec['nll']:.4f} l1 {rec['l1']:+.4f}")

    fit = fit_head_gates(plan.model, plan.examples, plan.spec.fit_spec(), log=progress)
    return gate_frame(fit, plan.model_name, _task_name(plan.spec))


def _run_gate(plan: GatePlan, out: str | Path, log: Callable[[str], None]) -> dict[str, Any]:
    from workbench.runs.parquet import check_writable, read_parquet, run_metadata, write_parquet
    from workbench.runs.sweep import writing

    targets.check_url(str(out))
    check_writable(targets.join(targets.join(targets.as_target(out), "parts"), "probe.parquet"))
    with writing(out):
        folder = RunFolder(out)
        sound, _ = folder.reconcile([u for u, _ in plan.units], log)
        fit_rows = None
        ran = 0
        for unit, kind in plan.units:
            path = targets.join(folder.parts, unit.filename)
            if unit.filename in sound:
                if kind == "fit":
                    fit_rows = read_parquet(path)[0]
                continue
            t0 = time.perf_counter()
            if kind == "fit":
                rows = _fit_rows(plan, log)
                fit_rows = rows
            else:
                rows = _check_rows(plan, fit_rows) if kind == "check" else _patching_rows(plan, fit_rows)
            rows = _tidy(rows, plan)
            meta = run_metadata(
                model=plan.model.describe(),
                config={"gate": plan.spec.model_dump(), "unit": kind},
                unit={"kind": kind, "key": unit.key},
                timing={"seconds": round(time.perf_counter() - t0, 3)},
            )
            write_parquet(rows, path, meta)
            folder.record({"filename": unit.filename, "size": targets.size(path), "sha256": targets.sha256(path)})
            log(f"{kind}: {len(rows)} rows in {time.perf_counter() - t0:.0f} s")
            ran += 1
    return {"units": len(plan.units), "ran": ran, "out": str(out)}


def gate_heads(model: str | Any, out: str | Path, log: Callable[[str], None] = print, **spec: Any) -> pd.DataFrame:
    """The Python door to ``workbench gate``: fit head gates on ``model`` (a name or a loaded
    model) with the :class:`GateRunSpec` fields ``spec`` into the run folder ``out`` (resumable)
    and return its rows."""
    from workbench.protocol.params import validate_options
    from workbench.runs.load import load_results

    loaded = None if isinstance(model, str) else model
    name = model if isinstance(model, str) else model.name
    run = validate_options(GateRunSpec, spec, "gate", "see workbench.runs.gate.GateRunSpec for the fields")
    run_gate(plan_gate(name, run, model=loaded), out, log)
    return load_results(out)
