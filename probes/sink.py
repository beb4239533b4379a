"""Attention sink mass per head (Gu et al., sail-sg/Attention-Sink; definitions: docs/metrics.md#sink_mass).

For one prompt of T tokens, the importance of key k is alpha_k = (1/(T-k)) sum_{q>=k} A[q,k],
the mean attention k receives from the queries that can see it (their code:
``(A / arange(T, 0, -1)).sum(dim=-2)``). For the first token, alpha_0 = (1/T) sum_q A[q,0],
including q = 0 where A[0,0] = 1.

- ``sink_mass``: alpha_0 averaged over prompts.
- ``sink_rate``: fraction of prompts with alpha_0 > epsilon (default 0.3); averaging it over
  layers and heads gives the paper's Sink_1^epsilon.

``n`` is the number of prompts. "First token" is the prompt's first real token, wherever
padding put it.
"""

from __future__ import annotations

import pandas as pd
from pydantic import Field

from probes.base import PatternProbe
from workbench.protocol.metrics import MetricInfo
from workbench.protocol.params import Float, Options
from workbench.protocol.roles import Role
from workbench.protocol.views import BatchInfo, PatternView


class SinkProbe(PatternProbe):
    name = "sink"
    metrics = ("sink_mass", "sink_rate")
    description = "mean attention on the first token (alpha_0) and share of prompts with alpha_0 > epsilon"
    needs = ("key_weights",)
    metric_info = {
        "sink_mass": MetricInfo("bounded", "mean attention on the prompt's first token (alpha_0)", "an attention sink"),
        "sink_rate": MetricInfo(
            "bounded", "share of prompts whose first-token attention alpha_0 exceeds epsilon", "a sink on most prompts"
        ),
    }
    roles = (
        Role(
            "sink",
            "S",
            "sink_mass",
            0.5,
            "#9e9ac8",
            "puts most of its attention on the first token",
            look_for="the first-token column: most queries put most of their weight on key 0",
        ),
    )
    scatter_pairs = (("entropy", "sink_mass"),)

    class Params(Options):
        epsilon: Float = Field(
            0.3, ge=0.0, le=1.0, description="sink_rate counts prompts with alpha_0 > epsilon, a share in [0, 1]"
        )

    @property
    def epsilon(self) -> float:
        return self.options.epsilon

    def on_pattern_chunk(self, chunk: PatternView) -> None:
        valid = self.per_queries(
            chunk, lambda: chunk.query_valid.float().unsqueeze(1)
        )  # [batch, 1, chunk], the same in every layer
        a0 = chunk.key_probs(chunk.batch.first_index)  # [batch, head, chunk]
        self.acc("col0", chunk.batch.size, self.n_layers, self.n_heads)[:, chunk.layer] += (a0 * valid).sum(-1)

    def end_batch(self, batch: BatchInfo) -> None:
        alpha0 = self._batch.pop("col0") / batch.lengths.double().view(-1, 1, 1)  # [batch, L, H]
        self._batch["mass"] = alpha0.sum(0)
        self._batch["hits"] = (alpha0 > self.epsilon).double().sum(0)
        self._batch["n"] = self._batch["mass"].new_full(alpha0.shape[1:], float(batch.size))
        super().end_batch(batch)

    def results(self) -> pd.DataFrame:
        t = self.total
        return pd.concat(
            [self.rows("sink_mass", t["mass"] / t["n"], t["n"]), self.rows("sink_rate", t["hits"] / t["n"], t["n"])],
            ignore_index=True,
        )
