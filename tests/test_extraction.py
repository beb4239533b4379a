"""The extraction engine: batching, bounded memory, OOM back-off, and leaving the bridge intact."""

from __future__ import annotations

import pytest
import torch

from probes.base import PatternProbe
from tests.test_metrics import lookup, random_prompts
from workbench import get_probe
from workbench.engine.patterns import collate
from workbench.errors import WorkbenchError
from workbench.inputs.batching import plan_batches
from workbench.runner import run_probes


class ChunkSpy(PatternProbe):
    """Records which layer each chunk came from and how many scores it held."""

    name, metrics, description = "spy", ("spy",), "records chunks"

    def setup(self, *a, **k):
        super().setup(*a, **k)
        self.events = []

    def on_pattern_chunk(self, chunk):
        self.events.append((chunk.layer, chunk.probs.numel(), chunk.q_start, chunk.q_end))

    def results(self):
        import pandas as pd

        return pd.DataFrame(columns=["metric", "layer", "head", "value", "n"])


def test_chunks_respect_the_memory_budget_and_come_layer_by_layer(tiny_models):
    model = tiny_models["llama"]
    spy = ChunkSpy()
    budget = 4 * model.n_heads * 60  # a few query rows at a time for 60-token prompts
    run_probes(
        model,
        random_prompts(model.vocab_size, [60, 50, 40, 30]),
        [spy],
        batch_size=2,
        chunk_elements=budget,
        progress=False,
    )
    assert max(n for _, n, _, _ in spy.events) <= budget
    layers = [layer for layer, *_ in spy.events]
    assert sorted(set(layers)) == list(range(model.n_layers))
    # within a batch, a layer's chunks finish before the next layer starts: only one layer live
    changes = sum(1 for a, b in zip(layers, layers[1:]) if a != b)
    assert changes == 2 * model.n_layers - 1
    assert len(spy.events) > 2 * model.n_layers, "several chunks per layer"


def test_plan_batches():
    assert plan_batches([5, 10, 3, 8], 2, 0) == [[1, 3], [0, 2]]
    auto = plan_batches([100, 10, 50, 40, 60], "auto", 150)
    assert auto == [[0], [4, 2], [3, 1]]
    with pytest.raises(WorkbenchError):
        plan_batches([1], 0, 10)


def test_collate_right_and_left_padding():
    b = collate([[5, 6, 7], [8]], pad_id=0)
    assert b.input_ids.tolist() == [[5, 6, 7], [8, 0, 0]]
    assert b.positions.tolist() == [[0, 1, 2], [0, -1, -1]]
    left = collate([[5, 6, 7], [8]], pad_id=0, padding_side="left")
    assert left.input_ids.tolist() == [[5, 6, 7], [0, 0, 8]]
    assert left.positions.tolist() == [[0, 1, 2], [-1, -1, 0]] and left.first_index.tolist() == [0, 2]


def test_oom_backoff_splits_batches_and_counts_nothing_twice(tiny_models):
    """GPU out-of-memory, simulated: batches above 1 prompt fail mid-forward; the engine halves
    them, and the probes' numbers equal an unbatched run."""
    model = tiny_models["llama"]
    prompts = random_prompts(model.vocab_size, [20, 11, 31, 7, 16], seed=4)
    reference = run_probes(
        model, prompts, [get_probe("entropy"), get_probe("sink")], batch_size=1, progress=False
    ).table
    base = model.hf_model.base_model

    def flaky_forward(batch):
        base(
            input_ids=batch.input_ids,
            attention_mask=batch.attention_mask,
            position_ids=batch.positions.clamp_min(0),
            use_cache=False,
        )
        if batch.size > 1:  # fail after the probes already saw every layer of this batch
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    _res = run_probes(
        model, prompts, [get_probe("entropy"), get_probe("sink")], batch_size=4, progress=False, forward=flaky_forward
    )

    table, stats = _res.table, _res.stats
    assert stats.n_oom_splits >= 2 and stats.n_batches == len(prompts)
    for metric in ("entropy", "entropy_norm", "sink_mass", "sink_rate"):
        got, ref = lookup(table, metric), lookup(reference, metric)
        assert all(abs(got[k][0] - ref[k][0]) < 1e-6 and got[k][1] == ref[k][1] for k in ref)


def test_oom_on_a_single_prompt_is_a_clear_error(tiny_models):
    model = tiny_models["llama"]

    def always_oom(batch):
        raise torch.OutOfMemoryError("CUDA out of memory")

    with pytest.raises(WorkbenchError, match="out of memory on a single prompt"):
        run_probes(
            model, random_prompts(model.vocab_size, [5, 6]), [get_probe("sink")], forward=always_oom, progress=False
        )


def test_bridge_is_restored_after_runs_and_failures(tiny_models):
    model = tiny_models["llama"]
    model.bridge  # booted: its wrappers are what must come back
    hf = model.hf_model
    attn_before = type(hf.model.layers[0].original_component.self_attn)
    impl_before = hf.config._attn_implementation
    run_probes(model, random_prompts(model.vocab_size, [8]), [get_probe("entropy")], progress=False)

    def crash(batch):
        raise ValueError("boom")

    with pytest.raises(ValueError):
        run_probes(model, random_prompts(model.vocab_size, [8]), [get_probe("entropy")], forward=crash, progress=False)
    assert type(hf.model.layers[0].original_component.self_attn) is attn_before
    assert hf.config._attn_implementation == impl_before
    # TransformerLens' own hooks still work afterwards
    _, cache = model.bridge.run_with_cache(
        torch.tensor([[5, 6, 7, 8]]), names_filter=lambda n: n.endswith("hook_pattern")
    )
    assert cache["blocks.0.attn.hook_pattern"].shape == (1, 4, 4, 4)


