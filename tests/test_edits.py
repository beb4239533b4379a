"""The declared intervention protocol: every edit point against the same edit made by hand.

The reference is a plain transformers model with eager attention, run one unpadded prompt at a
time, whose attention function is replaced by a few lines written from the definitions (scores,
softmax, weights, output) with the edit applied where its point says; ``RESID`` is a forward
pre-hook on the decoder layer. The workbench runs the same edit through
:func:`workbench.engine.attention.hooked_run` on one padded batch of prompts of unequal lengths
(right and left padding), and the logits of every real token must agree.

The edits here are written sloppily on purpose (they edit every head, every row): the protocol
must restrict each to the heads it declares.
"""

from __future__ import annotations

import math

import pytest
import torch
from transformers.models.gemma3 import modeling_gemma3
from transformers.models.llama import modeling_llama

from tests.reference import eager_model
from tests.test_metrics import random_prompts
from workbench.engine import edits
from workbench.engine.attention import hooked_run
from workbench.engine.edits import (
    EVERY,
    QKV,
    QKVEdit,
    ResidEdit,
    Rows,
    ScoresEdit,
    WeightsEdit,
    ZEdit,
    ZReader,
    ordered,
    sites_of,
)
from workbench.engine.interventions import HeadAblation, HeadScaling
from workbench.engine.patterns import collate
from workbench.errors import WorkbenchError

GAMMA = 3.0
LENGTHS = [11, 4, 17, 8]
SITES = [(0, 1), (1, 2), (2, 0)]  # tiny-llama: 3 layers x 4 query heads, 2 KV heads


class OnHeads:
    """The heads an edit declares, given as ``[(layer, head), ...]``, and its gamma."""

    def __init__(self, heads, gamma=1.0):
        self.where, self.gamma = sites_of(heads), gamma

    def sites(self):
        return self.where


class FirstKeyLogit(OnHeads, ScoresEdit):
    """ZeroTuning in logit form: ln(gamma) added to the first token's score."""

    def edit(self, call, x: Rows):
        return x.values + math.log(self.gamma) * x.first_key  # every head: the protocol restricts it


class FirstKeyWeight(OnHeads, WeightsEdit):
    """ZeroTuning as its paper states it: the first token's weight times gamma, rows renormalised."""

    def edit(self, call, x: Rows):
        return torch.where(x.first_key, x.values * self.gamma, x.values)


class Flatten(OnHeads, WeightsEdit):
    """AttentionInfluence's edit: uniform attention over the visible prefix."""

    def edit(self, call, x: Rows):
        return x.visible.float()  # renormalised by the protocol


class HalveKeys(QKVEdit):
    """Keys of KV head 0 halved, queries of every head times 1.5 (sites: the heads it reaches)."""

    def sites(self):
        return {1: frozenset({0, 1})}

    def edit(self, call, x: QKV):
        key = x.key.clone()
        key[:, 0] = key[:, 0] * 0.5
        return QKV(x.query * 1.5, key, x.value)


class ZeroZ(OnHeads, ZEdit):
    def edit(self, call, z):
        z = z.clone()
        for h in self.where.get(call.layer, ()):
            z[:, :, h] = 0
        return z


class _Pushes:
    """A fixed direction added at layer 1 (the point is the subclass's)."""

    def __init__(self, direction):
        self.direction = direction

    def sites(self):
        return {1: None}

    def edit(self, layer, x):
        return x + self.direction


class Push(_Pushes, ResidEdit):
    """A fixed direction added to the residual stream entering layer 1."""


# --- the reference: the definitions, with the edit where its point says -----------------------


def _by_layer(heads):
    out: dict[int, list[int]] = {}
    for layer, head in heads:
        out.setdefault(layer, []).append(head)
    return out


def _hand_edit(point, scores_or_weights, heads, gamma, visible):
    """The SCORES / WEIGHTS edits on ``heads`` of one layer, made with loops over heads."""
    x = scores_or_weights
    for h in heads:
        if point == "scores":
            x[:, h, :, 0] = x[:, h, :, 0] + math.log(gamma)
        elif point == "weights":
            x[:, h, :, 0] = x[:, h, :, 0] * gamma
            x[:, h] = x[:, h] / x[:, h].sum(-1, keepdim=True)
        elif point == "flatten":
            x[:, h] = visible.float() / visible.float().sum(-1, keepdim=True)
        elif point == "z":
            x[:, :, h] = 0
    return x


