"""A grid of cache policies x budgets x tasks: the specification and one unit of it.

:class:`GridSpec` names the selectors (:mod:`workbench.kv.selectors`), budgets, seeds of the
random baseline, tasks, lengths and depths; :func:`grid_points` turns it into the grid points
of one model (each a function from a context length to a policy, with its labels), and
:func:`run_unit` evaluates every point on one (task, length, protocol) and returns tidy rows
(model, policy, selector, budget, kv_tokens, kv_fraction, kv_bytes, head_sparsity, task,
protocol, length, depth, metric, value, seed, n). The run folder around it (resumable, one part
per unit) is :mod:`workbench.runs.kv`.

Selectors by name (``--selectors``): ``full``, ``streaming`` (StreamingLLM), ``snapkv``,
``headkv`` (retrieval scores, summed over each GQA group), ``retrieval`` (the workbench's
retrieval score, max over the group; the other KV heads sink + recent), ``streaming-heads``
(the workbench's streaming score: the *least* streaming KV heads keep the full cache), ``razor``
(RazorAttention: the top 14/15 of the share by induction and 1/15 by echo on repeated random
tokens, max over the group; the others :class:`~workbench.kv.policy.Compensated`), ``duo``
(DuoAttention gates, one per KV head), ``random`` (as many full KV heads as the head selectors,
drawn per seed).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Literal

import pandas as pd
import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator
from torch import Tensor

from workbench.errors import WorkbenchError
from workbench.kv import selectors as sel
from workbench.kv.policy import CachePolicy, Compensated, Geometry, Window

SELECTORS = ("full", "streaming", "snapkv", "headkv", "retrieval", "streaming-heads", "razor", "duo", "random")
SCORED = {  # selector -> (probe, metric(s), aggregation over the GQA group)
    "headkv": ("retrieval", ("retrieval",), "sum"),
    "retrieval": ("retrieval", ("retrieval",), "max"),
    "streaming-heads": ("streaming", ("streaming",), "max"),
    "razor": ("razor", ("razor_induction", "razor_echo"), "max"),
    "duo": ("duo", ("gate",), "max"),
}


class GridSpec(BaseModel):
    """What a ``workbench kv`` run evaluates (every field a parameter, defaults documented)."""

    model_config = ConfigDict(extra="forbid")

    selectors: list[str] = Field(
        ["full", "streaming", "snapkv", "random"],
        min_length=1,
        description="the scored ones (headkv, retrieval, streaming-heads, razor, duo) need their scores",
    )
    budgets: list[float] = Field([0.05, 0.1, 0.25, 0.5], min_length=1, description="cache shares in (0, 1]")
    seeds: int = Field(5, ge=1, description="random-head draws per budget")
    tasks: list[Literal["niah", "loss"]] = Field(["niah", "loss"], min_length=1)
    protocols: list[Literal["question-agnostic", "question-aware"]] = Field(["question-agnostic"], min_length=1)
    lengths: list[int] = Field([1024, 2048], min_length=1, description="niah context lengths (tokens)")
    depths: list[float] = Field([0.0, 0.25, 0.5, 0.75, 1.0], min_length=1, description="needle depths in [0, 1]")
    loss_length: int = Field(2048, ge=64, description="tokens per held-out prose segment")
    loss_tail: int = Field(256, ge=2, description="teacher-forced tokens at the end of each segment")
    loss_segments: int = Field(4, ge=1)
    sink: int = Field(4, ge=0, description="sink tokens of StreamingLLM and of streaming heads")
    recent: int = Field(256, ge=1, description="recent tokens of a head selector's streaming heads")
    razor_capacity: int = Field(256, ge=6, description="RazorAttention's local capacity (sinks + 1 + recent)")
    snap_window: int = Field(8, ge=1)
    snap_kernel: int = Field(7, ge=1)
    snap_pooling: Literal["max", "avg"] = "max"
    headkv_beta: float = Field(1.5, gt=1.0)
    max_new_tokens: int = Field(8, ge=1)
    seed: int = Field(0, ge=0, description="niah prompts and loss segments")

    @field_validator("selectors")
    @classmethod
    def _known(cls, names: list[str]) -> list[str]:
        unknown = [s for s in names if s not in SELECTORS]
        if unknown:
            raise ValueError(f"unknown selector(s) {', '.join(unknown)}; known: {', '.join(SELECTORS)}")
        return names

    @field_validator("budgets")
    @classmethod
    def _budgets(cls, budgets: list[float]) -> list[float]:
        for b in budgets:
            if not 0.0 < b <= 1.0:
                raise ValueError(f"budget {b:g} is outside (0, 1]: give cache shares, e.g. 0.1,0.25")
        return budgets

    @field_validator("depths")
    @classmethod
    def _depths(cls, depths: list[float]) -> list[float]:
        if any(not 0.0 <= d <= 1.0 for d in depths):
            raise ValueError("depths are fractions in [0, 1]")
        return depths


@dataclass
class Point:
    """One grid point: a policy for any context length, and the selector and budget it came from."""

    selector: str
    budget: float
    seed: int
    policy_for: Callable[[int], CachePolicy]


def head_scores(frame: pd.DataFrame, metric: str, geom: Geometry) -> Tensor:
    """``[layer, head]`` scores of ``metric`` from a tidy table (mean over its datasets and
    prompts), NaN where a head has none."""
    rows = frame[frame["metric"] == metric]
    out = torch.full((geom.n_layers, geom.n_heads), float("nan"), dtype=torch.float64)
    for (layer, head), value in rows.groupby(["layer", "head"])["value"].mean().items():
        if 0 <= layer < geom.n_layers and 0 <= head < geom.n_heads:
            out[int(layer), int(head)] = float(value)
    return out


def kv_scores(selector: str, frame: pd.DataFrame | None, geom: Geometry) -> list[Tensor]:
    """The KV-head scores a scored selector reads (one tensor per metric), aggregated over the
    GQA group by the source's rule; a missing table or missing heads is an error naming them."""
    probe, metrics, rule = SCORED[selector]
    if frame is None or frame.empty:
        raise WorkbenchError(
            f"selector {selector} needs {probe} scores for this model",
            f"give a table with {probe} rows ({', '.join(metrics)}) via --scores",
        )
    out = []
    for metric in metrics:
        if selector == "duo":  # gates are per KV head already
            t = torch.full((geom.n_layers, geom.n_kv_heads), float("nan"), dtype=torch.float64)
            for r in frame[frame["metric"] == "gate"].itertuples():
                t[int(r.layer), int(r.head)] = float(r.value)
        else:
            h = head_scores(frame, metric, geom)
            # the least streaming heads need the full cache: a KV head does if any of its query heads does
            h = -h if selector == "streaming-heads" else h
            t = sel.to_kv_heads(h, geom.n_kv_heads, rule)  # type: ignore[arg-type]
        missing = [(l_, k) for l_, k in CachePolicy(geom).eligible if torch.isnan(t[l_, k])]
        if missing:
            shown = ", ".join(f"{l_}.{k}" for l_, k in missing[:6])
            raise WorkbenchError(
                f"the {selector} scores ({metric}) miss {len(missing)} KV heads of this model ({shown}"
                f"{', ...' if len(missing) > 6 else ''})",
                "give scores from a run of that probe on this model, covering every head",
            )
        out.append(t)
    return out


