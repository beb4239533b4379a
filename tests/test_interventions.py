"""Head ablations against the same edit made by hand on a plain transformers model."""

from __future__ import annotations

import pytest
import torch

from tests.reference import eager_model
from tests.test_metrics import random_prompts
from workbench.engine.attention import native_attention
from workbench.engine.call import observe
from workbench.engine.interventions import HeadAblation, head_means, parse_heads
from workbench.errors import WorkbenchError

HEADS = [(0, 1), (1, 3), (2, 0)]


def reference_logits(model, ids, mode, means=None):
    """Plain eager HF Llama; the head's slice of o_proj's input replaced by a pre-hook."""
    ref = eager_model(model.source)
    d = ref.config.hidden_size // ref.config.num_attention_heads
    group = ref.config.num_attention_heads // ref.config.num_key_value_heads
    handles, values = [], {}
    for layer in {lyr for lyr, _ in HEADS}:
        attn = ref.model.layers[layer].self_attn
        heads = [h for lyr, h in HEADS if lyr == layer]
        handles.append(attn.v_proj.register_forward_hook(lambda m, i, o, layer=layer: values.__setitem__(layer, o)))

        def pre(m, args, layer=layer, heads=heads):
            z = args[0].clone()  # [b, t, heads * d]
            for h in heads:
                if mode == "zero":
                    z[..., h * d : (h + 1) * d] = 0
                elif mode == "mean":
                    z[..., h * d : (h + 1) * d] = means[layer, h]
                else:
                    kv = h // group
                    z[..., h * d : (h + 1) * d] = values[layer][:, :1, kv * d : (kv + 1) * d]
            return (z,)

        handles.append(attn.o_proj.register_forward_pre_hook(pre))
    with torch.no_grad():
        out = ref(torch.tensor([ids])).logits
    for h in handles:
        h.remove()
    return out


@pytest.mark.parametrize("mode", ["zero", "mean", "first"])
def test_ablation_equals_hand_edit(tiny_models, mode):
    model = tiny_models["llama"]
    ids = random_prompts(model.vocab_size, [15], seed=4)[0].ids
    means = head_means(model, random_prompts(model.vocab_size, [10, 20, 5], seed=8)) if mode == "mean" else None
    with torch.no_grad(), native_attention(model.hf_model), observe(HeadAblation(HEADS, mode, means)):
        got = model.hf_model(torch.tensor([ids])).logits
    with torch.no_grad(), native_attention(model.hf_model):
        clean = model.hf_model(torch.tensor([ids])).logits
    want = reference_logits(model, ids, mode, means)
    assert (got - want).abs().max() < 1e-4
    assert (got - clean).abs().max() > 1e-3, "the ablation must change something"


def test_head_means_equal_a_direct_average(tiny_models):
    model = tiny_models["llama"]
    prompts = random_prompts(model.vocab_size, [10, 20, 5], seed=8)
    got = head_means(model, prompts, batch_size=2)
    ref = eager_model(model.source)
    zs = {}
    hooks = [
        ref.model.layers[layer].self_attn.o_proj.register_forward_pre_hook(
            lambda m, a, layer=layer: zs.setdefault(layer, []).append(a[0][0])
        )
        for layer in range(3)
    ]
    with torch.no_grad():
        for p in prompts:
            ref(torch.tensor([p.ids]))
    for h in hooks:
        h.remove()
    for layer in range(3):
        z = torch.cat(zs[layer]).view(-1, 4, 16).mean(0)
        assert (got[layer] - z).abs().max() < 1e-5


def test_parse_heads():
    assert parse_heads("1.2, 0.0,1.2", 3, 4) == [(1, 2), (0, 0)]
    for bad in ("3.0", "0.4", "x.1", "1", ""):
        with pytest.raises(WorkbenchError):
            parse_heads(bad, 3, 4)


def test_cli_ablate_out_of_range(tmp_path, capsys):
    from workbench.cli import main

    rc = main(
        [
            "probe",
            "entropy",
            "--model",
            "tiny-llama",
            "--n-prompts",
            "2",
            "--ablate",
            "7.1",
            "--out",
            str(tmp_path / "r.parquet"),
        ]
    )
    err = capsys.readouterr().err
    assert rc == 2 and "head 7.1 is out of range" in err and not (tmp_path / "r.parquet").exists()
