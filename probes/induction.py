"""Previous-token, duplicate-token, induction and echo scores per head (docs/metrics.md#induction).

On a sequence of random tokens repeated with period n (dataset ``repeated-random``; metadata
``period`` and ``offset``, the index of the first random token), for queries at in-prompt
position q:

- ``prev_token``: mean of A[q, q-1] over q >= 1.
- ``duplicate``: mean of A[q, q-n] over queries in the repeats (q - offset >= n).
- ``induction``: mean of A[q, q-n+1] over the same queries.
- ``echo`` (RazorAttention): mean over queries whose token occurred before of the attention on
  those earlier occurrences, sum_{k<q, tok[k]=tok[q]} A[q, k]. It needs no period, so it is
  defined on any text; on repeated-random it equals ``duplicate``.

Deviation from TransformerLens' ``detect_head`` "mul" measure, sum(A * P) / sum(A): that
divides by the attention of *every* query row, including the first copy where the detection
pattern P is empty, so a perfect induction head scores n/(2n) = 0.5 on two copies. We average
over the queries where P is defined, as the head-detector definition states ("mean attention from position q in
the second half"), so a perfect head scores 1; TL's number is ours times the share of rows
with a target. Prompts without a ``period`` count only towards ``prev_token`` and ``echo``.
``n`` is the number of queries averaged.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import pandas as pd
import torch
from torch import Tensor

from probes.base import PatternProbe
from workbench.engine.patterns import same_token_ranges
from workbench.protocol.metrics import MetricInfo
from workbench.protocol.roles import Role
from workbench.protocol.views import BatchInfo, PatternView


class Targets(NamedTuple):
    """What induction reads of a batch's queries, the same in every layer
    (:meth:`~probes.base.PatternProbe.per_queries`)."""

    keys: Tensor  # [batch, query, 3]: previous token, earlier copy, the token after it (-1 where none)
    echo_lo: Tensor  # [batch, query]: echo's key range, in same-token order
    echo_hi: Tensor
    use_named: Tensor  # [batch, 1, query, 3]: 1.0 where the query counts towards prev_token / duplicate / induction
    use_echo: Tensor  # [batch, 1, query]: 1.0 where it counts towards echo
    n: Tensor  # [4]: queries counted per metric, float64


class InductionProbe(PatternProbe):
    name = "induction"
    metrics = ("prev_token", "duplicate", "induction", "echo")
    description = (
        "attention to the previous token, the earlier copy (duplicate), the token after it (induction), "
        "earlier same tokens (echo)"
    )
    metric_info = {
        "prev_token": MetricInfo("bounded", "mean attention to the previous token", "a previous-token head"),
        "duplicate": MetricInfo(
            "bounded",
            "mean attention to the earlier copy of the current token, on repeated random tokens",
            "a duplicate-token head",
        ),
        "induction": MetricInfo(
            "bounded",
            "mean attention to the token after the earlier copy of the current token, on repeated random tokens",
            "an induction head",
        ),
        "echo": MetricInfo(
            "bounded", "attention on earlier occurrences of the current token (any text)", "an echo head"
        ),
    }
    roles = (
        Role(
            "previous-token",
            "P",
            "prev_token",
            0.4,
            "#1f78b4",
            "attends to the previous token",
            look_for="the sub-diagonal: each query attends to the token just before it (key = query - 1)",
        ),
        Role(
            "duplicate",
            "D",
            "duplicate",
            0.3,
            "#33a02c",
            "attends to the earlier copy of the current token",
            look_for="the stripe in the second copy on the earlier copy's diagonal: each query attends to the "
            "earlier occurrence of its own token (key = query - period)",
        ),
        Role(
            "induction",
            "I",
            "induction",
            0.3,
            "#e31a1c",
            "attends to the token after the earlier copy (induction)",
            look_for="the stripe in the second copy one key to the right of the earlier copy's diagonal: each query "
            "attends to the token that followed its token's earlier occurrence (key = query - period + 1)",
        ),
        Role(
            "echo",
            "E",
            "echo",
            0.3,
            "#b2df8a",
            "attends to earlier occurrences of the current token",
            look_for="weight on earlier occurrences of the query's own token",
        ),
    )
    scatter_pairs = (("prev_token", "induction"),)
    needs = ("key_weights",)

    def begin_batch(self, batch: BatchInfo) -> None:
        super().begin_batch(batch)
        metas = batch.metas or [{} for _ in range(batch.size)]
        dev = batch.input_ids.device
        self._period = torch.tensor([int(m.get("period", 0) or 0) for m in metas], device=dev).view(-1, 1)
        self._offset = torch.tensor([int(m.get("offset", 0) or 0) for m in metas], device=dev).view(-1, 1)
        # earlier keys holding the query's token: a key range once positions are sorted by token
        self._rank, self._echo_lo, self._echo_hi = same_token_ranges(batch)

    def _targets(self, chunk: PatternView) -> Targets:
        """The layer-independent part (:meth:`per_queries`): each query's named keys (previous
        token, earlier copy, the token after it; -1 where there is none), echo's key range, and
        which queries each metric averages over (float32, for the named keys and for echo) and
        how many."""
        qpos, valid = chunk.query_pos, chunk.query_valid
        first = chunk.batch.first_index.view(-1, 1)
        none = torch.full_like(qpos, -1)
        has_prev = valid & (qpos >= 1)
        rep = valid & (self._period > 0) & (qpos - self._offset >= self._period)
        keys = torch.stack(
            [
                torch.where(has_prev, first + qpos - 1, none),
                torch.where(rep, first + qpos - self._period, none),
                torch.where(rep, first + qpos - self._period + 1, none),
            ],
            dim=-1,
        )
        lo, hi = self._echo_lo[:, chunk.queries], self._echo_hi[:, chunk.queries]
        use = torch.stack([has_prev, rep, rep, valid & (hi > lo)], dim=-1)  # [batch, chunk, metric]
        weights = use.float().unsqueeze(1)  # [batch, 1, chunk, metric]
        return Targets(keys, lo, hi, weights[..., :3], weights[..., 3], use.sum((0, 1)).double())

    def on_pattern_chunk(self, chunk: PatternView) -> None:
        t = self.per_queries(chunk, lambda: self._targets(chunk))
        a = chunk.probs_at(t.keys)  # [batch, head, chunk, 3]: previous token, earlier copy, the token after it
        echo = chunk.mass_in(t.echo_lo, t.echo_hi, self._rank)  # [batch, head, chunk]
        total = self.acc(
            "sum", len(self.metrics), self.n_layers, self.n_heads
        )  # [metric, layer, head], self.metrics' order
        total[:3, chunk.layer] += (a * t.use_named).sum((0, 2)).T
        total[3, chunk.layer] += (echo * t.use_echo).sum((0, 2))
        self.acc("n", len(self.metrics), self.n_layers)[:, chunk.layer] += t.n

    def results(self) -> pd.DataFrame:
        frames = []
        for i, metric in enumerate(self.metrics):
            total, n = self.total["sum"][i], self.total["n"][i].unsqueeze(-1).expand(-1, self.n_heads)
            value = torch.where(n > 0, total / n.clamp_min(1), torch.full_like(total, math.nan))
            frames.append(self.rows(metric, value, n))
        return pd.concat(frames, ignore_index=True)
