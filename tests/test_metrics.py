"""Probe values against the slow reference, on padded batches of unequal lengths."""
from __future__ import annotations

import random

import pytest

from probes import get_probe
from tests.reference import eager_model, entropy_reference, patterns, sink_reference
from workbench.extraction import run_probes
from workbench.prompts import TokenizedPrompt

TOL = 1e-4


def random_prompts(vocab: int, lengths: list[int], seed: int = 0) -> list[TokenizedPrompt]:
    rng = random.Random(seed)
    return [TokenizedPrompt(f"p{i}", [rng.randrange(4, vocab) for _ in range(n)]) for i, n in enumerate(lengths)]


def lookup(table, metric):
    sub = table[table.metric == metric]
    return {(int(r.layer), int(r.head)): (float(r.value), int(r.n)) for r in sub.itertuples()}


def check_against_reference(model, prompts, batch_size, epsilon=0.3, **kw):
    table, _ = run_probes(model, prompts, [get_probe("entropy"), get_probe("sink", epsilon=epsilon)], batch_size=batch_size, progress=False, **kw)
    ref_model = eager_model(model.source)
    pats = [patterns(ref_model, p.ids) for p in prompts]
    ent, ent_norm, n_q = entropy_reference(pats)
    mass, rate, n_p = sink_reference(pats, epsilon)
    assert len(table) == 4 * model.n_layers * model.n_heads
    for metric, ref, n in (("entropy", ent, n_q), ("entropy_norm", ent_norm, n_q), ("sink_mass", mass, n_p), ("sink_rate", rate, n_p)):
        got = lookup(table, metric)
        assert set(got) == set(ref)
        worst = max(abs(got[k][0] - ref[k]) for k in ref)
        assert worst <= TOL, f"{metric}: max abs diff {worst}"
        assert all(got[k][1] == n for k in ref), metric
    return table


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("batch_size", [1, 3, "auto"])
def test_tiny_matches_reference(tiny_models, arch, batch_size):
    model = tiny_models[arch]
    prompts = random_prompts(model.vocab_size, [17, 5, 33, 1, 12, 2, 40])
    check_against_reference(model, prompts, batch_size)


def test_small_chunks_match(tiny_models):
    """Many query chunks per layer (a tiny memory budget) give the same numbers."""
    model = tiny_models["llama"]
    prompts = random_prompts(model.vocab_size, [30, 9, 21], seed=3)
    check_against_reference(model, prompts, 3, chunk_elements=64)


def test_sink_rate_threshold_is_used(tiny_models):
    model = tiny_models["llama"]
    prompts = random_prompts(model.vocab_size, [10, 20, 7], seed=5)
    for eps in (0.05, 0.5):
        check_against_reference(model, prompts, 2, epsilon=eps)


def test_prompt_values_do_not_depend_on_batch(tiny_models):
    """A prompt alone and a prompt padded inside a batch of longer ones give the same numbers."""
    model = tiny_models["llama"]
    target = random_prompts(model.vocab_size, [9], seed=11)
    others = random_prompts(model.vocab_size, [40, 25], seed=12)
    alone, _ = run_probes(model, target, [get_probe("entropy"), get_probe("sink")], batch_size=1, progress=False)
    # the others are run too, so isolate the target by running it with and without them
    both, _ = run_probes(model, target + others, [get_probe("entropy"), get_probe("sink")], batch_size=3, progress=False)
    only_others, _ = run_probes(model, others, [get_probe("entropy"), get_probe("sink")], batch_size=2, progress=False)
    for metric in ("sink_mass",):  # per-prompt mean: both = (target + 2 * others) / 3
        a, b, o = lookup(alone, metric), lookup(both, metric), lookup(only_others, metric)
        for k in a:
            assert abs(b[k][0] * 3 - o[k][0] * 2 - a[k][0]) <= 1e-5


@pytest.mark.smollm2
def test_smollm2_matches_reference(smollm2):
    from workbench.datasets import make_dataset
    from workbench.prompts import tokenize_prompts

    prompts = make_dataset("prose", n_prompts=3, seed=7, min_words=5, max_words=40)
    tok = tokenize_prompts(prompts, smollm2.tokenizer, smollm2.n_ctx, smollm2.vocab_size)
    assert len({len(p) for p in tok}) == 3, "want mixed lengths in one batch"
    check_against_reference(smollm2, tok, 3)
