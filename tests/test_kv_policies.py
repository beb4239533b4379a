"""KV-cache policies: the masked form equals real eviction, on padded batches of unequal lengths.

The masked form (:class:`workbench.kv.masked.PolicyMask`, one forward over context and
continuation, a ``SCORES`` edit) and the evicted form (:mod:`workbench.kv.evicted`: prefill,
compress the store for real, run the continuation against what is left) share only the key
selection; their logits must agree to 1e-5 on every continuation token. Plus the selection
itself against a slow re-computation from the definitions, and the store's slots against the
budget accounting.
"""

from __future__ import annotations

import random

import pytest
import torch

from workbench.engine.attention import hooked_run
from workbench.engine.patterns import collate
from workbench.errors import WorkbenchError
from workbench.kv.evicted import continue_forward, prefill
from workbench.kv.masked import PolicyMask
from workbench.kv.policy import Budget, CachePolicy, Compensated, Full, Window, geometry
from workbench.kv.select import select_row


def _mixed_policy(model, scale: int = 1) -> CachePolicy:
    """Every kind of head policy, spread over the layers and KV heads."""
    g = geometry(model)
    kinds = [
        Window(sink=2 * scale, recent=5 * scale),
        Budget(capacity=6 * scale, window=3, kernel=3, pooling="max"),
        Compensated(sink=2 * scale, capacity=9 * scale),
        Full(),
        Budget(capacity=4 * scale, window=4, kernel=5, pooling="avg"),
        Window(sink=0, recent=7 * scale),
    ]
    heads = {}
    i = 0
    for layer in range(g.n_layers):
        for kv in range(g.n_kv_heads):
            heads[(layer, kv)] = kinds[i % len(kinds)]
            i += 1
    return CachePolicy(g, heads, name="mixed", compress_sliding=False)


def _prompts(vocab: int, lengths, conts, seed=0, bos=None):
    rng = random.Random(seed)
    ctx = [
        ([bos] if bos is not None else []) + [rng.randrange(4, vocab) for _ in range(n - (bos is not None))]
        for n in lengths
    ]
    cont = [[rng.randrange(4, vocab) for _ in range(m)] for m in conts]
    return ctx, cont


def masked_logits(model, policy, contexts, continuations, padding_side):
    """One forward over context + continuation with the policy as a SCORES edit."""
    ids = [c + t for c, t in zip(contexts, continuations)]
    batch = collate(ids, 0, model.device, padding_side=padding_side)
    mask = PolicyMask(policy, [len(c) for c in contexts])
    # left padding puts every continuation at the end: only those positions go through the LM head
    keep = max(len(t) for t in continuations) if padding_side == "left" else 0
    with hooked_run(model.hf_model, mask):
        logits = model.hf_model(
            input_ids=batch.input_ids,
            attention_mask=batch.attention_mask,
            position_ids=batch.positions.clamp_min(0),
            use_cache=False,
            logits_to_keep=keep,
        ).logits
    width = batch.input_ids.shape[1]
    out = []
    for r, (c, t) in enumerate(zip(contexts, continuations)):
        start = int(batch.first_index[r]) + len(c) - (width - logits.shape[1])
        out.append(logits[r, start : start + len(t)])
    return out


def evicted_logits(model, policy, contexts, continuations, window=8):
    store = prefill(model, contexts, window_queries=window).compress(policy)
    logits = continue_forward(model, store, continuations, [len(c) for c in contexts])
    return [logits[r, : len(t)] for r, t in enumerate(continuations)], store


def _check(model, policy, contexts, continuations, sides=("right", "left"), against_full=True):
    ref, store = evicted_logits(model, policy, contexts, continuations)
    for side in sides:
        got = masked_logits(model, policy, contexts, continuations, side)
        for a, b in zip(got, ref):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    if against_full:  # the policy changed the model's predictions: the comparison could have failed
        full, _ = evicted_logits(model, CachePolicy(policy.geometry), contexts, continuations)
        assert max(float((a - b).abs().max()) for a, b in zip(ref, full)) > 1e-3
    return store


@pytest.fixture(scope="module")
def tiny_llama(tiny_model_dir):
    import workbench

    return workbench.load_model(str(tiny_model_dir))


def test_masked_equals_evicted_gqa(tiny_llama):
    """Tiny Llama (4 query heads on 2 KV heads): every kind of head policy, a padded batch of
    unequal context and continuation lengths, right and left padding."""
    policy = _mixed_policy(tiny_llama)
    contexts, conts = _prompts(tiny_llama.vocab_size, [40, 57, 31], [6, 9, 4])
    _check(tiny_llama, policy, contexts, conts)


def test_masked_equals_evicted_sliding(tiny_gemma3):
    """Tiny Gemma-3 (layer 0 slides over 6 tokens): the sliding layer keeps its window, alone
    and when the policy compresses it too."""
    model = tiny_gemma3
    assert geometry(model).sliding == {0: 6}
    contexts, conts = _prompts(500, [30, 44, 23], [5, 8, 3], seed=1, bos=2)
    store = _check(model, _mixed_policy(model), contexts, conts)
    assert all(h.slots <= 6 for row in store.rows for h in row[0])  # the window's keys only
    g = geometry(model)
    squeezed = _mixed_policy(model)
    heads = {**squeezed.heads, (0, 0): Window(sink=0, recent=3), (0, 1): Window(sink=0, recent=4)}
    squeeze = CachePolicy(g, heads, compress_sliding=True)
    _check(model, squeeze, contexts, conts)
    short = prefill(model, contexts).compress(squeeze)
    assert [h.pos.tolist() for h in short.rows[0][0]] == [[27, 28, 29], [26, 27, 28, 29]]  # the shorter windows
    with pytest.raises(WorkbenchError, match="sliding window"):
        CachePolicy(g, squeezed.heads, compress_sliding=True)


