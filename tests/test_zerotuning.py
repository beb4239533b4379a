"""ZeroTuning (probes/zerotuning.py) against a slow reference written from the definition.

The reference is a plain eager transformers tiny Llama run one unpadded prompt at a time, whose
attention function (monkeypatched, as tests/test_edits.py does) adds ln(gamma) to key 0's score
on the chosen heads; the choices are scored by hand from its last logits, and the profiling loop
(units, accuracies, gold log-probabilities, gains) is rewritten with plain loops. The workbench
runs padded batches of unequal lengths.
"""

from __future__ import annotations

import math
import random
from collections import Counter

import pytest
import torch
from transformers.models.llama import modeling_llama

from probes.zerotuning import (
    FirstKeyScaling,
    FirstKeyWeightScaling,
    ZeroTuningProbe,
    tune,
)
from tests.reference import eager_model
from tests.test_edits import workbench_logits
from workbench.datasets import make_dataset, sentiment
from workbench.engine import edits
from workbench.engine.scoring import read_choices
from workbench.errors import WorkbenchError
from workbench.inputs.prompts import TokenizedPrompt
from workbench.protocol.run_context import RunContext

CHOICES = ["with", "they"]  # single tokens of the tiny tokenizer whose order gamma = 4 flips (LENGTHS, seed 4)
LENGTHS = [9, 4, 15, 7, 12, 5, 10, 6]
GAMMA = 4.0


def labelled_prompts(vocab: int, lengths: list[int], seed: int) -> list[TokenizedPrompt]:
    rng = random.Random(seed)
    return [
        TokenizedPrompt(
            f"p{seed}-{i}",
            [rng.randrange(4, vocab) for _ in range(n)],
            {"choices": CHOICES, "label": rng.choice(CHOICES)},
        )
        for i, n in enumerate(lengths)
    ]


# --- the reference -------------------------------------------------------------------------------


def reference_attention(heads: list[tuple[int, int]], gamma: float):
    """Eager attention of one unpadded prompt, ln(gamma) added to key 0's score on ``heads``."""

    def attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, softcap=None, **kw):
        k = key.repeat_interleave(module.num_key_value_groups, dim=1)
        v = value.repeat_interleave(module.num_key_value_groups, dim=1)
        scores = (query @ k.transpose(2, 3)) * scaling
        n_q, n_k = scores.shape[-2:]
        visible = torch.ones(n_q, n_k, dtype=torch.bool).tril(n_k - n_q)
        scores = scores.masked_fill(~visible, float("-inf"))
        for layer, head in heads:
            if layer == module.layer_idx:
                scores[:, head, :, 0] += math.log(gamma)
        p = torch.softmax(scores.float(), dim=-1)
        return (p @ v.float()).transpose(1, 2).contiguous().to(query.dtype), p

    return attention


def reference_last_logits(ref, prompts, heads, gamma):
    original = modeling_llama.eager_attention_forward
    modeling_llama.eager_attention_forward = reference_attention(heads, gamma)
    try:
        with torch.no_grad():
            return [ref(torch.tensor([p.ids])).logits[0, -1].double() for p in prompts]
    finally:
        modeling_llama.eager_attention_forward = original


def reference_outcome(ref, prompts, token_ids, heads, gamma):
    """(accuracy, [gold log-probability over the choices]) with ``heads`` scaled by ``gamma``."""
    right, gold_lp = 0, []
    for p, logits in zip(prompts, reference_last_logits(ref, prompts, heads, gamma)):
        lp = torch.log_softmax(logits, -1)[token_ids]
        lp = lp - torch.logsumexp(lp, -1)
        gold = CHOICES.index(p.meta["label"])
        right += int(int(lp.argmax()) == gold)
        gold_lp.append(float(lp[gold]))
    return right / len(prompts), gold_lp


def reference_units(mode, n_layers, n_heads):
    """Each unit's label (as the probe's summary names it) and heads."""
    if mode == "index":
        return {f"head {h}": [(layer, h) for layer in range(n_layers)] for h in range(n_heads)}
    if mode == "layer":
        return {f"layer {layer}": [(layer, h) for h in range(n_heads)] for layer in range(n_layers)}
    return {f"{layer}.{h}": [(layer, h)] for layer in range(n_layers) for h in range(n_heads)}


