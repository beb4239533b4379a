"""AttentionInfluence (probes/influence.py) and its mask, HeadFlattening (workbench.engine.interventions).

The reference is a plain eager transformers model run one unpadded prompt at a time, whose
attention function is replaced by a few lines from the definition: the chosen heads' weights set
to 1 / (number of keys up to the query), every other head as the model computes it; the loss is
the mean cross-entropy of the prompt's tokens 1 .. n-1, computed directly from the logits. The
probe runs on padded batches of prompts of unequal lengths. Mutations of the mask (uniform over
every key of the padded batch, future and padding included; the wrong heads) must fail the check.
"""

from __future__ import annotations

import math

import pandas as pd
import pytest
import torch
from transformers.models.llama import modeling_llama

from probes.influence import AttentionInfluenceProbe, head_scores, top_heads
from tests.test_metrics import random_prompts
from workbench.engine import edits
from workbench.engine.call import AttentionCall
from workbench.engine.edits import Rows, ZEdit, sites_of
from workbench.engine.interventions import HeadAblation, HeadFlattening, head_ablation
from workbench.errors import WorkbenchError
from workbench.protocol.run_context import RunContext
from workbench.testing import eager_model

LENGTHS = [11, 4, 17, 8, 2]
HEADS = [(0, 1), (1, 3), (2, 0)]  # tiny-llama: 3 layers x 4 query heads, 2 KV heads


def flat_attention(chosen: dict[int, list[int]]):
    """Eager attention of one unpadded prompt with ``chosen`` heads' weights uniform over the causal prefix."""

    def attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kw):
        k = key.repeat_interleave(module.num_key_value_groups, dim=1)
        v = value.repeat_interleave(module.num_key_value_groups, dim=1)
        scores = (query @ k.transpose(2, 3)) * scaling
        n_q, n_k = scores.shape[-2:]
        visible = torch.ones(n_q, n_k, dtype=torch.bool).tril(n_k - n_q)
        p = torch.softmax(scores.masked_fill(~visible, float("-inf")).float(), dim=-1)
        for h in chosen.get(module.layer_idx, []):
            for q in range(n_q):
                p[:, h, q] = 0.0
                p[:, h, q, : q + 1 + n_k - n_q] = 1.0 / (q + 1 + n_k - n_q)
        return (p @ v.float()).transpose(1, 2).contiguous().to(query.dtype), p

    return attention


_MODELS: dict = {}
_REFERENCE: dict = {}


def reference_influence(source, prompts, heads) -> dict[str, tuple[float, float, float]]:
    """Per prompt id: (AI, base loss, masked loss), one unpadded prompt at a time (computed once
    per prompts and heads: the mutation tests compare against the same reference)."""
    key = (str(source), tuple(tuple(p.ids) for p in prompts), tuple(heads))
    if key not in _REFERENCE:
        _REFERENCE[key] = _reference_influence(source, prompts, heads)
    return _REFERENCE[key]


def _reference_influence(source, prompts, heads) -> dict[str, tuple[float, float, float]]:
    ref = _MODELS.setdefault(str(source), eager_model(source) if str(source) not in _MODELS else None)
    chosen: dict[int, list[int]] = {}
    for layer, head in heads:
        chosen.setdefault(layer, []).append(head)

    def loss(ids):
        with torch.no_grad():
            logits = ref(torch.tensor([ids])).logits[0].double()
        return float(torch.nn.functional.cross_entropy(logits[:-1], torch.tensor(ids[1:])))

    out = {}
    original = modeling_llama.eager_attention_forward
    for p in prompts:
        base = loss(p.ids)
        modeling_llama.eager_attention_forward = flat_attention(chosen)
        try:
            masked = loss(p.ids)
        finally:
            modeling_llama.eager_attention_forward = original
        out[p.id] = ((masked - base) / base, base, masked)
    return out


