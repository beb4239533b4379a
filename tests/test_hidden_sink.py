"""Hidden sinks (probe ``hidden_sink``) and ACT's calibration (edit ``SinkCalibration``, probe
``act``) against the definitions recomputed the slow way.

The reference is a plain eager transformers model run one unpadded prompt at a time: detection
reads its full attention patterns (``eager_patterns``) with loops over heads and keys; the
calibration is ACT's edit written by hand (from ``atten_process_cal`` in GATECH-EIC/ACT) inside a
monkeypatched ``eager_attention_forward``. The workbench runs padded batches of prompts of
unequal lengths, several chunks / blocks of query rows per layer.
"""

from __future__ import annotations

import pytest
import torch
from transformers.models.llama import modeling_llama

from probes.hidden_sink import ActProbe, HiddenSinkProbe, SinkCalibration
from tests.reference import eager_model, patterns
from tests.test_metrics import random_prompts
from workbench.engine import edits
from workbench.engine.extraction import run_pattern_probes
from workbench.engine.scoring import token_losses
from workbench.inputs.prompts import TokenizedPrompt
from workbench.protocol.run_context import RunContext

LENGTHS = [23, 9, 31, 16]
THRESHOLD = 0.2  # the tiny model's attention is flat: 0.1 would make nearly every key a sink
BETA = 0.4
HEADS = [(0, 1), (1, 2), (2, 0), (2, 3)]


def ref_sinks(A: torch.Tensor, threshold: float = THRESHOLD, min_rows: int = 1) -> list[int]:
    """Hidden sinks of one head's ``[query, key]`` pattern of an unpadded prompt (causal)."""
    T = A.shape[-1]
    out = []
    for s in range(1, T):
        rows = T - s  # the queries t >= s see s
        if rows >= min_rows and float(A[s:, s].sum()) / rows > threshold:
            out.append(s)
    return out


_PATTERNS: dict[tuple, list] = {}


def ref_detection(model, prompts, threshold=THRESHOLD, min_rows=1):
    """Per (layer, head): (rate, mass, count) over prompts, from the definitions."""
    key = (model.source, tuple(tuple(p.ids) for p in prompts))
    if key not in _PATTERNS:
        ref = eager_model(model.source)
        _PATTERNS[key] = [patterns(ref, p.ids) for p in prompts]
    acc: dict[tuple[int, int], list[tuple[float, float, float]]] = {}
    for pats in _PATTERNS[key]:
        for layer, A in enumerate(pats):
            T = A.shape[-1]
            for h in range(A.shape[0]):
                sinks = ref_sinks(A[h], threshold, min_rows)
                mass = sum(float(A[h, :, s].sum()) for s in sinks) / T
                acc.setdefault((layer, h), []).append((float(bool(sinks)), mass, float(len(sinks))))
    return {k: [sum(x[i] for x in v) / len(v) for i in range(3)] for k, v in acc.items()}


def probe_table(model, prompts, batch_size, **params):
    probe = HiddenSinkProbe(**params)
    run_pattern_probes(model, prompts, [probe], RunContext(batch_size=batch_size, chunk_elements=4 * 4 * 31 * 5))
    return probe.results()


@pytest.mark.parametrize("min_rows", [1, 4])
@pytest.mark.parametrize("batch_size", [1, 4])
def test_detection_matches_the_definition(tiny_models, batch_size, min_rows):
    model = tiny_models["llama"]
    prompts = random_prompts(model.vocab_size, LENGTHS, seed=3)
    table = probe_table(model, prompts, batch_size, threshold=THRESHOLD, min_rows=min_rows)
    want = ref_detection(model, prompts, min_rows=min_rows)
    rates = []
    for i, metric in enumerate(("hidden_sink_rate", "hidden_sink_mass", "hidden_sink_count")):
        sub = table[table.metric == metric]
        assert len(sub) == 12 and (sub.n == len(prompts)).all()
        for r in sub.itertuples():
            assert r.value == pytest.approx(want[(r.layer, r.head)][i], abs=1e-5), (metric, r.layer, r.head)
        if i == 0:
            rates = list(sub.value)
    assert 0 < min(rates) < max(rates) or 0 < max(rates) < 1, "the threshold must separate heads or prompts"


