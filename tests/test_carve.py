# ruff: noqa: F811 (the fixtures of test_vhd, imported by name, are the tests' arguments)
"""CARVE visual attention entropy on tiny LLaVA and Gemma 3, against CARVE's own loop (no KV
cache, eager attentions, one unpadded item at a time); the probe runs padded batches."""

from __future__ import annotations

import math

import pytest
import torch

from probes.carve import CARVEProbe
from tests.test_vhd import FAMILIES, _text, items, plain, vlm_dirs, vlms  # noqa: F401 (fixtures)
from workbench.engine.divergence import _eos_ids
from workbench.inputs.conditions import load_image
from workbench.runner import run_probes


def carve_reference(hf, processor, model, item, max_new_tokens, renormalise=True):
    """CARVE's generate_with_attention: recompute the whole sequence each step with
    output_attentions; at the last step, the last row over the image tokens. Returns the
    generated ids, per-head entropies [layer, head] and head-averaged entropies [layer]."""
    enc = processor(text=[_text(model, item.text)], images=[[load_image(item.meta["image"])]], return_tensors="pt")
    cfg = hf.config
    tid = cfg.image_token_id if isinstance(getattr(cfg, "image_token_id", None), int) else cfg.image_token_index
    ids = enc["input_ids"]
    image = ids[0] == tid
    extra = {k: v for k, v in enc.items() if k not in ("input_ids", "attention_mask")}
    eos = _eos_ids(model)
    out_ids = []
    for _ in range(max_new_tokens):
        n = ids.shape[1]
        grown = {
            k: torch.nn.functional.pad(v, (0, n - v.shape[1])) if k == "token_type_ids" else v for k, v in extra.items()
        }
        with torch.no_grad():
            out = hf(input_ids=ids, attention_mask=torch.ones_like(ids), output_attentions=True, **grown)
        nxt = int(out.logits[0, -1].argmax())
        out_ids.append(nxt)
        maps = [a[0, :, -1][:, : len(image)][:, image].double() for a in out.attentions]  # [head, N_v] per layer
        if nxt in eos:
            break
        ids = torch.cat([ids, torch.tensor([[nxt]])], 1)

    def h(a):
        a = a / a.sum() if renormalise else a
        return -sum(float(x) * math.log(float(x)) for x in a if x > 0)

    per_head = torch.tensor([[h(m[head]) for head in range(m.shape[0])] for m in maps], dtype=torch.float64)
    mean_heads = torch.tensor([h(m.mean(0)) for m in maps], dtype=torch.float64)
    return out_ids, per_head, mean_heads


@pytest.mark.parametrize("renormalise", [True, False])
@pytest.mark.parametrize("arch", FAMILIES)
def test_carve_equals_the_authors_loop(arch, renormalise, vlms, plain, items):
    model, (hf, processor) = vlms[arch], plain[arch]
    probe = CARVEProbe(max_new_tokens=3, layers=[1, 2], renormalise=renormalise)
    df = run_probes(model, items, [probe], batch_size=3).table  # 4 items of unequal lengths
    heads, h_items = [], []
    for item, toks in zip(items, probe.tokens):
        gen, per_head, mean_heads = carve_reference(hf, processor, model, item, 3, renormalise)
        assert gen == toks
        heads.append(per_head)
        got = df[(df.metric == "carve_entropy") & (df["item"] == item.id)].value
        assert len(got) == 1 and float(got.iloc[0]) == pytest.approx(float(mean_heads[[1, 2]].mean()), abs=1e-5)
        h_items.append(mean_heads)
    table = torch.tensor(
        df[df.metric == "visual_entropy"].pivot(index="layer", columns="head", values="value").to_numpy()
    )
    expect = torch.stack(heads).mean(0)
    assert torch.allclose(table, expect, atol=1e-5), (table - expect).abs().max()
    assert expect.std() > 1e-3  # the entropies vary across heads: the test can fail


def test_renormalised_entropy_is_bounded_and_differs_from_the_raw_slice(vlms, items):
    model = vlms["llava"]
    a = CARVEProbe(max_new_tokens=2)
    b = CARVEProbe(max_new_tokens=2, renormalise=False)
    ta = run_probes(model, items, [a], batch_size=4).table
    tb = run_probes(model, items, [b], batch_size=4).table
    va, vb = ta[ta.metric == "visual_entropy"].value, tb[tb.metric == "visual_entropy"].value
    assert (abs(va.to_numpy() - vb.to_numpy()) > 1e-3).any()
    assert va.max() <= math.log(16) + 1e-6  # tiny LLaVA: 16 image tokens
