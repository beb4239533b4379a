"""DuoAttention gates (workbench.kv.duo): the mixed attention, the loss, its gradient, the fit, the data.

The reference for the mix is a plain transformers model with eager attention, run one unpadded
prompt at a time, whose attention function is replaced by loops over heads and query rows that
compute, from the model's own queries, keys and values, the full softmax attention and the
streaming one (keys ``j <= i`` with ``j < sink`` or ``i - j < recent``) and mix them with the head's
KV-head gate. The workbench runs :class:`DuoMix` through ``hooked_run`` on a padded batch of unequal
lengths (right and left padding); the final hidden states of every real token must agree.
"""

from __future__ import annotations

import functools
import math

import pytest
import torch
from transformers.models.gemma3 import modeling_gemma3
from transformers.models.llama import modeling_llama

from tests.reference import eager_model
from tests.test_metrics import random_prompts
from workbench.engine.patterns import collate
from workbench.errors import WorkbenchError
from workbench.inputs.prompts import pad_token_id
from workbench.kv import duo
from workbench.models.loading import load_model

LENGTHS = [23, 9, 17]
SINK, RECENT = 2, 3


@pytest.fixture(scope="module")
def gemma(tiny_gemma3):
    """Tiny Gemma-3: layer 0 sliding (window 6), layer 1 global; GQA 4:2."""
    return tiny_gemma3


@pytest.fixture(scope="module")
def models(tiny_models, gemma):
    return {"llama": tiny_models["llama"], "gemma": gemma}


def _gates(model, kind: str, seed: int = 0) -> torch.Tensor:
    shape = (model.n_layers, model.n_kv_heads)
    if kind == "random":
        return torch.rand(shape, generator=torch.Generator().manual_seed(seed))
    return torch.full(shape, {"zero": 0.0, "half": 0.5, "one": 1.0}[kind])


# --- the reference: loops over heads and rows ---------------------------------------------------


def _softmax_mix(q, k, v, scaling, keys, rows):
    """Attention output of one head for query rows ``rows``, each over the keys ``keys(i)``
    (a softmax over the listed keys, in float64)."""
    out = torch.zeros(q.shape[0], v.shape[-1], dtype=torch.float64)
    for i in rows:
        js = keys(i)
        s = (k[js].double() @ q[i].double()) * scaling
        out[i] = torch.softmax(s, 0) @ v[js].double()
    return out