def reference_attention(point, heads, gamma):
    """An eager attention function for one unpadded prompt with the edit of ``point`` applied."""
    chosen = _by_layer(heads)

    def attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, softcap=None, **kw):
        mine = chosen.get(module.layer_idx, [])
        if point == "qkv" and module.layer_idx == 1:
            query, key = query * 1.5, key.clone()
            key[:, 0] = key[:, 0] * 0.5
        k = key.repeat_interleave(module.num_key_value_groups, dim=1)
        v = value.repeat_interleave(module.num_key_value_groups, dim=1)
        scores = (query @ k.transpose(2, 3)) * (scaling if scaling is not None else module.head_dim**-0.5)
        if softcap is not None:
            scores = torch.tanh(scores / softcap) * softcap
        n_q, n_k = scores.shape[-2:]
        visible = torch.ones(n_q, n_k, dtype=torch.bool).tril(n_k - n_q)
        if attention_mask is not None:
            visible = visible & (attention_mask[0, 0] == 0)  # the layer's window
        scores = scores.masked_fill(~visible, float("-inf"))
        scores = _hand_edit(point if point == "scores" else None, scores, mine, gamma, visible)
        p = torch.softmax(scores.float(), dim=-1)
        p = _hand_edit(point if point in ("weights", "flatten") else None, p, mine, gamma, visible)
        out = (p @ v.float()).transpose(1, 2).contiguous()
        out = _hand_edit(point if point == "z" else None, out, mine, gamma, visible)
        return out.to(query.dtype), p

    return attention


def reference_logits(source, ids_list, point, heads, gamma, direction=None):
    ref = eager_model(source)
    module = modeling_gemma3 if "gemma" in type(ref).__name__.lower() else modeling_llama
    original = module.eager_attention_forward
    module.eager_attention_forward = reference_attention(point, heads, gamma)
    handle = None
    if point == "resid":
        layer = ref.model.layers[1]
        handle = layer.register_forward_pre_hook(
            lambda m, args, kwargs: ((args[0] + direction, *args[1:]), kwargs) if args
            else (args, {**kwargs, "hidden_states": kwargs["hidden_states"] + direction}),
            with_kwargs=True,
        )
    try:
        with torch.no_grad():
            return [ref(torch.tensor([ids])).logits[0] for ids in ids_list]
    finally:
        module.eager_attention_forward = original
        if handle is not None:
            handle.remove()


def workbench_logits(model, ids_list, *interventions, padding_side="right"):
    from workbench.inputs.prompts import pad_token_id

    batch = collate(ids_list, pad_token_id(model.tokenizer), padding_side=padding_side)
    with hooked_run(model.hf_model, *interventions):
        logits = model.hf_model(
            input_ids=batch.input_ids,
            attention_mask=batch.attention_mask,
            position_ids=batch.positions.clamp_min(0),
            use_cache=False,
        ).logits
    width = batch.input_ids.shape[1]
    out = []
    for i, ids in enumerate(ids_list):
        start = 0 if padding_side == "right" else width - len(ids)
        out.append(logits[i, start : start + len(ids)])
    return out


def _edit_for(point, direction=None):
    return {
        "scores": lambda: FirstKeyLogit(SITES, GAMMA),
        "weights": lambda: FirstKeyWeight(SITES, GAMMA),
        "flatten": lambda: Flatten(SITES),
        "qkv": lambda: HalveKeys(),
        "z": lambda: ZeroZ(SITES),
        "resid": lambda: Push(direction),
    }[point]()


def _max_diff(a, b):
    return max(float((x - y).abs().max()) for x, y in zip(a, b))


@pytest.mark.parametrize("padding_side", ["right", "left"])
@pytest.mark.parametrize("point", ["resid", "qkv", "scores", "weights", "flatten", "z"])
def test_each_edit_point_equals_the_edit_made_by_hand(tiny_models, point, padding_side, monkeypatch):
    model = tiny_models["llama"]
    monkeypatch.setattr(edits, "BLOCK_ROWS", 5)  # several blocks of query rows per prompt
    ids = [p.ids for p in random_prompts(model.vocab_size, LENGTHS, seed=3)]
    direction = torch.randn(model.hf_model.config.hidden_size, generator=torch.Generator().manual_seed(0))
    got = workbench_logits(model, ids, _edit_for(point, direction), padding_side=padding_side)
    want = reference_logits(model.source, ids, point, SITES, GAMMA, direction)
    clean = workbench_logits(model, ids, padding_side=padding_side)
    assert _max_diff(got, want) < 1e-4
    assert _max_diff(got, clean) > 1e-3, "the edit must change the logits"


def test_scaling_the_first_weight_by_gamma_is_adding_ln_gamma_to_its_score(tiny_models):
    model = tiny_models["llama"]
    ids = [p.ids for p in random_prompts(model.vocab_size, LENGTHS, seed=5)]
    a = workbench_logits(model, ids, FirstKeyWeight(SITES, GAMMA))
    b = workbench_logits(model, ids, FirstKeyLogit(SITES, GAMMA))
    assert _max_diff(a, b) < 1e-4