def test_the_threshold_matters(tiny_models):
    model = tiny_models["llama"]
    prompts = random_prompts(model.vocab_size, LENGTHS, seed=3)
    low = probe_table(model, prompts, 4, threshold=0.05)
    high = probe_table(model, prompts, 4, threshold=0.5)
    assert low[low.metric == "hidden_sink_count"].value.sum() > high[high.metric == "hidden_sink_count"].value.sum()


# --- calibration ------------------------------------------------------------------------------


def act_attention(heads, threshold=THRESHOLD, beta=BETA):
    """Eager attention of one unpadded prompt with ACT's calibration of ``heads`` made by hand."""

    def attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, softcap=None, **kw):
        k = key.repeat_interleave(module.num_key_value_groups, dim=1)
        v = value.repeat_interleave(module.num_key_value_groups, dim=1)
        scores = (query @ k.transpose(2, 3)) * (scaling if scaling is not None else module.head_dim**-0.5)
        T = scores.shape[-1]
        visible = torch.ones(T, T, dtype=torch.bool).tril()
        p = torch.softmax(scores.float().masked_fill(~visible, float("-inf")), dim=-1)
        for layer, h in heads:
            if layer != module.layer_idx:
                continue
            A = p[0, h].clone()
            sinks = ref_sinks(A.double(), threshold)
            if not sinks:
                continue
            available = A[:, sinks].sum(1, keepdim=True) * (1 - beta)
            edited = A.clone()
            edited[:, sinks] *= beta
            others = A.clone()
            others[:, sinks] = 0
            p[0, h] = edited + available * others / others.sum(1, keepdim=True)
        return (p @ v.float()).transpose(1, 2).contiguous().to(query.dtype), p

    return attention


_EAGER: dict = {}


def ref_losses(model, prompts, heads, monkeypatch) -> list[torch.Tensor]:
    """Per prompt, next-token cross-entropy of the eager model with ``heads`` calibrated."""
    if model.source not in _EAGER:
        _EAGER[model.source] = eager_model(model.source)
    ref = _EAGER[model.source]
    out = []
    with monkeypatch.context() as m:
        m.setattr(modeling_llama, "eager_attention_forward", act_attention(heads))
        with torch.no_grad():
            for p in prompts:
                logits = ref(torch.tensor([p.ids])).logits[0].double()
                logp = torch.log_softmax(logits[:-1], -1)
                out.append(-logp.gather(-1, torch.tensor(p.ids[1:])[:, None]).squeeze(-1))
    return out


def test_calibration_equals_acts_edit_made_by_hand(tiny_models, monkeypatch):
    model = tiny_models["llama"]
    monkeypatch.setattr(edits, "BLOCK_ROWS", 5)  # several blocks of rows per prompt
    prompts = random_prompts(model.vocab_size, LENGTHS, seed=3)
    edit = SinkCalibration(HEADS, THRESHOLD, BETA)
    got = token_losses(model, prompts, RunContext(batch_size=4), [edit])
    want = ref_losses(model, prompts, HEADS, monkeypatch)
    clean = token_losses(model, prompts, RunContext(batch_size=4))
    for g, w, c in zip(got, want, clean):
        assert torch.allclose(g, w, atol=1e-4)
    assert max(float((g - c).abs().max()) for g, c in zip(got, clean)) > 1e-3, "the calibration must change losses"
    rates = ref_detection(model, prompts)
    for head in HEADS:
        assert edit.prompts_with_sinks[head] == round(rates[head][0] * len(prompts))


def test_calibration_keeps_rows_normalised_and_scales_the_sinks(tiny_models):
    """On every row: the sinks get beta times their weight, the row still sums to 1, and the
    other keys grow by one common factor (the freed mass goes in proportion to attention)."""
    from workbench.engine.attention import hooked_run
    from workbench.engine.edits import Rows, WeightsEdit
    from workbench.engine.patterns import collate

    model = tiny_models["llama"]
    prompts = random_prompts(model.vocab_size, LENGTHS, seed=3)
    cal = SinkCalibration([(1, 2)], THRESHOLD, BETA)
    seen = []

    class Spy(WeightsEdit):  # after the calibration (ordered): records the rows it returns
        def sites(self):
            return {1: frozenset({2})}

        def edit(self, call, x: Rows):
            seen.append((x.values.clone(), cal._detect(call)))
            return x.values

    class Before(Spy):
        def edit(self, call, x: Rows):
            before.append(x.values.clone())
            return x.values

    before: list[torch.Tensor] = []
    batch = collate([p.ids for p in prompts], 0)
    with hooked_run(model.hf_model, edits.ordered(Before(), cal, Spy())):
        model.hf_model(
            input_ids=batch.input_ids,
            attention_mask=batch.attention_mask,
            position_ids=batch.positions.clamp_min(0),
            use_cache=False,
        )
    (after, sinks), p = seen[0], before[0]
    a, p, s = after[:, 2], p[:, 2], sinks[:, 2, None, : after.shape[-1]].expand_as(after[:, 2])
    assert s.any()
    real = batch.attention_mask.bool()[:, : a.shape[1]]
    assert torch.allclose(a.sum(-1)[real], torch.ones(()), atol=1e-5)
    on, rest = (p * s).sum(-1, keepdim=True), (p * ~s).sum(-1, keepdim=True)
    want = torch.where(s, BETA * p, p * (1 + (1 - BETA) * on / rest))
    assert torch.allclose(a[real], want[real], atol=1e-6)


