"""Attention scores exactly as the model formed them: the one place masks are interpreted.

Every consumer of attention weights (the pattern chunks of :mod:`workbench.engine.patterns`, the
answer-row attention of the divergence engine, retrieval's top-1 key per decoding step, the
first-token ablation) reads a layer's scores through :func:`attention_scores`, which applies,
in this order and in float32:

- grouped KV heads (query head ``h`` reads KV head ``h // (n_heads / n_kv_heads)``),
- the scaling (``1/sqrt(d)``, or the model's own, e.g. Gemma's ``query_pre_attn_scalar``),
- logit soft-capping ``c * tanh(s / c)`` when the layer has one (Gemma 2),
- the mask the kernel used: boolean (True = may attend; causal, padding and sliding-window
  masks all arrive this way from transformers), additive float (added; entries at the dtype's
  minimum count as masked), or none with ``is_causal`` (plain causal).

Queries are aligned to the *last* keys: with a KV cache the ``n_q`` queries of a decoding step
sit at key positions ``n_k - n_q .. n_k - 1``. Scores of masked keys are set to ``fill``.
:func:`key_visibility` gives which keys a block of queries may see, how many, and how far to
compute (keys past the block's last visible key are skipped, which halves the work under a
causal mask).

Two more views of the same scores serve statistics that name their keys
(:mod:`workbench.engine.statistics`), masked by the same rules (:func:`_visible`): each query against
a few keys it names (:func:`key_products`, O(T x n x d)), and blocks of queries against a window
of keys each (the banded products of :meth:`workbench.engine.statistics.LayerStatistics.mass_in`,
O(T x window x d)), optionally in a per-row order of the positions (e.g. sorted by token, so
that earlier occurrences of a token form a window). Their masks (:func:`named_key_mask`,
:func:`band_mask`) depend on the call's mask only, so the layers of one forward share them;
callers zero masked weights after ``exp`` or add the mask as a bias before it (:func:`biased`
applies the soft-cap and a float mask's values).
:func:`additive_mask` gives the mask as the float tensor fused kernels take (what SDPA builds
from a boolean mask itself).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from workbench.engine.call import AttentionCall

NEG = -1e30  # a finite "minus infinity": exp() gives exactly 0 and 0 * NEG stays finite


def wide(x: Tensor) -> Tensor:
    """``x`` in float32, or float64 when it already is (a model run in float64 for a reference
    test keeps its precision; half-precision inputs are widened)."""
    return x if x.dtype == torch.float64 else x.float()


@dataclass
class KeyVisibility:
    """Which keys the queries ``[q0, q1)`` of a layer call may attend to."""

    q0: int
    q1: int
    k_end: int  # keys at or past this index are visible to no query of the block
    offset: int  # n_keys - n_queries: query i sits at key position i + offset
    allowed: Bool[Tensor, "batch mask_head block key"] | None  # None: causal (or everything), by position
    causal: bool
    additive: Float[Tensor, "batch mask_head block key"] | None = None  # a float mask's values (0 / bias)

    def mask(self, device: torch.device) -> Bool[Tensor, "batch mask_head block key"]:
        """The boolean mask of the block, built from positions when none was given."""
        if self.allowed is not None:
            return self.allowed
        q = torch.arange(self.q0, self.q1, device=device) + self.offset
        k = torch.arange(self.k_end, device=device)
        vis = k[None, :] <= q[:, None] if self.causal else torch.ones(len(q), len(k), dtype=torch.bool, device=device)
        return vis[None, None]

    def n_visible(self, batch: int, device: torch.device) -> Int[Tensor, "batch block"]:
        """How many keys each query may see (the same for every head of a batch row)."""
        if self.allowed is None:
            if not self.causal:
                return torch.full((batch, self.q1 - self.q0), self.k_end, dtype=torch.long, device=device)
            q = torch.arange(self.q0, self.q1, device=device) + self.offset
            return (q + 1).clamp(0, self.k_end).expand(batch, -1)
        return self.allowed[:, 0].sum(-1).expand(batch, -1)


def key_visibility(call: AttentionCall, q0: int = 0, q1: int | None = None) -> KeyVisibility:
    """Visibility of keys for queries ``[q0, q1)`` (default: all) of ``call``."""
    n_q, n_k = call.query.shape[2], call.key.shape[2]
    q1 = n_q if q1 is None else q1
    offset = n_k - n_q
    if call.mask is None:
        if call.is_causal:
            return KeyVisibility(q0, q1, max(1, min(q1 + offset, n_k)), offset, None, True)
        return KeyVisibility(q0, q1, n_k, offset, None, False)
    m = call.mask[..., q0:q1, :]
    if m.dtype == torch.bool:
        allowed, additive = m, None
    else:
        allowed, additive = m > torch.finfo(m.dtype).min / 2, m
    cols = allowed.any(dim=0).any(dim=0).any(dim=0).nonzero()
    k_end = int(cols.max()) + 1 if cols.numel() else 1
    return KeyVisibility(
        q0, q1, k_end, offset, allowed[..., :k_end], False, additive[..., :k_end] if additive is not None else None
    )


def visible_counts(call: AttentionCall) -> Int[Tensor, "batch query"]:
    """How many keys each query of the call may see (head 0 of a per-head mask), without the
    intermediate copies of :func:`key_visibility`: a boolean mask is counted a block of rows at
    a time (``m.sum(-1)`` over a whole ``[T, T]`` boolean mask makes an int64 copy of it first,
    2 GB at 16k tokens, which was the largest peak of a long Gemma run)."""
    b, _, n_q, _ = call.query.shape
    n_k = call.key.shape[2]
    dev = call.query.device
    if call.mask is None:
        if not call.is_causal:
            return torch.full((b, n_q), n_k, dtype=torch.long, device=dev)
        return (torch.arange(n_q, device=dev) + (n_k - n_q) + 1).clamp(0, n_k).expand(b, -1)
    m = call.mask[:, 0]
    step = max(1, (1 << 22) // max(1, m.shape[0] * m.shape[-1]))
    counts = []
    for q0 in range(0, m.shape[1], step):
        rows = m[:, q0 : q0 + step]
        if rows.dtype != torch.bool:
            rows = rows > torch.finfo(rows.dtype).min / 2
        counts.append(torch.count_nonzero(rows, dim=-1))
    return torch.cat(counts, dim=1).expand(b, -1)


def attention_scores(
    call: AttentionCall,
    q0: int = 0,
    q1: int | None = None,
    fill: float = float("-inf"),
    vis: KeyVisibility | None = None,
) -> tuple[Float[Tensor, "batch head block key"], KeyVisibility]:
    """Float32 scores of queries ``[q0, q1)`` against keys ``[0, k_end)``, masked with ``fill``.

    Rows that may see no key are all ``fill``; callers decide what such a row means.
    """
    vis = vis or key_visibility(call, q0, q1)
    q, k = call.query, call.key
    b, h, _, d = q.shape
    n_kv = k.shape[1]
    g = h // n_kv
    c = vis.q1 - vis.q0
    # scale the queries, not the scores: d multiplications per row instead of k_end
    qs = (wide(q[:, :, vis.q0 : vis.q1]) * call.scaling).reshape(b, n_kv, g, c, d)
    kt = wide(k[:, :, : vis.k_end]).transpose(-1, -2).unsqueeze(2)  # [b, kv, 1, d, key]
    s = torch.matmul(qs, kt).view(b, h, c, vis.k_end)
    biased(call, s, None if vis.additive is None else vis.additive.to(s.dtype).clamp_min(NEG))
    if vis.allowed is not None:
        s.masked_fill_(~vis.allowed, fill)
    elif vis.causal:
        # keys before the block's first query are visible to every row: mask only the diagonal block
        start = max(0, vis.q0 + vis.offset + 1)
        if start < vis.k_end:
            q_at = torch.arange(vis.q0, vis.q1, device=s.device) + vis.offset
            tri = torch.arange(start, vis.k_end, device=s.device)[None, :] > q_at[:, None]
            s[..., start:].masked_fill_(tri, fill)
    return s, vis


def _mask_at(mask: Tensor, rows: Tensor, queries: Tensor, keys: Tensor) -> Tensor:
    """``mask[row, :, query, key]`` for index tensors that broadcast together (the mask-head
    dimension last); broadcast dimensions of the mask are read at 0."""

    def at(dim: int, idx: Tensor) -> Tensor:
        return idx.clamp(0, mask.shape[dim] - 1) if mask.shape[dim] > 1 else torch.zeros_like(idx)

    return mask[at(0, rows), :, at(2, queries), at(3, keys)]


def _visible(call: AttentionCall, rows: Tensor, queries: Tensor, keys: Tensor) -> tuple[Tensor, Tensor | None]:
    """Whether query ``queries`` of batch row ``rows`` may attend to key ``keys`` (keys outside
    ``[0, n_keys)`` may not), and a float mask's additive values there: the rules of
    :func:`attention_scores`, for index tensors that broadcast together (mask heads last)."""
    n_q, n_k = call.query.shape[2], call.key.shape[2]
    inside = (keys >= 0) & (keys < n_k)
    kc = keys.clamp(0, n_k - 1)
    if call.mask is None:
        ok = inside & (kc <= queries + (n_k - n_q)) if call.is_causal else inside
        shape = torch.broadcast_shapes(rows.shape, queries.shape, keys.shape)
        return torch.broadcast_to(ok, shape).unsqueeze(-1), None
    m = _mask_at(call.mask, rows, queries, kc)
    if m.dtype == torch.bool:
        return m & inside.unsqueeze(-1), None
    return (m > torch.finfo(m.dtype).min / 2) & inside.unsqueeze(-1), m.float().clamp_min(NEG)


def biased(call: AttentionCall, s: Tensor, additive: Tensor | None) -> Tensor:
    """Soft-cap, then the additive mask (broadcast against the scores ``s``), in place."""
    if call.softcap is not None:
        s.div_(call.softcap).tanh_().mul_(call.softcap)
    if additive is not None:
        s.add_(additive)
    return s


def grouped_queries(
    call: AttentionCall, out: Tensor | None = None, factor: float = 1.0
) -> Float[Tensor, "batch kv query group d"]:
    """The call's queries, float32, multiplied by the scaling (and ``factor``) and grouped by
    the KV head they read: one copy, into ``out`` when given (any float32
    ``[batch, kv, query, group, d]`` view), else a new contiguous tensor."""
    q = call.query
    b, h, n_q, d = q.shape
    n_kv = call.key.shape[1]
    x = q.reshape(b, n_kv, h // n_kv, n_q, d).transpose(2, 3)
    if out is None:
        out = torch.empty((b, n_kv, n_q, h // n_kv, d), dtype=torch.float32, device=q.device)
    return torch.mul(x, call.scaling * factor, out=out)


def _grouped(x: Tensor, n_kv: int) -> Tensor:
    """``[batch, ..., mask_head]`` (mask heads last, 1 or all heads) as
    ``[batch, kv | 1, ..., group | 1]``, matching scores laid out by KV head and group."""
    mh = x.shape[-1]
    lead = x.shape[:-1]
    x = x.view(*lead, n_kv, mh // n_kv) if mh > 1 else x.view(*lead, 1, 1)
    return x.movedim(-2, 1)


def take_positions(x: Tensor, index: Int[Tensor, "batch n"], dim: int = 2, out: Tensor | None = None) -> Tensor:
    """``x[b, ..., index[b], ...]`` row by row along ``dim`` (index_select per batch row), into
    ``out`` when given (any view of the result's shape, e.g. the first rows of a longer buffer).
    The dimensions after ``dim`` are taken as one when source and destination allow it:
    ``index_select`` copies whole contiguous rows several times faster than it walks a
    multi-dimensional one (measured: 0.13 against 0.49 ms on [3, 1024, 3, 65])."""
    tail = x.shape[dim + 1 :]
    flat = len(tail) > 1 and x[0].is_contiguous() and (out is None or out.is_contiguous())
    rows = x.flatten(dim + 1) if flat else x
    if out is None:
        out = torch.empty((*x.shape[:dim], index.shape[1], *tail), dtype=x.dtype, device=x.device)
    dst = out.flatten(dim + 1) if flat else out
    for i in range(x.shape[0]):
        torch.index_select(rows[i], dim - 1, index[i], out=dst[i])
    return out


def _folds(call: AttentionCall, queries: Tensor, per_query: bool, q0: int, q1: int) -> bool:
    """Whether :func:`key_products` takes every row of ``queries`` (zero rows past the last query
    included) so that (batch, kv, query) fold into one batch axis: all the call's queries, each
    naming its own keys."""
    n_q = call.query.shape[2]
    return per_query and q0 == 0 and q1 == n_q and queries.shape[2] >= n_q


def product_rows(call: AttentionCall, queries: Tensor, per_query: bool, q0: int, q1: int) -> int:
    """Query rows :func:`key_products` takes for queries ``[q0, q1)`` (the caller sizes the key
    buffer by it): every row of ``queries`` when they fold into one batch axis, else ``q1 - q0``."""
    return queries.shape[2] if _folds(call, queries, per_query, q0, q1) else q1 - q0


def key_products(
    call: AttentionCall,
    key_index: Int[Tensor, "batch block n"],
    q0: int = 0,
    q1: int | None = None,
    *,
    queries: Float[Tensor, "batch kv pos group d"],
    keys: Float[Tensor, "batch kv key d"],
    key_buffer: Tensor | None = None,
) -> Float[Tensor, "batch head block n"]:
    """Float32 products ``q . k`` of the queries ``[q0, q1)`` against the ``n`` keys each names
    (``key_index``, on the call's key axis; out-of-range indices read a clamped key, which
    :func:`named_key_mask` masks). O(queries x n x d): no other key is touched.

    ``queries``: float32, grouped by KV head (:func:`grouped_queries`: scaled, so the products
    are the scores before any soft-cap or mask); ``keys``: float32. Given both with one more
    column each (``log2 e (q, -lse)`` and ``(k, 1)``, as
    :class:`~workbench.engine.statistics.LayerStatistics` keeps them), the products are base-2
    log-weights. ``key_index`` of shape ``[batch, 1, n]`` names the same keys for every query
    (the first token, a block of sink keys): then the products are one per row. ``key_buffer``:
    where to gather the named keys (contiguous float32 ``[batch, kv, n, d]``, or
    ``[batch, kv, rows x n, d]`` for keys per query, rows from :func:`product_rows`; a reused
    buffer spares an allocation).
    """
    b, h = call.query.shape[:2]
    n_kv, n_k = call.key.shape[1], call.key.shape[2]
    g, n = h // n_kv, key_index.shape[-1]
    q1 = q0 + key_index.shape[1] if q1 is None else q1
    n_q = q1 - q0
    one = key_index.shape[1] == 1  # the same keys for every query of the row: one product
    whole = _folds(call, queries, not one, q0, q1)
    rows = queries.shape[2] if whole else n_q  # padding rows name key 0; their products are cut
    qg, kf = queries[:, :, q0 : q0 + rows], keys  # [b, kv, rows, g, d], [b, kv, key, d]
    d = kf.shape[-1]
    idx = key_index.clamp(0, n_k - 1)
    if rows > n_q:
        idx = torch.nn.functional.pad(idx, (0, 0, 0, rows - n_q))
    ks = take_positions(kf, idx[:, 0] if one else idx.flatten(1), out=key_buffer)  # [b, kv, n | rows x n, d]
    if one:  # [b x kv] products of [n, d] and [d, block x g] (twice as fast as queries x keys for a few keys)
        st = torch.bmm(ks.flatten(0, 1), qg.flatten(2, 3).flatten(0, 1).transpose(1, 2)).view(b, n_kv, n, n_q, g)
        return st.permute(0, 1, 4, 3, 2).reshape(b, h, n_q, n)
    if whole and n == 1:  # one key per query: a dot product per (query, head)
        s = torch.linalg.vecdot(qg, ks.view(b, n_kv, rows, 1, d)).unsqueeze(-1)[:, :, :n_q]
    elif whole:  # [b x kv x rows] products of [g, d] and [d, n]
        s = torch.bmm(qg.flatten(0, 2), ks.view(b * n_kv * rows, n, d).transpose(1, 2)).view(b, n_kv, rows, g, n)[
            :, :, :n_q
        ]
    else:
        s = torch.empty((b, n_kv, n_q, g, n), dtype=torch.float32, device=kf.device)
        for i in range(b):  # per row and KV head: [block, g, d] of a row is contiguous even when qg is a slice
            for j in range(n_kv):
                torch.bmm(qg[i, j], ks[i, j].view(n_q, n, d).transpose(1, 2), out=s[i, j])
    return s.transpose(2, 3).reshape(b, h, n_q, n)


def named_key_mask(
    call: AttentionCall,
    key_index: Int[Tensor, "batch block n"],
    q0: int = 0,
    q1: int | None = None,
) -> tuple[Bool[Tensor, "batch mask_head block n"], Float[Tensor, "batch mask_head block n"] | None]:
    """Whether query ``q0 + i`` may attend to key ``key_index[b, i, j]`` (a negative or
    out-of-range index may not) by :func:`attention_scores`' rules, and a float mask's additive
    values there (None for boolean or no masks). It depends on the call's mask and shapes only,
    not on its queries and keys, so the layers of one forward can share it."""
    b = call.query.shape[0]
    q1 = q0 + key_index.shape[1] if q1 is None else q1
    dev = call.key.device
    r = torch.arange(b, device=dev).view(b, 1, 1)
    allowed, additive = _visible(call, r, torch.arange(q0, q1, device=dev).view(1, q1 - q0, 1), key_index)
    return allowed.movedim(-1, 1), None if additive is None else additive.movedim(-1, 1)


def band_mask(
    call: AttentionCall,
    q_starts: Int[Tensor, " block"],
    rows: int,
    k_starts: Int[Tensor, " block"],
    width: int,
    order: tuple[Int[Tensor, "batch query"], Int[Tensor, "batch pos"]] | None = None,
    keep: Bool[Tensor, "batch block row key"] | None = None,
) -> tuple[
    Bool[Tensor, "batch kv_or_1 block row group_or_1 key"],
    Float[Tensor, "batch kv_or_1 block row group_or_1 key"] | None,
]:
    """Whether query ``q_starts[i] + r`` (block i, row r) may attend to key ``k_starts[i] + j``
    by :func:`attention_scores`' rules and ``keep`` (keys past the end may not), laid out as a
    banded product's scores (KV head, block, row, group, key); and a float mask's
    additive values (None for boolean or no masks). With ``order = (query_order, key_order)``
    (per batch row) query and key indices count along those orders: query ``i`` is column
    ``query_order[b, i]``, key ``j`` column ``key_order[b, j]``. It depends on the call's mask and
    shapes only, so the layers of one forward can share it."""
    b, h, n_q, _ = call.query.shape
    n_kv, n_k = call.key.shape[1], call.key.shape[2]
    n_b = q_starts.shape[0]
    dev = call.key.device
    qi = q_starts.view(-1, 1) + torch.arange(rows, device=dev)  # [block, row]
    ki = k_starts.view(-1, 1) + torch.arange(width, device=dev)  # [block, key]
    r = torch.arange(b, device=dev).view(b, 1, 1, 1)
    if order is None:
        qcol, kcol = qi.view(1, n_b, rows, 1), ki.view(1, n_b, 1, width)
    else:
        query_order, key_order = order
        qcol = query_order.gather(1, qi.clamp(0, query_order.shape[1] - 1).view(1, -1).expand(b, -1)).view(
            b, n_b, rows, 1
        )
        kcol = key_order.gather(1, ki.clamp(0, n_k - 1).view(1, -1).expand(b, -1)).view(b, n_b, 1, width)
        kcol = torch.where(((ki >= 0) & (ki < n_k)).view(1, n_b, 1, width), kcol, -1)
    allowed, additive = _visible(call, r, qcol, kcol)  # [b, block, row, key, mask_head]
    if keep is not None:
        allowed = allowed & keep.unsqueeze(-1)
    to_scores = lambda x: _grouped(x, n_kv).movedim(-1, -2)  # noqa: E731  [b, kv|1, block, row, g|1, key]
    return to_scores(allowed), None if additive is None else to_scores(additive)


def additive_mask(call: AttentionCall, dtype: torch.dtype) -> Float[Tensor, "batch mask_head query key"] | None:
    """The call's mask as the additive float tensor fused kernels take (0 = attend, -inf = masked;
    a float mask keeps its values), in ``dtype``; None when the call has no mask. This is the
    conversion SDPA applies to a boolean mask itself."""
    m = call.mask
    if m is None:
        return None
    return boolean_bias(m, dtype) if m.dtype == torch.bool else m.to(dtype)


def boolean_bias(allowed: Bool[Tensor, "*shape"], dtype: torch.dtype) -> Float[Tensor, "*shape"]:
    """A boolean mask (or a slice of one) as an additive bias in ``dtype``: 0 where True, -inf elsewhere."""
    zero = torch.zeros((), dtype=dtype, device=allowed.device)
    return torch.where(allowed, zero, torch.full((), float("-inf"), dtype=dtype, device=allowed.device))


def attention_probs(call: AttentionCall, n_last: int | None = None) -> Float[Tensor, "batch head query key"]:
    """The layer's attention weights, in float32, for its last ``n_last`` queries (all by
    default), over every key. Rows that see no key are all zero."""
    n_q, n_k = call.query.shape[2], call.key.shape[2]
    q0 = n_q - (n_q if n_last is None else n_last)
    s, vis = attention_scores(call, q0, n_q)
    p = torch.softmax(s, dim=-1).nan_to_num(0.0)
    if vis.k_end < n_k:
        p = torch.nn.functional.pad(p, (0, n_k - vis.k_end))
    return p


def first_visible_key(call: AttentionCall) -> Int[Tensor, " batch"]:
    """Index of each row's first real key: the earliest key any query of the call may see
    (left padding moves it; a sliding window does not, as long as the call holds the prompt's
    first query: in a decoding step of a sliding-window layer the earliest cached key is the
    window's start, and the first token may no longer be cached at all)."""
    b = call.query.shape[0]
    vis = key_visibility(call)
    if vis.allowed is None:
        return torch.zeros(b, dtype=torch.long, device=call.query.device)
    return vis.allowed.any(dim=2).any(dim=1).int().argmax(-1).expand(b)
