"""Active-dormant heads (probes/dormant.py) against a slow reference written from the definition.

The reference is a plain eager transformers model run one unpadded prompt at a time, whose
attention function is replaced by a few lines (scores, softmax, output) in which the chosen head's
attention row is set by hand to all weight on key 0, the prompt's first token; losses are the
cross-entropy of its logits, computed directly. The workbench runs the probe on one padded batch
of prompts of unequal lengths. Mutations (the first *padded* slot instead of the first real token,
a neighbouring head, prompt-weighted losses, query 0 counted in the attention) must fail.
"""

from __future__ import annotations

import math
import textwrap

import pandas as pd
import pytest
import torch
from transformers.models.llama import modeling_llama

import probes.dormant as dormant
from probes.dormant import DLOSS, FIRST, DormantProbe, active_dormant
from tests.test_edits import workbench_logits
from workbench.datasets import DATASETS, OPTIONS, make_dataset
from workbench.engine.edits import WeightsEdit, ZEdit, sites_of
from workbench.engine.interventions import HeadAblation
from workbench.errors import WorkbenchError
from workbench.runner import run_probes
from workbench.testing import eager_model, eager_patterns, unequal_prompts

LENGTHS = [9, 17, 5, 12]  # unequal: one padded batch
HEADS = [(1, 2), (2, 1)]  # tiny llama: 3 layers x 4 query heads on 2 KV heads
REDIRECTED = sorted({(1, 0), (1, 1), (1, 2), (1, 3), *HEADS})  # the heads whose reference loss is computed


# --- the reference: the definition, one unpadded prompt at a time ----------------------------


def redirected_attention(layer: int, head: int):
    """Eager attention with (layer, head)'s row all on key 0, written from the definition."""

    def attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, softcap=None, **kw):
        k = key.repeat_interleave(module.num_key_value_groups, dim=1)
        v = value.repeat_interleave(module.num_key_value_groups, dim=1)
        scores = (query @ k.transpose(2, 3)) * (scaling if scaling is not None else module.head_dim**-0.5)
        n_q, n_k = scores.shape[-2:]
        causal = torch.ones(n_q, n_k, dtype=torch.bool).tril(n_k - n_q)
        p = torch.softmax(scores.float().masked_fill(~causal, float("-inf")), dim=-1)
        if module.layer_idx == layer:
            p[:, head] = 0.0
            p[:, head, :, 0] = 1.0  # every query of this head on the prompt's first token
        return (p @ v.float()).transpose(1, 2).contiguous().to(query.dtype), p

    return attention


def reference_logits(ref, ids_list, head: tuple[int, int] | None):
    original = modeling_llama.eager_attention_forward
    if head is not None:
        modeling_llama.eager_attention_forward = redirected_attention(*head)
    try:
        with torch.no_grad():
            return [ref(torch.tensor([ids])).logits[0].double() for ids in ids_list]
    finally:
        modeling_llama.eager_attention_forward = original


def reference_loss(ref, ids_list, head=None) -> float:
    """Token-weighted mean next-token cross-entropy over every prompt's positions 0 .. T-2."""
    total, n = 0.0, 0
    for ids, logits in zip(ids_list, reference_logits(ref, ids_list, head)):
        total += float(torch.nn.functional.cross_entropy(logits[:-1], torch.tensor(ids[1:]), reduction="sum"))
        n += len(ids) - 1
    return total / n


def reference_first_attention(patterns, layer: int, head: int) -> float:
    """Mean weight of queries 1 .. T-1 on key 0, token-weighted over prompts (``patterns``: per
    prompt, per layer, ``[head, query, key]``)."""
    total, n = 0.0, 0
    for pats in patterns:
        A = pats[layer][head]  # [query, key]
        total += float(A[1:, 0].sum())
        n += A.shape[0] - 1
    return total / n


@pytest.fixture(scope="module")
def setup(tiny_models):
    model = tiny_models["llama"]
    prompts = unequal_prompts(model.vocab_size, LENGTHS, seed=4)
    ref = eager_model(model.source)
    ids = [p.ids for p in prompts]
    base = reference_loss(ref, ids)
    patterns = [eager_patterns(ref, x) for x in ids]
    want = {}
    for layer in range(model.n_layers):
        for head in range(model.n_heads):
            want[FIRST, layer, head] = reference_first_attention(patterns, layer, head)
    for layer, head in REDIRECTED:
        want[DLOSS, layer, head] = reference_loss(ref, ids, (layer, head)) - base
    return model, prompts, ref, want, base


def probe_table(model, prompts, **params) -> pd.DataFrame:
    return run_probes(model, prompts, [DormantProbe(**params)], batch_size=len(prompts)).table