def razor(geom: Geometry, budget: float, n: int, induction: Tensor, echo: Tensor, rest: Compensated) -> CachePolicy:
    """RazorAttention: the full-cache KV heads are the top ``14/15`` of the share by induction
    score united with the top ``1/15`` by echo score (their 14 % + 1 %), the rest compensated."""
    eligible = CachePolicy(geom).eligible
    k = sel.n_full(geom, budget)
    k_echo = round(k / 15)
    keep = set(sel.top_heads(induction, eligible, k - k_echo)) | set(sel.top_heads(echo, eligible, k_echo))
    heads = {h: (sel.FULL if h in keep else rest) for h in eligible}
    return CachePolicy(geom, heads, name=f"razor@{budget:g}", selector="razor", budget=budget)


def grid_points(spec: GridSpec, geom: Geometry, scores: dict[str, pd.DataFrame | None]) -> list[Point]:
    """Every grid point of ``spec`` on a model (``scores``: selector -> its table, if scored).
    Missing or incomplete scores fail here, before any model runs."""
    window = Window(spec.sink, spec.recent)
    comp = Compensated(spec.sink, spec.razor_capacity)
    pts = [Point("full", 1.0, -1, lambda n: sel.full(geom))]
    for name in spec.selectors:
        if name == "full":
            continue
        s = kv_scores(name, scores.get(name), geom) if name in SCORED else None
        for b in spec.budgets:
            pts.extend(_points(name, b, spec, geom, s, window, comp))
    return pts


