"""Greedy decoding with a KV cache, batched: the engine of probes that generate (retrieval).

:func:`greedy_decode` decodes every prompt greedily, in batches planned like every other engine
(:mod:`workbench.inputs.batching`, prompt length + ``max_new_tokens`` padded tokens per item), with the
``"workbench"`` attention hook active so observers see each layer's queries and keys at every
step. Prompts are left-padded so the next position of every row is the last column; finished
rows keep decoding in the batch (their tokens are ignored).

Observers that need to know *which* prompt a forward computes read the :class:`DecodeState`
they were given: ``rows`` (the batch rows of the running forward; ``None`` = all of them) and
``key_offset`` (per computed row, the index of its prompt's position 0 on that forward's key
axis), so an attended key index ``j`` is in-prompt position ``j - key_offset``.

``prefill="auto"`` runs the prompt forward as one padded batch on GPUs, but prompt by prompt on
CPUs (then merges the KV caches, left-padded, for batched decoding): with padding, SDPA needs a
mask and leaves PyTorch's fused causal CPU kernel for the generic path (on our 2-core machines
the padded prefill of 8 x 1000-token prompts takes 1.09x the time; benchmarks/bench_retrieval.py).
A prompt that shares a prefix with one already prefilled (niah prompts on one haystack, the
paper's grid, share everything before the earlier needle) reuses that prefix's KV cache.
Prompts longer than ``PREFILL_CHUNK`` tokens are prefilled in pieces through the cache, so no
``[T, T]`` mask is ever built (32k-token prompts fit in a few GB; see :func:`forward_with_cache`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Literal, Sequence

import numpy as np
import torch
from jaxtyping import Bool, Int
from torch import Tensor

from workbench.engine.attention import hooked_run
from workbench.engine.patterns import collate
from workbench.errors import WorkbenchError
from workbench.inputs.prompts import TokenizedPrompt, pad_token_id
from workbench.protocol.run_context import RunContext
from workbench.protocol.views import BatchInfo

if TYPE_CHECKING:
    from workbench.models.loading import LoadedModel

Prefill = Literal["auto", "batched", "separate"]
MIN_SHARED_PREFIX = 32  # tokens; shorter shared prefixes are not worth copying a cache for
PREFILL_CHUNK = 4096  # tokens per prefill forward: masks stay [chunk, keys] (see forward_with_cache)


@dataclass
class DecodeState:
    """The running decode, as observers and step callbacks see it."""

    prompts: list[TokenizedPrompt] = field(default_factory=list)  # the batch's prompts, by row
    batch: BatchInfo | None = None  # the left-padded batch
    rows: Int[Tensor, " rows"] | None = None  # rows the running forward computes (None: all)
    key_offset: Int[Tensor, " rows"] | None = None  # in-prompt position 0 on the forward's key axis
    step: int = 0

    @property
    def size(self) -> int:
        return len(self.prompts)


StepCallback = Callable[[DecodeState, Int[Tensor, " batch"], Bool[Tensor, " batch"]], None]


def _cache_kwarg(hf_model: Any) -> str:
    """transformers >= 5.2x calls the KV cache argument ``cache`` (``past_key_values`` is
    deprecated); older 5.x releases only know ``past_key_values``."""
    import inspect

    try:
        return "cache" if "cache" in inspect.signature(hf_model.forward).parameters else "past_key_values"
    except (TypeError, ValueError):
        return "past_key_values"


def forward_with_cache(model: LoadedModel, cache: Any, **inputs: Any) -> tuple[Any, Tensor]:
    """One forward with a KV cache; returns (the updated cache, last-position logits).

    A long input (a prefill) runs in pieces of at most :data:`PREFILL_CHUNK` tokens through the
    cache: the model's masks and SDPA's float copy of them are then ``[chunk, keys]``, not
    ``[T, T]`` (at 32k tokens a boolean sliding-window mask alone is 1 GB, its float32 copy
    4 GB), for the same arithmetic (a chunk attends to the keys cached so far).
    """
    n = inputs["input_ids"].shape[1]
    kw = {_cache_kwarg(model.hf_model): cache}
    step = PREFILL_CHUNK if n > PREFILL_CHUNK else n
    mask = inputs.get("attention_mask")
    past = 0 if mask is None else mask.shape[1] - n
    for start in range(0, n, step):
        piece = {k: v[:, start : start + step] for k, v in inputs.items() if k != "attention_mask"}
        if mask is not None:
            piece["attention_mask"] = mask[:, : past + start + piece["input_ids"].shape[1]]
        out = model.hf_model(**piece, **kw, use_cache=True, logits_to_keep=1)
        kw = {_cache_kwarg(model.hf_model): out["cache"] if "cache" in out else out.past_key_values}
    return next(iter(kw.values())), out.logits[:, -1]


def _common_prefix(a: Sequence[int], b: Sequence[int], limit: int) -> int:
    n = min(len(a), len(b), limit)
    if n <= 0:
        return 0
    diff = np.asarray(a[:n]) != np.asarray(b[:n])
    return int(diff.argmax()) if diff.any() else n


def prefix_tree(rows: Sequence[Sequence[int]]) -> list[tuple[int, int | None, int]]:
    """An order to prefill ``rows`` in, each with the already-prefilled row whose prefix it
    reuses and the shared length: ``(row, parent or None, shared)``.

    Prim's maximum spanning tree over shared-prefix lengths, so the tokens computed are as few
    as prefix reuse allows (on one haystack with needles at depths c_1 >= ... >= c_n, the sum of
    c_2..c_n is saved). A row always recomputes at least its last token.
    """
    n = len(rows)
    share = [[0] * n for _ in range(n)]
    for i in range(n):
        for j in range(i + 1, n):
            share[i][j] = share[j][i] = _common_prefix(rows[i], rows[j], min(len(rows[i]), len(rows[j])) - 1)
    order = [(0, None, 0)]
    best = {j: (share[0][j], 0) for j in range(1, n)}
    while best:
        j = max(best, key=lambda k: best[k][0])
        s, parent = best.pop(j)
        order.append((j, parent, s) if s >= MIN_SHARED_PREFIX else (j, None, 0))
        for k in best:
            if share[j][k] > best[k][0]:
                best[k] = (share[j][k], j)
    return order


def _separate_prefill(model: LoadedModel, batch: BatchInfo, state: DecodeState) -> tuple[Any, Tensor]:
    """Prefill each prompt alone (no padding, no mask), then merge the KV caches left-padded to
    the batch width. Returns (cache, last-position logits)."""
    from transformers import DynamicCache

    b, width = batch.input_ids.shape
    dev = batch.input_ids.device
    caches: list[Any] = [None] * b
    logits: list[Tensor | None] = [None] * b
    rows = [batch.input_ids[r, int(batch.first_index[r]) :].tolist() for r in range(b)]
    try:
        for r, parent, shared in prefix_tree(rows):
            ids = rows[r]
            cache = DynamicCache()
            if parent is not None:  # the KV of the shared prefix is the same computation: reuse it
                for layer, kv in enumerate(caches[parent].layers):
                    cache.update(kv.keys[..., :shared, :], kv.values[..., :shared, :], layer)
            state.rows = torch.tensor([r], device=dev)
            state.key_offset = torch.zeros(1, dtype=torch.long, device=dev)
            caches[r], logits[r] = forward_with_cache(
                model,
                cache,
                input_ids=torch.tensor([ids[shared:]], device=dev),
                position_ids=torch.arange(shared, len(ids), device=dev)[None],
            )
    finally:
        state.rows, state.key_offset = None, batch.first_index
    merged = DynamicCache()
    for layer in range(len(caches[0].layers)):
        ks, vs = [], []
        for c in caches:
            k, v = c.layers[layer].keys, c.layers[layer].values
            pad = width - k.shape[2]
            ks.append(torch.nn.functional.pad(k, (0, 0, pad, 0)))
            vs.append(torch.nn.functional.pad(v, (0, 0, pad, 0)))
        merged.update(torch.cat(ks), torch.cat(vs), layer)
    return merged, torch.cat(logits)  # type: ignore[arg-type]


def _decode_batch(
    model: LoadedModel,
    prompts: list[TokenizedPrompt],
    max_new_tokens: int,
    stops: set[int],
    separate: bool,
    state: DecodeState,
    on_step: StepCallback | None,
) -> list[list[int]]:
    from transformers import DynamicCache

    dev = model.device
    batch = collate(
        [p.ids for p in prompts],
        pad_token_id(model.tokenizer),
        dev,
        padding_side="left",
        prompt_ids=[p.id for p in prompts],
    )
    b = batch.size
    state.prompts, state.batch, state.rows, state.key_offset, state.step = (
        list(prompts),
        batch,
        None,
        batch.first_index,
        0,
    )
    mask = batch.attention_mask
    pos = batch.positions.clamp_min(0)
    active = torch.ones(b, dtype=torch.bool, device=dev)
    generated: list[list[int]] = [[] for _ in range(b)]
    cache = DynamicCache()
    inp = batch.input_ids
    for step in range(max_new_tokens):
        state.step = step
        # logits_to_keep=1: only the last position goes through the LM head (the prefill would
        # otherwise build [batch, context, vocab] logits nobody reads)
        if step == 0 and separate and b > 1:
            cache, last = _separate_prefill(model, batch, state)
        else:
            cache, last = forward_with_cache(model, cache, input_ids=inp, attention_mask=mask, position_ids=pos)
        y = last.argmax(-1)  # [b]
        if on_step is not None:
            on_step(state, y, active)
        for r in range(b):
            if active[r]:
                generated[r].append(int(y[r]))
                if int(y[r]) in stops:
                    active[r] = False
        if not active.any():
            break
        mask = torch.cat([mask, torch.ones(b, 1, dtype=mask.dtype, device=dev)], dim=1)
        pos = pos[:, -1:] + 1
        inp = y[:, None]
    return generated


def greedy_decode(
    model: LoadedModel,
    prompts: Sequence[TokenizedPrompt],
    max_new_tokens: int,
    stop_ids: set[int] | None = None,
    ctx: RunContext | None = None,
    observers: Sequence[Any] = (),
    on_step: StepCallback | None = None,
    state: DecodeState | None = None,
    prefill: Prefill = "auto",
) -> list[list[int]]:
    """Greedy tokens of every prompt (up to ``max_new_tokens``; a stop token is kept and ends the
    row), in the prompts' order.

    ``observers`` (with ``ctx.interventions``) see every forward's attention; ``on_step(state,
    next_tokens, active)`` is called after each step's logits, before finished rows are marked.
    """
    if prefill not in ("auto", "batched", "separate"):
        raise WorkbenchError(f"unknown prefill {prefill!r}", "use auto, batched or separate")
    if max_new_tokens < 1:
        raise WorkbenchError(f"max_new_tokens must be at least 1, got {max_new_tokens}", "generate at least one token")
    ctx = ctx or RunContext()
    state = state if state is not None else DecodeState()
    separate = prefill == "separate" or (prefill == "auto" and model.device.type == "cpu")
    stops = set(stop_ids or ())
    out: dict[int, list[int]] = {}
    with hooked_run(model.hf_model, *observers, *ctx.interventions):
        for idx in ctx.plan([len(p) + max_new_tokens for p in prompts], model.device):
            for i, toks in zip(
                idx, _decode_batch(model, [prompts[i] for i in idx], max_new_tokens, stops, separate, state, on_step)
            ):
                out[i] = toks
    return [out[i] for i in range(len(prompts))]
