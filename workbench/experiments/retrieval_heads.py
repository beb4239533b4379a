"""The causal test of retrieval heads (Wu et al., section 4): mask them and needle retrieval
breaks; mask as many random heads and it does not.

1. Detect: retrieval scores on one set of niah prompts (``seed``).
2. Evaluate on a *different* set (``seed + 1000``: other haystacks and answers) the needle
   accuracy, the share of prompts whose response has ROUGE-1 recall > 0.5 of the answer, with
   (a) nothing ablated, (b) the top-k heads by retrieval score ablated, (c) k heads drawn at
   random from the non-retrieval heads (score <= ``threshold``, not in the top k), ``draws``
   times, for each k.

The result is a tidy table (``metric = needle_accuracy``, ``layer = head = -1``) with the
columns ``condition`` (none / top / random), ``k``, ``draw`` and ``heads`` (the ablated heads).
"""

from __future__ import annotations

import random
from typing import TYPE_CHECKING, Sequence

import pandas as pd

from workbench.engine.interventions import HeadAblation
from workbench.inputs.batching import BatchSize
from workbench.inputs.prompts import TokenizedPrompt
from workbench.protocol.registry import get_probe
from workbench.runner import run_probes

if TYPE_CHECKING:
    from workbench.models.loading import LoadedModel


def needle_accuracy(
    model: LoadedModel,
    prompts: Sequence[TokenizedPrompt],
    heads: Sequence[tuple[int, int]],
    mode: str = "zero",
    batch_size: BatchSize = "auto",
    max_new_tokens: int = 20,
) -> float:
    """Share of prompts answered (ROUGE-1 recall > 0.5) with ``heads`` ablated."""
    interventions = [HeadAblation(list(heads), mode)] if heads else []
    probe = get_probe("retrieval", max_new_tokens=max_new_tokens, require_correct=False)
    result = run_probes(model, prompts, [probe], batch_size=batch_size, interventions=interventions, progress=False)
    return float(result.results["retrieval"].summary["accuracy"])


def retrieval_ablation(
    model: LoadedModel,
    detect: Sequence[TokenizedPrompt],
    evaluate: Sequence[TokenizedPrompt],
    ks: Sequence[int] = (5, 10, 20),
    draws: int = 3,
    threshold: float = 0.1,
    mode: str = "zero",
    seed: int = 0,
    batch_size: BatchSize = "auto",
    max_new_tokens: int = 20,
    log=print,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Returns (retrieval scores per head, needle accuracy per condition)."""
    detection = run_probes(
        model, detect, [get_probe("retrieval", max_new_tokens=max_new_tokens)], batch_size=batch_size, progress=False
    )
    scores = detection.table
    ranked = scores.fillna({"value": -1.0}).sort_values("value", ascending=False)
    order = [(int(r.layer), int(r.head)) for r in ranked.itertuples()]
    value = {(int(r.layer), int(r.head)): float(r.value) for r in ranked.itertuples()}
    rng = random.Random(seed)
    rows = []

    def record(condition: str, k: int, draw: int, heads: list[tuple[int, int]]) -> None:
        acc = needle_accuracy(model, evaluate, heads, mode, batch_size, max_new_tokens)
        rows.append(
            {
                "condition": condition,
                "k": k,
                "draw": draw,
                "heads": ",".join(f"{layer}.{h}" for layer, h in heads),
                "value": acc,
                "n": len(evaluate),
            }
        )
        log(f"  {condition:6s} k={k:<3d} draw={draw}: needle accuracy {acc:.0%}")

    log(
        f"detection: {detection.results['retrieval'].summary['n_counted']}/{len(detect)} prompts answered; "
        f"{sum(v > threshold for v in value.values())} heads score above {threshold}"
    )
    record("none", 0, 0, [])
    for k in ks:
        top = order[:k]
        record("top", k, 0, top)
        pool = [hd for hd in order if value[hd] <= threshold and hd not in top]
        for d in range(draws):
            record("random", k, d, rng.sample(pool, min(k, len(pool))))
    table = pd.DataFrame(rows)
    table.insert(0, "metric", "needle_accuracy")
    table.insert(0, "probe", "retrieval-ablation")
    table["layer"] = -1
    table["head"] = -1
    return scores, table