def reference_profile(model, prompts, mode, gamma):
    """Per (layer, head): accuracy gain and mean gold log-probability gain of its unit."""
    ref = eager_model(model.source)
    token_ids = [model.tokenizer(c, add_special_tokens=False)["input_ids"][0] for c in CHOICES]
    base_acc, base_lp = reference_outcome(ref, prompts, token_ids, [], 1.0)
    acc_gain, lp_gain, unit_acc = {}, {}, {}
    for label, heads in reference_units(mode, model.n_layers, model.n_heads).items():
        acc, lp = reference_outcome(ref, prompts, token_ids, heads, gamma)
        unit_acc[label] = acc
        for cell in heads:
            acc_gain[cell] = acc - base_acc
            lp_gain[cell] = sum(a - b for a, b in zip(lp, base_lp)) / len(prompts)
    return base_acc, acc_gain, lp_gain, unit_acc


def cells(table, metric):
    return {(int(r.layer), int(r.head)): float(r.value) for r in table[table.metric == metric].itertuples()}


# --- the operator ---------------------------------------------------------------------------------


@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_the_operator_equals_ln_gamma_on_the_first_key_by_hand(tiny_models, padding_side, monkeypatch):
    """SCORES form, WEIGHTS form (the paper's gamma a_0 / D) and the hand-made reference agree on
    padded batches; left padding puts pad tokens at key 0, so scaling key index 0 instead of
    each prompt's first real token would fail here."""
    model = tiny_models["llama"]
    monkeypatch.setattr(edits, "BLOCK_ROWS", 5)
    prompts = labelled_prompts(model.vocab_size, LENGTHS, seed=1)
    heads = [(0, 1), (1, 3), (2, 0), (2, 2)]
    ids = [p.ids for p in prompts]
    by_scores = workbench_logits(model, ids, FirstKeyScaling(heads, GAMMA), padding_side=padding_side)
    by_weights = workbench_logits(model, ids, FirstKeyWeightScaling(heads, GAMMA), padding_side=padding_side)
    clean = workbench_logits(model, ids, padding_side=padding_side)
    ref = eager_model(model.source)
    want = reference_last_logits(ref, prompts, heads, GAMMA)
    for got_s, got_w, plain, w in zip(by_scores, by_weights, clean, want):
        torch.testing.assert_close(got_s[-1].double(), w, atol=1e-4, rtol=0)
        torch.testing.assert_close(got_w[-1].double(), w, atol=1e-4, rtol=0)
    assert max(float((a[-1] - b[-1]).abs().max()) for a, b in zip(by_scores, clean)) > 1e-3
    # the wrong heads (a neighbour) give other logits: the test can tell heads apart
    other = workbench_logits(
        model, ids, FirstKeyScaling([(0, 0), (1, 3), (2, 0), (2, 2)], GAMMA), padding_side=padding_side
    )
    assert max(float((a[-1] - b[-1]).abs().max()) for a, b in zip(by_scores, other)) > 1e-4


def test_gamma_must_be_positive():
    for bad in (0.0, -1.0, math.nan, math.inf):
        with pytest.raises(WorkbenchError):
            FirstKeyScaling([(0, 0)], bad)


# --- the profiling loop ---------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["index", "head", "layer"])
def test_profiling_equals_the_reference_loop(tiny_models, mode):
    model = tiny_models["llama"]
    prompts = labelled_prompts(model.vocab_size, LENGTHS, seed=4)
    result = ZeroTuningProbe(mode=mode, gamma=GAMMA).run(model, prompts, RunContext(batch_size=4))
    base, acc_gain, lp_gain, unit_acc = reference_profile(model, prompts, mode, GAMMA)
    got_acc, got_lp = cells(result.table, "zt_accuracy_gain"), cells(result.table, "zt_logprob_gain")
    assert set(got_acc) == set(acc_gain) == {(a, b) for a in range(model.n_layers) for b in range(model.n_heads)}
    for cell in acc_gain:
        assert got_acc[cell] == pytest.approx(acc_gain[cell], abs=1e-9), cell
        assert got_lp[cell] == pytest.approx(lp_gain[cell], abs=2e-5), cell
    assert result.summary["baseline_accuracy"] == pytest.approx(base)
    assert set(result.table.n) == {len(prompts)}
    # the scaling moved something, so the comparison could fail
    assert max(abs(v) for v in lp_gain.values()) > 1e-3
    assert any(v != 0 for v in acc_gain.values()), "pick prompts/gamma where some unit flips a prediction"
    assert result.summary["unit_accuracy"] == pytest.approx(unit_acc)  # each unit scales the heads its label names
    assert result.summary["up_effective"] == [u for u, a in unit_acc.items() if a > base]  # gamma > 1
    assert result.summary["down_effective"] == [u for u, a in unit_acc.items() if a < base]


