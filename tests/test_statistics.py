"""Statistics from the kernel's log-sum-exp against the chunked reference path.

The same probes run through both paths (``attention_path="auto"``: layer statistics from the
fused kernel's lse; ``"chunks"``: full pattern chunks) on padded batches of unequal lengths,
grouped KV heads, sliding-window layers and soft-capped layers (which fall back to chunks); the
views are also compared one method at a time on random calls with every kind of mask; the
kernel's output is SDPA's; the CUDA branch is checked by simulation (which kernel, shapes,
dtypes), GPU timings are not measured here.
"""

from __future__ import annotations

import os
import random

import pandas as pd
import pytest
import torch

from tests.test_metrics import TOL, lookup
from workbench import get_probe
from workbench.engine import kernels, statistics
from workbench.engine.call import AttentionCall
from workbench.engine.extraction import ChunkFeeder
from workbench.engine.kernels import attention_with_statistics, choose_kernel
from workbench.engine.masking import attention_probs, key_visibility
from workbench.engine.patterns import collate, iter_pattern_chunks, same_token_ranges
from workbench.engine.statistics import LayerStatistics
from workbench.inputs.prompts import TokenizedPrompt
from workbench.runner import run_probes

ALL = ("entropy", "sink", "induction", "streaming")


def probes(**streaming):
    return [
        get_probe("entropy"),
        get_probe("sink"),
        get_probe("induction"),
        get_probe("streaming", **(streaming or {"sink": 2, "recent": 5})),
    ]


def prompts_for(model, lengths=(40, 13, 29, 8, 1), seed=0):
    """Random prompts of unequal lengths, one with repeats (echo) and two repeated-random ones."""
    from workbench.datasets import make_dataset
    from workbench.inputs.prompts import tokenize_prompts

    rng = random.Random(seed)
    out = [
        TokenizedPrompt(f"r{i}", [rng.randrange(4, model.vocab_size) for _ in range(n)]) for i, n in enumerate(lengths)
    ]
    out.append(TokenizedPrompt("small-alphabet", [rng.randrange(4, 12) for _ in range(37)]))
    rep = make_dataset("repeated-random", n_prompts=2, seed=seed, tokenizer=model.tokenizer, period=7)
    return out + tokenize_prompts(rep, model.tokenizer, model.n_ctx, model.vocab_size)


class Count:
    """Counts LayerStatistics built while active (so a test knows which path ran)."""

    def __init__(self, monkeypatch):
        self.n = 0
        orig = LayerStatistics.__init__

        def spy(this, *a, **k):
            self.n += 1
            orig(this, *a, **k)

        monkeypatch.setattr(LayerStatistics, "__init__", spy)


def compare_paths(model, prompts, batch_size=4, **kw):
    auto = run_probes(model, prompts, probes(), batch_size=batch_size, progress=False, **kw).table
    ref = run_probes(
        model, prompts, probes(), batch_size=batch_size, progress=False, attention_path="chunks", **kw
    ).table
    metrics = sorted(set(ref.metric))
    assert len(metrics) == 9 and len(auto) == len(ref)
    for metric in metrics:
        got, want = lookup(auto, metric), lookup(ref, metric)
        worst = max(abs(got[k][0] - want[k][0]) for k in want if want[k][1] > 0)
        assert worst <= TOL, f"{metric}: max abs diff {worst}"
        assert all(got[k][1] == want[k][1] for k in want), metric
    return auto


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_both_paths_agree_on_padded_batches(tiny_models, arch, monkeypatch):
    model = tiny_models[arch]
    count = Count(monkeypatch)
    compare_paths(model, prompts_for(model))
    assert count.n > 0, "the statistics path ran"


def test_both_paths_agree_with_small_budgets(tiny_models):
    """A tiny chunk budget splits every statistic into many pieces: same numbers."""
    model = tiny_models["llama"]
    compare_paths(model, prompts_for(model, seed=3), batch_size=3, chunk_elements=300)


def _save(tmp_path, cfg, scale_qk=4.0):
    from tests.tiny_gemma import save_tiny
    from workbench.models.loading import load_model

    return load_model(str(save_tiny(tmp_path, cfg, scale_qk)), device="cpu")


def test_both_paths_agree_on_sliding_window_layers(tmp_path, monkeypatch):
    """Gemma 3 text: sliding-window layers (boolean masks, window 6 < the prompts) next to a
    global one, grouped KV heads, query_pre_attn_scalar scaling."""
    from transformers import Gemma3TextConfig

    cfg = Gemma3TextConfig(
        vocab_size=512,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=128,
        sliding_window=6,
        layer_types=["sliding_attention", "full_attention", "sliding_attention"],
        query_pre_attn_scalar=16,
        bos_token_id=2,
        eos_token_id=3,
        pad_token_id=1,
    )
    model = _save(tmp_path, cfg)
    seen = []

    class Masks:
        def on_attention(self, call):
            seen.append(None if call.mask is None else call.mask.dtype)

    count = Count(monkeypatch)
    from workbench.runner import RunContext  # noqa: F401  (interventions are observers too)

    auto = compare_paths(model, prompts_for(model), interventions=[Masks()])
    assert count.n > 0 and torch.bool in seen
    # the window bounds entropy_norm's denominator: ln(min(q + 1, 6)) keeps it in [0, 1]
    norm = auto[auto.metric == "entropy_norm"].value
    assert norm.between(0, 1).all()


def test_softcapped_layers_fall_back_to_chunks(tmp_path, monkeypatch):
    """Gemma 2 soft-caps its logits, which no fused kernel does: every probe reads chunks there,
    and the numbers are the chunked path's."""
    from tests.tiny_gemma import gemma_config

    model = _save(tmp_path, gemma_config("gemma2"), scale_qk=8.0)
    count = Count(monkeypatch)
    compare_paths(model, prompts_for(model, lengths=(20, 9, 14)))
    assert count.n == 0


