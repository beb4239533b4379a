"""Streaming score per head: the share of attention on the sink tokens plus a recent window
(definitions: docs/metrics.md#streaming).

DuoAttention splits heads into *streaming* heads, whose attention concentrates on the first few
(sink) tokens and a window of recent tokens, and *retrieval* heads, which need the full
context. For query position q the streaming mass is

    S_q = sum_{k < sink} A[q,k] + sum_{q - recent < k <= q} A[q,k]

(default 4 sink tokens, 64 recent, the current token included). ``streaming`` is the mean of
S_q over queries that can see more than the sink and the window (q >= sink + recent); earlier
queries would score 1 whatever the head does, so they are left out. Near 1: the head could use a
streaming (sink + window) KV cache; low: it reads the middle of the context. ``n`` = queries.
Positions are in-prompt positions (padding and left-padding offsets removed).
"""

from __future__ import annotations

import math

import pandas as pd
import torch
from pydantic import Field
from torch import Tensor

from probes.base import PatternProbe
from workbench.protocol.metrics import MetricInfo
from workbench.protocol.params import Int, Options
from workbench.protocol.roles import Role
from workbench.protocol.views import PatternView


class StreamingProbe(PatternProbe):
    name = "streaming"
    metrics = ("streaming",)
    description = "share of attention on the first `sink` tokens plus the last `recent` tokens (DuoAttention)"
    metric_info = {
        "streaming": MetricInfo(
            "bounded",
            "share of attention on the first tokens plus a recent window (DuoAttention)",
            "the head could run on a sink + window KV cache",
            "the head reads the middle of the context",
        ),
    }
    needs = ("key_weights",)
    roles = (
        Role(
            "streaming",
            "W",
            "streaming",
            0.95,
            "#bdbdbd",
            "attends almost only to the first tokens and a recent window",
            look_for="the first-token column and a band along the diagonal: the first keys and the most recent ones",
        ),
    )

    class Params(Options):
        sink: Int = Field(4, ge=0, description="number of initial (sink) tokens, a whole number >= 0")
        recent: Int = Field(
            64, ge=1, description="size of the recent window, a whole number >= 1 (the current token included)"
        )

    def __init__(self, **params: int) -> None:
        super().__init__(**params)
        self.sink, self.recent = self.options.sink, self.options.recent

    def _ranges(self, chunk: PatternView) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
        """The layer-independent part (:meth:`per_queries`): key columns of the sink tokens
        [first, first + sink) and of the recent window (q - recent, q] (disjoint for the queries
        scored, q >= sink + recent), which queries are scored (float32) and how many."""
        use = chunk.query_valid & (chunk.query_pos >= self.sink + self.recent)
        first = chunk.batch.first_index.view(-1, 1)
        zero = torch.zeros_like(chunk.query_pos)
        at = first + chunk.query_pos
        return (
            first.expand_as(at),
            (first + self.sink).expand_as(at),  # the same keys for every query
            torch.where(use, at - self.recent + 1, zero),
            torch.where(use, at + 1, zero),
            use.float().unsqueeze(1),
            use.sum().double(),
        )

    def on_pattern_chunk(self, chunk: PatternView) -> None:
        sink_lo, sink_hi, lo, hi, use, n = self.per_queries(chunk, lambda: self._ranges(chunk))
        mass = chunk.mass_in(sink_lo, sink_hi) + chunk.mass_in(lo, hi)  # [batch, head, chunk]
        L, H = self.n_layers, self.n_heads
        self.acc("sum", L, H)[chunk.layer] += (mass * use).sum((0, 2))
        self.acc("n", L, H)[chunk.layer] += n

    def results(self) -> pd.DataFrame:
        t, n = self.total["sum"], self.total["n"]
        return self.rows("streaming", torch.where(n > 0, t / n.clamp_min(1), torch.full_like(t, math.nan)), n)
