"""Faithfulness, completeness and minimality of head circuits (Wang et al. 2023, section 4).

``F(S)`` is the mean logit difference over the clean prompts when every head *not* in ``S`` is
ablated (:mod:`circuits.ablation`; MLPs and embeddings are never ablated at head level). ``M``
is the whole model, so ``F(M)`` is the clean LD; ``C`` is the circuit.

- **faithfulness** ``F(C) / F(M)`` (the IOI paper's 87% for GPT-2 small), with ``F(empty)``
  (every head ablated) and the normalised ``(F(C) - F(empty)) / (F(M) - F(empty))``.
- **completeness**: for subsets ``K`` of ``C``, the incompleteness ``|F(C \\ K) - F(M \\ K)|``
  should be small: removing ``K`` should hurt the circuit as it hurts the model. ``K`` is chosen
  as the paper does: the empty set, random subsets (each head of ``C`` in ``K`` with
  probability 1/2), and greedily (``K`` grows one head at a time, each step adding the head of
  ``C`` that maximises the incompleteness, every candidate evaluated).
- **minimality**: every head ``v`` of ``C`` should matter for some ``K`` inside ``C \\ {v}``:
  the score ``|F(C \\ (K + v)) - F(C \\ K)|`` maximised over ``K`` = empty and random subsets
  of ``C \\ {v}`` (the paper picks ``K`` by hand per head class; we search).

Every ``F`` is a batch of stacked variants through the attention hook (any architecture), cached
by the set of ablated heads. :func:`head_curve` measures ``F`` for the top-k heads of a ranking
on a grid of k and finds the smallest k reaching a target; :func:`prune_heads` then drops heads
whose removal keeps ``F`` at the target (lowest-ranked first).
"""

from __future__ import annotations

import random
from typing import Iterable, Sequence

import numpy as np
import pandas as pd
from torch import Tensor

from circuits.ablation import Ablation, HeadAblator, masks_for
from circuits.baseline import Baseline, fork_at, logit_diff, repeat_rows

Head = tuple[int, int]


