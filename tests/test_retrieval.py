"""Retrieval score: batched decoding against the paper's one-prompt loop, and the niah dataset."""

from __future__ import annotations

import random

import pytest
import torch

from probes.retrieval import RetrievalProbe, generate_and_score, newline_token_ids, rouge1_recall
from tests.reference import eager_model, retrieval_reference
from workbench.datasets import make_dataset
from workbench.errors import WorkbenchError
from workbench.inputs.prompts import TokenizedPrompt, tokenize_prompts
from workbench.protocol.run_context import RunContext
from workbench.runner import run_probes


def favourite_tokens(model, seed=0):
    """Tokens a random tiny model likes to emit (its greedy continuation of a random prompt)."""
    rng = random.Random(seed)
    ids = torch.tensor([[rng.randrange(4, model.vocab_size) for _ in range(8)]])
    out = model.hf_model.generate(ids, max_new_tokens=20, do_sample=False, attention_mask=torch.ones_like(ids))
    return sorted(set(out[0, 8:].tolist()))


def copy_prompts(model, lengths, seed=0):
    """Prompts made of the tokens the model tends to emit, with an 'answer' span covering most of
    the prompt, so a random model's greedy output is copied from the span often enough to give
    non-zero scores (a real retrieval test needs a real model: see the smollm2 test)."""
    rng = random.Random(seed)
    fav = favourite_tokens(model, seed)
    out = []
    for i, n in enumerate(lengths):
        ids = [rng.choice(fav) if rng.random() < 0.7 else rng.randrange(4, model.vocab_size) for _ in range(n)]
        out.append(TokenizedPrompt(f"c{i}", ids, {"answer_span": [1, n - 1], "needle_span": [0, n], "answer": "x"}))
    return out


def stop_ids(tok):
    ids = newline_token_ids(tok)
    if tok.eos_token_id is not None:
        ids.add(tok.eos_token_id)
    return ids


@pytest.mark.parametrize("prefill", ["batched", "separate"])
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_batched_scores_equal_the_paper_loop(tiny_models, arch, prefill):
    model = tiny_models[arch]
    prompts = copy_prompts(model, [25, 9, 17, 30], seed=1)
    res = generate_and_score(
        model, prompts, max_new_tokens=12, require_correct=False, prefill=prefill, ctx=RunContext(batch_size=3)
    )
    ref_model = eager_model(model.source)
    total = 0.0
    for p, r in zip(prompts, res):
        ref, out = retrieval_reference(
            ref_model, model.tokenizer, p.ids, p.meta["answer_span"], stop_ids(model.tokenizer), 12
        )
        assert r.n_steps == len(out)
        assert r.response == model.tokenizer.decode(out, skip_special_tokens=True).strip()
        assert torch.allclose(r.scores, torch.tensor(ref, dtype=torch.float64), atol=1e-4)
        total += float(r.scores.sum())
    assert total > 0, "the test prompts must produce some copy hits"


def test_probe_counts_only_correct_prompts(tiny_models):
    model = tiny_models["llama"]
    prompts = copy_prompts(model, [20, 12], seed=2)
    table = run_probes(model, prompts, [RetrievalProbe(max_new_tokens=5)]).table
    assert (table.n == 0).all() and table.value.isna().all(), "answer 'x' is never produced: nothing counts"
    table = run_probes(model, prompts, [RetrievalProbe(max_new_tokens=5, require_correct=False)]).table
    assert (table.n == 2).all()


def test_rouge_criterion():
    assert rouge1_recall("amber falcon 4821", "The passphrase is amber falcon 4821.") == 1.0
    assert rouge1_recall("amber falcon 4821", "walnut") == 0.0


def test_bad_retrieval_input(tiny_models):
    model = tiny_models["llama"]
    with pytest.raises(WorkbenchError, match="needs niah prompts"):
        generate_and_score(model, [TokenizedPrompt("p", [5, 6, 7])])
    with pytest.raises(WorkbenchError, match=r"niah.depths\[0\]: must be <= 1, got 1.5"):
        make_dataset("niah", tokenizer=model.tokenizer, context_len=200, depths=[1.5])
    with pytest.raises(WorkbenchError, match="too short"):
        make_dataset("niah", tokenizer=model.tokenizer, context_len=10)
    with pytest.raises(WorkbenchError, match="exceeds the model's context"):
        make_dataset("niah", tokenizer=model.tokenizer, context_len=400, n_ctx=256)


def test_niah_spans_point_at_the_answer(tiny_models):
    tok = tiny_models["llama"].tokenizer
    prompts = make_dataset("niah", tokenizer=tok, context_len=200, depths=[0, 0.5, 1])
    assert len(prompts) == 3
    for p in prompts:
        assert len(p.tokens) == 200
        s, e = p.meta["answer_span"]
        assert tok.decode(p.tokens[s:e]).replace(" ", "") == p.meta["answer"].replace(" ", "") or "[UNK]" in tok.decode(
            p.tokens[s:e]
        )
    assert (
        prompts[0].meta["needle_span"][0] == 0 and prompts[2].meta["needle_span"][0] > prompts[1].meta["needle_span"][0]
    )