def probe_values(table: pd.DataFrame) -> dict[str, tuple[float, float, float]]:
    by = {m: dict(zip(g["item"], g["value"])) for m, g in table.groupby("metric")}
    return {i: (by["attention_influence"][i], by["loss_base"][i], by["loss_masked"][i]) for i in by["loss_base"]}


def check(model, prompts, got, heads):
    want = reference_influence(model.source, prompts, heads)
    assert set(got) == set(want)
    for i, (a, b, m) in want.items():
        assert got[i] == pytest.approx((a, b, m), abs=2e-5), i


@pytest.fixture(scope="module")
def model(tiny_models):
    return tiny_models["llama"]


@pytest.fixture(scope="module")
def prompts(model):
    return random_prompts(model.vocab_size, LENGTHS, seed=7)


def run(model, prompts, **params):
    probe = AttentionInfluenceProbe(**params)
    return probe, probe.run(model, prompts, RunContext(batch_size=3))


def test_influence_equals_the_mask_made_by_hand_on_padded_batches(model, prompts, monkeypatch):
    monkeypatch.setattr(edits, "BLOCK_ROWS", 5)  # several blocks of query rows per prompt
    probe, result = run(model, prompts, heads="0.1,1.3,2.0")
    got = probe_values(result.table)
    check(model, prompts, got, HEADS)
    assert max(abs(a) for a, _, _ in got.values()) > 1e-3, "the mask must change the loss"
    items = result.table
    assert (items["layer"] == -1).all() and (items["head"] == -1).all()
    assert dict(zip(items[items.metric == "loss_base"]["item"], items[items.metric == "loss_base"]["n"])) == {
        p.id: len(p) - 1 for p in prompts
    }
    ai = sorted(((a, i) for i, (a, _, _) in got.items()), reverse=True)
    s = result.summary
    assert s["mean"] == pytest.approx(sum(a for a, _ in ai) / len(ai))
    assert s["top_documents"] == [ai[0][1]]  # ceil(0.2 x 5) = 1
    assert s["heads"] == "0.1,1.3,2.0"


class AllKeys(ZEdit):
    """Mutation: 'uniform over the sequence' read literally on the padded batch: z = the mean value
    over every key, future keys and padding included."""

    def __init__(self, heads):
        self.where = sites_of(heads)

    def sites(self):
        return self.where

    def edit(self, call: AttentionCall, z):
        group = call.query.shape[1] // call.key.shape[1]
        mean = call.value.float().mean(2).repeat_interleave(group, dim=1)  # [batch, head, d]
        z = z.clone()
        for h in self.where.get(call.layer, ()):
            z[:, :, h] = mean[:, h, None].to(z.dtype)
        return z


class WrongHeads(HeadFlattening):
    """Mutation: each chosen head's neighbour flattened instead."""

    def __init__(self, heads):
        super().__init__([(layer, (head + 1) % 4) for layer, head in heads])


@pytest.mark.parametrize("mutant", [AllKeys, WrongHeads])
def test_mutations_of_the_mask_fail_the_check(model, prompts, monkeypatch, mutant):
    import probes.influence

    monkeypatch.setattr(probes.influence, "HeadFlattening", mutant)
    _, result = run(model, prompts, heads="0.1,1.3,2.0")
    with pytest.raises(AssertionError):
        check(model, prompts, probe_values(result.table), HEADS)


def test_the_edit_is_uniform_over_visible_keys_only():
    visible = torch.tensor([[1, 0, 0, 0], [1, 1, 0, 0], [1, 1, 1, 0], [0, 0, 0, 0]], dtype=torch.bool)
    visible = visible[None, None].expand(2, 3, 4, 4).clone()
    visible[1, :, :, 0] = False  # a prompt whose first key is padding
    rows = Rows(
        torch.rand(2, 3, 4, 4), visible, torch.zeros(2, 4, dtype=torch.long), torch.zeros(2, 4, dtype=torch.long), 0, 4
    )
    got = HeadFlattening([(0, 0)]).edit(None, rows)
    for b in range(2):
        for q in range(4):
            n = int(visible[b, 0, q].sum())
            want = visible[b, 0, q].float() / n if n else torch.zeros(4)
            torch.testing.assert_close(got[b, :, q], want.expand(3, 4))


