"""Pattern probes from an activation store, without the model's weights.

The store holds each layer's post-rotary queries and keys at every real position, and the
layer's geometry (scaling, soft-cap, causal, sliding window, KV groups). For each batch the
pattern engine plans, :func:`store_calls` pads the prompts' stored queries and keys on the
right, rebuilds the mask from the geometry (:func:`workbench.store.geometry.visible_keys`) and
yields one :class:`~workbench.engine.call.AttentionCall` per stored layer; the engine
(:func:`workbench.engine.extraction.run_pattern_probes` with ``calls=``) hands them to the probes
through the same path a live forward takes, so every pattern probe gives the live run's
numbers: the same code computes them from the same queries and keys.

The model is replaced by :class:`StoreModel`, a stand-in with the few facts the engine reads
(``n_layers``, ``n_heads``, ``device``, a tokenizer that knows its pad id). Token and item probes
run their own forwards and need the model; they are refused with that reason.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence

import torch

from workbench.engine.call import AttentionCall
from workbench.errors import WorkbenchError
from workbench.protocol.views import BatchInfo
from workbench.store.geometry import visible_keys
from workbench.store.reader import ActivationStore


@dataclass
class _PadOnly:
    """What the engine asks of a tokenizer: the id to pad batches with."""

    pad_token_id: int | None
    eos_token_id: int | None = None


@dataclass
class StoreModel:
    """The facts of the model a store was cached from, standing in for it in the pattern engine."""

    name: str
    n_layers: int
    n_heads: int
    n_kv_heads: int
    device: torch.device
    tokenizer: Any
    info: dict = field(default_factory=dict)
    hf_model: None = None

    def describe(self) -> dict:
        return dict(self.info)


def stand_in(store: ActivationStore, device: str | torch.device = "cpu") -> StoreModel:
    g, tok = store.geometry, store.index["tokenizer"]
    return StoreModel(
        store.index["model"],
        int(g["n_layers"]),
        int(g["n_heads"]),
        int(g["n_kv_heads"]),
        torch.device(device),
        _PadOnly(tok.get("pad_token_id"), tok.get("eos_token_id")),
        {**store.index.get("model_info", {}), "from_store": str(store.path)},
    )


def check_replayable(store: ActivationStore, probes: Sequence[Any]) -> None:
    """One clear error for every reason these probes cannot run from this store."""
    store.require_complete()
    live = [p.name for p in probes if getattr(p, "kind", None) != "pattern"]
    if live:
        raise WorkbenchError(
            f"{', '.join(live)} needs the model: it runs its own forwards or reads raw items, "
            "and a store holds only activations",
            f"run it live: workbench probe {','.join(live)} --model {store.index['model']} ...; "
            "from a store run only pattern probes",
        )
    missing = [h for h in ("q", "k") if h not in store.hooks]
    if missing:
        raise WorkbenchError(
            f"{store.path} holds hooks {','.join(store.hooks)}; "
            "pattern probes need the post-rotary queries and keys (q, k)",
            f"cache them: workbench cache --model {store.index['model']} ... --hooks q,k --out NEW_STORE",
        )
    bad = {int(k): v for k, v in store.manifest.get("mask_mismatch", {}).items()}
    if bad:
        L = sorted(bad)
        raise WorkbenchError(
            f"layer(s) {', '.join(map(str, L))} of {store.index['model']} used a mask a store cannot rebuild "
            f"({bad[L[0]]})",
            f"run the probes on the live model: workbench probe ... --model {store.index['model']}",
        )


def store_calls(store: ActivationStore, batch: BatchInfo, dtype: torch.dtype | None = None) -> Iterator[AttentionCall]:
    """The attention calls of ``batch`` (prompts of the store, right-padded), one per stored layer."""
    device = batch.input_ids.device
    lengths = batch.lengths.to(device)
    width = int(batch.input_ids.shape[1])
    has_v = "v" in store.hooks
    for layer in store.layers:
        geo = store.geometry["layers"][str(layer)]

        def padded(hook: str) -> torch.Tensor:
            rows = [store.get(hook, layer, pid) for pid in batch.prompt_ids]
            t = rows[0].new_zeros((len(rows), width, *rows[0].shape[1:]))
            for i, r in enumerate(rows):
                t[i, : r.shape[0]] = r
            t = t.to(device).transpose(1, 2)  # [batch, head, pos, d]
            return t if dtype is None else t.to(dtype)

        q, k = padded("q"), padded("k")
        yield AttentionCall(
            layer=layer,
            module=None,
            query=q,
            key=k,
            value=padded("v") if has_v else k,
            mask=visible_keys(lengths, width, geo["causal"], geo["sliding_window"], device),
            scaling=float(geo["scaling"]),
            is_causal=False,
            softcap=geo["softcap"],
        )


def store_prompts(store: ActivationStore, n_prompts: int | None = None) -> list:
    from workbench.inputs.prompts import TokenizedPrompt

    ids = store.prompt_ids[:n_prompts] if n_prompts else store.prompt_ids
    return [TokenizedPrompt(pid, store.tokens(pid), store.meta(pid)) for pid in ids]


def run_probes_from_store(
    store: ActivationStore | str,
    probes: Sequence[Any],
    *,
    batch_size: int | str = "auto",
    device: str | torch.device = "cpu",
    n_prompts: int | None = None,
    chunk_elements: int | None = None,
    progress: bool | None = False,
):
    """Run pattern ``probes`` on the queries and keys of ``store``; a :class:`~workbench.runner.RunResult`
    whose rows cover the store's layers."""
    import pandas as pd

    from workbench.engine.extraction import run_pattern_probes
    from workbench.protocol.plugins import blaming, check_result
    from workbench.protocol.run_context import RunContext
    from workbench.runner import RunResult

    if not isinstance(store, ActivationStore):
        store = ActivationStore(store)
    if not probes:
        raise WorkbenchError("no probes to run", "name at least one probe")
    check_replayable(store, probes)
    model = stand_in(store, device)
    prompts = store_prompts(store, n_prompts)
    ctx = RunContext(batch_size=batch_size, chunk_elements=chunk_elements, progress=progress)
    with blaming(probes):  # a plugin's own code raised: name it
        stats = run_pattern_probes(model, prompts, probes, ctx, calls=lambda batch: store_calls(store, batch))
    results = {}
    layers = set(store.layers)
    for p in probes:
        r = p.result()
        check_result(p, r.table, model.n_layers, model.n_heads)
        if len(layers) < model.n_layers:
            r.table = r.table[r.table.layer.isin(layers)].reset_index(drop=True)
        results[p.name] = r
    table = pd.concat([r.table for r in results.values()], ignore_index=True)
    return RunResult(table, results, stats)
