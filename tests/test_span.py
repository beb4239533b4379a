"""Probe ``span`` (local / global heads, WAAD, FAI) against the definitions recomputed the slow way:
full eager attention patterns of one unpadded prompt at a time (``eager_patterns``), loops over
heads, rows and keys. The workbench runs padded batches of prompts of unequal lengths, several
chunks of query rows per layer."""

from __future__ import annotations

import math

import pytest
import torch

from probes.span import SpanProbe, head_groups
from tests.reference import eager_model, patterns
from tests.test_metrics import random_prompts
from workbench.inputs.prompts import TokenizedPrompt
from workbench.protocol.run_context import RunContext

LENGTHS = [23, 9, 31, 16]
_PATTERNS: dict = {}


def eager(model, prompts):
    key = (model.source, tuple(tuple(p.ids) for p in prompts))
    if key not in _PATTERNS:
        ref = eager_model(model.source)
        _PATTERNS[key] = [patterns(ref, p.ids) for p in prompts]
    return _PATTERNS[key]


def reference(model, prompts, start, local_share=0.3, global_share=0.3, W=10, lo=10, hi=50):
    """(span[(l, h)], local heads, global heads, waad[(item, t)], fai[(item, s)]) from the definitions."""
    pats = eager(model, prompts)
    starts = [p.meta.get("response_start", start) for p in prompts]
    L, H = len(pats[0]), pats[0][0].shape[0]
    span = {}
    for layer in range(L):
        for h in range(H):
            total, rows = 0.0, 0
            for A, r0 in zip(pats, starts):
                T = A[layer].shape[-1]
                for t in range(r0, T):
                    total += sum(float(A[layer][h, t, s]) * (t - s) for s in range(t + 1))
                    rows += 1
            span[(layer, h)] = total / rows
    order = sorted(span, key=lambda k: (span[k], k))
    n_loc, n_glob = round(local_share * len(order)), round(global_share * len(order))
    local, global_ = order[:n_loc], order[len(order) - n_glob :]
    waad, fai = {}, {}
    for p, A, r0 in zip(prompts, pats, starts):
        T = len(p.ids)
        for t in range(r0, T):
            waad[(p.id, t)] = sum(
                sum(float(A[layer][h, t, s]) * min(t - s, W) for s in range(t + 1)) for layer, h in local
            ) / len(local)
        for s in range(T):
            ts = [t for t in range(max(r0, s + lo), min(T - 1, s + hi) + 1)]
            if ts:
                fai[(p.id, s)] = sum(sum(float(A[layer][h, t, s]) for layer, h in global_) / len(global_) for t in ts)
                fai[(p.id, s)] /= len(ts)
    return span, sorted(local), sorted(global_), waad, fai


def run(model, prompts, batch_size, **params):
    ctx = RunContext(batch_size=batch_size, chunk_elements=4 * 4 * 31 * 5)  # several chunks per layer
    return SpanProbe(**params).run(model, prompts, ctx)


def check(result, want):
    span, local, global_, waad, fai = want
    t = result.table
    sub = t[t.metric == "span"]
    assert len(sub) == len(span)
    for r in sub.itertuples():
        assert r.value == pytest.approx(span[(r.layer, r.head)], abs=1e-4)
    assert result.summary["local_heads"] == [list(x) for x in local]
    assert result.summary["global_heads"] == [list(x) for x in global_]
    for metric, ref in (("waad", waad), ("fai", fai)):
        sub = t[t.metric == metric]
        assert (sub.layer == -1).all() and (sub["head"] == -1).all()
        got = {(r.item, int(r.step)): r.value for r in sub.itertuples()}
        assert set(got) == set(ref), metric
        for k, v in ref.items():
            assert got[k] == pytest.approx(v, abs=1e-5), (metric, k)
        assert len(set(round(v, 6) for v in ref.values())) > 3, "the reference must vary"


@pytest.mark.parametrize("batch_size", [1, 4])
def test_defaults_match_the_definitions(tiny_models, batch_size):
    model = tiny_models["llama"]
    prompts = random_prompts(model.vocab_size, LENGTHS, seed=3)
    check(run(model, prompts, batch_size), reference(model, prompts, 0))


def test_small_windows_and_a_response_start(tiny_models):
    model = tiny_models["llama"]
    prompts = random_prompts(model.vocab_size, LENGTHS, seed=5)
    params = dict(response_start=4, window=3, horizon_lo=2, horizon_hi=6, local_share=0.25, global_share=0.4)
    want = reference(model, prompts, 4, 0.25, 0.4, W=3, lo=2, hi=6)
    check(run(model, prompts, 4, **params), want)


def test_response_start_from_the_prompt_meta(tiny_models):
    model = tiny_models["llama"]
    base = random_prompts(model.vocab_size, LENGTHS, seed=5)
    prompts = [TokenizedPrompt(p.id, p.ids, {"response_start": r}) for p, r in zip(base, [12, 3, 20, 0])]
    want = reference(model, prompts, 0, W=3, lo=2, hi=6)
    got = run(model, prompts, 4, window=3, horizon_lo=2, horizon_hi=6)
    check(got, want)
    waad_items = got.table[got.table.metric == "waad"]
    assert int(waad_items[waad_items.item == "p0"].step.min()) == 12


def test_head_groups_split_by_span():
    span = torch.tensor([[3.0, 1.0, 2.0], [math.nan, 5.0, 4.0]])
    local, global_ = head_groups(span, 0.4, 0.2)  # 5 heads with a span: 2 local, 1 global
    assert local.nonzero().tolist() == [[0, 1], [0, 2]]
    assert global_.nonzero().tolist() == [[1, 1]]