def test_both_paths_agree_on_tiny_gemma3_text(tmp_path, monkeypatch):
    """The project's tiny Gemma 3 text model (window 8 on layers 0, 1, 3, global layer 2, 4 query
    heads on 2 KV heads, BOS) with prompts several windows long, padded, in two batch sizes."""
    from tests.test_gemma3 import tiny_prompts
    from workbench.models.loading import load_model
    from workbench.models.tiny import make_tiny_model

    model = load_model(str(make_tiny_model(tmp_path / "g", "gemma3_text", seed=1)), device="cpu")
    assert model.n_kv_heads < model.n_heads
    ps = tiny_prompts(model)
    assert max(len(p) for p in ps) > 4 * 8 and len({len(p) for p in ps}) == len(ps)
    count = Count(monkeypatch)
    for batch_size in (5, 2):
        compare_paths(model, ps, batch_size=batch_size)
    assert count.n > 0


def test_grouped_kv_heads_are_read_per_query_head(tiny_models):
    """GQA (tiny Llama: 4 query heads on 2 KV heads): every query head's weights come from its
    own KV head on both paths (the per-head numbers differ across a group and still agree)."""
    model = tiny_models["llama"]
    assert model.n_kv_heads < model.n_heads
    auto = compare_paths(model, prompts_for(model, seed=5), batch_size=8)
    sink = auto[auto.metric == "sink_mass"].pivot(index="layer", columns="head", values="value")
    assert sink.nunique(axis=1).min() == model.n_heads  # heads of one group are not copies


@pytest.mark.gemma3
def test_both_paths_agree_on_gemma3_beyond_the_window(gemma3, monkeypatch):
    """Gemma-3-270M with prompts beyond its 512-key window (one padded batch of ~700, ~560 and a
    short prompt): sliding and global layers, one KV head for four query heads."""
    from tests.test_gemma3 import gemma_prompts

    count = Count(monkeypatch)
    compare_paths(gemma3, gemma_prompts(gemma3), batch_size=3)
    assert count.n > 0


@pytest.mark.smollm2
def test_both_paths_agree_on_smollm2(smollm2):
    from workbench.datasets import make_dataset
    from workbench.inputs.prompts import tokenize_prompts

    prose = tokenize_prompts(
        make_dataset("prose", n_prompts=3, seed=7, min_words=20, max_words=120),
        smollm2.tokenizer,
        smollm2.n_ctx,
        smollm2.vocab_size,
    )
    rep = tokenize_prompts(
        make_dataset("repeated-random", n_prompts=2, seed=1, tokenizer=smollm2.tokenizer, period=40),
        smollm2.tokenizer,
        smollm2.n_ctx,
        smollm2.vocab_size,
    )
    assert len({len(p) for p in prose}) == 3
    compare_paths(smollm2, prose + rep, batch_size=5)