def _slow_snap(keys, queries, scaling, w, kernel, pooling, cap):
    """SnapKV from the definition, one key at a time."""
    n_kv, c, _ = keys.shape
    h = queries.shape[0]
    g = h // n_kv
    keeps = []
    for kv in range(n_kv):
        score = [0.0] * (c - w)
        for head in range(kv * g, (kv + 1) * g):
            for i in range(w):
                p = c - w + i
                logits = [float(queries[head, -w + i] @ keys[kv, j]) * scaling for j in range(p + 1)]
                z = max(logits)
                e = [pow(2.718281828459045, x - z) for x in logits]
                for j in range(c - w):
                    score[j] += e[j] / sum(e) / (w * g)
        pooled = []
        for j in range(c - w):
            nb = [score[k] for k in range(j - kernel // 2, j + kernel // 2 + 1) if 0 <= k < c - w]
            pooled.append(max(nb) if pooled is not None and pooling == "max" else sum(nb) / kernel)
        best = sorted(range(c - w), key=lambda j: (-pooled[j], j))[:cap]
        keeps.append(sorted(best) + list(range(c - w, c)))
    return keeps


@pytest.mark.parametrize("pooling", ["max", "avg"])
def test_snapkv_selection_matches_definition(pooling):
    torch.manual_seed(3)
    keys = torch.randn(2, 30, 8)
    queries = torch.randn(4, 5, 8) * 2
    p = Budget(capacity=7, window=5, kernel=3, pooling=pooling)
    keep = select_row([p, p], keys, queries, 0.35)
    want = _slow_snap(keys, queries, 0.35, 5, 3, pooling, 7)
    for kv in range(2):
        assert keep.keep[kv].nonzero()[:, 0].tolist() == want[kv]
    assert keep.kept_tokens() == [12, 12]


def test_window_and_compensated_selection():
    keys = torch.randn(1, 20, 4)
    keep = select_row([Window(sink=3, recent=4)], keys, None, 1.0)
    assert keep.keep[0].nonzero()[:, 0].tolist() == [0, 1, 2, 16, 17, 18, 19]
    comp = select_row([Compensated(sink=4, capacity=8)], keys, None, 1.0)
    # 4 sinks + 1 compensation token + 3 recent = capacity 8; 13 merged
    assert comp.keep[0].nonzero()[:, 0].tolist() == [0, 1, 2, 3, 17, 18, 19]
    assert comp.merge[0].nonzero()[:, 0].tolist() == list(range(4, 17))
    assert comp.kept_tokens() == [8]
    short = select_row([Compensated(sink=4, capacity=30)], keys, None, 1.0)
    assert bool(short.keep.all()) and not bool(short.merge.any())


def test_budget_counts_what_the_store_holds(tiny_llama, tiny_gemma3):
    """kv_tokens / kv_bytes of the accounting equal the slots and bytes the evicted store really
    holds after compression (GQA model; Gemma-3 with its sliding layer as a fixed cost)."""
    import dataclasses

    from workbench.kv.budget import cost

    for model, bos in ((tiny_llama, None), (tiny_gemma3, 2)):
        policy = _mixed_policy(model)
        policy = dataclasses.replace(policy, geometry=dataclasses.replace(policy.geometry, dtype_bytes=4))
        contexts, _ = _prompts(500, [40, 57, 9], [1, 1, 1], seed=2, bos=bos)
        store = prefill(model, contexts, window_queries=8).compress(policy)
        for r, ctx in enumerate(contexts):
            c = cost(policy, len(ctx))
            assert c.kv_tokens == store.slots(r)
            assert c.kv_bytes == store.nbytes(r)
        full = cost(CachePolicy(policy.geometry), 57)
        assert full.kv_fraction == 1.0 and full.head_sparsity == 0.0
        assert cost(policy, 57).kv_fraction < 1.0 and cost(policy, 5).kv_fraction == 1.0


def _real_check(name, lengths, conts, bos):
    """On a float64 copy of a real model: the two forms are the same arithmetic, so they agree
    to 1e-5 once float32 rounding (which 30 layers grow to ~7e-5 on the logits) is out of the way."""
    import workbench

    model = workbench.load_model(name, device="cpu")
    model.hf_model.to(torch.float64)
    contexts, continuations = _prompts(model.vocab_size, lengths, conts, seed=5, bos=bos)
    store = _check(model, _mixed_policy(model, scale=8), contexts, continuations, ("left",), against_full=False)
    g = geometry(model)
    for r, ctx in enumerate(contexts):  # the evictions the tiny-model tests show change the logits happened
        small = [h.slots < len(ctx) for layer in g.global_layers for h in store.rows[r][layer]]
        assert sum(small) >= len(small) // 2
    return model, store


@pytest.mark.smollm2
def test_masked_equals_evicted_smollm2():
    """SmolLM2-135M (9 query heads on 3 KV heads per layer): every kind of head policy."""
    model, _ = _real_check("smollm2-135m", [150, 191, 127], [4, 6, 3], None)
    assert geometry(model).n_kv_heads == 3 and geometry(model).group == 3


@pytest.mark.gemma3
def test_masked_equals_evicted_gemma3():
    """Gemma-3-270M: contexts past the 512-token window, so the sliding layers evict as they go."""
    model, store = _real_check("gemma3-270m", [560, 530, 600], [4, 7, 3], 2)
    g = geometry(model)
    assert set(g.sliding.values()) == {512} and g.global_layers == [5, 11, 17]
    assert all(h.slots == 511 for h in store.rows[2][0])  # the window's keys only, after the continuation
