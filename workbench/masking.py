"""Attention scores exactly as the model formed them: the one place masks are interpreted.

Every consumer of attention weights (the pattern chunks of :mod:`workbench.patterns`, the
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
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from workbench.attention import AttentionCall

NEG = -1e30  # a finite "minus infinity": exp() gives exactly 0 and 0 * NEG stays finite


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
    return KeyVisibility(q0, q1, k_end, offset, allowed[..., :k_end], False,
                         additive[..., :k_end] if additive is not None else None)


def attention_scores(
    call: AttentionCall, q0: int = 0, q1: int | None = None, fill: float = float("-inf"),
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
    qs = (q[:, :, vis.q0 : vis.q1].float() * call.scaling).reshape(b, n_kv, g, c, d)
    kt = k[:, :, : vis.k_end].float().transpose(-1, -2).unsqueeze(2)  # [b, kv, 1, d, key]
    s = torch.matmul(qs, kt).view(b, h, c, vis.k_end)
    if call.softcap is not None:
        s.div_(call.softcap).tanh_().mul_(call.softcap)
    if vis.additive is not None:
        s.add_(vis.additive.float().clamp_min(NEG))
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