def reference_attention(gates, gated, sink, recent):
    def attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, softcap=None, **kw):
        layer, g = module.layer_idx, module.num_key_value_groups
        scaling = scaling if scaling is not None else module.head_dim**-0.5
        n = query.shape[2]
        visible = torch.ones(n, n, dtype=torch.bool).tril()
        if attention_mask is not None:
            visible = visible & (attention_mask[0, 0] == 0)  # the layer's window
        out = torch.zeros(1, n, query.shape[1], value.shape[-1], dtype=torch.float64)
        for h in range(query.shape[1]):
            q, k, v = query[0, h], key[0, h // g], value[0, h // g]
            full = _softmax_mix(q, k, v, scaling, lambda i: [j for j in range(n) if visible[i, j]], range(n))
            if layer not in gated:
                out[0, :, h] = full
                continue
            stream = _softmax_mix(
                q, k, v, scaling, lambda i: [j for j in range(i + 1) if j < sink or i - j < recent], range(n)
            )
            a = float(gates[layer, h // g])
            out[0, :, h] = (1 - a) * stream + a * full
        return out.to(query.dtype), None

    return attention


@functools.lru_cache(maxsize=2)
def _eager(source):
    return eager_model(source)


def reference_hidden(model, ids_list, gates, gated, sink, recent):
    ref = _eager(model.source)
    module = modeling_gemma3 if "gemma" in type(ref).__name__.lower() else modeling_llama
    original = module.eager_attention_forward
    module.eager_attention_forward = reference_attention(gates, gated, sink, recent)
    try:
        with torch.no_grad():
            return [ref.model(input_ids=torch.tensor([ids]))[0][0] for ids in ids_list]
    finally:
        module.eager_attention_forward = original


def workbench_hidden(model, ids_list, *edits, padding_side="right", grad=False):
    batch = collate(ids_list, pad_token_id(model.tokenizer), padding_side=padding_side)
    h = duo.final_hidden(model, batch, *edits, grad=grad)
    width = batch.input_ids.shape[1]
    return [h[i, (0 if padding_side == "right" else width - len(ids)) :][: len(ids)] for i, ids in enumerate(ids_list)]


def _max_diff(a, b):
    return max(float((x.double() - y.double()).abs().max()) for x, y in zip(a, b))


# --- (a) the mix against loops ------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["llama", "gemma"])
def test_the_mixed_output_equals_full_and_streaming_attention_by_hand(models, arch, monkeypatch):
    model = models[arch]
    monkeypatch.setattr(duo, "BLOCK_ROWS", 4)  # several bands of query rows per prompt
    ids = [p.ids for p in random_prompts(model.vocab_size, LENGTHS, seed=3)]
    layers = duo.gated_layers(model)
    assert layers == ([0, 1, 2] if arch == "llama" else [1])  # Gemma: the sliding layer 0 is not gated
    clean = {side: workbench_hidden(model, ids, padding_side=side) for side in ("right", "left")}
    for kind in ("zero", "half", "random"):
        gates = _gates(model, kind)
        want = reference_hidden(model, ids, gates, layers, SINK, RECENT)
        for side in ("right", "left"):
            got = workbench_hidden(model, ids, duo.DuoMix(gates, layers, SINK, RECENT, block_rows=4), padding_side=side)
            assert _max_diff(got, want) < 1e-4, (kind, side)
            assert _max_diff(got, clean[side]) > 1e-3, f"{kind}: the streaming part must change the hidden states"


def test_streaming_attention_reads_sink_and_recent_from_each_prompts_first_token():
    """The streaming kernel alone on a hand-made call: GQA 4:2, a boolean mask with left padding
    on row 1, bands of 5 rows; against loops with positions counted from each row's first token."""
    from workbench.engine.call import AttentionCall

    torch.manual_seed(0)
    b, h, n_kv, n, d = 2, 4, 2, 29, 8
    q, k, v = torch.randn(b, h, n, d), torch.randn(b, n_kv, n, d), torch.randn(b, n_kv, n, d)
    first = [0, 12]
    mask = torch.zeros(b, 1, n, n, dtype=torch.bool)
    for i in range(b):
        for a in range(first[i], n):
            mask[i, 0, a, first[i] : a + 1] = True
    call = AttentionCall(layer=0, module=None, query=q, key=k, value=v, mask=mask, scaling=0.3, is_causal=False)
    got = duo.streaming_attention(call, sink=3, recent=4, block_rows=5)
    for i in range(b):
        f = first[i]
        for head in range(h):
            want = _softmax_mix(
                q[i, head],
                k[i, head // 2],
                v[i, head // 2],
                0.3,
                lambda a: [j for j in range(f, a + 1) if j - f < 3 or a - j < 4],
                range(f, n),
            )
            assert float((got[i, f:, head].double() - want[f:]).abs().max()) < 1e-5
        assert float(got[i, :f].abs().max() if f else 0.0) == 0.0  # padded query rows see no key: 0


# --- (b) alpha = 1 is the model --------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["llama", "gemma"])
def test_gates_at_one_reproduce_the_unedited_model_exactly(models, arch):
    model = models[arch]
    ids = [p.ids for p in random_prompts(model.vocab_size, LENGTHS, seed=4)]
    for side in ("right", "left"):
        plain = workbench_hidden(model, ids, padding_side=side)
        edit = duo.DuoMix(_gates(model, "one"), duo.gated_layers(model, gate_sliding=True), SINK, RECENT)
        same = workbench_hidden(model, ids, edit, padding_side=side)
        assert all(torch.equal(a, b) for a, b in zip(plain, same))
        half = workbench_hidden(
            model, ids, duo.DuoMix(_gates(model, "half"), [model.n_layers - 1], SINK, RECENT), padding_side=side
        )
        assert _max_diff(half, plain) > 1e-3


# --- (c) the gradient -------------------------------------------------------------------------------


def _samples(model, lengths=(70, 58), seed=0):
    return duo.passkey_samples(model.tokenizer, lengths, n_passkeys=1, passkey_words=3, seed=seed)


def test_the_gradient_of_the_loss_matches_a_finite_difference(tiny_dirs):
    model = load_model(str(tiny_dirs["llama"]), device="cpu")
    model.hf_model.double()
    samples = _samples(model)  # one batch of two prompts of unequal lengths (right padding)
    assert len({s.length for s in samples}) == 2
    layers = duo.gated_layers(model)
    gates = torch.nn.Parameter((0.2 + 0.6 * _gates(model, "random", seed=1)).double())
    loss, distill, reg = duo.duo_loss(model, samples, gates, layers, SINK, RECENT, reg_weight=0.05)
    loss.backward()
    assert distill.item() > 0 and abs(reg.item() - float(gates.detach().mean())) < 1e-12
    eps = 1e-3  # the model computes a few things in float32 (RoPE's cos/sin): smaller steps see its rounding
    for layer, head in ((0, 1),):
        values = []
        for sign in (1, -1):
            shifted = gates.detach().clone()
            shifted[layer, head] += sign * eps
            values.append(duo.duo_loss(model, samples, shifted, layers, SINK, RECENT, 0.05)[0].item())
        fd = (values[0] - values[1]) / (2 * eps)
        assert abs(fd) > 1e-4
        assert abs(float(gates.grad[layer, head]) - fd) < 2e-5 * max(1.0, abs(fd)), (layer, head)


# --- (d) the fit ------------------------------------------------------------------------------------


def test_a_few_steps_lower_the_loss_and_keep_the_gates_in_the_unit_interval(models, monkeypatch):
    model = models["llama"]
    samples = _samples(model)
    before = [p.requires_grad for p in model.hf_model.parameters()]
    seen = []  # the gates each step's loss is computed with

    def spy(model, samples, gates, *args, **kw):
        seen.append(gates.detach().clone())
        return loss_of(model, samples, gates, *args, **kw)

    loss_of = duo.duo_loss
    monkeypatch.setattr(duo, "duo_loss", spy)
    fit = duo.fit_gates(model, samples, steps=6, lr=0.4, reg_weight=1.0, sink=SINK, recent=RECENT)
    assert [p.requires_grad for p in model.hf_model.parameters()] == before
    assert len(fit.loss) == 6 and fit.distill[0] == 0.0 and fit.reg[0] == 1.0  # gates start at 1
    assert fit.loss[-1] < fit.loss[0] - 0.1
    assert all(abs(lo - (d + 1.0 * r)) < 1e-6 for lo, d, r in zip(fit.loss, fit.distill, fit.reg))
    assert fit.gates.shape == (model.n_layers, model.n_kv_heads) and fit.gates.dtype == torch.float32
    assert float(fit.gates.min()) >= 0.0 and float(fit.gates.max()) <= 1.0
    assert len(seen) == 6 and all(float(g.min()) >= 0.0 and float(g.max()) <= 1.0 for g in seen)
    assert any(float(g.min()) == 0.0 for g in seen[1:]), "lr 0.4 drives gates past 0: clamped in place before a step"
    assert all(abs(r - float(g.mean())) < 1e-6 for r, g in zip(fit.reg, seen))
    frame = duo.gates_frame(fit, "tiny")
    assert list(frame.columns) == ["model", "layer", "kv_head", "gate"] and len(frame) == 6


def test_gemma_sliding_layers_are_not_gated(models):
    model = models["gemma"]
    samples = _samples(model, lengths=(72,))
    fit = duo.fit_gates(model, samples, steps=2, sink=SINK, recent=RECENT)
    assert fit.params["gated_layers"] == [1]
    assert bool(torch.isnan(fit.gates[0]).all()) and not bool(torch.isnan(fit.gates[1]).any())
    frame = duo.gates_frame(fit, "tiny-gemma")
    assert sorted(frame.layer.unique()) == [1] and len(frame) == model.n_kv_heads


def test_the_schedule_is_the_sources():
    f = duo.lr_lambda(100)  # 20 warm-up steps, 20 decay steps, floor 0.1
    assert [round(f(s), 6) for s in (0, 1, 19, 50, 80, 81, 99)] == [0.1, 0.1, 1.0, 1.0, 1.0, 0.95, 0.1]
    assert f(9) == pytest.approx(0.5)


# --- (e) bad input ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, says",
    [
        (dict(steps=0), "steps"),
        (dict(sink=-1), "sink"),
        (dict(recent=-1), "recent"),
        (dict(recent=0), "recent"),
        (dict(lengths=[]), "lengths"),
        (dict(lengths=[20]), "too short"),
        (dict(lengths=[400]), "context"),
        (dict(lr=0.0), "lr"),
    ],
)
def test_bad_input_is_refused_with_a_fix(models, kwargs, says):
    with pytest.raises(WorkbenchError) as err:
        duo.fit_gates(models["llama"], **{"n_passkeys": 1, "passkey_words": 3, **kwargs})
    assert says in str(err.value) and err.value.fix


# --- the data ---------------------------------------------------------------------------------------


def test_passkey_prompts_have_their_needles_at_the_drawn_depths_and_labels_on_the_qa_tail():
    from transformers import AutoTokenizer

    from workbench.models.embedded import embedded_folder

    folder = embedded_folder("smollm2-135m")
    if not (folder / "tokenizer.json").is_file():
        pytest.skip("the SmolLM2 tokenizer is not in the cache")
    tok = AutoTokenizer.from_pretrained(str(folder))
    samples = duo.passkey_samples(tok, [300, 420], n_passkeys=3, passkey_words=5, seed=7)
    assert [s.length for s in samples] == [300, 420]
    enc = lambda text: tok(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    for s in samples:
        assert len(s.passkeys) == 3 and all(w in duo.NATO for k in s.passkeys for w in k.split())
        assert s.depths == sorted(s.depths) and all(0.1 <= d <= 0.9 for d in s.depths)
        qa = []
        for i, key in enumerate(s.passkeys):
            qa += enc(duo.QUESTION.format(ordinal=duo.ORDINALS[i])) + enc(key) + enc("\n\n")
        n_qa = sum(s.labels)
        assert s.labels == [False] * (s.length - n_qa) + [True] * n_qa and s.input_ids[-n_qa:] == qa
        # needles, in order, at int(depth x haystack) of the haystack (the prompt minus wrapper and needles)
        prefix, close = enc(duo.BOOK_OPEN), enc(duo.BOOK_CLOSE)
        needles = [
            enc("\n\n") + enc(duo.NEEDLE.format(ordinal=duo.ORDINALS[i])) + enc(k) + enc("\n\n")
            for i, k in enumerate(s.passkeys)
        ]
        n_hay = s.length - len(prefix) - len(close) - n_qa - sum(map(len, needles))
        at = len(prefix)
        for depth, needle in zip(s.depths, needles):
            start = at + int(n_hay * depth)
            assert s.input_ids[start : start + len(needle)] == needle
            at += len(needle)
        assert s.input_ids[: len(prefix)] == prefix
        assert s.input_ids[s.length - n_qa - len(close) : s.length - n_qa] == close
    again = duo.passkey_samples(tok, [300, 420], n_passkeys=3, passkey_words=5, seed=7)
    other = duo.passkey_samples(tok, [300, 420], n_passkeys=3, passkey_words=5, seed=8)
    assert [s.input_ids for s in again] == [s.input_ids for s in samples]
    assert [s.passkeys for s in other] != [s.passkeys for s in samples]
    assert not math.isnan(samples[0].depths[0])
