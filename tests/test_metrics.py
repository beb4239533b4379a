"""Probe values against the slow reference, on padded batches of unequal lengths."""

from __future__ import annotations

import random

import pytest

from tests.reference import eager_model, entropy_reference, patterns, sink_reference
from workbench import get_probe
from workbench.inputs.prompts import TokenizedPrompt
from workbench.runner import run_probes

TOL = 1e-4


def random_prompts(vocab: int, lengths: list[int], seed: int = 0) -> list[TokenizedPrompt]:
    rng = random.Random(seed)
    return [TokenizedPrompt(f"p{i}", [rng.randrange(4, vocab) for _ in range(n)]) for i, n in enumerate(lengths)]


def lookup(table, metric):
    sub = table[table.metric == metric]
    return {(int(r.layer), int(r.head)): (float(r.value), int(r.n)) for r in sub.itertuples()}


def check_against_reference(model, prompts, batch_size, epsilon=0.3, **kw):
    table = run_probes(
        model,
        prompts,
        [get_probe("entropy"), get_probe("sink", epsilon=epsilon)],
        batch_size=batch_size,
        progress=False,
        **kw,
    ).table
    ref_model = eager_model(model.source)
    pats = [patterns(ref_model, p.ids) for p in prompts]
    ent, ent_norm, n_q = entropy_reference(pats)
    mass, rate, n_p = sink_reference(pats, epsilon)
    assert len(table) == 4 * model.n_layers * model.n_heads
    for metric, ref, n in (
        ("entropy", ent, n_q),
        ("entropy_norm", ent_norm, n_q),
        ("sink_mass", mass, n_p),
        ("sink_rate", rate, n_p),
    ):
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
    alone = run_probes(model, target, [get_probe("entropy"), get_probe("sink")], batch_size=1, progress=False).table
    # the others are run too, so isolate the target by running it with and without them
    both = run_probes(
        model, target + others, [get_probe("entropy"), get_probe("sink")], batch_size=3, progress=False
    ).table
    only_others = run_probes(
        model, others, [get_probe("entropy"), get_probe("sink")], batch_size=2, progress=False
    ).table
    for metric in ("sink_mass",):  # per-prompt mean: both = (target + 2 * others) / 3
        a, b, o = lookup(alone, metric), lookup(both, metric), lookup(only_others, metric)
        for k in a:
            assert abs(b[k][0] * 3 - o[k][0] * 2 - a[k][0]) <= 1e-5


@pytest.mark.smollm2
def test_smollm2_matches_reference(smollm2):
    from workbench.datasets import make_dataset
    from workbench.inputs.prompts import tokenize_prompts

    prompts = make_dataset("prose", n_prompts=3, seed=7, min_words=5, max_words=40)
    tok = tokenize_prompts(prompts, smollm2.tokenizer, smollm2.n_ctx, smollm2.vocab_size)
    assert len({len(p) for p in tok}) == 3, "want mixed lengths in one batch"
    check_against_reference(smollm2, tok, 3)


def test_softcapped_attention_falls_back_to_eager_and_matches_hf(tmp_path):
    """Gemma 2 soft-caps attention logits, which SDPA cannot do: the hook computes those layers
    from :func:`workbench.engine.masking.attention_probs`; logits equal HF's eager forward, on a padded
    batch, and ``attention_probs`` of the last rows equals the last rows of the full pattern."""
    import torch
    from transformers import AutoModelForCausalLM

    from tests.tiny_gemma import gemma_config, save_tiny
    from workbench.engine.attention import hooked_run
    from workbench.engine.call import AttentionCall
    from workbench.engine.masking import attention_probs
    from workbench.models.loading import load_model

    save_tiny(tmp_path, gemma_config("gemma2"))
    ours = load_model(str(tmp_path), device="cpu")
    ref = AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="eager").eval()
    ids = torch.randint(4, 512, (2, 12))
    mask = torch.ones_like(ids)
    mask[1, :4] = 0  # left padding in the second row
    seen = []

    class Spy:
        def on_attention(self, call):
            seen.append(call.softcap)
            full = attention_probs(call)
            assert torch.allclose(attention_probs(call, 3), full[:, :, -3:], atol=1e-6)

    with torch.no_grad(), hooked_run(ours.hf_model, Spy()):
        got = ours.hf_model(input_ids=ids, attention_mask=mask).logits
    with torch.no_grad():
        want = ref(input_ids=ids, attention_mask=mask).logits
    assert seen == [5.0, 5.0]
    assert torch.allclose(got[0], want[0], atol=1e-4)
    assert torch.allclose(got[1, 4:], want[1, 4:], atol=1e-4)

    # no mask tensor: causal, queries aligned to the last keys
    q, k = torch.randn(1, 4, 5, 16), torch.randn(1, 2, 5, 16)
    call = AttentionCall(
        layer=0, module=None, query=q, key=k, value=k, mask=None, scaling=0.25, is_causal=True, softcap=5.0
    )
    s = 5.0 * torch.tanh((q @ k.repeat_interleave(2, 1).transpose(-1, -2)) * 0.25 / 5.0)
    s = s.masked_fill(torch.ones(5, 5, dtype=torch.bool).triu(1), float("-inf"))
    assert torch.allclose(attention_probs(call), torch.softmax(s, -1), atol=1e-6)