def test_an_identity_edit_changes_nothing_on_sliding_window_layers(tmp_path):
    """Gemma-3's local layers: the eager path of an edited layer keeps the window and the scaling
    the kernel uses (an edit that returns its input gives the unedited logits), and a real edit
    equals the hand-made one."""
    from workbench.models.loading import load_model
    from workbench.models.tiny import make_tiny_model

    model = load_model(str(make_tiny_model(tmp_path / "g", "gemma3_text", seed=2)), device="cpu")

    class Same(ScoresEdit):
        def edit(self, call, x):
            return x.values

    class SameWeights(WeightsEdit):
        def edit(self, call, x):
            return x.values

    ids = [p.ids for p in random_prompts(model.vocab_size, [20, 13, 9], seed=1)]
    clean = workbench_logits(model, ids)
    assert _max_diff(workbench_logits(model, ids, Same()), clean) < 1e-4
    assert _max_diff(workbench_logits(model, ids, SameWeights()), clean) < 1e-4
    heads = [(0, 1), (2, 3), (3, 0)]  # local, global, local
    got = workbench_logits(model, ids, Flatten(heads), padding_side="left")
    want = reference_logits(model.source, ids, "flatten", heads, GAMMA)
    assert _max_diff(got, want) < 1e-4 and _max_diff(got, clean) > 1e-3


def test_two_edits_of_one_point_of_one_head_are_refused_unless_ordered(tiny_models):
    model = tiny_models["llama"]
    ids = [p.ids for p in random_prompts(model.vocab_size, [6, 9], seed=7)]
    ablate, scale = HeadAblation([(1, 2)], "zero"), HeadScaling([(1, 2), (2, 0)], 3.0, positions="all")
    with pytest.raises(WorkbenchError) as err:
        workbench_logits(model, ids, ablate, scale)
    message = f"{err.value.message} {err.value.fix}"
    assert "1.2" in message and "zero ablation" in message and "head scaling" in message
    assert "ordered(" in message and "--order" in message

    # other heads, other points, and readers do not conflict
    workbench_logits(model, ids, HeadAblation([(1, 3)], "zero"), scale)
    workbench_logits(model, ids, FirstKeyLogit([(1, 2)], 2.0), FirstKeyWeight([(1, 2)], 2.0), ZeroZ([(1, 2)]))

    class Seen(ZReader):
        def read(self, call, z):
            pass

    workbench_logits(model, ids, ablate, Seen())

    # ordered: applied in the order given; two scalings in either order multiply
    both = workbench_logits(model, ids, ordered(HeadScaling([(1, 2)], 2.0, "all"), HeadScaling([(1, 2)], 3.0, "all")))
    once = workbench_logits(model, ids, HeadScaling([(1, 2)], 6.0, "all"))
    assert _max_diff(both, once) < 1e-4
    # the ablation then the scaling: head 1.2 is zero whatever the scaling did, 2.0 is scaled
    first = workbench_logits(model, ids, ordered(ablate, scale))
    apart = workbench_logits(model, ids, ablate, HeadScaling([(2, 0)], 3.0, positions="all"))
    assert _max_diff(first, apart) < 1e-4


def test_every_point_is_declared_and_nothing_dispatches_on_method_names():
    """The engine dispatches on ``point``; no observer declares an edit by a method name the
    engine would have to look for (the protocol before this one: ``edit_z``, ``edit_qkv``,
    ``replaces_z``). The explicit graph of :mod:`circuits.graph` (edge-level patching) takes its
    edits as interventions too (``edits=``), not as callbacks."""
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    assert [p.value for p in edits.ORDER] == ["resid", "qkv", "scores", "weights", "z", "mlp_in"]
    files = [f for d in ("workbench", "probes", "circuits") for f in (root / d).rglob("*.py")]
    old_names = ("def edit_z(", "def edit_qkv(", "def replaces_z(", "def edit_scores(", '"edit_z"', '"edit_qkv"')
    for file in files:
        text = file.read_text(encoding="utf-8")
        for old in (*old_names, "edit_qkv=", "edit_z=", "edit_mlp_in="):
            assert old not in text, f"{file.relative_to(root)} still uses the duck-typed {old}"
    assert EVERY is edits.EVERY


