"""A cache policy run for real: evicted keys and values are gone from memory.

:class:`EvictedCache` is a KV cache held per (prompt, layer, KV head) as its own tensors, so
heads keep different numbers of tokens (a retrieval head all of them, a streaming head sink +
recent, a HeadKV head its own budget) with no padding and no fake keys. It is a ``Z`` edit that
replaces the layer's attention output (the model runs with ``use_cache=False``; the HF cache is
not used): each forward appends the new tokens' keys and values to the store, then every query
attends to what its KV head holds, causal by position, within the window on sliding-window
layers (whose older entries are evicted as the window moves).

:meth:`EvictedCache.compress` applies a :class:`~workbench.kv.policy.CachePolicy` at the end of
what the store holds (the compression point), with the selection of
:func:`workbench.kv.select.select_row`; a compensation token is stored as one more key and value
(the means) that every later query sees. :meth:`copy` shares the tensors, so one prefilled
store serves many policies (:mod:`workbench.kv.grid`).

:func:`prefill` fills a store from ordinary prefills (SDPA, one prompt at a time, long prompts in
chunks), reading the last context queries a SnapKV selection needs; the continuation (question,
decoded answer, teacher-forced text) then runs through the store. Per-head Python loops: this is
the reference form and the CPU grid's; on a GPU the masked form batches.
"""

from __future__ import annotations

import copy as _copy
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from workbench.engine.call import AttentionCall
from workbench.engine.edits import QKV, QKVReader, ZEdit
from workbench.engine.masking import wide
from workbench.kv.policy import CachePolicy, Geometry
from workbench.kv.select import select_row, window_size


@dataclass
class HeadCache:
    """What one KV head of one layer holds for one prompt."""

    key: Float[Tensor, "slot d_head"]
    value: Float[Tensor, "slot d_head"]
    pos: Int[Tensor, " slot"]  # the token's position; -1 for a compensation token
    always: Bool[Tensor, " slot"]  # visible to every later query (compensation tokens)

    def append(self, k: Tensor, v: Tensor, pos: Tensor) -> "HeadCache":
        return HeadCache(
            torch.cat([self.key, k]),
            torch.cat([self.value, v]),
            torch.cat([self.pos, pos]),
            torch.cat([self.always, torch.zeros_like(pos, dtype=torch.bool)]),
        )

    def take(self, idx: Tensor) -> "HeadCache":
        return HeadCache(self.key[idx], self.value[idx], self.pos[idx], self.always[idx])

    @property
    def slots(self) -> int:
        return int(self.key.shape[0])