def _points(
    name: str, b: float, spec: GridSpec, geom: Geometry, s: Any, window: Window, comp: Compensated
) -> list[Point]:
    snap = dict(window=spec.snap_window, kernel=spec.snap_kernel, pooling=spec.snap_pooling)
    makers: dict[str, Callable[[int], CachePolicy]] = {
        "streaming": lambda n: sel.streaming(geom, b, n, spec.sink),
        "snapkv": lambda n: sel.snapkv(geom, b, n, **snap),
        "headkv": lambda n: sel.headkv(geom, b, n, s[0], spec.headkv_beta, **snap),
        "retrieval": lambda n: sel.heads(geom, b, n, s[0], window, "retrieval"),
        "streaming-heads": lambda n: sel.heads(geom, b, n, s[0], window, "streaming-heads"),
        "duo": lambda n: sel.heads(geom, b, n, s[0], window, "duo"),
        "razor": lambda n: razor(geom, b, n, s[0], s[1], comp),
    }
    if name == "random":
        return [
            Point("random", b, seed, lambda n, seed=seed: sel.random_heads(geom, b, n, window, seed))
            for seed in range(spec.seeds)
        ]
    return [Point(name, b, -1, makers[name])]


COLUMNS = [
    "model", "policy", "selector", "budget", "kv_tokens", "kv_fraction", "kv_bytes", "head_sparsity",
    "task", "protocol", "length", "depth", "metric", "value", "seed", "n",
]  # fmt: skip


def check_points(points: list[Point], n: int) -> None:
    """Build every point's policy for a context of ``n`` tokens: a budget that keeps fewer
    tokens than sink + recent fails here, before anything runs."""
    for p in points:
        p.policy_for(n)


def check_lengths(model: Any, lengths: list[int]) -> None:
    """Every niah length fits the model's context; one error naming the fix otherwise."""
    for length in lengths:
        if length > model.n_ctx:
            raise WorkbenchError(
                f"context length {length} exceeds the model's context of {model.n_ctx} tokens",
                f"use --lengths up to {model.n_ctx}",
            )


def check_loss(model: Any, spec: GridSpec) -> None:
    """The loss segments fit the model's context and their tail fits the segment."""
    if spec.loss_length > model.n_ctx:
        raise WorkbenchError(
            f"loss segments of {spec.loss_length} tokens exceed the model's context of {model.n_ctx}",
            f"use --loss-length up to {model.n_ctx}",
        )
    if spec.loss_tail >= spec.loss_length:
        raise WorkbenchError("the loss tail must be shorter than the segment", "lower --loss-tail")


def niah_items(model: Any, spec: GridSpec, length: int) -> list[Any]:
    """The niah prompts of one length (every depth), split where the question starts."""
    from workbench.datasets.niah import make
    from workbench.kv.tasks import NiahItem

    check_lengths(model, [length])
    prompts = make(
        tokenizer=model.tokenizer, context_len=[length], depths=spec.depths, seed=spec.seed, n_ctx=model.n_ctx
    )
    items = []
    for p in prompts:
        q = len(model.tokenizer(p.meta["question"], add_special_tokens=False)["input_ids"])
        ids = list(p.tokens)
        items.append(NiahItem(p.id, ids[:-q], ids[-q:], p.meta["answer"], length, float(p.meta["depth"])))
    return items


def loss_segments(model: Any, spec: GridSpec) -> list[list[int]]:
    """``loss_segments`` stretches of ``loss_length`` tokens of the prose corpus (documents joined,
    each stretch from its own seeded document onwards)."""
    import random

    from workbench.inputs.corpus import corpus_ids
    from workbench.inputs.prompts import special_prefix

    check_loss(model, spec)
    rng = random.Random(f"kv-loss-{spec.seed}")
    prefix = special_prefix(model.tokenizer)  # Gemma's BOS, nothing for SmolLM2
    n = spec.loss_length - len(prefix)
    return [prefix + corpus_ids(model.tokenizer, n, rng) for _ in range(spec.loss_segments)]


def run_unit(model: Any, spec: GridSpec, points: list[Point], task: str, length: int, protocol: str) -> pd.DataFrame:
    """Every grid point on one (task, length, protocol): tidy rows (:data:`COLUMNS` plus
    ``item`` and ``response``)."""
    from workbench.kv import tasks

    fns = [p.policy_for for p in points]
    if task == "niah":
        items = niah_items(model, spec, length)
        rows = tasks.niah_rows(model, items, fns, protocol, spec.max_new_tokens)
    else:
        rows = tasks.loss_rows(model, loss_segments(model, spec), fns, spec.loss_tail, spec.loss_length)
    return pd.DataFrame(rows)