# -- the two views, one method at a time, on random calls -------------------------------------
def random_call(mask_kind, b=2, h=4, kv=2, n=23, d=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (
        torch.randn(b, h, n, d, generator=g) * 2,
        torch.randn(b, kv, n, d, generator=g) * 2,
        torch.randn(b, kv, n, d, generator=g),
    )
    lengths = [n, n - 9]
    batch = collate([list(range(4, 4 + m)) for m in lengths], 0)
    causal = torch.ones(n, n, dtype=torch.bool).tril()
    real = batch.attention_mask.bool()[:, None, None, :]
    mask, is_causal = None, False
    if mask_kind == "none":
        batch = collate([list(range(4, 4 + n))] * b, 0)
        is_causal = True
    elif mask_kind == "padding":
        mask = causal & real
    elif mask_kind == "window":
        i = torch.arange(n)
        mask = causal & (i[:, None] - i[None, :] < 5) & real
    elif mask_kind == "additive":
        bias = torch.randn(b, 1, n, n, generator=g) * 0.5
        mask = bias.masked_fill(~(causal & real), torch.finfo(torch.float32).min)
    call = AttentionCall(0, None, q, k, v, mask, 0.35, is_causal)
    _, call.lse, call.key_mean = attention_with_statistics(call, key_mean=mask_kind != "additive")
    # token ids with repeats, for the same-token ranges
    ids = torch.randint(4, 9, (b, n), generator=g)
    batch.input_ids = torch.where(batch.valid, ids, 0)
    return call, batch


def chunked(call, batch, fn, budget=40):
    """fn(chunk) for every chunk of a small budget, concatenated along the queries."""
    return torch.cat([fn(c) for c in iter_pattern_chunks(call, batch, budget)], dim=2)


@pytest.mark.parametrize("mask_kind", ["none", "padding", "window", "additive"])
def test_views_answer_the_same(mask_kind):
    call, batch = random_call(mask_kind)
    stats = LayerStatistics(
        call, batch, key_visibility(call).n_visible(call.query.shape[0], call.query.device), chunk_elements=64
    )
    valid = stats.query_valid.unsqueeze(1)
    b, n = batch.input_ids.shape
    pos = batch.positions
    close = lambda got, want: torch.allclose(got * valid, want * valid, atol=1e-5)  # noqa: E731
    keys = torch.stack([pos - 1, pos - 4, torch.full_like(pos, -1), pos + 2, torch.full_like(pos, 3)], dim=-1)
    assert close(stats.probs_at(keys).sum(-1), chunked(call, batch, lambda c: c.probs_at(keys[:, c.queries]).sum(-1)))
    assert close(stats.probs_at(pos - 2), chunked(call, batch, lambda c: c.probs_at((pos - 2)[:, c.queries])))
    first = torch.tensor([0, 1])
    assert close(stats.key_probs(first), chunked(call, batch, lambda c: c.key_probs(first)))
    for lo, hi in ((pos - 6, pos + 1), (torch.zeros_like(pos), torch.full_like(pos, 3)), (pos - 13, pos - 2)):
        assert close(
            stats.mass_in(lo, hi), chunked(call, batch, lambda c: c.mass_in(lo[:, c.queries], hi[:, c.queries]))
        )
    rank, lo, hi = same_token_ranges(batch)
    assert bool((hi > lo).any())
    assert close(
        stats.mass_in(lo, hi, rank), chunked(call, batch, lambda c: c.mass_in(lo[:, c.queries], hi[:, c.queries], rank))
    )
    # against the pattern itself: the weight on every key, summed, is 1 per visible row
    every = torch.arange(n).expand(b, n, n)
    assert close(stats.probs_at(every).sum(-1), torch.ones(b, 1, n))
    if mask_kind != "additive":
        assert close(stats.row_entropy, chunked(call, batch, lambda c: c.row_entropy))
        p = attention_probs(call).double()
        ent = -(p * p.clamp_min(1e-300).log()).sum(-1)
        assert close(stats.row_entropy.double(), ent)


@pytest.mark.parametrize("mask_kind", ["none", "padding", "window", "additive"])
@pytest.mark.parametrize("merge", [0, 1 << 14])
def test_banded_products_over_many_blocks(monkeypatch, mask_kind, merge):
    """Key ranges over blocks of 4 queries (several widths unless merged): windows that start
    late or widen midway (the blocks' keys a whole block apart only where that covers every
    range) and same-token ranges (queries without an earlier copy and keys no range covers are
    left out of the blocks) against the chunked rows."""
    monkeypatch.setattr(statistics, "BLOCK", 4)
    monkeypatch.setattr(statistics, "MERGE_SCORES", merge)
    for seed in range(3):
        call, batch = random_call(mask_kind, n=29, seed=seed)
        stats = LayerStatistics(
            call, batch, key_visibility(call).n_visible(call.query.shape[0], call.query.device), chunk_elements=1 << 14
        )
        valid = stats.query_valid.unsqueeze(1)
        pos = batch.positions
        late = pos >= 11  # ranges of more than 8 keys: banded products, not named keys
        ranges = [
            (torch.where(late, pos - 9, 0), torch.where(late, pos + 1, 0)),  # a window from query 11 on
            (torch.where(pos < 13, pos - 9, pos - 14), pos + 1),  # a window that widens
            (torch.where(pos % 9 == 4, pos - 20, pos - 9), pos + 1),  # one query in nine reaches further back
        ]
        for lo, hi in ranges:
            want = chunked(call, batch, lambda c: c.mass_in(lo[:, c.queries], hi[:, c.queries]))  # noqa: B023
            assert torch.allclose(stats.mass_in(lo, hi) * valid, want * valid, atol=1e-5)
        rank, lo, hi = same_token_ranges(batch)
        want = chunked(call, batch, lambda c: c.mass_in(lo[:, c.queries], hi[:, c.queries], rank))
        assert torch.allclose(stats.mass_in(lo, hi, rank) * valid, want * valid, atol=1e-5)


def test_same_token_ranges_name_earlier_occurrences():
    batch = collate([[5, 6, 5, 7, 5, 6, 8], [7, 7, 3, 7]], 0)
    rank, lo, hi = same_token_ranges(batch)
    ids = batch.input_ids.tolist()
    for r in range(2):
        for q in range(batch.input_ids.shape[1]):
            named = {k for k in range(ids[r].__len__()) if lo[r, q] <= rank[r, k] < hi[r, q]}
            want = {k for k in range(q) if batch.valid[r, q] and batch.valid[r, k] and ids[r][k] == ids[r][q]}
            assert named == want, (r, q)


def test_statistics_hold_no_rows():
    call, batch = random_call("padding")
    stats = LayerStatistics(call, batch, key_visibility(call).n_visible(2, call.query.device))
    with pytest.raises(AttributeError, match="needs = \\('rows',\\)"):
        stats.probs  # noqa: B018


# -- the engine: who gets which view, and the kernel's output -----------------------------------
def test_each_probe_gets_the_view_it_needs():
    """A probe that reads rows gets chunks while the others share one LayerStatistics; under a
    float mask entropy falls back to chunks (the identity leaves the bias out), sink does not."""
    from probes.base import PatternProbe

    class Rows(PatternProbe):
        name, metrics, description = "rows", ("rows",), "reads rows"

        def on_pattern_chunk(self, chunk):
            seen.append(("rows", type(chunk).__name__))

        def results(self):
            return None

    seen: list = []
    for mask_kind, entropy_view in (("padding", "LayerStatistics"), ("additive", "PatternChunk")):
        call, batch = random_call(mask_kind)
        ps = [get_probe("entropy"), get_probe("sink"), Rows()]
        feeder = ChunkFeeder(ps, 1 << 20)
        for p in ps:
            p.setup(1, 4, "cpu")
            p.begin_batch(batch)
        feeder.batch = batch
        wants = feeder.wants_statistics(call)
        assert wants == ({"lse", "key_mean"} if mask_kind == "padding" else {"lse"})
        call.key_mean = call.key_mean if "key_mean" in wants else None
        views = {}
        for p in ps[:2]:
            orig = p.on_pattern_chunk
            p.on_pattern_chunk = lambda c, orig=orig, name=p.name: (views.setdefault(name, type(c).__name__), orig(c))
        seen.clear()
        feeder.on_attention(call)
        assert views == {"entropy": entropy_view, "sink": "LayerStatistics"}
        assert seen and all(v == "PatternChunk" for _, v in seen)
    assert ChunkFeeder(ps, 1 << 20, "chunks").wants_statistics(call) == frozenset()


@pytest.mark.parametrize("mask_kind", ["none", "padding", "window"])
def test_kernel_output_is_sdpa(mask_kind):
    """The fused call gives exactly what transformers' SDPA integration gives (grouped KV
    heads), and its lse is the log-partition of the model's own scores."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    call, _ = random_call(mask_kind)

    class Module(torch.nn.Module):
        num_key_value_groups, is_causal = 2, True

    z, lse, _ = attention_with_statistics(call)
    want, _ = sdpa_attention_forward(
        Module(), call.query, call.key, call.value, call.mask, scaling=call.scaling, is_causal=call.is_causal or None
    )
    assert torch.equal(z, want)
    from workbench.engine.masking import attention_scores

    s, _ = attention_scores(call)
    ref = torch.logsumexp(s, -1)
    ok = torch.isfinite(ref)
    assert torch.allclose(lse[ok], ref[ok], atol=1e-5)


def test_models_give_the_same_logits_with_statistics_on(tiny_models):
    """Asking for statistics changes how a layer's output is computed, not what it is."""
    from workbench.engine.attention import hooked_run

    model = tiny_models["llama"]
    ids = torch.randint(4, 500, (2, 17))
    mask = torch.ones_like(ids)
    mask[1, 12:] = 0

    class Wants:
        def wants_statistics(self, call):
            return {"lse", "key_mean"}

        def on_attention(self, call):
            assert call.lse is not None and call.key_mean is not None

    with hooked_run(model.hf_model):
        plain = model.hf_model(input_ids=ids, attention_mask=mask).logits
    with hooked_run(model.hf_model, Wants()):
        fused = model.hf_model(input_ids=ids, attention_mask=mask).logits
    assert torch.allclose(plain, fused, atol=1e-6)


# -- CUDA, simulated ---------------------------------------------------------------------------
# Without a GPU only two things are replaced: the device check (kernels.device_type says "cuda")
# and the two CUDA aten ops, by fakes that bind their arguments to the ops' real schemas, check
# what the CUDA kernels require, and compute with the CPU kernel in float32, returning what the
# CUDA ops return (flash: lse [b, h, q]; memory-efficient: lse padded to a multiple of 32 rows).
# The engine's own code (kernel choice, KV-head repetition, bias alignment, lse cut, float32
# statistics) runs unchanged. GPU timings are not measured here.
_CPU_OP = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
_SCHEMAS = {
    name: getattr(torch.ops.aten, name).default._schema
    for name in ("_scaled_dot_product_flash_attention", "_scaled_dot_product_efficient_attention")
}


def _bind(name, args, kwargs) -> dict:
    """The call's arguments by name, checked against the op's schema (count, names, required)."""
    schema = _SCHEMAS[name]
    positional = [a.name for a in schema.arguments if not a.kwarg_only]
    names = [a.name for a in schema.arguments]
    assert len(args) <= len(positional), f"too many positional arguments for {schema.name}"
    bound = dict(zip(positional, args))
    assert set(kwargs) <= set(names) - set(bound), f"bad keywords {set(kwargs)} for {schema.name}"
    bound.update(kwargs)
    missing = [a.name for a in schema.arguments if not a.has_default_value() and a.name not in bound]
    assert not missing, f"{schema.name}: missing {missing}"
    return bound


class FakeCudaOps:
    def __init__(self, monkeypatch):
        self.calls: list[dict] = []
        monkeypatch.setattr(kernels, "device_type", lambda t: "cuda")
        monkeypatch.setattr(torch.ops.aten, "_scaled_dot_product_flash_attention", self.flash)
        monkeypatch.setattr(torch.ops.aten, "_scaled_dot_product_efficient_attention", self.efficient)

    def _run(self, name, a, bias):
        q, k, v = a["query"], a["key"], a["value"]
        assert q.shape[:2] == k.shape[:2] == v.shape[:2], "CUDA kernels get as many KV heads as query heads"
        assert a.get("dropout_p", 0.0) == 0.0
        self.calls.append(
            {
                "name": name,
                "dtype": q.dtype,
                "shape": tuple(q.shape),
                "causal": a.get("is_causal", False),
                "bias": None if bias is None else (bias.dtype, tuple(bias.shape), bias.stride()),
            }
        )
        f = lambda t: None if t is None else t.float()  # noqa: E731
        out, lse = _CPU_OP(f(q), f(k), f(v), 0.0, a.get("is_causal", False), attn_mask=f(bias), scale=a.get("scale"))
        return out.to(q.dtype), lse

    def flash(self, *args, **kwargs):
        a = _bind("_scaled_dot_product_flash_attention", args, kwargs)
        assert a["query"].dtype in (torch.float16, torch.bfloat16) and a["query"].shape[-1] <= 256
        out, lse = self._run("cuda_flash", a, None)
        z = torch.zeros(())
        return out, lse, z, z, 0, 0, z, z, z

    def efficient(self, *args, **kwargs):
        a = _bind("_scaled_dot_product_efficient_attention", args, kwargs)
        assert a["compute_log_sumexp"] is True
        bias = a["attn_bias"]
        if bias is not None:
            assert bias.dtype == a["query"].dtype and bias.dim() == 4 and bias.stride(2) % 16 == 0
        out, lse = self._run("cuda_efficient", a, bias)
        lse = torch.nn.functional.pad(lse, (0, (-lse.shape[-1]) % 32), value=7.0)  # 32-row padding, garbage
        z = torch.zeros(())
        return out, lse, z, z


def test_cuda_kernel_choice():
    assert choose_kernel("cuda", torch.bfloat16, 64, False) == "cuda_flash"
    assert choose_kernel("cuda", torch.float16, 256, False) == "cuda_flash"
    assert choose_kernel("cuda", torch.float32, 64, False) == "cuda_efficient"
    assert choose_kernel("cuda", torch.bfloat16, 64, True) == "cuda_efficient"
    assert choose_kernel("cuda", torch.float16, 512, False) == "cuda_efficient"
    assert choose_kernel("cpu", torch.bfloat16, 64, True) == "cpu_flash"
    with pytest.raises(ValueError):
        choose_kernel("mps", torch.float32, 64, False)


@pytest.mark.parametrize("mask_kind", ["none", "padding", "window"])
def test_cuda_dispatch_shapes_and_dtypes(monkeypatch, mask_kind):
    """bf16 inputs on the simulated GPU: flash without a mask, memory-efficient with one (KV heads
    repeated, the bias in bf16, expanded and 16-aligned), the keys-as-values pass in float32
    (memory-efficient), the lse cut from its 32-row padding; output bf16 in the model's layout,
    statistics float32 and equal to the float32 CPU kernel's."""
    ops = FakeCudaOps(monkeypatch)
    call, _ = random_call(mask_kind, n=21)
    ops.calls.clear()
    call32 = AttentionCall(0, None, call.query, call.key, call.value, call.mask, call.scaling, call.is_causal)
    call.query, call.key, call.value = (t.bfloat16() for t in (call.query, call.key, call.value))
    assert kernels.fusable(call)
    z, lse, km = attention_with_statistics(call, key_mean=True)
    first, second = ops.calls
    assert (
        first["name"] == ("cuda_flash" if mask_kind == "none" else "cuda_efficient")
        and first["dtype"] == torch.bfloat16
    )
    assert first["shape"] == (2, 4, 21, 8) and first["causal"] == (mask_kind == "none")
    assert second["name"] == "cuda_efficient" and second["dtype"] == torch.float32  # E_A[k] in float32
    if mask_kind != "none":
        dtype, shape, stride = first["bias"]
        assert dtype == torch.bfloat16 and shape == (2, 4, 21, 21) and stride[1] == 0 and stride[2] % 16 == 0
        assert second["bias"][0] == torch.float32
    assert z.dtype == torch.bfloat16 and z.shape == (2, 21, 4, 8)
    assert lse.dtype == km.dtype == torch.float32 and lse.shape == (2, 4, 21) and km.shape == (2, 4, 21, 8)
    # against the CPU kernel on the float32 inputs (bf16 rounding of q and k is all that differs)
    monkeypatch.setattr(kernels, "device_type", lambda t: "cpu")
    _, lse32, km32 = attention_with_statistics(call32, key_mean=True)
    ok = torch.isfinite(lse32)
    assert torch.allclose(lse[ok], lse32[ok], atol=0.1) and not torch.equal(lse, lse32)


def test_run_probes_on_a_simulated_gpu(tiny_dirs, monkeypatch):
    """The whole engine on the simulated GPU with a bf16 model: a padded batch (mask: the
    memory-efficient kernel) and an unpadded one (no mask: flash), float32 statistics, and the
    numbers of the chunked path on the same bf16 model."""
    from workbench.models.loading import load_model

    model = load_model(str(tiny_dirs["llama"]), dtype="bfloat16")
    ps = prompts_for(model, lengths=(30, 12, 7))
    ref = run_probes(model, ps, probes(), batch_size=3, progress=False, attention_path="chunks").table
    ops = FakeCudaOps(monkeypatch)
    dtypes = set()
    orig = LayerStatistics.__init__

    def spy(self, call, *a, **k):
        dtypes.update({call.lse.dtype, call.key_mean.dtype})
        orig(self, call, *a, **k)

    monkeypatch.setattr(LayerStatistics, "__init__", spy)
    got = run_probes(model, ps, probes(), batch_size=3, progress=False).table
    assert dtypes == {torch.float32}
    assert {c["name"] for c in ops.calls} == {"cuda_efficient"}  # padded batches carry a mask
    for metric in set(ref.metric):
        a, b = lookup(got, metric), lookup(ref, metric)
        assert max(abs(a[k][0] - b[k][0]) for k in b if b[k][1] > 0) < 2e-3, metric
    ops.calls.clear()
    same = [TokenizedPrompt(f"s{i}", list(range(10 + i, 40 + i))) for i in range(2)]  # equal lengths: no mask
    run_probes(model, same, probes(), batch_size=2, progress=False)
    assert "cuda_flash" in {c["name"] for c in ops.calls}


def test_bfloat16_models_keep_float32_statistics(tiny_dirs, monkeypatch):
    """A bf16 model: the statistics are float32 (lse from the kernel, E_A[k] from a float32
    pass), and both paths agree closely (they read the same bf16 queries and keys)."""
    from workbench.models.loading import load_model

    model = load_model(str(tiny_dirs["llama"]), dtype="bfloat16")
    dtypes = set()
    orig = LayerStatistics.__init__

    def spy(self, call, *a, **k):
        dtypes.update({call.lse.dtype, call.key_mean.dtype, call.query.dtype})
        orig(self, call, *a, **k)

    monkeypatch.setattr(LayerStatistics, "__init__", spy)
    ps = prompts_for(model, lengths=(30, 12, 7))
    auto = run_probes(model, ps, probes(), batch_size=3, progress=False).table
    ref = run_probes(model, ps, probes(), batch_size=3, progress=False, attention_path="chunks").table
    assert dtypes == {torch.float32, torch.bfloat16}
    for metric in set(ref.metric):
        got, want = lookup(auto, metric), lookup(ref, metric)
        assert max(abs(got[k][0] - want[k][0]) for k in want if want[k][1] > 0) < 2e-3, metric


def test_weights_zero_masked_keys_and_keep_tiny_ones():
    """``weights`` of the log-weights s - lse = exp(s - lse) where allowed, exactly 0 elsewhere
    (given in base 2), exactly 0 elsewhere (also where the score is -inf from a float mask), no
    NaN, and weights under 2^-126 off by less than 2e-38 each."""
    from workbench.engine.statistics import LOG2_MIN, LOG2E, weights

    torch.manual_seed(0)
    s = torch.randn(2, 3, 5, 7) * 30
    s[0, 0, 0, 0] = float("-inf")
    lse = torch.logsumexp(s, -1, keepdim=True)
    allowed = torch.rand(2, 1, 5, 7) > 0.4
    allowed[0, 0, 0, 0] = True  # a -inf score that is allowed: weight 0, not NaN
    want = torch.where(allowed, (s - lse).exp(), 0.0)
    got = weights((s - lse) * LOG2E, allowed)
    assert not got.isnan().any()
    assert (got[~allowed.expand_as(got)] == 0).all()
    tiny = want < 2.0**LOG2_MIN
    assert tiny.any() and ((got - want).abs()[tiny] <= 2e-38).all()
    assert torch.allclose(got, want, rtol=1e-6, atol=1e-7)  # base 2: log2 e rounds the log-weights (1 ulp x |s - lse|)


def test_statistics_threads_single_for_small_layers_on_a_busy_machine_only(monkeypatch, request):
    from workbench.engine.statistics import SMALL_LAYER, statistics_threads

    outer = torch.get_num_threads()  # one under pytest-xdist: give the test two to switch between
    torch.set_num_threads(max(2, outer))
    request.addfinalizer(lambda: torch.set_num_threads(outer))
    n = torch.get_num_threads()
    cpus = os.cpu_count() or 1
    monkeypatch.setattr(statistics.os, "getloadavg", lambda: (cpus + 1.0, 0.0, 0.0))  # busy
    with statistics_threads(SMALL_LAYER - 1):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == n
    with statistics_threads(SMALL_LAYER):
        assert torch.get_num_threads() == n
    monkeypatch.setattr(
        statistics.os, "getloadavg", lambda: (float(cpus), 0.0, 0.0)
    )  # our own threads only: the process's threads
    with statistics_threads(SMALL_LAYER - 1):
        assert torch.get_num_threads() == n


def test_layers_of_a_forward_share_their_plans_and_only_when_the_mask_is_the_same():
    """A plan (blocks, spans, masks) made for one call serves another call with the same mask
    object and ranges, and gives what a fresh plan gives; a call with another mask (or other
    ranges) gets its own plan."""
    from workbench.engine.statistics import LayerPlans

    def stats_for(call, batch, plans):
        return LayerStatistics(
            call,
            batch,
            key_visibility(call).n_visible(call.query.shape[0], call.query.device),
            chunk_elements=64,
            plans=plans,
        )

    call_a, batch = random_call("window")
    call_b, _ = random_call("padding")
    plans = LayerPlans()
    pos = batch.positions
    rank, lo, hi = same_token_ranges(batch)
    ranges = [(pos - 6, pos + 1, None), (lo, hi, rank), (torch.zeros_like(pos), torch.full_like(pos, 3), None)]
    for lo_, hi_, rank_ in ranges:
        stats_for(call_a, batch, plans).mass_in(lo_, hi_, rank_)
    n = len(plans)
    # the same mask object, queries and keys of "another layer": plans reused, answers unchanged
    other = AttentionCall(
        1, None, call_a.query.flip(1), call_a.key.flip(1), call_a.value, call_a.mask, call_a.scaling, call_a.is_causal
    )
    _, other.lse, _ = attention_with_statistics(other)
    for lo_, hi_, rank_ in ranges:
        shared = stats_for(other, batch, plans).mass_in(
            lo_.clone(), hi_.clone(), None if rank_ is None else rank_.clone()
        )
        fresh = stats_for(other, batch, LayerPlans()).mass_in(lo_, hi_, rank_)
        assert torch.equal(shared, fresh)
    assert len(plans) == n
    # another mask with the same shapes and ranges: its own plans, its own (different) answer
    for lo_, hi_, rank_ in ranges:
        shared = stats_for(call_b, batch, plans).mass_in(lo_, hi_, rank_)
        assert torch.equal(shared, stats_for(call_b, batch, LayerPlans()).mass_in(lo_, hi_, rank_))
    assert len(plans) > n


def test_run_probes_makes_each_plan_once_per_batch(tiny_models, monkeypatch):
    """The banded plan of streaming's window and induction's echo is made once per batch, not
    once per layer (the point of LayerPlans)."""
    from workbench.engine.statistics import LayerStatistics as LS

    model = tiny_models["llama"]
    made = []
    orig = LS._band_plan
    monkeypatch.setattr(LS, "_band_plan", lambda self, *a: made.append(self.layer) or orig(self, *a))
    prompts = prompts_for(model)[:4]
    run_probes(
        model,
        prompts,
        [get_probe("induction"), get_probe("streaming", sink=2, recent=12)],
        batch_size=len(prompts),
        progress=False,
    )
    assert model.n_layers > 1 and made and set(made) == {0}
    assert len(made) == 2  # the window (12 keys: banded, not named) and the echo ranges, at layer 0 only


def test_keys_named_for_every_query_are_one_product_per_layer(tiny_models, monkeypatch):
    """sink (the first token) and streaming (its sink keys) name keys the same for every query:
    from the second layer on, each layer takes one product for both probes, and each probe's
    numbers are those of a run on its own (and of the chunked reference path)."""
    model = tiny_models["llama"]
    prompts = prompts_for(model)[:4]
    probes = lambda: [get_probe("sink"), get_probe("streaming", sink=2, recent=3)]  # noqa: E731
    alone = pd.concat(
        [run_probes(model, prompts, [p], batch_size=len(prompts), progress=False).table for p in probes()]
    )
    ref = run_probes(model, prompts, probes(), batch_size=len(prompts), progress=False, attention_path="chunks").table
    shared = []
    orig = statistics.key_products

    def spy(call, key_index, *a, **k):
        if key_index.shape[1] == 1:
            shared.append((call.layer, key_index.shape[-1]))
        return orig(call, key_index, *a, **k)

    monkeypatch.setattr(statistics, "key_products", spy)
    together = run_probes(model, prompts, probes(), batch_size=len(prompts), progress=False).table
    # layer 0: the first token, then the first token and both sink keys; later layers: one product
    assert shared == [(0, 1), (0, 3)] + [(layer, 3) for layer in range(1, model.n_layers)]
    cols = ["metric", "layer", "head", "value"]
    for other in (alone, ref):
        merged = together[cols].merge(other[cols], on=["metric", "layer", "head"], suffixes=("", "_other"))
        assert len(merged) == len(together) == len(other)
        assert (merged["value"] - merged["value_other"]).abs().max() < TOL


def test_shared_keys_stop_growing_at_their_cap(monkeypatch):
    """Keys named for every query join the batch's shared product only up to SHARED_MOST keys;
    past it each request is its own product. Every answer equals a fresh computation."""
    from workbench.engine.statistics import LayerPlans

    monkeypatch.setattr(statistics, "SHARED_MOST", 3)
    call, batch = random_call("padding", seed=3)
    n_vis = key_visibility(call).n_visible(call.query.shape[0], call.query.device)
    plans = LayerPlans()
    asks = [
        torch.tensor([0, 0]),
        torch.tensor([1, 2]),
        torch.tensor([2, 3]),
        torch.tensor([3, 1]),
        torch.tensor([0, 0]),
    ]
    for layer in range(2):
        stats = LayerStatistics(call, batch, n_vis, chunk_elements=64, plans=plans)
        for key in asks:
            fresh = LayerStatistics(call, batch, n_vis, chunk_elements=64).key_probs(key)
            assert torch.allclose(
                stats.key_probs(key), fresh, rtol=1e-5, atol=1e-7
            )  # products of other shapes: rounding only
    assert plans.shared_keys.shape[-1] == 3  # [0, 0], [1, 2], [2, 3]; [3, 1] would be the fourth


def test_layers_sharing_scratch_buffers_never_read_each_others():
    """Statistics of two layers on one batch's plans, asked alternately, answer what they answer
    alone: whichever writes the shared scratch buffers makes the other drop its views of them
    (the reuse would otherwise hand layer A layer B's queries). And a second layer reuses the
    first one's buffers instead of allocating its own."""
    from workbench.engine.statistics import LayerPlans

    def stats_for(call, batch, plans):
        return LayerStatistics(
            call,
            batch,
            key_visibility(call).n_visible(call.query.shape[0], call.query.device),
            chunk_elements=64,
            plans=plans,
        )

    call_a, batch = random_call("padding", seed=1)
    call_b, _ = random_call("padding", seed=2)
    pos = batch.positions
    rank, lo, hi = same_token_ranges(batch)
    keys = torch.stack([pos - 1, pos - 3], dim=-1)
    asks = [
        lambda s: s.mass_in(pos - 6, pos + 1),
        lambda s: s.mass_in(lo, hi, rank),
        lambda s: s.probs_at(keys),
        lambda s: s.key_probs(torch.tensor([0, 1])),
    ]
    alone = {
        name: [ask(stats_for(c, batch, LayerPlans())) for ask in asks] for name, c in (("a", call_a), ("b", call_b))
    }
    assert not torch.allclose(alone["a"][0], alone["b"][0])
    plans = LayerPlans()
    a, b = stats_for(call_a, batch, plans), stats_for(call_b, batch, plans)
    for i, ask in enumerate(asks):
        assert torch.equal(ask(a), alone["a"][i])
        assert torch.equal(ask(b), alone["b"][i])
        assert torch.equal(ask(a), alone["a"][i])
    held = {name: buf.data_ptr() for name, buf in plans.scratch._buffers.items()}
    assert {"queries", "keys", "band_queries", "band_keys"} <= set(held)
    c = stats_for(call_a, batch, plans)
    for ask in asks:
        ask(c)
    assert {name: buf.data_ptr() for name, buf in plans.scratch._buffers.items()} == held


def test_scratch_grows_and_hands_out_views():
    from workbench.engine.scratch import Scratch

    s = Scratch()
    x = s.get("x", (2, 3), torch.float32, torch.device("cpu"))
    assert x.shape == (2, 3) and x.is_contiguous()
    assert s.get("x", (5,), torch.float32, torch.device("cpu")).data_ptr() == x.data_ptr()  # fits: the same memory
    y = s.get("x", (4, 4), torch.float32, torch.device("cpu"))  # larger: a new buffer
    assert y.shape == (4, 4) and s.nbytes == 64
    assert s.get("x", (2,), torch.float64, torch.device("cpu")).dtype == torch.float64
    small = Scratch(max_bytes=100)
    a = small.get("a", (20,), torch.float32, torch.device("cpu"))  # 80 bytes: kept
    assert small.get("a", (20,), torch.float32, torch.device("cpu")).data_ptr() == a.data_ptr()
    b = small.get("b", (10,), torch.float32, torch.device("cpu"))  # 80 + 40 > 100: a fresh tensor each time
    assert b.shape == (10,) and small.nbytes == 80
    assert (
        small.get("b", (10,), torch.float32, torch.device("cpu")).data_ptr() != b.data_ptr()
    )  # b is alive: not its memory

    class User:
        released = 0

        def release_scratch(self):
            self.released += 1

    u, v = User(), User()
    s.claim(u)
    s.claim(u)
    assert u.released == 0
    s.claim(v)
    assert u.released == 1 and v.released == 0


@pytest.mark.parametrize("mask_kind", ["padding", "window", "left_padded_window"])
def test_query_blocks_give_the_whole_calls_answer(monkeypatch, mask_kind):
    """Under a long boolean mask the kernel runs per block of queries on the keys the block may
    see: same output, lse and E_A[k] as one call over every key (to float32 summation order),
    also for rows that see no key (left padding) and for grouped KV heads; spans are found once
    per mask object, and a mask edited in place gets new ones."""
    b, h, kv, n, d = 2, 4, 2, 200, 8
    g = torch.Generator().manual_seed(3)
    q, k, v = (
        torch.randn(b, h, n, d, generator=g) * 2,
        torch.randn(b, kv, n, d, generator=g) * 2,
        torch.randn(b, kv, n, d, generator=g),
    )
    i = torch.arange(n)
    causal = i[:, None] >= i[None, :]
    real = torch.ones(b, n, dtype=torch.bool)
    if mask_kind == "left_padded_window":
        real[1, :37] = False
    else:
        real[1, n - 51 :] = False
    window = (i[:, None] - i[None, :] < 24) if "window" in mask_kind else torch.ones(n, n, dtype=torch.bool)
    mask = (causal & window)[None, None] & real[:, None, None, :]
    if mask_kind == "left_padded_window":
        mask = mask & real[:, None, :, None]  # padded queries see nothing
    call = AttentionCall(0, None, q, k, v, mask, 0.35, False)
    monkeypatch.setattr(kernels, "BLOCK_QUERIES", 16)
    spans = []
    monkeypatch.setattr(kernels, "_spans", lambda m, blk, orig=kernels._spans: spans.append(blk) or orig(m, blk))
    blocks = kernels.query_blocks(mask)
    assert blocks is not None and len(blocks) == 13 and blocks[0][:2] == (0, 16) and blocks[-1][:2] == (192, 200)
    assert all(k1 - k0 <= 16 + (23 if "window" in mask_kind else 200) for _, _, k0, k1 in blocks)
    assert sum(k0 > 0 for _, _, k0, _ in blocks) >= (10 if "window" in mask_kind else 0)
    z, lse, km = attention_with_statistics(call, key_mean=True)
    assert kernels.query_blocks(mask) is blocks and spans == [16]  # the layers of a forward share them
    monkeypatch.setattr(kernels, "BLOCK_QUERIES", 1000)  # one call over every key
    assert kernels.query_blocks(mask) is None
    z1, lse1, km1 = attention_with_statistics(call, key_mean=True)
    assert torch.equal(torch.isfinite(lse), torch.isfinite(lse1))
    ok = torch.isfinite(lse1)
    assert torch.allclose(lse[ok], lse1[ok], rtol=1e-6, atol=1e-6)
    assert torch.allclose(z, z1, rtol=1e-5, atol=1e-6, equal_nan=True)
    assert torch.allclose(km, km1, rtol=1e-5, atol=1e-6, equal_nan=True)
    if mask_kind == "left_padded_window":
        assert (z[1, :37] == 0).all() and (z1[1, :37] == 0).all()  # rows that see nothing: the kernel's zeros
    monkeypatch.setattr(kernels, "BLOCK_QUERIES", 16)
    mask[:, :, :, 0] = False  # in place: the cached spans are no longer this mask's
    assert kernels.query_blocks(mask) is not blocks and spans == [16, 1000, 16]


def test_query_blocks_only_where_they_skip_enough(monkeypatch):
    """No blocks for float masks, none without a mask, none for short calls, and none when the
    spans would cover most scores (a plain full mask)."""
    monkeypatch.setattr(kernels, "BLOCK_QUERIES", 16)
    n = 64
    causal = torch.ones(n, n, dtype=torch.bool).tril()[None, None]
    assert kernels.query_blocks(causal) is not None
    assert kernels.query_blocks(torch.ones(1, 1, n, n, dtype=torch.bool)) is None
    assert kernels.query_blocks(torch.zeros(1, 1, n, n)) is None
    assert kernels.query_blocks(None) is None
    assert kernels.query_blocks(causal[..., :31, :31]) is None
    assert kernels.query_blocks(causal[0, 0]) is None  # a 2-d mask broadcast by SDPA: left to one call
    blocks = kernels.query_blocks(causal)
    assert [b_[:2] for b_ in blocks] == [(0, 16), (16, 32), (32, 48), (48, 64)] and [b_[3] for b_ in blocks] == [
        16,
        32,
        48,
        64,
    ]


def test_blocked_kernel_keeps_a_models_numbers(tmp_path, monkeypatch):
    """Gemma 3 text with a 6-key window, query blocks of 8: the statistics path (kernel run per
    block) still agrees with the chunked reference on padded batches, and the model's logits
    with statistics on are the plain forward's."""
    from transformers import Gemma3TextConfig

    from workbench.engine.attention import hooked_run

    cfg = Gemma3TextConfig(
        vocab_size=512,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=128,
        sliding_window=6,
        layer_types=["sliding_attention", "full_attention", "sliding_attention"],
        query_pre_attn_scalar=16,
        bos_token_id=2,
        eos_token_id=3,
        pad_token_id=1,
    )
    model = _save(tmp_path, cfg)
    monkeypatch.setattr(kernels, "BLOCK_QUERIES", 8)
    used = []
    monkeypatch.setattr(
        kernels,
        "query_blocks",
        lambda m, orig=kernels.query_blocks: (lambda r: used.append(r is not None) or r)(orig(m)),
    )
    compare_paths(model, prompts_for(model, lengths=(60, 33, 47, 8, 1)))
    assert any(used)
    ids = torch.randint(4, 500, (2, 50))
    mask = torch.ones_like(ids)
    mask[1, 30:] = 0
    plain = model.hf_model(input_ids=ids, attention_mask=mask).logits

    class Wants:
        def wants_statistics(self, call):
            return frozenset({"lse", "key_mean"})

    used.clear()
    with hooked_run(model.hf_model, Wants()):
        got = model.hf_model(input_ids=ids, attention_mask=mask).logits
    assert any(used)
    assert torch.allclose(got[mask.bool()], plain[mask.bool()], atol=1e-5)


def test_query_blocks_with_a_bfloat16_model(monkeypatch):
    """bf16 queries under a long window mask: per block, the output pass gets a bf16 bias and
    the keys-as-values pass a float32 one; both agree with the one-call kernel."""
    n = 96
    g = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(1, 4 if i == 0 else 2, n, 8, generator=g).bfloat16() for i in range(3))
    i = torch.arange(n)
    mask = ((i[:, None] >= i[None, :]) & (i[:, None] - i[None, :] < 10))[None, None]
    call = AttentionCall(0, None, q, k, v, mask, 0.35, False)
    biases = []
    orig = kernels.attention_with_lse
    monkeypatch.setattr(kernels, "attention_with_lse", lambda *a: biases.append(a[3].dtype) or orig(*a))
    monkeypatch.setattr(kernels, "BLOCK_QUERIES", 16)
    z, lse, km = attention_with_statistics(call, key_mean=True)
    assert biases == [torch.bfloat16, torch.float32] * 6
    monkeypatch.setattr(kernels, "BLOCK_QUERIES", 1000)
    z1, lse1, km1 = attention_with_statistics(call, key_mean=True)
    assert z.dtype == torch.bfloat16 and lse.dtype == km.dtype == torch.float32
    assert torch.allclose(lse, lse1, atol=1e-5) and torch.allclose(km, km1, atol=1e-5)
    assert torch.allclose(z.float(), z1.float(), atol=2e-2)