def test_a_probes_own_edits_compose_with_the_runs_interventions_as_the_order_says(tiny_models):
    """``RunContext.with_edits``: an intervening probe's edits beside ``--ablate``: refused when
    they meet on a head without an order, applied in the declared order otherwise."""
    from workbench.protocol.run_context import RunContext

    model = tiny_models["llama"]
    ids = [p.ids for p in random_prompts(model.vocab_size, [6, 9], seed=7)]
    ablate = HeadAblation([(1, 2)], "first")
    scale = HeadScaling([(1, 2)], 3.0, positions="all")
    with pytest.raises(WorkbenchError, match="--order"):
        workbench_logits(model, ids, *RunContext(interventions=(ablate,)).with_edits(scale))
    given, probe = (RunContext(interventions=(ablate,), order=o) for o in ("given,probe", "probe,given"))
    given_first = workbench_logits(model, ids, *given.with_edits(scale))
    probe_first = workbench_logits(model, ids, *probe.with_edits(scale))
    assert _max_diff(given_first, workbench_logits(model, ids, ordered(ablate, scale))) < 1e-6
    assert _max_diff(probe_first, workbench_logits(model, ids, ordered(scale, ablate))) < 1e-6
    assert _max_diff(given_first, probe_first) > 1e-3, "scaling an ablated head differs from ablating a scaled one"
    assert _max_diff(probe_first, workbench_logits(model, ids, ablate)) < 1e-6, "ablating after scaling: ablation"


class MLPPush(_Pushes, edits.MLPInEdit):
    """A fixed direction added to what layer 1's MLP reads (not to the residual stream)."""


@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_the_mlp_input_point_equals_the_edit_made_by_hand(tiny_models, padding_side):
    """MLP_IN: only the MLP of layer 1 reads x + direction; the residual stream is not edited."""
    model = tiny_models["llama"]
    ids = [p.ids for p in random_prompts(model.vocab_size, LENGTHS, seed=3)]
    direction = torch.randn(model.hf_model.config.hidden_size, generator=torch.Generator().manual_seed(0))
    got = workbench_logits(model, ids, MLPPush(direction), padding_side=padding_side)
    ref = eager_model(model.source)
    layer = ref.model.layers[1]
    calls = []

    def mlp_reads_pushed(module, args):  # by hand: the MLP's norm reads x + direction, nothing else does
        calls.append(1)
        return (args[0] + direction,)

    handle = layer.post_attention_layernorm.register_forward_pre_hook(mlp_reads_pushed)
    try:
        with torch.no_grad():
            want = [ref(input_ids=torch.tensor([x])).logits[0] for x in ids]
    finally:
        handle.remove()
    assert calls
    assert _max_diff(got, want) < 1e-4
    plain = workbench_logits(model, ids)
    assert _max_diff(got, plain) > 1e-3  # the edit changed something
    resid = workbench_logits(model, ids, Push(direction))
    assert _max_diff(got, resid) > 1e-3  # and it is not a residual-stream edit


def test_the_graph_forward_applies_the_same_interventions_as_the_hooked_model(tiny_models):
    """circuits.graph.ModelGraph (the edge-level engine) takes the protocol's QKV, Z and MLP_IN
    interventions and gives the logits the attention-hook engine gives with the same edits; the
    points it does not have are refused."""
    from circuits.graph import graph_for

    model = tiny_models["llama"]
    g = graph_for(model)
    assert g is not None
    ids = [p.ids for p in random_prompts(model.vocab_size, LENGTHS, seed=3)]
    direction = torch.randn(model.hf_model.config.hidden_size, generator=torch.Generator().manual_seed(0))
    batch = collate(ids, 0)
    for point in ("qkv", "z", "mlp_in"):
        iv = MLPPush(direction) if point == "mlp_in" else _edit_for(point, direction)
        want = workbench_logits(model, ids, iv)
        rows = g.rows(batch, batch.lengths - 1)
        with torch.no_grad():
            h = g.forward(g.embed(batch.input_ids), rows, edits=[iv])
        # the graph reads out logit differences: compare them at each prompt's last token
        top = torch.stack([w[-1] for w in want]).argmax(-1)
        other = (top + 1) % model.vocab_size
        got_ld = g.unembed_diff(g.read_out(h, rows), top, other)
        want_ld = torch.stack([w[-1][t] - w[-1][o] for w, t, o in zip(want, top, other)])
        plain = torch.stack([w[-1][t] - w[-1][o] for w, t, o in zip(workbench_logits(model, ids), top, other)])
        assert float((got_ld.float() - want_ld.float()).abs().max()) < 1e-3, point
        assert float((want_ld - plain).abs().max()) > 1e-3, point  # the edit changed the read-out
    with pytest.raises(WorkbenchError, match="no scores point"):
        g.forward(g.embed(batch.input_ids), g.rows(batch, batch.lengths - 1), edits=[_edit_for("scores", direction)])
