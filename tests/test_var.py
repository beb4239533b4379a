# ruff: noqa: F811 (the fixtures of test_vhd, imported by name, are the tests' arguments)
"""VAR visual sinks and image-centric heads on tiny LLaVA and Gemma 3, against eager hidden states
and eager attentions, one unpadded item at a time; the probe runs padded batches of unequal lengths."""

from __future__ import annotations

import pytest
import torch

from probes.var import VARProbe
from tests.test_vhd import FAMILIES, _text, items, plain, vlm_dirs, vlms  # noqa: F401 (fixtures)
from workbench.inputs.conditions import load_image
from workbench.runner import run_probes


def eager_run(hf, processor, model, item):
    enc = processor(text=[_text(model, item.text)], images=[[load_image(item.meta["image"])]], return_tensors="pt")
    with torch.no_grad():
        out = hf(**enc, output_hidden_states=True, output_attentions=True)
    cfg = hf.config  # the tokens carrying the image (Gemma: the soft tokens, not begin/end of image)
    tid = cfg.image_token_id if isinstance(getattr(cfg, "image_token_id", None), int) else cfg.image_token_index
    return enc["input_ids"][0], out, enc["input_ids"][0] == tid


def phi_reference(x, dims):
    """max over dims of |x_d / RMS(x)|, RMS with eps 1e-6, per token."""
    x = x.double()
    rms = (x.pow(2).mean(-1, keepdim=True) + 1e-6).sqrt()
    return (x / rms).abs()[:, dims].max(-1).values


def var_reference(runs, dims, tau, summ, rho, require=True):
    """Sums over (item, text query after the image) of r, image-centric and a_img, per
    (layer, head), and the number of queries: plain loops from the definition."""
    n_layers = len(runs[0][1].attentions)
    n_heads = runs[0][1].attentions[0].shape[1]
    sums = {k: torch.zeros(n_layers, n_heads, dtype=torch.float64) for k in ("ratio", "centric", "image")}
    n = 0
    for ids, out, image in runs:
        last = int(torch.nonzero(image).max())
        queries = range(last + 1, len(ids))
        n += len(queries)
        for layer in range(n_layers):
            sink = image & (phi_reference(out.hidden_states[layer][0], dims) > tau)
            att = out.attentions[layer][0].double()
            for head in range(n_heads):
                for q in queries:
                    a_img = float(att[head, q][image].sum())
                    r = 1 - float(att[head, q][sink].sum()) / a_img if a_img > 0 else 1.0
                    ok = a_img >= summ and r >= rho and (bool(sink.any()) or not require)
                    sums["ratio"][layer, head] += r
                    sums["centric"][layer, head] += ok
                    sums["image"][layer, head] += a_img
    return {k: v / n for k, v in sums.items()}, n


def table_of(df, metric):
    return torch.tensor(df[df.metric == metric].pivot(index="layer", columns="head", values="value").to_numpy())


@pytest.fixture(scope="module")
def runs(vlms, plain, items):
    return {arch: [eager_run(*plain[arch], vlms[arch], it) for it in items] for arch in FAMILIES}


def sink_setting(runs):
    """D_sink and tau chosen so that the tiny random model has some sinks and some non-sinks:
    the two largest dims of the first image token at layer 1, tau halfway between the middle two
    phi of the image tokens over all layers."""
    ids, out, image = runs[0]
    first = int(torch.nonzero(image).min())
    x = out.hidden_states[1][0, first].double()
    dims = (x / x.pow(2).mean().sqrt()).abs().topk(2).indices.tolist()
    phis = torch.cat([phi_reference(h[0], dims)[img] for _, o, img in runs for h in o.hidden_states[:-1]])
    phis = phis.sort().values
    k = len(phis) // 2
    assert phis[k + 1] - phis[k] > 1e-4  # tau between two values: no token sits on it
    return dims, float(phis[k] + phis[k + 1]) / 2


@pytest.mark.parametrize("arch", FAMILIES)
def test_var_metrics_equal_eager_loops(arch, vlms, items, runs):
    model, ref_runs = vlms[arch], runs[arch]
    dims, tau = sink_setting(ref_runs)
    probe = VARProbe(sink_dims=dims, tau=tau, summ=0.2, rho=0.5)
    result = run_probes(model, items, [probe], batch_size=3)  # 4 items of different lengths, padded
    df = result.table
    ref, n = var_reference(ref_runs, dims, tau, 0.2, 0.5)
    assert (df.n == n).all()
    for metric, key in (
        ("visual_nonsink_ratio", "ratio"),
        ("image_centric_rate", "centric"),
        ("visual_attention", "image"),
    ):
        got = table_of(df, metric)
        assert torch.allclose(got, ref[key], atol=1e-5), (metric, (got - ref[key]).abs().max())
    # the setting is not degenerate: some sinks, some non-sinks, some image-centric queries, some not
    assert ((ref["ratio"] > 0) & (ref["ratio"] < 1)).any()
    assert ref["centric"].max() > 0 and ref["centric"].min() < 1
    # without sinks the ratio is 1 and the rule selects nothing (require_sinks)
    none = VARProbe(sink_dims=dims, tau=1e6)
    df0 = run_probes(model, items, [none], batch_size=3).table
    assert torch.allclose(table_of(df0, "visual_nonsink_ratio"), torch.ones_like(ref["ratio"]))
    assert (table_of(df0, "image_centric_rate") == 0).all()


@pytest.mark.parametrize("arch", FAMILIES)
def test_sink_dims_found_from_the_first_token(arch, vlms, items, runs):
    """Empty sink_dims: the dims where the first token's |x_d / RMS(x)| > tau entering dim_layer."""
    model, ref_runs = vlms[arch], runs[arch]

    def normalised(out):
        x = out.hidden_states[1][0, 0].double()  # the first token entering layer 1
        return (x / (x.pow(2).mean() + 1e-6).sqrt()).abs()

    values = normalised(ref_runs[0][1]).sort(descending=True).values
    tau = float(values[2] + values[3]) / 2  # three dims of the first item's first token above tau
    texts = [out for _, out, image in ref_runs if not image[0]]  # items starting with text, not the image
    assert texts
    expect = sorted({d for out in texts for d in torch.nonzero(normalised(out) > tau).flatten().tolist()})
    assert 3 <= len(expect) < model.hf_model.config.get_text_config().hidden_size // 4
    probe = VARProbe(tau=tau, dim_layer=1, summ=0.1, rho=0.3)
    result = run_probes(model, items, [probe], batch_size=4)
    assert result.summaries()["var"]["sink_dims"] == expect
    ref, _ = var_reference(ref_runs, expect, tau, 0.1, 0.3)
    for metric, key in (("visual_nonsink_ratio", "ratio"), ("image_centric_rate", "centric")):
        assert torch.allclose(table_of(result.table, metric), ref[key], atol=1e-5)
