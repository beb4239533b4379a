"""Vision-aware head divergence on tiny LLaVA and Gemma 3 (real processors, generated images),
against plain two-forward recomputations; image replaced by itself; batching; VHR scaling."""

from __future__ import annotations

import pandas as pd
import pytest
import torch

from tests.reference import reference_condition_attention, reference_vhd
from workbench import get_probe
from workbench.datasets import make_dataset
from workbench.inputs.conditions import load_image
from workbench.inputs.prompts import Prompt
from workbench.runner import run_probes

FAMILIES = ["llava", "gemma3"]
IMAGE_TOKENS = {"llava": ["<image>"], "gemma3": ["<start_of_image>", "<image_soft_token>", "<end_of_image>"]}


@pytest.fixture(scope="module")
def vlm_dirs(tmp_path_factory):
    from workbench.models.tiny import make_tiny_model

    root = tmp_path_factory.mktemp("vlm")
    return {arch: make_tiny_model(root / arch, arch, seed=2) for arch in FAMILIES}


@pytest.fixture(scope="module")
def vlms(vlm_dirs):
    from workbench.models.loading import load_model

    return {arch: load_model(str(path), device="cpu") for arch, path in vlm_dirs.items()}


@pytest.fixture(scope="module")
def plain(vlm_dirs):
    """The same folders as plain transformers models (no bridge, eager attention)."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    out = {}
    for arch, path in vlm_dirs.items():
        hf = AutoModelForImageTextToText.from_pretrained(path, attn_implementation="eager").eval()
        out[arch] = (hf, AutoProcessor.from_pretrained(path, backend="pil"))
    return out


@pytest.fixture(scope="module")
def items(tmp_path_factory):
    """Shapes images, and prompts of different lengths around the placeholder."""
    folder = tmp_path_factory.mktemp("shapes")
    shapes = make_dataset("shapes", n_prompts=4, seed=5, folder=str(folder))
    texts = [
        "USER: <image>\nWhat color is the shape? ASSISTANT:",
        "<image> the lord said",
        "and the king of the land said unto them <image> what is it",
        "USER: <image>\nWhat shape ASSISTANT:",
    ]
    return [Prompt(s.id, text=t, meta=dict(s.meta)) for s, t in zip(shapes, texts)]


def _text(model, text: str) -> str:
    return text.replace("<image>", model.processor.image_token)


@pytest.mark.parametrize("arch", FAMILIES)
@pytest.mark.parametrize("steps", ["first", "all"])
def test_vhd_equals_two_plain_forwards(arch, steps, vlms, plain, items):
    model, (hf, processor) = vlms[arch], plain[arch]
    probe = get_probe("vhd", steps=steps, max_new_tokens=3, top_k=2)
    df = run_probes(model, items, [probe], batch_size=3).table  # mixed lengths in one batch
    divs, atts = [], []
    for item, out in zip(items, probe.outcomes):
        gen, ref = reference_vhd(
            hf,
            processor,
            _text(model, item.text),
            load_image(item.meta["image"]),
            max_new_tokens=3 if steps == "all" else 1,
        )
        assert out.tokens == gen
        assert out.divergence.shape == ref.shape
        assert torch.allclose(out.divergence, ref, atol=1e-4), (out.divergence - ref).abs().max()
        assert ref.abs().max() > 1e-3  # the image matters: the test can fail
        # T-VHD: per layer the sum of the top-2 heads, summed over layers
        expect = ref.topk(2, dim=-1).values.sum((-1, -2))
        got = df[(df.metric == "t_vhd") & (df["item"] == item.id)].sort_values("step")["value"].to_numpy()
        assert got == pytest.approx(expect.numpy(), abs=1e-4)
        enc = processor(text=[_text(model, item.text)], images=[[load_image(item.meta["image"])]], return_tensors="pt")
        tok = model.processor.tokenizer
        ids = {tok.convert_tokens_to_ids(t) for t in IMAGE_TOKENS[arch]}
        atts.append(reference_condition_attention(hf, dict(enc), enc["input_ids"].shape[1] - 1, ids))
        divs.append(ref)
    mean = torch.cat(divs).mean(0)
    table = df[df.metric == "vhd"].pivot(index="layer", columns="head", values="value").to_numpy()
    assert table == pytest.approx(mean.numpy(), abs=1e-4)
    if steps == "first":
        att = df[df.metric == "image_attention"].pivot(index="layer", columns="head", values="value").to_numpy()
        assert att == pytest.approx(torch.stack(atts).mean(0).numpy(), abs=1e-4)
        assert att.max() > 0.01


@pytest.mark.parametrize("arch", FAMILIES)
def test_image_replaced_by_itself_gives_zero_and_batching_changes_nothing(arch, vlms, items):
    model = vlms[arch]
    same = [Prompt(i.id, text=i.text, meta={**i.meta, "counter_image": i.meta["image"]}) for i in items]
    probe = get_probe("vhd", steps="all", max_new_tokens=3)
    df = run_probes(model, same, [probe], batch_size=4).table
    assert df[df.metric.isin(["vhd", "t_vhd"])].value.abs().max() < 1e-6
    batched = get_probe("vhd", steps="all", max_new_tokens=3)
    run_probes(model, items, [batched], batch_size=4).table
    for item in items:
        single = get_probe("vhd", steps="all", max_new_tokens=3)
        run_probes(model, [item], [single], batch_size=1).table
        a, b = single.outcomes[0], next(o for o in batched.outcomes if o.id == item.id)
        assert a.tokens == b.tokens
        assert torch.allclose(a.divergence, b.divergence, atol=1e-5)


@pytest.mark.parametrize("positions", ["first", "all"])
def test_head_scaling_matches_a_hand_made_o_proj_hook(positions, vlms, plain, items):
    from workbench.engine.attention import hooked_run
    from workbench.engine.divergence import left_padded_inputs
    from workbench.engine.interventions import HeadScaling
    from workbench.inputs.conditions import image_pair

    model, (hf, processor) = vlms["llava"], plain["llava"]
    heads, alpha = [(1, 2), (2, 0), (2, 3)], 2.5
    item = items[0]
    pair = image_pair(model, item)
    inputs, _ = left_padded_inputs([pair.cond], [[]], 1, "cpu")
    with hooked_run(model.hf_model, HeadScaling(heads, alpha, positions)):
        ours = model.hf_model(**inputs).logits[0]
    d = hf.config.text_config.head_dim

    def scale(mod, args, layer):
        x = args[0].clone()
        for lyr, h in heads:
            if lyr == layer:
                rows = slice(None) if positions == "all" else slice(-1, None)
                x[0, rows, h * d : (h + 1) * d] *= alpha
        return (x,)

    layers = hf.get_decoder().layers
    handles = [
        layers[i].self_attn.o_proj.register_forward_pre_hook(lambda m, a, i=i: scale(m, a, i))
        for i in range(len(layers))
    ]
    try:
        enc = processor(text=[_text(model, item.text)], images=[[load_image(item.meta["image"])]], return_tensors="pt")
        with torch.no_grad():
            ref = hf(**enc).logits[0]
    finally:
        for h in handles:
            h.remove()
    with torch.no_grad():
        unscaled = hf(**enc).logits[0]
    assert torch.allclose(ours, ref, atol=1e-4)
    assert (ref[-1] - unscaled[-1]).abs().max() > 1e-3
    if positions == "first":  # earlier positions untouched
        assert torch.allclose(ours[:-1], unscaled[:-1], atol=1e-4)


def test_vhr_head_selection_follows_the_paper_rule():
    from workbench.experiments.vhr import default_vhr_layers, vhr_heads

    rows = []
    vhd = {0: [1, 2, 3, 4], 1: [4, 3, 2, 1], 2: [1, 1, 9, 2]}
    img = {0: [0.5] * 4, 1: [0.5] * 4, 2: [0.5, 0.5, 0.01, 0.5]}  # 2.2: high VHD and high text attention
    for layer in vhd:
        for head in range(4):
            rows.append({"metric": "vhd", "layer": layer, "head": head, "value": vhd[layer][head]})
            rows.append({"metric": "image_attention", "layer": layer, "head": head, "value": img[layer][head]})
    table = pd.DataFrame(rows)
    assert vhr_heads(table, layers=[0, 1], set_aside=False) == [(0, 2), (0, 3), (1, 0), (1, 1)]
    assert (2, 2) in vhr_heads(table, layers=[2], set_aside=False)
    assert vhr_heads(table, layers=[0, 1, 2]) == [(0, 2), (0, 3), (1, 0), (1, 1), (2, 3)]
    assert default_vhr_layers(32) == [2, *range(18, 32)]


def test_vlm_loads_by_hub_id_from_the_hub_cache(vlm_dirs, tmp_path):
    """The path a user takes with e.g. llava-hf/llava-1.5-7b-hf: transformers' hub resolution
    (here served from the local hub cache, the network being absent) -> AutoProcessor (PIL
    backend) -> the same probe."""
    import os
    import shutil
    import subprocess
    import sys
    import textwrap

    snap = tmp_path / "hub" / "models--llava-hf--tiny-llava" / "snapshots" / ("0" * 40)
    shutil.copytree(vlm_dirs["llava"], snap)
    (snap.parent.parent / "refs").mkdir()
    (snap.parent.parent / "refs" / "main").write_text("0" * 40)
    img = tmp_path / "x.png"
    import random

    from workbench.datasets.shapes import draw

    draw("circle", (200, 0, 0), random.Random(0)).save(img)
    code = textwrap.dedent(
        f"""
        from workbench.models.loading import load_model
        from workbench.inputs.prompts import Prompt
        from workbench import get_probe
        from workbench.runner import run_probes
        m = load_model("llava-hf/tiny-llava", device="cpu")
        prompt = Prompt("a", text="USER: <image> what ASSISTANT:", meta={{"image": {str(img)!r}}})
        df = run_probes(m, [prompt], [get_probe("vhd")]).table
        print(m.info["kind"], type(m.processor.image_processor).__name__, int((df.metric == "vhd").sum()))
        """
    )
    env = {**os.environ, "HF_HUB_CACHE": str(tmp_path / "hub")}
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0, res.stderr
    assert res.stdout.split() == ["hub", "CLIPImageProcessorPil", "12"]


def test_out_of_memory_batches_are_halved_and_give_the_same_numbers(vlms, items):
    """GPU out-of-memory, simulated: any forward over more than one item fails inside the
    attention hook; the engine halves batches down to single items and the numbers equal a
    batch-1 run."""
    from workbench.engine.divergence import divergence
    from workbench.inputs.conditions import image_pair
    from workbench.protocol.run_context import RunContext

    class OOMAboveOne:
        def on_attention(self, call):
            if call.query.shape[0] > 1:
                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    model = vlms["llava"]
    pairs = [image_pair(model, it) for it in items]
    got = divergence(
        model, pairs, steps="all", max_new_tokens=3, ctx=RunContext(batch_size=4), observers=[OOMAboveOne()]
    )
    ref = divergence(model, pairs, steps="all", max_new_tokens=3, ctx=RunContext(batch_size=1))
    for a, b in zip(got, ref):
        assert a.tokens == b.tokens and torch.allclose(a.divergence, b.divergence, atol=1e-6)

    class AlwaysOOM:
        def on_attention(self, call):
            raise torch.OutOfMemoryError("CUDA out of memory")

    from workbench.errors import WorkbenchError

    with pytest.raises(WorkbenchError, match="out of memory on a single item"):
        divergence(model, pairs[:2], ctx=RunContext(batch_size=2), observers=[AlwaysOOM()])
