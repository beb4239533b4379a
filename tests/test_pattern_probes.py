"""induction / streaming probes against direct loops, on padded batches of unequal lengths."""

from __future__ import annotations

import random

import pytest

from tests.reference import eager_model, induction_reference, patterns, streaming_reference
from tests.test_metrics import TOL, lookup
from workbench import get_probe
from workbench.datasets import make_dataset
from workbench.errors import WorkbenchError
from workbench.inputs.prompts import TokenizedPrompt, tokenize_prompts
from workbench.runner import run_probes


def mixed_prompts(model, seed=0):
    """Repeated-random prompts of different periods (one with BOS) plus plain text with repeats."""
    rep = make_dataset("repeated-random", n_prompts=2, seed=seed, tokenizer=model.tokenizer, period=9)
    rep += make_dataset(
        "repeated-random", n_prompts=1, seed=seed + 1, tokenizer=model.tokenizer, period=6, repeats=3, prepend_bos=True
    )
    out = tokenize_prompts(rep, model.tokenizer, model.n_ctx, model.vocab_size)
    rng = random.Random(seed)
    out.append(TokenizedPrompt("text", [rng.randrange(4, 20) for _ in range(23)]))  # small alphabet: many echoes
    return out


def compare(table, metric, ref, n):
    got = lookup(table, metric)
    assert set(got) == set(ref)
    assert max(abs(got[k][0] - ref[k]) for k in ref) <= TOL, metric
    assert all(v[1] == n for v in got.values()), metric


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_induction_scores_match_reference(tiny_models, arch):
    model = tiny_models[arch]
    prompts = mixed_prompts(model)
    assert len({len(p) for p in prompts}) > 2
    table = run_probes(model, prompts, [get_probe("induction")], batch_size=4, progress=False).table
    pats = [patterns(eager_model(model.source), p.ids) for p in prompts]
    ref = induction_reference(pats, [p.ids for p in prompts], [p.meta for p in prompts])
    for metric, (values, n) in ref.items():
        compare(table, metric, values, n)
    # on two copies of random tokens, echo equals duplicate (no token repeats within a period)
    rep_only = [p for p in prompts if p.meta.get("period") == 9]
    t2 = run_probes(model, rep_only, [get_probe("induction")], batch_size=2, progress=False).table
    d, e = lookup(t2, "duplicate"), lookup(t2, "echo")
    assert all(abs(d[k][0] - e[k][0]) < 1e-6 for k in d)


@pytest.mark.parametrize("path", ["auto", "chunks"])
def test_what_probes_keep_per_batch_is_remade_for_the_next_batch(tiny_models, path):
    """Probes make the keys they name and the queries they score once per batch and reuse them
    in every layer (``per_queries``); batches of the same shape whose prompts differ (another
    period, another first token) must not inherit them: batch size 1, equal lengths."""
    from tests.reference import sink_reference

    model = tiny_models["llama"]
    tok = model.tokenizer
    rep = make_dataset("repeated-random", n_prompts=1, seed=3, tokenizer=tok, period=9)  # 18 tokens
    rep += make_dataset("repeated-random", n_prompts=1, seed=4, tokenizer=tok, period=6, repeats=3)  # 18 tokens
    prompts = tokenize_prompts(rep, tok, model.n_ctx, model.vocab_size)
    assert [len(p) for p in prompts] == [18, 18]
    probes = [get_probe("induction"), get_probe("streaming", sink=2, recent=3), get_probe("sink")]
    table = run_probes(model, prompts, probes, batch_size=1, progress=False, attention_path=path).table
    pats = [patterns(eager_model(model.source), p.ids) for p in prompts]
    for metric, (values, n) in induction_reference(pats, [p.ids for p in prompts], [p.meta for p in prompts]).items():
        compare(table, metric, values, n)
    compare(table, "streaming", *streaming_reference(pats, sink=2, recent=3))
    mass, _, n = sink_reference(pats)
    compare(table, "sink_mass", mass, n)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_streaming_matches_reference(tiny_models, arch):
    model = tiny_models[arch]
    rng = random.Random(2)
    prompts = [
        TokenizedPrompt(f"p{i}", [rng.randrange(4, model.vocab_size) for _ in range(n)])
        for i, n in enumerate([40, 13, 29, 8])
    ]
    table = run_probes(
        model, prompts, [get_probe("streaming", sink=2, recent=5)], batch_size=3, progress=False, chunk_elements=300
    ).table
    pats = [patterns(eager_model(model.source), p.ids) for p in prompts]
    values, n = streaming_reference(pats, sink=2, recent=5)
    compare(table, "streaming", values, n)


def test_repeated_random_excludes_special_tokens(tiny_models):
    tok = tiny_models["llama"].tokenizer
    prompts = make_dataset("repeated-random", n_prompts=5, seed=0, tokenizer=tok, period=30)
    special = set(tok.all_special_ids)
    for p in prompts:
        assert len(p.tokens) == 60 and p.tokens[:30] == p.tokens[30:] and not special & set(p.tokens)
    with pytest.raises(WorkbenchError):
        make_dataset("repeated-random", n_prompts=1, tokenizer=tok, period=1)


@pytest.mark.smollm2
def test_smollm2_has_induction_heads(smollm2):
    prompts = make_dataset("repeated-random", n_prompts=4, seed=0, tokenizer=smollm2.tokenizer, period=50)
    tok = tokenize_prompts(prompts, smollm2.tokenizer, smollm2.n_ctx, smollm2.vocab_size)
    table = run_probes(smollm2, tok, [get_probe("induction")], progress=False).table
    ind = table[table.metric == "induction"].value
    assert ind.max() > 0.5, "real models have induction heads"