def worst(table: pd.DataFrame, want: dict) -> float:
    got = {(r.metric, r.layer, r.head): r.value for r in table.itertuples()}
    assert set(got) <= set(want)
    return max(abs(v - want[k]) for k, v in got.items())


# --- the redirect ------------------------------------------------------------------------------


class AllOnFirstKey(WeightsEdit):
    """The redirect as a WEIGHTS edit: all mass on ``rows.first_key``."""

    def __init__(self, heads):
        self.where = sites_of(heads)

    def sites(self):
        return self.where

    def edit(self, call, x):
        return torch.where(x.first_key, 1.0, 0.0).expand_as(x.values)


class FirstPaddedSlot(ZEdit):
    """Mutation: z = the value at batch index 0 (the first *padded* slot, not the first real token)."""

    def __init__(self, layer, head):
        self.layer, self.head = layer, head

    def sites(self):
        return sites_of([(self.layer, self.head)])

    def edit(self, call, z):
        if call.layer != self.layer:
            return z
        z = z.clone()
        group = call.query.shape[1] // call.key.shape[1]
        z[:, :, self.head] = call.value[:, self.head // group, 0].unsqueeze(1).to(z.dtype)
        return z


def _diff(a, b) -> float:
    return max(float((x - y).abs().max()) for x, y in zip(a, b))


@pytest.mark.parametrize("padding_side, layer, head", [("right", *HEADS[0]), ("left", *HEADS[1])])
def test_first_token_redirect_is_the_weights_edit_and_the_hand_made_one(setup, padding_side, layer, head):
    model, prompts, ref, _, _ = setup
    ids = [p.ids for p in prompts]
    clean = workbench_logits(model, ids, padding_side=padding_side)
    z_edit = workbench_logits(model, ids, HeadAblation([(layer, head)], "first"), padding_side=padding_side)
    weights = workbench_logits(model, ids, AllOnFirstKey([(layer, head)]), padding_side=padding_side)
    want = reference_logits(ref, ids, (layer, head))
    assert _diff(z_edit, weights) < 1e-4
    assert _diff(z_edit, [w.float() for w in want]) < 1e-4
    assert _diff(z_edit, clean) > 1e-3, "the redirect must change the logits"
    # mutations: a neighbouring head, the first padded slot (differs where padding is on the left)
    other = workbench_logits(model, ids, HeadAblation([(layer, head ^ 1)], "first"), padding_side=padding_side)
    assert _diff(other, [w.float() for w in want]) > 1e-3
    slot = workbench_logits(model, ids, FirstPaddedSlot(layer, head), padding_side=padding_side)
    assert (_diff(slot, [w.float() for w in want]) > 1e-3) == (padding_side == "left")


# --- the probe ---------------------------------------------------------------------------------


def test_probe_equals_the_reference_on_a_padded_batch(setup):
    model, prompts, _, want, base = setup
    result = run_probes(model, prompts, [DormantProbe(layers="1")], batch_size=len(prompts))
    table = result.table
    assert len(table) == (1 + model.n_layers) * model.n_heads
    assert worst(table, want) < 1e-5
    assert (table.n == sum(LENGTHS) - len(LENGTHS)).all()
    summary = result.results["dormant"].summary
    assert math.isclose(summary["loss_base"], base, abs_tol=1e-5)
    d = table[table.metric == DLOSS]
    assert d.value.abs().max() > 1e-3, "some redirect must change the loss"
    dormant = {f"{r.layer}.{r.head}" for r in d.itertuples() if abs(r.value) <= 0.005}
    assert set(summary["dormant_heads"]) == dormant


def test_heads_and_layers_restrict_the_redirected_heads(setup):
    model, prompts, _, want, _ = setup
    table = probe_table(model, prompts, heads="1.2,2.1")
    d = table[table.metric == DLOSS]
    assert sorted(zip(d.layer, d["head"])) == HEADS
    assert (table.metric == FIRST).sum() == model.n_layers * model.n_heads  # the proxy: every head
    assert worst(table, want) < 1e-5
    d = probe_table(model, prompts, layers="0,2").query("metric == @DLOSS")
    assert sorted(set(d.layer)) == [0, 2] and len(d) == 2 * model.n_heads
    with pytest.raises(WorkbenchError, match="dormant.layers"):
        probe_table(model, prompts, layers="3")


def test_mutations_fail(setup, monkeypatch):
    model, prompts, _, want, _ = setup

    class WrongHead(HeadAblation):
        def __init__(self, heads, mode):
            super().__init__([(layer, (head + 1) % model.n_heads) for layer, head in heads], mode)

    with monkeypatch.context() as m:
        m.setattr(dormant, "HeadAblation", WrongHead)
        assert worst(probe_table(model, prompts, heads="1.2,2.1"), want) > 1e-3

    def prompt_weighted(losses):
        return sum(float(x.mean()) for x in losses) / len(losses), sum(len(x) for x in losses)

    with monkeypatch.context() as m:
        m.setattr(dormant, "mean_loss", prompt_weighted)
        assert worst(probe_table(model, prompts, heads="1.2,2.1").query("metric == @DLOSS"), want) > 1e-4

    def with_query_zero(self, chunk):
        a0 = chunk.key_probs(chunk.batch.first_index)
        use = chunk.query_valid.unsqueeze(1)
        self.acc("sum", self.n_layers, self.n_heads)[chunk.layer] += (a0 * use).sum((0, 2))

    with monkeypatch.context() as m:
        m.setattr(dormant.FirstTokenAttention, "on_pattern_chunk", with_query_zero)
        assert worst(probe_table(model, prompts, heads="1.2").query("metric == @FIRST"), want) > 1e-3


# --- active_dormant ----------------------------------------------------------------------------


def _rows(model, domain, values, attention=None):
    """Tidy rows of one model and domain: ``{(layer, head): value}`` of each metric."""
    rows = []
    for metric, by_head in ((DLOSS, values), (FIRST, attention or {})):
        for (layer, head), v in by_head.items():
            rows.append({"model": model, "dataset": domain, "probe": "dormant", "metric": metric,
                         "layer": layer, "head": head, "value": v})
    return rows


def test_active_dormant_on_a_hand_made_table():
    table = pd.DataFrame(
        _rows("m", "prose", {(0, 0): 0.001, (0, 1): -0.003, (1, 0): -0.05, (1, 1): 0.0}, {(0, 0): 0.9, (0, 1): 0.8})
        + _rows("m", "code", {(0, 0): 0.05, (0, 1): 0.01, (1, 0): 0.03, (1, 1): 0.0}, {(0, 0): 0.2})
        + _rows("m", "random", {(0, 0): 0.002, (0, 1): 0.03, (1, 0): 0.004, (1, 1): 0.001})
        + _rows("other", "prose", {(0, 0): 0.03})
        + _rows("other", "code", {(0, 0): 0.0})
    )
    got = active_dormant(table, dormant_below=0.005, active_above=0.02)
    pairs = [(r.model, r.layer, r.head, r.dormant_on, r.active_on) for r in got.itertuples()]
    assert pairs == [
        ("m", 0, 0, "prose", "code"),
        ("m", 0, 0, "random", "code"),
        ("m", 0, 1, "prose", "random"),
        ("m", 1, 0, "random", "code"),  # -0.05 on prose is not dormant (|dloss| counts) nor active
        ("other", 0, 0, "code", "prose"),
    ]
    first = got.iloc[0]
    assert (first.dloss_dormant, first.dloss_active) == (0.001, 0.05)
    assert (first.attention_dormant, first.attention_active) == (0.9, 0.2)
    assert math.isnan(got.iloc[1].attention_dormant)  # no attention row for random
    strict = active_dormant(table, 0.0005, 0.02)  # dormant: |dloss| <= 0.0005, only exact zeros here
    assert [(r.model, r.dormant_on, r.active_on) for r in strict.itertuples()] == [("other", "code", "prose")]
    high = active_dormant(table, 0.005, 0.04)  # active: only 0.05 (head 0.0 on code)
    assert [(r.layer, r.head, r.dormant_on, r.active_on) for r in high.itertuples()] == [
        (0, 0, "prose", "code"),
        (0, 0, "random", "code"),
    ]
    with pytest.raises(WorkbenchError):
        active_dormant(table, 0.05, 0.02)


# --- the code domain ---------------------------------------------------------------------------


def test_code_dataset_is_shipped_source_reproducible_by_seed():
    assert "code" in DATASETS and "code" in OPTIONS
    a = make_dataset("code", 6, seed=3, min_lines=5, max_lines=12)
    b = make_dataset("code", 6, seed=3, min_lines=5, max_lines=12)
    assert [p.text for p in a] == [p.text for p in b]
    assert [p.text for p in make_dataset("code", 6, seed=4)] != [p.text for p in a]
    for p in a:
        assert 1 <= len(p.text.splitlines()) <= 12 and p.meta["source"].startswith("stdlib/")
        assert textwrap.dedent(p.text) == p.text  # no common indentation left
    docs = dormant_corpus()
    assert all(d["license"].startswith("PSF-2.0") for d in docs) and len(docs) >= 20
    with pytest.raises(WorkbenchError, match="min_lines"):
        make_dataset("code", 2, min_lines=9, max_lines=3)


def dormant_corpus():
    from workbench.datasets.code import load_documents

    return load_documents()