def test_heads_ranked_from_a_scores_file(model, tmp_path):
    rows = []
    for name, shift in ((model.name, 0), ("other", 5)):
        for layer in range(3):
            for head in range(4):
                value = ((layer * 4 + head + shift) * 7) % 12 / 12  # distinct per head
                rows.append((name, "retrieval", layer, head, value, 5))
                rows.append((name, "retrieval", layer, head, 1.0 if (layer, head) == (2, 3) else value, 0))  # n = 0
                rows.append((name, "induction", layer, head, 1 - value, 5))
    rows.append((model.name, "retrieval", -1, -1, 99.0, 5))  # a summary row is not a head
    table = pd.DataFrame(rows, columns=["model", "metric", "layer", "head", "value", "n"])
    path = tmp_path / "scores.parquet"
    table.to_parquet(path)
    mine = table[(table.model == model.name) & (table.metric == "retrieval") & (table.n > 0) & (table.layer >= 0)]
    best = sorted(mine.itertuples(), key=lambda r: -r.value)
    want = [(int(r.layer), int(r.head)) for r in best[:3]]  # ceil(0.25 x 12)
    assert AttentionInfluenceProbe(scores=str(path), top=0.25).choose_heads(model) == want
    probe = AttentionInfluenceProbe(scores=str(path), metric="induction", top=0.1)
    assert len(probe.choose_heads(model)) == 2  # ceil(0.1 x 12)
    assert top_heads(head_scores(table, "retrieval", "other"), 0.25, 3, 4) != want


@pytest.mark.parametrize(
    "params, message",
    [
        ({}, "no heads to flatten"),
        ({"heads": "3.0"}, "out of range"),
        ({"heads": "0.9"}, "out of range"),
        ({"heads": "x"}, "bad head"),
        ({"heads": "0.1", "scores": "s.parquet"}, "both"),
        ({"scores": "nowhere.parquet"}, "no file"),
        ({"scores": "{path}", "metric": "nothing"}, "no per-head rows of metric 'nothing'"),
        ({"scores": "{path}", "scores_model": "a"}, "several models"),
        ({"scores": "{big}"}, "outside this model"),
    ],
)
def test_errors_name_the_fix(model, tmp_path, params, message):
    two = pd.DataFrame(
        [(m, "retrieval", 0, 0, 0.5, 1) for m in ("x", "y")], columns=["model", "metric", "layer", "head", "value", "n"]
    )
    two.to_parquet(tmp_path / "two.parquet")
    pd.DataFrame([("retrieval", 7, 0, 0.5, 1)], columns=["metric", "layer", "head", "value", "n"]).to_parquet(
        tmp_path / "big.parquet"
    )
    params = {k: v.format(path=tmp_path / "two.parquet", big=tmp_path / "big.parquet") for k, v in params.items()}
    with pytest.raises(WorkbenchError, match=message) as err:
        AttentionInfluenceProbe(**params).choose_heads(model)
    assert err.value.fix


def test_flat_is_an_ablation_by_name():
    assert isinstance(head_ablation([(0, 1)], "flat"), HeadFlattening)
    assert isinstance(head_ablation([(0, 1)], "first"), HeadAblation)
    assert head_ablation([(0, 1), (2, 3)], "flat").sites() == {0: frozenset({1}), 2: frozenset({3})}
    with pytest.raises(WorkbenchError, match="flat"):
        head_ablation([(0, 1)], "uniform")
    assert math.isnan(AttentionInfluenceProbe(heads="0.1").summarize([], [])[0]["mean"])


# --- the causal check's pieces: answer accuracy and the flat mode of retrieval_ablation --------------