@dataclass
class EvictedCache(ZEdit):
    """A per-(prompt, layer, KV head) KV cache whose evicted entries are really removed."""

    geometry: Geometry
    window_queries: int = 0  # how many of the last queries per layer to keep for a later selection
    rows: list[dict[int, list[HeadCache]]] = field(default_factory=list)
    queries: list[dict[int, Tensor]] = field(default_factory=list)  # row -> layer -> [head, w, d]
    scaling: dict[int, float] = field(default_factory=dict)
    softcap: dict[int, float | None] = field(default_factory=dict)
    positions: Tensor | None = None  # [batch, new] of the running forward
    valid: Tensor | None = None

    label = "evicted KV cache"

    def replaces(self, call: AttentionCall) -> bool:
        return True

    def begin(self, positions: Int[Tensor, "batch new"], valid: Bool[Tensor, "batch new"]) -> None:
        """Declare the next forward's tokens: their positions and which are real (not padding)."""
        self.positions, self.valid = positions, valid
        while len(self.rows) < positions.shape[0]:
            self.rows.append({})
            self.queries.append({})

    def copy(self) -> "EvictedCache":
        """A store sharing this one's tensors (appends and compression build new ones)."""
        out = _copy.copy(self)
        out.rows = [{layer: list(heads) for layer, heads in row.items()} for row in self.rows]
        out.queries = [dict(q) for q in self.queries]
        return out

    def edit(self, call: AttentionCall, z: Tensor) -> Tensor:
        layer = call.layer
        self.scaling[layer], self.softcap[layer] = call.scaling, call.softcap
        out = torch.zeros_like(z)
        for r in range(call.query.shape[0]):
            idx = self.valid[r].nonzero()[:, 0]
            if idx.numel() == 0:
                continue
            qpos = self.positions[r, idx]
            heads = self._append(r, layer, call.key[r][:, idx], call.value[r][:, idx], qpos)
            q = call.query[r][:, idx]
            if self.window_queries:
                self.queries[r][layer] = _last_queries(self.queries[r].get(layer), q, self.window_queries)
            out[r, idx] = self._attend(layer, q, heads, qpos, call).to(out.dtype)
            self._slide(r, layer, qpos)
        return out

    def _append(self, r: int, layer: int, k: Tensor, v: Tensor, qpos: Tensor) -> list[HeadCache]:
        row = self.rows[r]
        if layer not in row:
            empty = qpos[:0]
            row[layer] = [
                HeadCache(k[kv, :0], v[kv, :0], empty, empty.bool()) for kv in range(self.geometry.n_kv_heads)
            ]
        row[layer] = [h.append(k[kv], v[kv], qpos) for kv, h in enumerate(row[layer])]
        return row[layer]

    def _attend(
        self, layer: int, q: Float[Tensor, "head new d"], heads: list[HeadCache], qpos: Tensor, call: AttentionCall
    ) -> Float[Tensor, "new head d"]:
        g = self.geometry.group
        window = self.geometry.window(layer)
        outs = []
        for kv, h in enumerate(heads):
            s = (wide(q[kv * g : (kv + 1) * g]) * call.scaling) @ wide(h.key).T  # [g, new, slots]
            if call.softcap is not None:
                s = call.softcap * torch.tanh(s / call.softcap)
            vis = h.pos[None, :] <= qpos[:, None]
            if window is not None:
                vis &= h.pos[None, :] > qpos[:, None] - window
            vis |= h.always[None, :]
            p = torch.softmax(s.masked_fill(~vis[None], float("-inf")), dim=-1)
            outs.append(p @ wide(h.value))  # [g, new, d]
        return torch.cat(outs).transpose(0, 1)

    def _slide(self, r: int, layer: int, qpos: Tensor) -> None:
        """Evict what a sliding-window layer's later queries can no longer see."""
        window = self.geometry.window(layer)
        if window is None:
            return
        newest = int(qpos.max())
        self.rows[r][layer] = [
            h.take(((h.pos > newest - window + 1) | h.always).nonzero()[:, 0]) for h in self.rows[r][layer]
        ]

    def compress(self, policy: CachePolicy | Sequence[CachePolicy]) -> "EvictedCache":
        """Apply ``policy`` (or one per prompt) at the end of what each prompt's store holds (in
        place; returns self)."""
        per_row = [policy] * len(self.rows) if isinstance(policy, CachePolicy) else list(policy)
        for r, (row, policy) in enumerate(zip(self.rows, per_row)):
            for layer, heads in row.items():
                if not policy.compresses(layer):
                    continue
                c = heads[0].slots
                if any(h.slots != c or bool(h.always.any()) for h in heads):
                    raise ValueError(f"layer {layer} of prompt {r} is already compressed")
                policies = policy.layer(layer)
                w = window_size(policies)
                wq = self.queries[r].get(layer)
                keys = torch.stack([h.key for h in heads])
                keep = select_row(
                    policies,
                    keys,
                    wq[:, -w:] if w and wq is not None else None,
                    self.scaling[layer],
                    self.softcap.get(layer),
                )
                row[layer] = [_compressed(h, keep.keep[kv], keep.merge[kv]) for kv, h in enumerate(heads)]
        return self

    def slots(self, r: int) -> int:
        """Key/value slots held for prompt ``r`` over all layers and KV heads (what kv_tokens counts)."""
        return sum(h.slots for heads in self.rows[r].values() for h in heads)

    def nbytes(self, r: int) -> int:
        """Bytes of keys and values held for prompt ``r``, in the store's dtype."""
        return sum(h.key.nbytes + h.value.nbytes for heads in self.rows[r].values() for h in heads)