@pytest.mark.smollm2
def test_smollm2_retrieval_matches_reference_and_retrieves(smollm2):
    prompts = make_dataset(
        "niah", n_prompts=3, tokenizer=smollm2.tokenizer, context_len=[300, 420], depths=[0.3, 0.7], seed=1
    )
    tok = tokenize_prompts(prompts, smollm2.tokenizer, smollm2.n_ctx, smollm2.vocab_size)
    res = generate_and_score(smollm2, tok, max_new_tokens=20, ctx=RunContext(batch_size=3))
    ref_model = eager_model(smollm2.source)
    for p, r in zip(tok, res):
        ref, out = retrieval_reference(
            ref_model, smollm2.tokenizer, p.ids, p.meta["answer_span"], stop_ids(smollm2.tokenizer), 20
        )
        assert r.n_steps == len(out)
        assert torch.allclose(r.scores, torch.tensor(ref, dtype=torch.float64), atol=1e-4)
    assert sum(r.counted for r in res) >= 2, [r.response for r in res]
    assert max(float(r.scores.max()) for r in res) > 0.5


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_prompts_sharing_a_prefix_reuse_its_cache_and_score_the_same(tiny_models, arch):
    """CPU prefill reuses the KV cache of a shared prefix (niah on one haystack); the scores and
    answers equal the paper loop's, prompt by prompt."""
    from workbench.engine import decoding

    model = tiny_models[arch]
    base = copy_prompts(model, [60, 52, 45], seed=3)
    prefix = base[0].ids[:40]
    prompts = [base[0]] + [
        TokenizedPrompt(p.id, prefix + p.ids[40:] if len(p.ids) > 40 else prefix + p.ids, p.meta) for p in base[1:]
    ]
    prompts = [TokenizedPrompt(p.id, p.ids, {**p.meta, "answer_span": [1, len(p.ids) - 1]}) for p in prompts]
    calls = []
    original = decoding._common_prefix
    decoding._common_prefix = lambda a, b, limit: calls.append(original(a, b, limit)) or calls[-1]
    try:
        res = generate_and_score(
            model, prompts, max_new_tokens=10, require_correct=False, prefill="separate", ctx=RunContext(batch_size=3)
        )
    finally:
        decoding._common_prefix = original
    assert max(calls) >= 40  # the prefix was shared
    ref_model = eager_model(model.source)
    for p, r in zip(prompts, res):
        ref, out = retrieval_reference(
            ref_model, model.tokenizer, p.ids, p.meta["answer_span"], stop_ids(model.tokenizer), 10
        )
        assert r.n_steps == len(out)
        assert torch.allclose(r.scores, torch.tensor(ref, dtype=torch.float64), atol=1e-4)


def test_niah_shared_haystack_prompts_share_the_prefix_before_the_needle(tiny_models, tmp_path, capsys):
    from workbench.cli import main
    from workbench.inputs.prompts import read_prompts

    out = tmp_path / "n.jsonl"
    assert (
        main(
            [
                "dataset",
                "niah",
                "--model",
                "tiny-llama",
                "--context-len",
                "120",
                "--depths",
                "0.2,0.9",
                "--shared-haystack",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    a, b = read_prompts(out)
    cut = a.meta["needle_span"][0]
    assert cut > 0 and a.tokens[:cut] == b.tokens[:cut]
    default = make_dataset(
        "niah", n_prompts=2, tokenizer=tiny_models["llama"].tokenizer, context_len=120, depths=[0.2, 0.9]
    )
    assert default[0].tokens[:cut] != default[1].tokens[:cut]  # default: a haystack per prompt


@pytest.mark.parametrize("prefill", ["batched", "separate"])
def test_long_prompts_prefill_in_pieces_and_score_the_same(tiny_models, prefill, monkeypatch):
    """Prompts longer than PREFILL_CHUNK are prefilled chunk by chunk through the cache: no
    attention call sees more than a chunk of queries (so no [T, T] mask), and the answers and
    scores are still the paper loop's."""
    from workbench.engine import decoding
    from workbench.engine.call import AttentionCall  # noqa: F401

    monkeypatch.setattr(decoding, "PREFILL_CHUNK", 7)
    model = tiny_models["llama"]
    prompts = copy_prompts(model, [25, 9, 17, 30], seed=1)
    widest = []

    class Widest:
        def on_attention(self, call):
            widest.append(call.query.shape[2])

    res = generate_and_score(
        model,
        prompts,
        max_new_tokens=8,
        require_correct=False,
        prefill=prefill,
        ctx=RunContext(batch_size=3, interventions=(Widest(),)),
    )
    assert max(widest) == 7
    ref_model = eager_model(model.source)
    for p, r in zip(prompts, res):
        ref, out = retrieval_reference(
            ref_model, model.tokenizer, p.ids, p.meta["answer_span"], stop_ids(model.tokenizer), 8
        )
        assert r.response == model.tokenizer.decode(out, skip_special_tokens=True).strip()
        assert torch.allclose(r.scores, torch.tensor(ref, dtype=torch.float64), atol=1e-4)
