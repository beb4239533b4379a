"""Causal head gating (circuits.gating): the gated objective against a slow reference, the fit
against the reference package, padding, roles, the closing check and bad input.

The reference for the objective is a plain transformers model with eager attention, one unpadded
example and one initialisation at a time, whose attention output projection gets a forward
pre-hook that reshapes its input to ``[batch, pos, head, in_features / head]`` and multiplies each
head by its gate (the paper's ``z <- G z``, as ``CHG.register_mask_hooks`` does), then reads
``log_softmax`` of the full logits at the positions before the target tokens. The workbench runs
:class:`HeadGates` through its attention seam on padded batches of unequal lengths (left and
right padding), unembedding only the target positions.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.stats import spearmanr

from circuits.gating import checks, fit, gates, objective, roles, tasks
from workbench.errors import WorkbenchError
from workbench.testing import eager_model

TEXTS = [
    ("the cat sat on the mat and the dog", " sat"),
    ("a b c d e f g h i j k l m n o p q r", " s t"),
    ("one two", " three four five"),
    ("x y z x y", " z"),
]


def _examples(model) -> list[tasks.GateExample]:
    return [tasks.example(model.tokenizer, f"e{i}", t, y) for i, (t, y) in enumerate(TEXTS)]


def _o_projs(hf):
    """The attention output projections (Llama/Gemma ``o_proj``, GPT-2 ``c_proj``)."""
    if hasattr(hf, "transformer"):
        return [block.attn.c_proj for block in hf.transformer.h]
    return [layer.self_attn.o_proj for layer in hf.model.layers]


def _width(module) -> int:
    """The input width of an output projection (GPT-2's Conv1D keeps its weight as [in, out])."""
    return getattr(module, "in_features", None) or module.weight.shape[0]


def reference_logp(hf, examples, logits: torch.Tensor) -> torch.Tensor:
    """``[example, init]`` mean target log-probabilities, one example and one init at a time."""
    n_heads = hf.config.num_attention_heads
    out = torch.zeros(len(examples), logits.shape[0], dtype=torch.float64)
    for k in range(logits.shape[0]):
        g = torch.sigmoid(logits[k].double())

        def pre(module, args, layer):
            x = args[0]
            d = _width(module) // n_heads
            x = x.view(*x.shape[:-1], n_heads, d) * g[layer].to(x.dtype)[:, None]
            return (x.reshape(*x.shape[:-2], n_heads * d),)

        handles = [m.register_forward_pre_hook(lambda mod, a, i=i: pre(mod, a, i)) for i, m in enumerate(_o_projs(hf))]
        try:
            for b, ex in enumerate(examples):
                ids = torch.tensor([list(ex.ids[:-1])])
                with torch.no_grad():
                    lp = torch.log_softmax(hf(input_ids=ids).logits[0].double(), -1)
                n = len(ex.ids) - 1
                total = sum(lp[n - ex.n_target + j, ex.ids[n + 1 - ex.n_target + j]] for j in range(ex.n_target))
                out[b, k] = total / ex.n_target
        finally:
            for h in handles:
                h.remove()
    return out


def _random_logits(model, k=3, seed=0):
    return torch.randn(k, model.n_layers, model.n_heads, generator=torch.Generator().manual_seed(seed)) * 2


@pytest.fixture(scope="module")
def llama(tiny_models):
    return tiny_models["llama"]


@pytest.fixture(scope="module")
def gpt2(tiny_models):
    return tiny_models["gpt2"]


@pytest.fixture(scope="module")
def wide_gemma(tmp_path_factory):
    """A tiny Gemma-3 whose head_dim (24) is not hidden / heads (64 / 4 = 16)."""
    from tests.tiny_gemma import gemma_config, save_tiny
    from workbench.models.loading import load_model

    cfg = gemma_config("gemma3")
    cfg.head_dim = 24
    return load_model(str(save_tiny(tmp_path_factory.mktemp("wide-gemma") / "g", cfg)), device="cpu")


@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("which", ["llama", "wide_gemma", "gpt2"])
def test_gated_target_logp_equals_the_reference(request, which, side):
    model = request.getfixturevalue(which)
    hf = eager_model(model.source)
    ex = _examples(model)
    assert len({len(e.ids) for e in ex}) > 2  # unequal lengths: padding matters
    logits = _random_logits(model)
    got = objective.target_logp(model, ex, gates.HeadGates(logits), side).double()
    want = reference_logp(hf, ex, logits)
    assert got.shape == (len(ex), 3)
    torch.testing.assert_close(got, want, atol=2e-5, rtol=0)
    ungated = reference_logp(hf, ex, torch.full_like(logits[:1], 30.0))  # gates ~1
    assert (got - ungated).abs().max() > 1e-2  # the gates do something


def test_gradient_equals_the_reference(llama):
    """d loss / d logits of the workbench's batched objective equals autograd through the reference."""
    hf = eager_model(llama.source)
    ex = _examples(llama)
    logits = _random_logits(llama, k=2, seed=3)
    mine = logits.clone().requires_grad_(True)
    loss, nll, l1 = objective.gating_loss(llama, ex, mine, weight=-0.1, clamp=4.0, padding_side="left")
    loss.backward()
    ref = logits.clone().double().requires_grad_(True)
    n_heads = hf.config.num_attention_heads
    total = 0
    for k in range(2):
        g = torch.sigmoid(ref[k])
        handles = []
        for i, m in enumerate(_o_projs(hf)):

            def pre(mod, a, i=i):
                x = a[0]
                d = _width(mod) // n_heads
                return ((x.view(*x.shape[:-1], n_heads, d) * g[i].to(x.dtype)[:, None]).reshape(x.shape),)

            handles.append(m.register_forward_pre_hook(pre))
        for e in ex:
            lp = torch.log_softmax(hf(input_ids=torch.tensor([list(e.ids[:-1])])).logits[0].double(), -1)
            n = len(e.ids) - 1
            total = (
                total
                + sum(lp[n - e.n_target + j, e.ids[n + 1 - e.n_target + j]] for j in range(e.n_target)) / e.n_target
            )
        for h in handles:
            h.remove()
    ref_loss = -total / (2 * len(ex)) - (-0.1) * ref.clamp(-4, 4).mean()
    ref_loss.backward()
    torch.testing.assert_close(loss.item(), ref_loss.item(), atol=1e-5, rtol=0)
    torch.testing.assert_close(mine.grad.double(), ref.grad, atol=1e-6, rtol=1e-4)


def test_l1_term_and_stage_signs():
    logits = torch.tensor([[[-9.0, -1.0], [0.5, 7.0]]])
    assert float(objective.l1_term(logits, 0.1, 4.0)) == pytest.approx(0.1 * (-4 - 1 + 0.5 + 4) / 4)
    assert float(objective.l1_term(logits, 0.0, 4.0)) == 0.0
    # loss = nll - lambda * mean(clamp): positive lambda rewards open gates (G+), negative closed ones (G-)
    assert fit.SIGN == {"none": 0.0, "positive": 1.0, "negative": -1.0}


def test_initial_logits_follow_the_reference_draw():
    got = gates.init_logits(2, 3, 4, (0.2, 0.6), seed=5)
    u = torch.rand(2, 3, 4, generator=torch.Generator().manual_seed(5))
    g = (0.2 + 0.4 * u).clamp(1e-6, 1 - 1e-6)
    torch.testing.assert_close(got, torch.log(g / (1 - g)))
    assert torch.all((torch.sigmoid(got) >= 0.2 - 1e-6) & (torch.sigmoid(got) <= 0.6 + 1e-6))


def test_a_closed_gate_is_a_zero_ablation(llama):
    """Gate 0 on some heads (logit -inf) and zero ablation of the same heads: the same numbers."""
    ex = _examples(llama)
    closed = [(0, 1), (2, 3), (1, 0)]
    logits = torch.full((1, llama.n_layers, llama.n_heads), math.inf)
    for layer, head in closed:
        logits[0, layer, head] = -math.inf
    a = objective.target_logp(llama, ex, gates.HeadGates(logits))[:, 0]
    b = torch.tensor([-checks.task_nll(llama, [e], closed) for e in ex])
    torch.testing.assert_close(a.double(), b.double(), atol=1e-6, rtol=0)
    assert (a - objective.target_logp(llama, ex)[:, 0]).abs().max() > 1e-3


def test_batch_order_is_epochs_of_a_seeded_shuffle():
    order = fit.batch_order(10, 4, 7, seed=1)
    assert [len(b) for b in order] == [4, 4, 2, 4, 4, 2, 4]
    assert sorted(sum(order[:3], [])) == list(range(10)) and sorted(sum(order[3:6], [])) == list(range(10))
    assert order == fit.batch_order(10, 4, 7, seed=1) and order != fit.batch_order(10, 4, 7, seed=2)


def _spec(**kw):
    base = dict(updates=6, reg_updates=6, n_inits=2, batch_size=3, seed=0)
    return fit.GateSpec(**{**base, **kw})


def test_left_and_right_padding_give_the_same_gates(llama):
    ex = _examples(llama) * 2
    right = fit.fit_head_gates(llama, ex, _spec(padding_side="right"))
    left = fit.fit_head_gates(llama, ex, _spec(padding_side="left"))
    for stage in fit.STAGES:
        torch.testing.assert_close(left.gates[stage], right.gates[stage], atol=1e-5, rtol=0)
    assert (right.gates["positive"] - right.gates["negative"]).abs().max() > 0.05


def test_fit_equals_the_reference_package(tiny_dirs):
    """Same model (float64), task, data order and initial gates: the package's CHGTrainer (its
    hooks, loss, Adam, clipping, stages; CPU autocast off) and the workbench reach the same gates."""
    pytest.importorskip("causal_head_gating")
    from transformers import AutoModelForCausalLM

    from benchmarks.chg_peer import package_fit
    from workbench.models.loading import load_model

    model = load_model(str(tiny_dirs["llama"]), device="cpu", dtype=torch.float64)
    hf = AutoModelForCausalLM.from_pretrained(str(tiny_dirs["llama"]), dtype=torch.float64)
    ex = tasks.make_task("aba", model.tokenizer, n=24)
    spec = fit.GateSpec(updates=15, reg_updates=15, n_inits=3, batch_size=8)
    init = gates.init_logits(3, model.n_layers, model.n_heads, seed=0)
    order = fit.batch_order(len(ex), 8, 45, 0)
    ours = fit.fit_head_gates(model, ex, spec, init=init, order=order)
    theirs = package_fit(hf, ex, init, order, spec)
    for stage in fit.STAGES:
        diff = (ours.gates[stage] - theirs["gates"][stage]).abs().max()
        assert diff < 1e-5, (stage, float(diff))
    assert (ours.gates["none"] - torch.sigmoid(init)).abs().max() > 0.1  # the gates moved


def test_roles_follow_the_paper():
    g_pos = torch.tensor([[0.9, 0.9, 0.1, 0.1, 0.5]])
    g_neg = torch.tensor([[0.9, 0.1, 0.1, 0.9, 0.49]])
    got = roles.head_roles(g_pos, g_neg)
    assert list(got[0]) == ["facilitating", "irrelevant", "interfering", "ambiguous", "irrelevant"]
    per_init = np.array(
        [[["irrelevant", "facilitating"]], [["facilitating", "facilitating"]], [["irrelevant", "ambiguous"]]],
        dtype=object,
    )
    best, share = roles.consensus(per_init)
    assert list(best[0]) == ["irrelevant", "facilitating"] and list(share[0]) == pytest.approx([2 / 3, 2 / 3])
    tie, _ = roles.consensus(np.array([[["interfering"]], [["irrelevant"]]], dtype=object))
    assert tie[0, 0] == "irrelevant"  # ties: the first in ROLES


def test_gate_frame_is_tidy_and_complete(llama):
    ex = _examples(llama)
    before = [p.requires_grad for p in llama.hf_model.parameters()]
    for p in llama.hf_model.parameters():
        p.grad = None  # other tests' backward passes through this shared model may have left some
    f = fit.fit_head_gates(llama, ex, _spec(updates=2, reg_updates=2))
    assert [p.requires_grad for p in llama.hf_model.parameters()] == before  # the weights' state is restored
    assert all(p.grad is None for p in llama.hf_model.parameters())  # and they never collected a gradient
    frame = roles.gate_frame(f, "tiny", "mine")
    g = frame[frame.metric == "gate"]
    assert len(g) == 3 * 2 * llama.n_layers * llama.n_heads
    row = g[(g.stage == "negative") & (g.init == 1) & (g.layer == 2) & (g["head"] == 3)].iloc[0]
    assert row.value == pytest.approx(float(f.gates["negative"][1, 2, 3]))
    want = roles.head_roles(f.gates["positive"][1, 2, 3], f.gates["negative"][1, 2, 3])
    assert row.role == want
    assert len(frame[frame.metric == "nll"]) == 6 and set(frame.n) == {len(ex)}
    grid = roles.consensus_grid(frame, llama.n_layers, llama.n_heads)
    assert set(grid.ravel()) <= set(roles.ROLES)


def test_closing_check_reads_the_roles(llama):
    ex = _examples(llama)
    r = np.full((llama.n_layers, llama.n_heads), "irrelevant", dtype=object)
    r[1, 2] = "facilitating"
    r[0, 0] = "interfering"
    frame = checks.closing_check(llama, ex, r, n_random=3)
    nll = frame[frame.metric == "nll"].set_index(["closed", "seed"]).value
    assert nll[("none", -1)] == pytest.approx(checks.task_nll(llama, ex))
    assert nll[("facilitating", -1)] == pytest.approx(checks.task_nll(llama, ex, [(1, 2)]))
    assert len(frame[(frame.closed == "random") & (frame.metric == "nll")]) == 3
    irr = [(a, b) for a in range(llama.n_layers) for b in range(llama.n_heads) if r[a, b] == "irrelevant"]
    assert nll[("irrelevant", -1)] == pytest.approx(checks.task_nll(llama, ex, irr))
    same = frame[(frame.closed == "random_irrelevant") & (frame.metric == "nll")]
    assert len(same) == 3 and set(same.n_closed) == {len(irr)}


def test_graded_check_closes_the_strongest_facilitating_heads(llama):
    ex = _examples(llama)
    r = np.full((llama.n_layers, llama.n_heads), "facilitating", dtype=object)
    r[0, :] = "irrelevant"
    strength = np.arange(llama.n_layers * llama.n_heads, dtype=float).reshape(llama.n_layers, llama.n_heads) / 100
    strength[1, 0] = 0.99  # the strongest
    assert checks.top_facilitating(r, strength, 2) == [(1, 0), (2, 3)]
    frame = checks.closing_check(llama, ex, r, n_random=2, strength=strength, ks=[2, 100])
    nll = frame[frame.metric == "nll"]
    top = nll[nll.closed == "facilitating_top"].set_index("n_closed").value
    n_fac = int((r == "facilitating").sum())
    assert list(top.index) == [2, n_fac]  # k capped at the number of facilitating heads
    assert top[2] == pytest.approx(checks.task_nll(llama, ex, [(1, 0), (2, 3)]))
    rand = nll[nll.closed == "random_top"]
    assert sorted(set(rand.n_closed)) == [2, n_fac] and len(rand) == 4


def test_patching_agreement_counts():
    import pandas as pd

    direct = pd.DataFrame({"layer": [0, 0, 1, 1], "head": [0, 1, 0, 1], "value": [0.1, -2.0, 0.5, 0.0]})
    g_neg = np.array([[0.2, 0.9], [0.8, 0.1]])
    r = np.array([["irrelevant", "facilitating"], ["facilitating", "interfering"]], dtype=object)
    got = checks.patching_agreement(direct, g_neg, r, top_k=2)
    assert got["overlap"] == 2 and got["top_patch_facilitating"] == 2
    assert got["top_patch_heads"] == ["0.1", "1.0"] and got["spearman"] == pytest.approx(1.0)
    # signed: 0.1 supports the answer (effect < 0) and is facilitating; 1.0 writes against it (> 0), facilitating too
    assert (got["top_supporting"], got["top_supporting_facilitating"]) == (1, 1)
    assert (got["top_opposing"], got["top_opposing_interfering"]) == (1, 0)
    assert got["spearman_signed"] == pytest.approx(spearmanr([0.2, 0.9, 0.8, 0.1], [-0.1, 2.0, -0.5, 0.0])[0])


def test_tasks_targets(llama):
    tok = llama.tokenizer
    ex = tasks.example(tok, "a", "x y", " z")
    assert ex.target == tuple(tok(" z", add_special_tokens=False)["input_ids"]) and ex.n_target >= 1
    aba = tasks.aba_task(tok, n=3, seed=0)
    assert aba == tasks.aba_task(tok, n=3, seed=0) and len(aba) == 3


@pytest.mark.smollm2
def test_niah_target_is_the_answer_span(smollm2):
    ex = tasks.niah_task(smollm2.tokenizer, n=2, context_len=160)
    text = smollm2.tokenizer.decode(list(ex[0].target))
    prompt = smollm2.tokenizer.decode(list(ex[0].prompt))
    assert text.strip().isdigit() and len(text.strip()) == 5
    assert f"is {text.strip()}." in prompt and prompt.rstrip().endswith("is")


def test_bad_input(llama, tmp_path):
    ex = _examples(llama)
    with pytest.raises(WorkbenchError, match="nothing to predict"):
        tasks.example(llama.tokenizer, "e", "x", "")
    long = [tasks.GateExample("long", tuple([5] * (llama.n_ctx + 5)), 2)]
    with pytest.raises(WorkbenchError, match="longer than the model's context"):
        fit.fit_head_gates(llama, long, _spec())
    with pytest.raises(WorkbenchError, match="unknown gating task"):
        tasks.make_task("nope", llama.tokenizer)
    with pytest.raises(ValueError, match="unknown stage"):
        fit.GateSpec(stages=["none", "sideways"])
    with pytest.raises(ValueError):
        fit.GateSpec(updates=0)
    bad = tmp_path / "t.jsonl"
    bad.write_text('{"text": "a b", "target": ""}\n')
    with pytest.raises(WorkbenchError, match="nothing to predict"):
        tasks.read_task(bad, llama.tokenizer)
    assert ex


def test_a_family_without_head_edit_point_is_refused(tmp_path):
    """Bloom's attention does not go through transformers' attention interface."""
    from transformers import BloomConfig, BloomForCausalLM

    from workbench.models.loading import LoadedModel

    hf = BloomForCausalLM(BloomConfig(vocab_size=64, hidden_size=32, n_layer=2, n_head=4))
    model = LoadedModel(
        name="tiny-bloom", source="x", hf_model=hf, tokenizer=None, device=torch.device("cpu"), dtype=torch.float32
    )
    with pytest.raises(WorkbenchError, match="no known head edit point"):
        gates.check_gateable(model)


@pytest.mark.smollm2
def test_fit_equals_the_reference_package_on_smollm2():
    """SmolLM2-135M (9 query heads x 30 layers) in float64, the aba task, same start and order:
    the package's gates (its masks made float64 like the model's) and ours agree to 1e-6 after
    two updates per stage at lr 1.0 (the second reads gates the first moved; benchmarks/bench_gate.py:
    the float32 comparison, and where its differences come from)."""
    pytest.importorskip("causal_head_gating")
    from transformers import AutoModelForCausalLM

    from benchmarks.chg_peer import package_fit
    from workbench.models.loading import load_model

    model = load_model("smollm2-135m", device="cpu", dtype=torch.float64)
    hf = AutoModelForCausalLM.from_pretrained(model.source, dtype=torch.float64)
    ex = tasks.make_task("aba", model.tokenizer, n=4)
    spec = fit.GateSpec(updates=2, reg_updates=2, n_inits=2, batch_size=2)
    init = gates.init_logits(2, model.n_layers, model.n_heads, seed=0)
    assert init.shape == (2, 30, 9)
    order = fit.batch_order(len(ex), 2, 6, 0)
    ours = fit.fit_head_gates(model, ex, spec, init=init, order=order)
    theirs = package_fit(hf, ex, init, order, spec)
    for stage in fit.STAGES:
        diff = (ours.gates[stage] - theirs["gates"][stage]).abs().max()
        assert diff < 1e-6, (stage, float(diff))
    assert (ours.gates["negative"] - torch.sigmoid(init)).abs().max() > 0.5


@pytest.mark.gemma3
def test_gates_on_gemma3_270m_use_the_configured_head_size(gemma3, gemma3_eager):
    """Gemma-3-270M: 4 query heads of 256 (its config's head_dim; hidden / heads would be 160). The
    gated objective on IOI prompts (padded, left) equals the o_proj pre-hook reference."""
    assert gemma3.d_head == 256 and gemma3.text_config.hidden_size // gemma3.n_heads == 160
    ex = tasks.ioi_task(gemma3.tokenizer, n=3, seed=1)
    ex = [ex[0], tasks.GateExample("short", ex[1].ids[-6:], 1), ex[2]]
    logits = _random_logits(gemma3, k=2, seed=4)
    got = objective.target_logp(gemma3, ex, gates.HeadGates(logits), "left").double()
    want = reference_logp(gemma3_eager, ex, logits)
    torch.testing.assert_close(got, want, atol=2e-4, rtol=0)
    assert (got[:, 0] - got[:, 1]).abs().max() > 1e-2
