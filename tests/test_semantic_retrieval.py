"""Semantic retrieval score (CompressKV): batched decoding against the authors' one-prompt loop."""

from __future__ import annotations

from functools import partial

import pytest
import torch

from probes.retrieval import generate_and_score
from probes.semantic_retrieval import SemanticRetrievalProbe, SpanMassScorer
from tests.reference import eager_model
from tests.test_retrieval import copy_prompts, stop_ids
from workbench.engine.decoding import _cache_kwarg
from workbench.inputs.prompts import TokenizedPrompt
from workbench.protocol.run_context import RunContext
from workbench.runner import run_probes


def semantic_reference(model, ids, span, stops, max_new_tokens):
    """CompressKV's loop, one prompt, no padding, plain eager attention: prefill all but the last
    token, feed tokens one at a time with output_attentions; when the emitted token is in the
    span, every head adds its attention mass on the span, once per span position holding it
    ("occurrences", the authors' loop) or once ("once"). Returns ({count: scores[layer, head]},
    output ids)."""
    from transformers import DynamicCache

    s, e = span
    cfg = model.config
    scores = {c: torch.zeros(cfg.num_hidden_layers, cfg.num_attention_heads, dtype=torch.float64) for c in COUNTS}
    KV = _cache_kwarg(model)
    with torch.no_grad():
        out = model(input_ids=torch.tensor([ids[:-1]]), **{KV: DynamicCache()}, use_cache=True)
        cache, inp, output = out[KV], torch.tensor(ids[-1]), []
        for _ in range(max_new_tokens):
            out = model(input_ids=inp.view(1, 1), **{KV: cache}, use_cache=True, output_attentions=True)
            cache, inp = out[KV], out.logits[0, -1].argmax()
            output.append(int(inp))
            hits = 0
            for i in range(s, e):
                if ids[i] == int(inp):
                    hits += 1
                    for layer, att in enumerate(out.attentions):
                        scores["occurrences"][layer] += att[0, :, -1, s:e].double().sum(-1)
                        if hits == 1:
                            scores["once"][layer] += att[0, :, -1, s:e].double().sum(-1)
            if int(inp) in stops:
                break
    return scores, output


COUNTS = ("occurrences", "once")
_REFERENCES: dict = {}  # the reference decodes, shared by the checks of both counting rules
_EAGER: dict = {}  # plain eager models by folder


def check_against_reference(model, prompts, res, max_new_tokens, count, span_key="answer_span", stops=None):
    stops = stop_ids(model.tokenizer) if stops is None else stops
    totals = []
    for p, r in zip(prompts, res):
        key = (str(model.source), tuple(p.ids), tuple(p.meta[span_key]), frozenset(stops), max_new_tokens)
        if key not in _REFERENCES:
            if model.source not in _EAGER:
                _EAGER[model.source] = eager_model(model.source)
            _REFERENCES[key] = semantic_reference(_EAGER[model.source], p.ids, p.meta[span_key], stops, max_new_tokens)
        refs, out = _REFERENCES[key]
        ref = refs[count]
        assert r.n_steps == len(out)
        assert r.response == model.tokenizer.decode(out, skip_special_tokens=True).strip()
        assert torch.allclose(r.scores, ref, atol=1e-5), (r.scores - ref).abs().max()
        totals.append(ref)
    return totals


def prompts_with_repeats(model, lengths, first_seed, tries=12):
    """Copy prompts on which the two counting rules differ in the reference loop (a random tiny
    model's greedy choices are near ties: which seed makes it emit repeated span tokens moved with
    the tests run before this one in the same process), so the test can tell the rules apart."""
    stops = stop_ids(model.tokenizer)
    for seed in range(first_seed, first_seed + tries):
        prompts = copy_prompts(model, lengths, seed=seed)
        if model.source not in _EAGER:
            _EAGER[model.source] = eager_model(model.source)
        refs = [semantic_reference(_EAGER[model.source], p.ids, p.meta["answer_span"], stops, 12)[0] for p in prompts]
        if sum(float(r["occurrences"].sum()) for r in refs) > sum(float(r["once"].sum()) for r in refs) + 1e-3:
            return prompts
    raise AssertionError(f"no seed in {first_seed}..{first_seed + tries - 1} makes the model repeat span tokens")


