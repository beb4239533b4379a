"""The inputs of a report: run folders, results files and circuit folders (paths, or fsspec
URLs read through :mod:`workbench.files.targets`), read into one table per run, and the *series* (one
model in one run) that get an atlas grid and a comparison line.

Also what a run recorded about itself: when it ran and how long (from ``timing`` fields when
the sweep records them, else the parts' ``created`` stamps, saying what is missing), and how
many tokens each dataset had.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Sequence

import pandas as pd

from workbench.errors import WorkbenchError
from workbench.files import targets
from workbench.runs.load import load_results


@dataclass
class Run:
    """One input of the report: its results table (``run`` column added), per-part metadata,
    the sweep config when there is one, and any discovered circuits."""

    label: str
    path: targets.Target
    table: pd.DataFrame
    metas: list[dict]
    config: dict | None = None
    circuits: list[dict] = field(default_factory=list)


def _find_circuits(path: targets.Target) -> list[targets.Target]:
    if targets.is_file(path) or not targets.is_dir(path):
        return []
    found = [
        *targets.glob(path, "circuit.json"),
        *targets.glob(path, "*/circuit.json"),
        *targets.glob(path, "circuits/*/circuit.json"),
    ]
    return sorted(dict.fromkeys(found))  # all paths or all URL strings


def load_run(path: str | Path, label: str) -> Run:
    """Read one run folder / results file / circuit folder (a path or an fsspec URL); bad input -> WorkbenchError."""
    path = targets.as_target(path)
    circuits = []
    for f in _find_circuits(path):
        try:
            circ = json.loads(targets.read_bytes(f).decode("utf-8"))
        except (OSError, ValueError) as exc:
            raise WorkbenchError(
                f"{f} is not readable JSON: {exc}", "re-run `workbench circuit` into a new folder"
            ) from None
        if isinstance(circ, dict) and isinstance(circ.get("nodes"), list):
            circ.setdefault("task", _parent_name(f))
            circ["run"], circ["file"] = label, str(f)
            circuits.append(circ)
    try:
        table, metas = load_results(path, with_metadata=True)
    except WorkbenchError:
        if not circuits:
            raise
        table, metas = pd.DataFrame(columns=["model", "dataset", "probe", "metric", "layer", "head", "value", "n"]), []
    cfg_file = targets.join(path, "sweep.json") if targets.is_dir(path) else None
    config = None
    if cfg_file is not None and targets.is_file(cfg_file):
        try:
            config = json.loads(targets.read_bytes(cfg_file).decode("utf-8"))
        except ValueError:
            config = {"unreadable": str(cfg_file)}
    return Run(label, path, table.assign(run=label), metas, config, circuits)


def run_labels(paths: Sequence[targets.Target], labels: Sequence[str] | None) -> list[str]:
    if labels:
        if len(labels) != len(paths):
            raise WorkbenchError(f"{len(labels)} labels for {len(paths)} runs", "give one label per run, in order")
        if len(set(labels)) != len(labels):
            raise WorkbenchError("run labels must be distinct", "e.g. --labels base,tuned")
        return list(labels)
    out = [_stem(p) if targets.is_file(p) else targets.name(p) for p in paths]
    if len(set(out)) < len(out):
        out = [f"{_parent_name(p)}/{name}" for p, name in zip(paths, out)]
    if len(set(out)) < len(out):
        out = [f"{name} #{i + 1}" for i, name in enumerate(out)]
    return out


def _stem(path: targets.Target) -> str:
    return Path(targets.name(path)).stem


def _parent_name(path: targets.Target) -> str:
    return (
        targets.name(str(path).rstrip("/").rsplit("/", 1)[0]) if targets.is_url(str(path)) else Path(path).parent.name
    )


@dataclass
class Series:
    """One model in one run: the unit that gets its own atlas grid and comparison line."""

    name: str
    run: str
    model: str
    info: dict

    @property
    def n_layers(self) -> int | None:
        v = self.info.get("n_layers")
        return int(v) if v is not None else None

    @property
    def n_heads(self) -> int | None:
        v = self.info.get("n_heads")
        return int(v) if v is not None else None


def _short_model(name: str) -> str:
    return Path(name).name if (os.sep in name or "/" in name) else name


def series_of(runs: Sequence[Run]) -> list[Series]:
    pairs: list[tuple[str, str]] = []
    for r in runs:
        present = list(r.table["model"].astype(str)) + [str(c.get("model", "")) for c in r.circuits]
        configured = [
            str(m) for m in ((r.config or {}).get("models") or []) if str(m) in set(present)
        ]  # the sweep's order
        pairs += [(r.label, m) for m in dict.fromkeys(configured + present) if m]
    models = [m for _, m in pairs]
    short = {m: _short_model(m) for m in models}
    if len(set(short.values())) < len(set(models)):
        short = {m: m for m in models}
    one_run_each = len(set(models)) == len(pairs)
    out = []
    for run_label, m in pairs:
        run = next(r for r in runs if r.label == run_label)
        info = next(
            (
                meta.get("model")
                for meta in run.metas
                if isinstance(meta.get("model"), dict) and str(meta["model"].get("model")) == m
            ),
            None,
        )
        info = dict(info or {})
        sub = run.table[(run.table["model"].astype(str) == m) & (run.table["layer"] >= 0)]
        if "n_layers" not in info and len(sub):
            info["n_layers"] = int(sub["layer"].max()) + 1
        if "n_heads" not in info and len(sub):
            info["n_heads"] = int(sub["head"].max()) + 1
        if "n_layers" not in info:  # a circuit alone: its logit edges end at layer n_layers
            ends = [
                int(e.get("receiver_layer", 0))
                for c in run.circuits
                if str(c.get("model")) == m
                for e in c.get("edges", [])
                if e.get("receiver") == "logits"
            ]
            if ends:
                info["n_layers"] = max(ends)
        out.append(Series(short[m] if one_run_each else f"{run_label} · {short[m]}", run_label, m, info))
    return out


def _time_text(d: datetime) -> str:
    """A time to the minute as the summary prints it: ``... UTC`` when it is in UTC, else ISO 8601 with its offset."""
    if d.utcoffset() is not None and not d.utcoffset():
        return d.strftime("%Y-%m-%d %H:%M UTC")
    return d.isoformat(timespec="minutes")


def when_text(metas: list[dict], config: dict | None) -> str:
    """When and how long, from what the run recorded (degrades to what exists)."""

    def parse(s: Any) -> datetime | None:
        try:
            return datetime.fromisoformat(str(s))
        except ValueError:
            return None

    timings = {}
    for m in metas:
        t = m.get("timing")
        if isinstance(t, dict) and (t.get("started") or t.get("seconds") is not None):
            # units of one forward share a timing; two quick groups can share its values (to the second), so
            # the group names it where recorded
            timings[t.get("group") or (t.get("started"), t.get("finished"), t.get("seconds"))] = t
    run_t = (config or {}).get("timing") if isinstance((config or {}).get("timing"), dict) else None
    created = sorted(d for d in (parse(m.get("created")) for m in metas) if d is not None)
    if run_t and run_t.get("started") and run_t.get("finished"):
        a, b = parse(run_t["started"]), parse(run_t["finished"])
        if a and b:
            return f"Ran {_time_text(a)} to {_time_text(b)} ({_duration((b - a).total_seconds())})."
    if timings:
        starts = [parse(t.get("started")) for t in timings.values() if t.get("started")]
        ends = [parse(t.get("finished")) for t in timings.values() if t.get("finished")]
        secs = sum(float(t.get("seconds") or 0) for t in timings.values())
        span = (
            f" from {_time_text(min(starts))} to {_time_text(max(ends))}"
            if starts and ends and all(starts) and all(ends)
            else ""
        )
        return f"Ran{span}: {_duration(secs)} of computation over {len(timings)} model x dataset group(s)."
    if not created:
        return "When it ran was not recorded."
    if len(created) == 1:
        return f"Results written {_time_text(created[0])}; how long it took was not recorded."
    return (
        f"Results written between {_time_text(created[0])} and {_time_text(created[-1])} "
        f"({_duration((created[-1] - created[0]).total_seconds())} from first to last part); "
        "the run's start and per-unit durations were not recorded, so the first unit's time is not included."
    )


def _duration(seconds: float) -> str:
    seconds = max(0.0, float(seconds))
    if seconds < 10:
        return f"{seconds:.1f} s"
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def tokens_text(run: Run, model: str, dataset: str, meta_ds: dict) -> str:
    if meta_ds.get("n_tokens") is not None:
        return f"{int(meta_ds['n_tokens']):,} tokens"
    ent = run.table[
        (run.table["model"] == model)
        & (run.table["dataset"] == dataset)
        & (run.table["metric"] == "entropy")
        & (run.table["layer"] >= 0)
    ]
    n_prompts = meta_ds.get("n_prompts")
    if len(ent) and n_prompts:
        # entropy averages every query position q >= 1: sum over prompts of (T - 1)
        return f"{int(ent['n'].max()) + int(n_prompts):,} tokens"
    opts = meta_ds.get("options") or {}
    if opts.get("context_len"):
        lens = opts["context_len"] if isinstance(opts["context_len"], list) else [opts["context_len"]]
        return "contexts of " + "/".join(str(x) for x in lens) + " tokens"
    return "token count not recorded"