def greedy_reference(source, ids, steps, heads=()):
    """Plain eager greedy decoding of one unpadded prompt, no cache (heads flattened by hand)."""
    ref = _MODELS.setdefault(str(source), eager_model(source) if str(source) not in _MODELS else None)
    chosen: dict[int, list[int]] = {}
    for layer, head in heads:
        chosen.setdefault(layer, []).append(head)
    original = modeling_llama.eager_attention_forward
    modeling_llama.eager_attention_forward = flat_attention(chosen)
    try:
        ids = list(ids)
        for _ in range(steps):
            with torch.no_grad():
                ids.append(int(ref(torch.tensor([ids])).logits[0, -1].argmax()))
    finally:
        modeling_llama.eager_attention_forward = original
    return ids[-steps:]


@pytest.mark.parametrize("heads", [(), HEADS])
def test_answer_accuracy_is_greedy_exact_match_on_padded_batches(model, prompts, monkeypatch, heads):
    """Gold answers = the reference's greedy tokens (the third one standing for the line end):
    every prompt is right; one wrong token or a token that does not end the line makes it wrong."""
    from workbench.experiments import retrieval_heads as rh

    usable = [p for p in prompts if len(p) >= 2]
    greedy = {p.id: greedy_reference(model.source, p.ids, 3, heads) for p in usable}
    ends = torch.zeros(model.vocab_size, dtype=torch.bool)
    ends[[g[-1] for g in greedy.values()]] = True
    monkeypatch.setitem(rh._LINE_ENDS, id(model.tokenizer), ends)
    tails = {p.id: greedy[p.id] for p in usable}
    monkeypatch.setattr(rh, "_answer_rows", lambda m, ps: [(list(p.ids) + tails[p.id], len(p)) for p in ps])
    assert rh.answer_accuracy(model, usable, heads, "flat", batch_size=3) == 1.0
    first = usable[0].id
    tails[first] = [tails[first][0], (tails[first][1] + 1) % model.vocab_size, tails[first][2]]
    assert rh.answer_accuracy(model, usable, heads, "flat", batch_size=3) == pytest.approx(1 - 1 / len(usable))
    alone = [p.id for p in usable[1:] if [g[-1] for g in greedy.values()].count(greedy[p.id][-1]) == 1]
    if alone:  # a prompt whose line-end token no other shares: no longer a line end, so it is wrong too
        ends[greedy[alone[0]][-1]] = False
        assert rh.answer_accuracy(model, usable, heads, "flat", batch_size=3) == pytest.approx(1 - 2 / len(usable))


def test_retrieval_ablation_with_given_scores_flat_mode_and_an_answer_task(model, prompts, monkeypatch):
    from tests.test_retrieval import copy_prompts
    from workbench.experiments import retrieval_heads as rh

    seen = []
    monkeypatch.setattr(rh, "answer_accuracy", lambda m, ps, hs, mode: seen.append((list(hs), mode)) or 0.5)
    scores = pd.DataFrame(
        [(layer, head, 0.9 if (layer, head) in HEADS else 0.0) for layer in range(3) for head in range(4)],
        columns=["layer", "head", "value"],
    )
    _, table = rh.retrieval_ablation(
        model,
        [],
        copy_prompts(model, [12, 9], seed=2),
        ks=[3],
        draws=2,
        mode="flat",
        max_new_tokens=2,
        log=lambda *_: None,
        scores=scores,
        tasks={"sums": prompts},
    )
    assert list(zip(table.condition, table.metric)) == [
        (c, m) for c in ("none", "top", "random", "random") for m in ("needle_accuracy", "sums_accuracy")
    ]
    top = table[table.condition == "top"].heads.iloc[0]
    assert sorted(top.split(",")) == ["0.1", "1.3", "2.0"]
    assert all(not set(h.split(",")) & set(top.split(",")) for h in table[table.condition == "random"].heads)
    assert [mode for _, mode in seen] == ["flat"] * 4 and sorted(seen[1][0]) == HEADS
    assert (table[table.metric == "sums_accuracy"].n == len(prompts)).all()
