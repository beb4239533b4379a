"""A cache policy evaluated by masking: a ``SCORES`` edit on the full computation.

:class:`PolicyMask` runs in one forward over context and continuation (a padded batch, any
padding side): every query at or after its prompt's compression point ``c`` loses the context
keys its KV head evicted (score ``-inf``), and for a :class:`~workbench.kv.policy.Compensated`
head the dropped keys act as one compensation key: each gets the score
``q . mean(k_dropped) * scale - log(n_dropped)`` (soft-capped first when the model caps), so their
softmax weights sum to the compensation key's and their values average to its value; the output
is exactly attention over ``[kept keys, (mean key, mean value)]``. Queries before ``c`` are left
as the model has them.

This is the form a GPU evaluation batches (one forward per prompt batch, the policy's layers run
the eager row-block kernel of :func:`workbench.engine.edits.edited_attention`). It holds every
key in memory: the memory a policy saves is what :mod:`workbench.kv.evicted` measures and
:mod:`workbench.kv.budget` counts.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import Tensor

from workbench.engine.call import AttentionCall
from workbench.engine.edits import Rows, ScoresEdit, Sites
from workbench.engine.masking import wide
from workbench.kv.policy import CachePolicy
from workbench.kv.select import Keep, select_row, window_size


class PolicyMask(ScoresEdit):
    """``policy`` applied at in-prompt positions ``compress_at`` (one per batch row), by masking.

    Positions count from each prompt's first real token (``Rows.key_pos``), so left and right
    padding give the same result."""

    label = "kv-policy mask"

    def __init__(self, policy: CachePolicy, compress_at: Sequence[int]) -> None:
        self.policy = policy
        self.compress_at = [int(c) for c in compress_at]
        self._call: AttentionCall | None = None
        self._keep: list[tuple[int, Keep] | None] = []

    def sites(self) -> Sites:
        return {layer: None for layer in range(self.policy.geometry.n_layers) if self.policy.compresses(layer)}

    def _select(self, call: AttentionCall, rows: Rows) -> list[tuple[int, Keep] | None]:
        """Per batch row: (key index of position 0, the layer's selection), once per call."""
        if self._call is call:
            return self._keep
        policies = self.policy.layer(call.layer)
        w = window_size(policies)
        offset = call.key.shape[2] - call.query.shape[2]
        out: list[tuple[int, Keep] | None] = []
        for r, c in enumerate(self.compress_at):
            first = int((rows.key_pos[r] == 0).nonzero()[0]) if bool((rows.key_pos[r] == 0).any()) else -1
            if first < 0 or first + c > call.key.shape[2]:
                out.append(None)
                continue
            q0 = first + c - min(w, c) - offset  # the window's queries, on the call's query axis
            wq = call.query[r, :, q0 : first + c - offset] if w else None
            out.append((first, select_row(policies, call.key[r, :, first : first + c], wq, call.scaling, call.softcap)))
        self._call, self._keep = call, out
        return out

    def edit(self, call: AttentionCall, x: Rows) -> Tensor:
        s = x.values.clone()
        g = call.query.shape[1] // call.key.shape[1]
        for r, sel in enumerate(self._select(call, x)):
            if sel is None:
                continue
            first, keep = sel
            c = keep.keep.shape[1]
            after = x.query_pos[r] >= self.compress_at[r]  # [block]
            if not bool(after.any()):
                continue
            cols = slice(first, first + c)
            drop = (~keep.keep & ~keep.merge).repeat_interleave(g, dim=0)  # [head, c]
            block = s[r, :, :, cols]  # a view: [head, block, c]
            block.masked_fill_(after[None, :, None] & drop[:, None, :], float("-inf"))
            if bool(keep.merge.any()):
                self._compensate(call, x, r, first, keep, after, block)
        return s

    def _compensate(
        self, call: AttentionCall, x: Rows, r: int, first: int, keep: Keep, after: Tensor, block: Tensor
    ) -> None:
        """Give each merged key the compensation key's score minus log(number merged)."""
        g = call.query.shape[1] // call.key.shape[1]
        q = wide(call.query[r, :, x.q0 : x.q1]) * call.scaling  # [head, block, d]
        k = wide(call.key[r, :, first : first + keep.keep.shape[1]])  # [kv, c, d]
        for kv in range(keep.merge.shape[0]):
            m = keep.merge[kv]
            n = int(m.sum())
            if n == 0:
                continue
            heads = slice(kv * g, (kv + 1) * g)
            sc = (q[heads] @ k[kv, m].mean(dim=0)).to(block.dtype)  # [g, block]
            if call.softcap is not None:
                sc = call.softcap * torch.tanh(sc / call.softcap)
            val = (sc - math.log(n))[:, :, None].expand(-1, -1, n)
            rows = block[heads]  # a view of the scores: the masked write below lands in them
            rows[:, :, m] = torch.where(after[None, :, None], val, rows[:, :, m])