def _compressed(h: HeadCache, keep: Tensor, merge: Tensor) -> HeadCache:
    out = h.take(keep.nonzero()[:, 0])
    if bool(merge.any()):
        k, v = h.key[merge].mean(dim=0, keepdim=True), h.value[merge].mean(dim=0, keepdim=True)
        out = HeadCache(
            torch.cat([out.key, k.to(out.key.dtype)]),
            torch.cat([out.value, v.to(out.value.dtype)]),
            torch.cat([out.pos, out.pos.new_full((1,), -1)]),
            torch.cat([out.always, out.always.new_ones(1)]),
        )
    return out


def _last_queries(prev: Tensor | None, new: Float[Tensor, "head new d"], n: int) -> Tensor:
    """The last ``n`` queries of ``prev`` followed by ``new`` (a prompt read in several forwards)."""
    both = new if prev is None else torch.cat([prev, new], dim=1)
    return both[:, -n:]


class _LastQueries(QKVReader):
    """Keeps each layer's last ``n`` queries of the running prompt (for a SnapKV selection)."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.queries: dict[int, Tensor] = {}
        self.scaling: dict[int, float] = {}
        self.softcap: dict[int, float | None] = {}

    def read(self, call: AttentionCall, x: QKV) -> None:
        self.queries[call.layer] = _last_queries(self.queries.get(call.layer), x.query[0], self.n)
        self.scaling[call.layer], self.softcap[call.layer] = call.scaling, call.softcap


def prefill(model: Any, prompts: Sequence[Sequence[int]], window_queries: int = 0) -> EvictedCache:
    """An :class:`EvictedCache` holding each prompt's keys and values after an ordinary prefill
    (SDPA through the ``"workbench"`` hook, one prompt at a time, chunked past
    :data:`workbench.engine.decoding.PREFILL_CHUNK` tokens), plus the last ``window_queries``
    queries of every layer."""
    from transformers import DynamicCache

    from workbench.engine.attention import hooked_run
    from workbench.engine.decoding import forward_with_cache
    from workbench.kv.policy import geometry

    store = EvictedCache(geometry(model), window_queries)
    dev = model.device
    for ids in prompts:
        reader = _LastQueries(max(1, window_queries))
        with hooked_run(model.hf_model, reader):
            cache, _ = forward_with_cache(model, DynamicCache(), input_ids=torch.tensor([list(ids)], device=dev))
        n = len(ids)
        row: dict[int, list[HeadCache]] = {}
        for layer, kv in enumerate(cache.layers):
            k, v = kv.keys[0], kv.values[0]  # [kv_head, held, d]; a sliding layer holds the last window - 1
            pos = torch.arange(n - k.shape[1], n, device=dev)
            row[layer] = [
                HeadCache(k[h], v[h], pos, torch.zeros_like(pos, dtype=torch.bool)) for h in range(k.shape[0])
            ]
        store.rows.append(row)
        for layer in row:  # a sliding layer keeps its window whatever the HF cache held
            store._slide(len(store.rows) - 1, layer, torch.tensor([n - 1], device=dev))
        store.queries.append(dict(reader.queries) if window_queries else {})
        store.scaling.update(reader.scaling)
        store.softcap.update(reader.softcap)
    return store


def continue_forward(
    model: Any, store: EvictedCache, tokens: Sequence[Sequence[int]], start: Sequence[int], **kwargs: Any
) -> Tensor:
    """Logits of ``tokens[r]`` (right-padded into one batch) at positions ``start[r], ...``
    against each prompt's store, which then holds them too. ``kwargs`` go to the model
    (e.g. ``logits_to_keep``)."""
    from workbench.engine.attention import hooked_run

    dev = model.device
    width = max(len(t) for t in tokens)
    ids = torch.zeros(len(tokens), width, dtype=torch.long, device=dev)
    valid = torch.zeros(len(tokens), width, dtype=torch.bool, device=dev)
    for r, t in enumerate(tokens):
        ids[r, : len(t)] = torch.tensor(list(t), dtype=torch.long)
        valid[r, : len(t)] = True
    pos = torch.tensor(list(start), device=dev)[:, None] + torch.arange(width, device=dev)[None, :]
    store.begin(pos, valid)
    with hooked_run(model.hf_model, store):
        return model.hf_model(input_ids=ids, position_ids=pos, use_cache=False, **kwargs).logits
