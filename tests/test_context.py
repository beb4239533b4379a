"""Context-aware divergence and context-vs-memory direct effects on a tiny Llama, against a plain
HF recomputation (o_proj inputs, the final RMSNorm written out by hand)."""

from __future__ import annotations

import pytest
import torch

from tests.reference import reference_head_z
from workbench import get_probe
from workbench.inputs.prompts import Prompt
from workbench.runner import run_probes

ITEMS = [
    Prompt(
        "a",
        text="and he said unto",
        meta={"context": "the lord God of the land", "target_context": " lord", "target_memory": " God"},
    ),
    Prompt(
        "b",
        text="the king",
        meta={"context": "in the day that the king said", "target_context": " said", "target_memory": " king"},
    ),
    Prompt(
        "c",
        text="and the people of the land said unto them",
        meta={"context": "God", "target_context": " people", "target_memory": " land"},
    ),
]


@pytest.fixture(scope="module")
def plain_llama(tiny_dirs):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = tiny_dirs["llama"]
    return AutoModelForCausalLM.from_pretrained(
        path, attn_implementation="eager"
    ).eval(), AutoTokenizer.from_pretrained(path)


def _rmsnorm(norm, x):
    return norm.weight * (x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + norm.variance_epsilon))


@torch.no_grad()
def test_context_divergence_and_direct_effects_match_plain_recomputation(tiny_models, plain_llama):
    hf, tok = plain_llama
    probe = get_probe("context")
    df = run_probes(tiny_models["llama"], ITEMS, [probe], batch_size=3).table
    div_ref, eff_ref = [], []
    for item in ITEMS:
        cond = tok(item.meta["context"] + "\n" + item.text, return_tensors="pt")
        base = tok(item.text, return_tensors="pt")
        n_c, n_b = cond["input_ids"].shape[1], base["input_ids"].shape[1]
        resid = {}
        h = hf.model.norm.register_forward_pre_hook(lambda m, a: resid.__setitem__("x", a[0][0, -1].detach()))
        try:
            z_c, _ = reference_head_z(hf, dict(cond), [n_c - 1])
        finally:
            h.remove()
        z_b, _ = reference_head_z(hf, dict(base), [n_b - 1])
        div_ref.append((z_c - z_b).norm(dim=-1)[0])
        # direct effect: logit diff minus logit diff with the head's z_h W_O[h] removed
        a = tok(item.meta["target_context"], add_special_tokens=False)["input_ids"][0]
        b = tok(item.meta["target_memory"], add_special_tokens=False)["input_ids"][0]
        w_u = hf.lm_head.weight
        direction = (w_u[a] - w_u[b]).double()
        x = resid["x"].double()
        full = _rmsnorm(hf.model.norm, x.float()).double() @ direction
        eff = torch.zeros(z_c.shape[1], z_c.shape[2], dtype=torch.double)
        for layer in range(z_c.shape[1]):
            w_o = hf.model.layers[layer].self_attn.o_proj.weight.double()
            d = z_c.shape[-1]
            for head in range(z_c.shape[2]):
                contrib = w_o[:, head * d : (head + 1) * d] @ z_c[0, layer, head]
                eff[layer, head] = full - _rmsnorm(hf.model.norm, (x - contrib).float()).double() @ direction
        eff_ref.append(eff)
    got = df[df.metric == "context_divergence"].pivot(index="layer", columns="head", values="value").to_numpy()
    assert got == pytest.approx(torch.stack(div_ref).mean(0).numpy(), abs=1e-4)
    assert got.max() > 1e-2
    got = df[df.metric == "context_direct_effect"].pivot(index="layer", columns="head", values="value").to_numpy()
    assert got == pytest.approx(torch.stack(eff_ref).mean(0).numpy(), abs=1e-4)
    assert abs(got).max() > 1e-3
    follows = df[df.metric == "follows_context"]
    assert list(follows["item"]) == ["a", "b", "c"] and set(follows.value) <= {0.0, 1.0}
    for metric, target in (("follows_context", "target_context"), ("follows_memory", "target_memory")):
        got = df[df.metric == metric].set_index("item")["value"]
        for item in ITEMS:  # the greedy first token of a plain forward with the passage
            enc = tok(item.meta["context"] + "\n" + item.text, return_tensors="pt")
            top = int(hf(**enc).logits[0, -1].argmax())
            want = tok(item.meta[target], add_special_tokens=False)["input_ids"][0]
            assert got[item.id] == float(top == want)


def test_context_batched_equals_one_at_a_time(tiny_models):
    """Batching mixed lengths gives the one-at-a-time values."""
    model = tiny_models["llama"]
    together = get_probe("context", steps="all", max_new_tokens=3)
    run_probes(model, ITEMS, [together], batch_size=3).table
    for item, out in zip(ITEMS, together.outcomes):
        alone = get_probe("context", steps="all", max_new_tokens=3)
        run_probes(model, [item], [alone], batch_size=1).table
        assert alone.outcomes[0].tokens == out.tokens
        assert torch.allclose(alone.outcomes[0].divergence, out.divergence, atol=1e-5)


def test_items_whose_targets_share_a_first_token_are_listed_not_scored(tiny_models):
    same = Prompt(
        "z", text="and he said", meta={"context": "the lord", "target_context": " Zorblax", "target_memory": " Quuxian"}
    )
    probe = get_probe("context")
    res = run_probes(tiny_models["llama"], [ITEMS[0], same], [probe])  # both unknown words -> [UNK]
    df = res.table
    assert res.results["context"].summary["skipped_same_first_token"] == ["z"]
    assert any("1 items not scored" in line for line in res.lines())
    assert (df[df.metric == "context_direct_effect"].n == 1).all()
    assert (df[df.metric == "context_divergence"].n == 2).all()


@torch.no_grad()
def test_context_attention_is_the_eager_mass_on_the_passage_after_position_0(tiny_models, plain_llama):
    hf, tok = plain_llama
    probe = get_probe("context")
    df = run_probes(tiny_models["llama"], ITEMS, [probe], batch_size=3).table
    ref = []
    for item in ITEMS:
        n_prefix = len(tok(item.meta["context"] + "\n")["input_ids"])
        enc = tok(item.meta["context"] + "\n" + item.text, return_tensors="pt")
        att = hf(**enc, output_attentions=True).attentions
        ref.append(torch.stack([a[0, :, -1, 1:n_prefix].sum(-1) for a in att]).double())
    got = df[df.metric == "context_attention"].pivot(index="layer", columns="head", values="value").to_numpy()
    assert got == pytest.approx(torch.stack(ref).mean(0).numpy(), abs=1e-4)