@pytest.mark.parametrize("prefill", ["batched", "separate"])
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_batched_scores_equal_the_authors_loop(tiny_models, arch, prefill):
    """Padded batches of unequal lengths (4 prompts, batches of 3), both counting rules."""
    model = tiny_models[arch]
    prompts = prompts_with_repeats(model, [25, 9, 17, 30], first_seed={"llama": 6, "gpt2": 1}[arch])
    by_count = {}
    for count in COUNTS:
        res = generate_and_score(
            model,
            prompts,
            max_new_tokens=12,
            require_correct=False,
            prefill=prefill,
            ctx=RunContext(batch_size=3),
            scorer=partial(SpanMassScorer, count=count),
        )
        by_count[count] = check_against_reference(model, prompts, res, 12, count)
    total = sum(float(t.sum()) for t in by_count["once"])
    assert total > 0, "the test prompts must emit span tokens"
    # the rules differ on these prompts (span tokens repeat), so the test can tell them apart
    assert sum(float(t.sum()) for t in by_count["occurrences"]) > total + 1e-3


def test_span_is_the_declared_one(tiny_models):
    """span=needle reads needle_span (a different window from answer_span: different scores)."""
    model = tiny_models["llama"]
    prompts = copy_prompts(model, [22, 14], seed=4)
    prompts = [TokenizedPrompt(p.id, p.ids, {**p.meta, "needle_span": [3, len(p) - 4]}) for p in prompts]
    probe = SemanticRetrievalProbe(max_new_tokens=8, require_correct=False, span="needle")
    table = run_probes(model, prompts, [probe], batch_size=2).table
    refs = check_against_reference(model, prompts, probe.outcomes, 8, "occurrences", "needle_span")
    expected = torch.stack(refs).mean(0)
    got = torch.tensor(table.sort_values(["layer", "head"]).value.to_numpy()).view_as(expected)
    assert torch.allclose(got, expected, atol=1e-5)
    assert (table.n == 2).all() and float(expected.sum()) > 0
    answer = SemanticRetrievalProbe(max_new_tokens=8, require_correct=False)
    other = run_probes(model, prompts, [answer], batch_size=2).table
    assert not torch.allclose(torch.tensor(other.sort_values(["layer", "head"]).value.to_numpy()), got.flatten())


def test_probe_counts_only_correct_prompts(tiny_models):
    model = tiny_models["llama"]
    prompts = copy_prompts(model, [20, 12], seed=2)
    table = run_probes(model, prompts, [SemanticRetrievalProbe(max_new_tokens=5)]).table
    assert (table.n == 0).all() and table.value.isna().all(), "answer 'x' is never produced: nothing counts"


def test_finished_rows_stop_scoring(tiny_models, monkeypatch):
    """A row that emitted a stop token keeps decoding in the batch but scores nothing more
    (the stop token itself is scored)."""
    import probes.retrieval

    model = tiny_models["llama"]
    prompts = copy_prompts(model, [25, 9, 17, 30], seed=6)
    ref_model = eager_model(model.source)
    # a prompt and a step to stop at, after which that prompt would still emit span tokens
    row, k, stop = next(
        (r, k, out[k])
        for r, p in enumerate(prompts)
        for out in [semantic_reference(ref_model, p.ids, p.meta["answer_span"], set(), 12)[1]]
        for k in range(1, 8)
        if out[k] not in out[:k] and any(t in p.ids[slice(*p.meta["answer_span"])] for t in out[k + 1 :])
    )
    monkeypatch.setattr(probes.retrieval, "newline_token_ids", lambda tok: {stop})
    scorer = partial(SpanMassScorer, count="occurrences")
    res = generate_and_score(
        model, prompts, max_new_tokens=12, require_correct=False, ctx=RunContext(batch_size=4), scorer=scorer
    )
    stops = {stop} | ({model.tokenizer.eos_token_id} - {None})
    check_against_reference(model, prompts, res, 12, "occurrences", stops=stops)
    assert res[row].n_steps == k + 1 and max(r.n_steps for r in res) > k + 1