@pytest.mark.parametrize("arch", ["llama", "gpt2", "gemma3_text"])
def test_unwrapped_forward_is_the_bridged_one(tiny_models, arch, tmp_path):
    """The pattern engine runs the plain HF modules (``unwrap``): the same hidden states as
    through the bridge's wrappers (bit for bit on RMSNorm models; GPT-2's LayerNorm the bridge
    recomputes in its own order, 2e-7 apart), also after the bridge wired its internal hooks at
    a first forward; the wrappers are back afterwards; a component somebody hooked stays
    wrapped and its hook fires."""
    from transformer_lens.model_bridge.generalized_components.base import GeneralizedComponent

    from workbench.engine.attention import native_attention
    from workbench.engine.call import base_network
    from workbench.models.loading import load_model
    from workbench.models.tiny import make_tiny_model

    model = tiny_models.get(arch) or load_model(str(make_tiny_model(tmp_path / arch, arch, seed=1)), device="cpu")
    model.bridge  # booted: its wrappers are what unwrapping takes out
    hf, ids = model.hf_model, torch.tensor([[5, 6, 7, 8, 9, 10, 11, 12, 13, 14]])

    def hidden(**kw):
        with torch.no_grad(), native_attention(hf, **kw):
            wrappers = sum(isinstance(m, GeneralizedComponent) for m in hf.modules())
            return base_network(hf)(input_ids=ids, use_cache=False).last_hidden_state, wrappers

    before = [type(m) for m in hf.modules()]
    want, wrapped = hidden()
    got, unwrapped = hidden(unwrap=True)
    same = torch.equal if arch != "gpt2" else lambda a, b: torch.allclose(a, b, atol=1e-6)
    assert same(got, want)
    assert wrapped > 0 and unwrapped == 0
    assert [type(m) for m in hf.modules()] == before
    seen = []
    handle = model.bridge.blocks[1].hook_out.register_forward_hook(lambda m, a, out: seen.append(out.shape))
    try:
        got, partly = hidden(unwrap=True)
    finally:
        handle.remove()
    assert seen and same(got, want) and 0 < partly < wrapped


def test_lower_precision_runs_and_stays_close(tiny_dirs):
    from workbench.models.loading import load_model

    prompts = random_prompts(512, [12, 30, 7], seed=9)
    full = run_probes(
        load_model(str(tiny_dirs["llama"]), dtype="float32"), prompts, [get_probe("entropy")], progress=False
    ).table
    half = run_probes(
        load_model(str(tiny_dirs["llama"]), dtype="bfloat16"), prompts, [get_probe("entropy")], progress=False
    ).table
    a, b = lookup(full, "entropy_norm"), lookup(half, "entropy_norm")
    assert max(abs(a[k][0] - b[k][0]) for k in a) < 0.05


def test_empty_inputs_are_rejected(tiny_models):
    with pytest.raises(WorkbenchError, match="no prompts"):
        run_probes(tiny_models["llama"], [], [get_probe("entropy")], progress=False)
    with pytest.raises(WorkbenchError, match="no probes"):
        run_probes(tiny_models["llama"], random_prompts(512, [3]), [], progress=False)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_the_forward_ends_after_the_last_layers_attention(tiny_models, arch):
    """Pattern probes read attention only: run_probes' forward ends once the last layer's
    attention has been observed, so that layer's MLP and the final norm never run; every layer
    is still seen, and a forward after the run computes everything again."""
    from workbench.engine.attention import native_attention
    from workbench.engine.call import base_network

    model = tiny_models[arch]
    spy = ChunkSpy()
    ran = []
    with native_attention(
        model.hf_model, unwrap=True
    ):  # the plain HF modules, as run_probes runs them (a booted bridge wraps them)
        modules = dict(base_network(model.hf_model).named_modules())
        layers = "layers" if arch == "llama" else "h"
        last_mlp, final_norm = (
            modules[f"{layers}.{model.n_layers - 1}.mlp"],
            modules["norm" if arch == "llama" else "ln_f"],
        )
        watched = [modules[f"{layers}.{i}.mlp"] for i in range(model.n_layers)] + [final_norm]
        handles = [m.register_forward_hook(lambda mod, i, o: ran.append(mod)) for m in watched]
        try:
            run_probes(model, random_prompts(model.vocab_size, [12, 9]), [spy], batch_size=2, progress=False)
            assert {layer for layer, *_ in spy.events} == set(range(model.n_layers))
            assert ran == watched[: model.n_layers - 1]  # every MLP but the last; no final norm
            assert last_mlp not in ran and final_norm not in ran
            ran.clear()
            with torch.no_grad():
                base_network(model.hf_model)(input_ids=torch.tensor([[1, 2, 3]]))
            assert ran == watched
        finally:
            for h in handles:
                h.remove()
