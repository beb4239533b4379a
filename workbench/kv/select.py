"""Which context keys each KV head keeps: one function for the masked and the evicted forms.

:func:`select_row` takes one prompt's context keys of one layer (in position order, the
compression point ``c`` = their number) and the layer's head policies, and returns, per KV head,
which keys stay (``keep``) and which are merged into a compensation token (``merge``,
RazorAttention). Both :mod:`workbench.kv.masked` and :mod:`workbench.kv.evicted` call it, so
the test that they agree tests the attention, not two selections.

SnapKV scores (:class:`~workbench.kv.policy.Budget`): the last ``window`` context queries attend
to their visible keys (causal inside the window; softmax in float32 over everything each query
sees, the window included); the weights on the keys before the window are averaged over the
window's queries and over the query heads of the KV group (kvpress' convention for GQA: one
selection per stored KV head; HeadKV instead duplicates KV per query head, which costs ``g``
times the memory), pooled over ``kernel`` neighbouring keys (max: HeadKV, avg: kvpress), and the
``capacity`` best are kept with the window. Ties go to the earlier key.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from jaxtyping import Bool, Float
from torch import Tensor

from workbench.engine.masking import wide
from workbench.kv.policy import Budget, Compensated, Full, HeadPolicy, Window


@dataclass
class Keep:
    """One prompt's selection in one layer, over its ``c`` context keys in position order."""

    keep: Bool[Tensor, "kv_head key"]  # stays in the cache
    merge: Bool[Tensor, "kv_head key"]  # dropped into the head's compensation token

    def kept_tokens(self) -> list[int]:
        """Slots each KV head holds (a compensation token counts as one)."""
        return [int(k.sum()) + int(m.any()) for k, m in zip(self.keep, self.merge)]


def window_size(policies: list[HeadPolicy]) -> int:
    """How many of the last context queries a layer's selection reads (0: none)."""
    return max((p.window for p in policies if isinstance(p, Budget)), default=0)


def snap_scores(
    keys: Float[Tensor, "kv_head key d_head"],
    window_queries: Float[Tensor, "head window d_head"],
    scaling: float,
    softcap: float | None,
    window: int,
) -> Float[Tensor, "kv_head prefix"]:
    """Mean attention of the last ``window`` queries on each key before them, per KV head."""
    c = keys.shape[1]
    q = wide(window_queries[:, -window:])
    h, w = q.shape[0], q.shape[1]
    group = h // keys.shape[0]
    k = wide(keys).repeat_interleave(group, dim=0)
    s = (q * scaling) @ k.transpose(-1, -2)  # [h, w, c]
    if softcap is not None:
        s = softcap * torch.tanh(s / softcap)
    pos = torch.arange(c - w, c, device=s.device)
    s = s.masked_fill(torch.arange(c, device=s.device)[None, :] > pos[:, None], float("-inf"))
    a = torch.softmax(s, dim=-1)[..., : c - w].mean(dim=1)  # [h, c - w]
    return a.view(keys.shape[0], group, c - w).mean(dim=1)


def _pool(scores: Tensor, kernel: int, pooling: str) -> Tensor:
    if kernel == 1:
        return scores
    x = scores[None]
    if pooling == "max":
        return F.max_pool1d(x, kernel, stride=1, padding=kernel // 2)[0]
    return F.avg_pool1d(x, kernel, stride=1, padding=kernel // 2)[0]


def _budget(
    p: Budget, keys: Tensor, window_queries: Tensor | None, scaling: float, softcap: float | None, c: int
) -> Tensor:
    keep = torch.zeros(c, dtype=torch.bool, device=keys.device)
    keep[c - p.window :] = True
    if p.capacity > 0:
        if window_queries is None or window_queries.shape[1] < p.window:
            raise ValueError(f"SnapKV selection needs the last {p.window} context queries")
        s = _pool(snap_scores(keys, window_queries, scaling, softcap, p.window), p.kernel, p.pooling)
        # topk's order among equal values is not specified: break ties towards the earlier key
        order = torch.argsort(-s, dim=-1, stable=True)[..., : p.capacity]
        keep[: c - p.window].scatter_(0, order[0], True)
    return keep


def select_row(
    policies: list[HeadPolicy],
    keys: Float[Tensor, "kv_head key d_head"],
    window_queries: Float[Tensor, "head window d_head"] | None,
    scaling: float,
    softcap: float | None = None,
    positions: Tensor | None = None,
) -> Keep:
    """The keys each KV head of one layer keeps of one prompt's ``c = keys.shape[1]`` context
    keys (``keys`` in position order; ``window_queries``: the last context queries, as many as
    :func:`window_size` asks for, for :class:`~workbench.kv.policy.Budget` heads).

    ``positions``: the keys' positions when they are not ``0 .. c-1``: a sliding-window layer's
    cache holds only its window; there only :class:`~workbench.kv.policy.Window` policies apply
    (:class:`~workbench.kv.policy.CachePolicy` refuses others), by position."""
    n_kv, n = keys.shape[0], keys.shape[1]
    keep = torch.ones(n_kv, n, dtype=torch.bool, device=keys.device)
    merge = torch.zeros(n_kv, n, dtype=torch.bool, device=keys.device)
    pos = torch.arange(n, device=keys.device) if positions is None else positions
    c = int(pos[-1]) + 1 if n else 0
    for kv, p in enumerate(policies):
        if isinstance(p, Full) or p.kept(c) >= c:
            continue
        if isinstance(p, Window):
            keep[kv] = (pos < p.sink) | (pos >= c - p.recent)
        elif isinstance(p, Compensated):
            drop = c - p.capacity + 1  # tokens merged into one: sink + 1 + recent == capacity
            keep[kv] = (pos < p.sink) | (pos >= p.sink + drop)
            merge[kv] = ~keep[kv]
        else:
            group = window_queries.shape[0] // n_kv if window_queries is not None else 1
            wq = window_queries[kv * group : (kv + 1) * group] if window_queries is not None else None
            keep[kv] = _budget(p, keys[kv : kv + 1], wq, scaling, softcap, c)
    return Keep(keep, merge)