def test_labels_must_be_there_and_distinct(tiny_models):
    model = tiny_models["llama"]
    bad = [TokenizedPrompt("x", [5, 6, 7], {"choices": CHOICES})]
    with pytest.raises(WorkbenchError, match="choices/label"):
        read_choices(model.tokenizer, bad, "zerotuning")
    same = [TokenizedPrompt("x", [5, 6, 7], {"choices": [" b", " x"], "label": " b"})]  # both [UNK]
    with pytest.raises(WorkbenchError, match="distinct"):
        read_choices(model.tokenizer, same, "zerotuning")


def test_tuning_picks_gamma_on_validation_and_reports_on_test(tiny_models):
    model = tiny_models["llama"]
    val = labelled_prompts(model.vocab_size, LENGTHS, seed=4)
    test = labelled_prompts(model.vocab_size, [6, 11, 8, 3], seed=9)
    grid = (0.5, 2.0, 4.0)
    out = tune(model, val, test, RunContext(batch_size=4), mode="index", gamma=GAMMA, grid=grid)
    ref = eager_model(model.source)
    token_ids = [model.tokenizer(c, add_special_tokens=False)["input_ids"][0] for c in CHOICES]
    assert out.kind in ("up", "down") and out.heads
    want_val = {g: reference_outcome(ref, val, token_ids, out.heads, g)[0] for g in (1.0, *grid)}
    assert out.val_accuracy == pytest.approx(want_val)
    best = max(want_val.values())
    assert out.val_accuracy[out.gamma] == best
    assert out.test_baseline == pytest.approx(reference_outcome(ref, test, token_ids, [], 1.0)[0])
    assert out.test_tuned == pytest.approx(reference_outcome(ref, test, token_ids, out.heads, out.gamma)[0])
    assert (out.n_val, out.n_test) == (len(val), len(test))
    with pytest.raises(WorkbenchError, match="disjoint"):
        tune(model, val, val[:2], RunContext(batch_size=4), grid=grid)


# --- the dataset ----------------------------------------------------------------------------------


def _polarity(clause: str) -> bool:
    word = clause.rstrip(".").split()[-1]
    positive = word in sentiment.POSITIVE
    assert positive or word in sentiment.NEGATIVE, clause
    return positive != (" not " in f" {clause} ")


def test_sentiment_labels_are_the_majority_polarity_and_balanced():
    prompts = make_dataset("sentiment", 40, seed=3, n_shots=3, negation=0.5)
    assert prompts == make_dataset("sentiment", 40, seed=3, n_shots=3, negation=0.5)
    assert prompts != make_dataset("sentiment", 40, seed=4, n_shots=3, negation=0.5)
    assert Counter(p.meta["label"] for p in prompts) == {" negative": 20, " positive": 20}
    negated = 0
    for p in prompts:
        assert p.meta["choices"] == [" negative", " positive"]
        blocks = p.text.split("\n\n")
        assert len(blocks) == 4 and p.text.endswith("\nSentiment:")
        for block in blocks:
            review = block.split("\n")[0].removeprefix("Review: ").lower()
            clauses = [c.strip() for part in review.split(", ") for c in part.split(" and ")]
            votes = [_polarity(c) for c in clauses]
            negated += sum(" not " in c for c in clauses)
            label = block.split("Sentiment:")[1] or p.meta["label"]
            assert (label == " positive") == (sum(votes) * 2 > len(votes)), block
    assert negated > 0