class Evaluator:
    """``F`` of sets of ablated heads, batched and cached."""

    def __init__(self, model, base: Baseline, abl: Ablation, max_rows: int = 512) -> None:
        self.model, self.base, self.abl, self.max_rows = model, base, abl, max_rows
        self.all = frozenset((layer, h) for layer in range(model.n_layers) for h in range(model.n_heads))
        self.cache: dict[frozenset, float] = {frozenset(): float(base.ld_clean.mean())}
        self.per_prompt: dict[frozenset, Tensor] = {frozenset(): base.ld_clean}
        self.n_forwards = 0

    def lds(self, ablate_sets: Sequence[Iterable[Head]]) -> list[float]:
        """Mean LD with each set of heads ablated."""
        keys = [frozenset(map(tuple, s)) for s in ablate_sets]
        todo = list(dict.fromkeys(k for k in keys if k not in self.cache))
        b = self.base.pb.size
        per = max(1, self.max_rows // b)
        for i in range(0, len(todo), per):
            chunk = todo[i : i + per]
            m = len(chunk)
            masks = masks_for(chunk, self.model.n_layers, self.model.n_heads, self.model.device)
            # the variants agree below the first layer where their ablated sets differ: run that prefix once
            common = frozenset.intersection(*chunk)
            fork = min((layer for s in chunk for layer, _ in s - common), default=self.model.n_layers)
            with fork_at(self.model, fork, m, b) as forked:
                batch = self.base.pb.clean if forked else repeat_rows(self.base.pb.clean, m)
                ld = logit_diff(self.model, batch, self.base.pb, m, [HeadAblator(self.abl, m, b, masks)])
            self.n_forwards += 1
            for key, row in zip(chunk, ld.view(m, b)):
                self.per_prompt[key] = row
                self.cache[key] = float(row.double().mean())
        return [self.cache[k] for k in keys]

    def F(self, kept: Iterable[Head]) -> float:
        """Mean LD keeping only ``kept``."""
        return self.lds([self.all - frozenset(map(tuple, kept))])[0]

    @property
    def ld_clean(self) -> float:
        return self.cache[frozenset()]


def faithfulness(ev: Evaluator, heads: Iterable[Head], n_boot: int = 1000, seed: int = 0) -> dict:
    """F(C), F(M), F(empty), F(C)/F(M) and the normalised faithfulness, with the ablation named;
    ``ci95``: a bootstrap over prompts of F(C)/F(M) (prompts resampled, both means recomputed)."""
    heads = set(map(tuple, heads))
    f_c, f_none = ev.lds([ev.all - heads, ev.all])
    f_m = ev.ld_clean
    c = ev.per_prompt[frozenset(ev.all - heads)].double().cpu().numpy()
    m = ev.base.ld_clean.double().cpu().numpy()
    idx = np.random.default_rng(seed).integers(0, len(m), size=(n_boot, len(m)))
    with np.errstate(divide="ignore", invalid="ignore"):
        boots = c[idx].mean(1) / m[idx].mean(1)
    return {
        "ablation": ev.abl.mode,
        "ablation_detail": ev.abl.describe(),
        "n_heads": len(heads),
        "n_pairs": len(m),
        "ld_clean": f_m,
        "ld_circuit": f_c,
        "ld_all_heads_ablated": f_none,
        "faithfulness": f_c / f_m if abs(f_m) > 1e-9 else float("nan"),
        "ci95": [float(np.nanpercentile(boots, 2.5)), float(np.nanpercentile(boots, 97.5))] if n_boot else None,
        "normalized_faithfulness": (f_c - f_none) / (f_m - f_none) if abs(f_m - f_none) > 1e-9 else float("nan"),
    }


def head_curve(
    ev: Evaluator, ranking: Sequence[Head], sizes: Sequence[int] | None = None, target: float | None = None
) -> tuple[pd.DataFrame, int | None]:
    """F(top-k heads)/F(M) on a grid of k (all sizes when the model is small); with ``target``,
    the smallest k reaching it (bisection between the grid points around the first crossing)."""
    n = len(ranking)
    if sizes is None:
        sizes = range(n + 1) if n <= 64 else sorted({0, n} | {int(round(x)) for x in np.geomspace(1, n, 30)})
    sizes = sorted(set(sizes))
    f = lambda ks: [ld / ev.ld_clean for ld in ev.lds([ev.all - set(ranking[:k]) for k in ks])]  # noqa: E731
    got = dict(zip(sizes, f(sizes)))
    chosen = None
    if target is not None:
        hit = next((i for i, k in enumerate(sizes) if got[k] >= target), None)
        if hit is not None:
            lo, hi = (sizes[hit - 1], sizes[hit]) if hit > 0 else (sizes[0], sizes[0])
            while hi - lo > 1:
                mid = (lo + hi) // 2
                got[mid] = f([mid])[0]
                lo, hi = (lo, mid) if got[mid] >= target else (mid, hi)
            chosen = hi
    curve = pd.DataFrame({"k": sorted(got), "faithfulness": [got[k] for k in sorted(got)]})
    curve["ld"] = curve.faithfulness * ev.ld_clean
    return curve, chosen


def prune_heads(ev: Evaluator, heads: Sequence[Head], target: float, max_passes: int = 3) -> list[Head]:
    """Try removing each head, lowest-ranked first; keep the removal when F(C)/F(M) stays at
    or above ``target``; repeat the pass while it removes something (at most ``max_passes``)."""
    kept = list(heads)
    for _ in range(max_passes):
        before = len(kept)
        for h in reversed(list(kept)):
            trial = [x for x in kept if x != h]
            if ev.F(trial) / ev.ld_clean >= target:
                kept = trial
        if len(kept) == before:
            break
    return kept


def completeness(
    ev: Evaluator, circuit: Sequence[Head], n_random: int = 20, greedy_steps: int = 10, seed: int = 0
) -> dict:
    """Incompleteness |F(C \\ K) - F(M \\ K)| for K = empty, random subsets and a greedy search."""
    C = [tuple(h) for h in circuit]
    outside = ev.all - set(C)
    rng = random.Random(seed)
    records = []

    def score(Ks: list[frozenset]) -> list[tuple[float, float]]:
        lds = ev.lds([outside | K for K in Ks] + list(Ks))
        return list(zip(lds[: len(Ks)], lds[len(Ks) :]))

    def add(kind: str, K: frozenset, fc: float, fm: float) -> None:
        records.append(
            {
                "kind": kind,
                "K": sorted(K),
                "size": len(K),
                "f_circuit_minus_k": fc,
                "f_model_minus_k": fm,
                "score": abs(fc - fm),
            }
        )

    ((fc, fm),) = score([frozenset()])
    add("empty", frozenset(), fc, fm)
    Ks = [frozenset(h for h in C if rng.random() < 0.5) for _ in range(n_random)]
    for K, (fc, fm) in zip(Ks, score(Ks)):
        add("random", K, fc, fm)
    K: frozenset = frozenset()
    for _ in range(min(greedy_steps, len(C))):
        cands = [K | {h} for h in C if h not in K]
        res = score(cands)
        best = max(range(len(cands)), key=lambda i: abs(res[i][0] - res[i][1]))
        K = cands[best]
        add("greedy", K, *res[best])
    f_m = ev.ld_clean
    by = lambda kind: [r["score"] for r in records if r["kind"] == kind]  # noqa: E731
    return {
        "records": records,
        "ld_clean": f_m,
        "max_score": max(r["score"] for r in records),
        "max_relative": max(r["score"] for r in records) / f_m,
        "random_mean_relative": float(np.mean(by("random"))) / f_m if by("random") else float("nan"),
        "greedy_max_relative": max(by("greedy")) / f_m if by("greedy") else float("nan"),
    }


def minimality(ev: Evaluator, circuit: Sequence[Head], n_random: int = 10, seed: int = 0) -> pd.DataFrame:
    """Per head v: |F(C \\ (K + v)) - F(C \\ K)| for K = empty (``score_alone``) and the best
    over random K in C \\ {v} (``score``, with that ``K``); ``relative`` = score / F(C)."""
    C = [tuple(h) for h in circuit]
    outside = ev.all - set(C)
    rng = random.Random(seed)
    Ks = [frozenset()] + [frozenset(h for h in C if rng.random() < 0.5) for _ in range(n_random)]
    sets = []
    for K in Ks:
        sets.append(outside | K)
        sets += [outside | K | {v} for v in C if v not in K]
    ev.lds(sets)
    f_c = ev.lds([outside])[0]
    rows = []
    for v in C:
        best, best_k, alone = -1.0, None, None
        for K in Ks:
            if v in K:
                continue
            base_ld, with_v = ev.lds([outside | K, outside | K | {v}])
            s = abs(with_v - base_ld)
            if not K:
                alone = s
            if s > best:
                best, best_k = s, K
        rows.append(
            {
                "layer": v[0],
                "head": v[1],
                "score_alone": alone,
                "score": best,
                "K": sorted(best_k),
                "relative": best / f_c if abs(f_c) > 1e-9 else float("nan"),
            }
        )
    frame = pd.DataFrame(
        rows, columns=["layer", "head", "score_alone", "score", "K", "relative"]
    )  # columns even when C is empty
    return frame.astype(
        {"layer": "int64", "head": "int64", "score_alone": "float64", "score": "float64", "relative": "float64"}
    )