def test_act_probe_scores_heads_by_the_change_in_loss(tiny_models, monkeypatch):
    model = tiny_models["llama"]
    prompts = random_prompts(model.vocab_size, LENGTHS, seed=3)
    probe = ActProbe(threshold=THRESHOLD, beta=BETA, layers=[0, 2], heads=[1, 3])
    table = probe.run(model, prompts, RunContext(batch_size=4)).table
    clean = [x.mean() for x in token_losses(model, prompts)]
    rates = ref_detection(model, prompts)
    dl = table[table.metric == "act_dloss"]
    assert sorted(zip(dl["layer"], dl["head"])) == [(0, 1), (0, 3), (2, 1), (2, 3)]
    assert "act_dacc" not in set(table.metric), "unlabelled prompts have no accuracy"
    values = []
    for r in dl.itertuples():
        edited = [x.mean() for x in ref_losses(model, prompts, [(r.layer, r.head)], monkeypatch)]
        want = sum(float(e - c) for e, c in zip(edited, clean)) / len(prompts)
        assert r.value == pytest.approx(want, abs=1e-5)
        values.append(r.value)
    assert max(abs(v) for v in values) > 1e-4
    for r in table[table.metric == "act_sinks"].itertuples():
        assert r.value == pytest.approx(rates[(r.layer, r.head)][0])


def test_act_accuracy_on_labelled_prompts(tiny_models, monkeypatch):
    """The choices are each prompt's two best next tokens, the label the second: clean accuracy
    is 0 and a calibration that flips the order scores."""
    model = tiny_models["llama"]
    tok = model.tokenizer
    ref = eager_model(model.source)
    base = random_prompts(model.vocab_size, LENGTHS + LENGTHS, seed=4)
    prompts = []
    for p in base:
        with torch.no_grad():
            top = ref(torch.tensor([p.ids])).logits[0, -1].topk(2).indices.tolist()
        choices = [tok.decode([i]) for i in top]
        if [tok(c, add_special_tokens=False)["input_ids"][0] for c in choices] != top:
            continue
        prompts.append(TokenizedPrompt(p.id, p.ids, {"choices": choices, "label_index": 1}))
    assert len(prompts) >= 2
    heads = [(0, 1), (1, 2), (2, 3)]
    result = ActProbe(threshold=0.1, beta=0.0, layers=[0, 1, 2], heads=[1, 2, 3]).run(
        model, prompts, RunContext(batch_size=4)
    )
    assert result.summary["base_accuracy"] == 0.0
    acc = result.table[result.table.metric == "act_dacc"]
    flips = []
    for layer, head in heads:
        with monkeypatch.context() as m:
            m.setattr(modeling_llama, "eager_attention_forward", act_attention([(layer, head)], 0.1, 0.0))
            hits = 0
            with torch.no_grad():
                for p in prompts:
                    last = eager_model_logits(ref, p.ids)
                    hits += int(
                        last[tok(p.meta["choices"][1], add_special_tokens=False)["input_ids"][0]]
                        > last[tok(p.meta["choices"][0], add_special_tokens=False)["input_ids"][0]]
                    )
        got = acc[(acc["layer"] == layer) & (acc["head"] == head)].value.item()
        assert got == pytest.approx(hits / len(prompts))
        flips.append(got)
    assert max(flips) > 0, "some calibration must flip a choice"


def eager_model_logits(ref, ids):
    return ref(torch.tensor([ids])).logits[0, -1]
