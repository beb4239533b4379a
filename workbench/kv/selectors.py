"""Head selectors: documented functions from head scores (or none) to a cache policy.

Each selector takes the model's :class:`~workbench.kv.policy.Geometry`, a ``budget`` in (0, 1]
and the context length ``n``, and returns a :class:`~workbench.kv.policy.CachePolicy`:

=============  ===================================================================================
selector       policy
=============  ===================================================================================
``full``       every head keeps everything (the upper bound)
``streaming``  StreamingLLM everywhere: each KV head keeps ``int(n * budget)`` tokens, ``sink``
               first and the rest most recent (kvpress' ``n_kept = int(k_len (1 - ratio))``)
``snapkv``     SnapKV everywhere: ``int(n * budget)`` tokens per KV head, the window included
``headkv``     HeadKV: the same mean capacity, split over KV heads in proportion to their scores
               (:func:`headkv_capacities`)
``heads``      a head selector: the top ``budget`` share of eligible KV heads by score keep the
               full cache, the others get a streaming policy (DuoAttention: sink + recent window;
               RazorAttention: :class:`~workbench.kv.policy.Compensated`). Scores: the
               workbench's probes (retrieval, streaming, RazorAttention's induction + echo),
               DuoAttention's gates, or anything with one number per head.
``random``     the same count of full KV heads as ``heads``, drawn uniformly (a seed each)
=============  ===================================================================================

Query-head scores reach KV heads by :func:`to_kv_heads` (max, mean or sum over the GQA group, as
each source does; see docs/kv-cache.md). Sliding-window layers are not eligible unless the policy
compresses them: they hold their window whatever the selector says. Ties between equal scores go
to the lower (layer, head), so a selection is reproducible.
"""

from __future__ import annotations

import math
import random as _random
from typing import Literal

import torch
from jaxtyping import Float
from torch import Tensor

from workbench.errors import WorkbenchError
from workbench.kv.policy import FULL, Budget, CachePolicy, Geometry, HeadPolicy, Window
from workbench.protocol.ranking import rank_heads

Aggregate = Literal["max", "mean", "sum"]


def check_budget(budget: float) -> float:
    budget = float(budget)
    if not (0.0 < budget <= 1.0) or math.isnan(budget):
        raise WorkbenchError(
            f"budget {budget:g} is outside (0, 1]",
            "give budgets as fractions of the cache, e.g. --budgets 0.1,0.25,0.5",
        )
    return budget


def _kept(budget: float, n: int, least: int, what: str) -> int:
    kept = int(n * check_budget(budget))
    if kept < least:
        raise WorkbenchError(
            f"budget {budget:g} of a {n}-token context keeps {kept} tokens per head, fewer than the {least} "
            f"the {what} itself holds",
            f"raise the budget to at least {math.ceil(least / n * 1000) / 1000:g}, or lower sink / window",
        )
    return kept


def full(geom: Geometry, budget: float = 1.0, n: int = 0) -> CachePolicy:
    """Every KV head keeps every token."""
    return CachePolicy(geom, {}, name="full", selector="full", budget=1.0)


def streaming(geom: Geometry, budget: float, n: int, sink: int = 4) -> CachePolicy:
    """StreamingLLM on every eligible KV head: ``sink`` first tokens + the most recent ones,
    ``int(n * budget)`` in all."""
    kept = _kept(budget, n, sink + 1, f"sink of {sink} tokens plus one recent token")
    heads = {h: Window(sink, kept - sink) for h in _eligible(geom)}
    return CachePolicy(geom, heads, name=f"streaming@{budget:g}", selector="streaming", budget=budget)


def snapkv(
    geom: Geometry, budget: float, n: int, window: int = 8, kernel: int = 7, pooling: str = "max"
) -> CachePolicy:
    """SnapKV with the same capacity on every eligible KV head: ``int(n * budget)`` tokens, the
    last ``window`` included."""
    kept = _kept(budget, n, window, f"observation window of {window} tokens")
    p = Budget(kept - window, window, kernel, pooling)  # type: ignore[arg-type]
    heads = {h: p for h in _eligible(geom)}
    return CachePolicy(geom, heads, name=f"snapkv@{budget:g}", selector="snapkv", budget=budget)


def headkv_capacities(
    scores: Float[Tensor, " head"], mean_capacity: int, beta: float = 1.5, temp: float = 1.0
) -> list[int]:
    """HeadKV's allocation (FYYFU/HeadKV, ``ReasonSnapKVCluster``): every head gets at least
    ``B - B // beta``; a pool of ``(B // beta) x heads`` is split in proportion to the normalised
    scores raised to ``temp`` (``B`` = ``mean_capacity``). Large ``beta``: uniform (SnapKV);
    ``beta`` near 1: fully proportional."""
    if beta <= 1.0:
        raise WorkbenchError(f"HeadKV's beta must be > 1, got {beta:g}", "use e.g. 1.5 (the paper's default)")
    s = scores.double().clamp_min(0)
    s = s / s.sum() if float(s.sum()) > 0 else torch.full_like(s, 1 / len(s))
    s = s**temp
    s = s / s.sum()
    pool = (mean_capacity // beta) * len(s)
    least = mean_capacity - mean_capacity // beta
    return [int(round(float(x) * pool + least)) for x in s]


def headkv(
    geom: Geometry,
    budget: float,
    n: int,
    scores: Float[Tensor, "layer kv_head"],
    beta: float = 1.5,
    temp: float = 1.0,
    window: int = 8,
    kernel: int = 7,
    pooling: str = "max",
) -> CachePolicy:
    """HeadKV: SnapKV in every eligible KV head with capacities from :func:`headkv_capacities`
    (mean ``int(n * budget) - window``), scores summed over the GQA group (:func:`to_kv_heads`)."""
    kept = _kept(budget, n, window, f"observation window of {window} tokens")
    eligible = _eligible(geom)
    caps = headkv_capacities(torch.stack([scores[h] for h in eligible]).nan_to_num(0.0), kept - window, beta, temp)
    heads = {h: Budget(cap, window, kernel, pooling) for h, cap in zip(eligible, caps)}  # type: ignore[arg-type]
    return CachePolicy(geom, heads, name=f"headkv@{budget:g}", selector="headkv", budget=budget)


def top_heads(scores: Float[Tensor, "layer kv_head"], eligible: list[tuple[int, int]], k: int) -> list[tuple[int, int]]:
    """The ``k`` eligible KV heads with the highest scores, ties to the lower (layer, head)."""
    return rank_heads(eligible, lambda h: float(scores[h]))[:k]


def n_full(geom: Geometry, budget: float) -> int:
    """How many eligible KV heads a head selector keeps whole at ``budget`` (a share)."""
    return int(round(check_budget(budget) * len(_eligible(geom))))


def heads(
    geom: Geometry,
    budget: float,
    n: int,
    scores: Float[Tensor, "layer kv_head"],
    rest: HeadPolicy,
    selector: str = "heads",
) -> CachePolicy:
    """The top ``budget`` share of eligible KV heads keep everything, the rest get ``rest``."""
    eligible = _eligible(geom)
    if torch.isnan(torch.stack([scores[h] for h in eligible])).any():
        missing = [f"{layer}.{kv}" for layer, kv in eligible if math.isnan(float(scores[layer, kv]))]
        raise WorkbenchError(
            f"the {selector} scores miss {len(missing)} KV heads ({', '.join(missing[:6])}"
            f"{', ...' if len(missing) > 6 else ''})",
            "give scores for every head of the model's global layers (a probe run on this model)",
        )
    keep = set(top_heads(scores, eligible, n_full(geom, budget)))
    policy = {h: (FULL if h in keep else rest) for h in eligible}
    return CachePolicy(geom, policy, name=f"{selector}@{budget:g}", selector=selector, budget=budget)


def random_heads(geom: Geometry, budget: float, n: int, rest: HeadPolicy, seed: int) -> CachePolicy:
    """As :func:`heads` with the full KV heads drawn uniformly at random (``seed``)."""
    eligible = _eligible(geom)
    keep = set(_random.Random(seed).sample(eligible, n_full(geom, budget)))
    policy = {h: (FULL if h in keep else rest) for h in eligible}
    return CachePolicy(geom, policy, name=f"random@{budget:g}#{seed}", selector="random", budget=budget, seed=seed)


def to_kv_heads(scores: Float[Tensor, "layer head"], n_kv_heads: int, rule: Aggregate = "max") -> Tensor:
    """Query-head scores as KV-head scores (query head ``h`` reads KV head ``h // g``, HF's
    ``repeat_kv`` grouping; golden-stick's ``_max_every_group`` groups the same consecutive heads):
    ``max`` over the group (RazorAttention; a KV head is needed if any of its query heads is),
    ``mean`` (kvpress), or ``sum`` (HeadKV's adaptation: the group's share of a normalised total).
    The scores' dtype is kept."""
    scores = torch.as_tensor(scores)
    layers, h = scores.shape
    if n_kv_heads < 1 or h % n_kv_heads:
        raise WorkbenchError(f"{h} query heads do not split into {n_kv_heads} KV heads", "pass the model's n_kv_heads")
    grouped = scores.reshape(layers, n_kv_heads, h // n_kv_heads)
    if rule == "max":
        return grouped.amax(-1)
    if rule == "mean":
        return grouped.mean(-1)
    if rule == "sum":
        return grouped.sum(-1)
    raise WorkbenchError(f"unknown aggregation {rule!r}", "use max, mean or sum")


def _eligible(geom: Geometry) -> list[tuple[int, int]]:
    return CachePolicy(geom).eligible
