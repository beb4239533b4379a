"""Attention entropy per head (definitions: docs/metrics.md#entropy).

- ``entropy``: mean over query positions q >= 1 of every prompt of
  H_q = -sum_k A[q,k] ln A[q,k] (nats; 0 ln 0 = 0). Position 0 always has H = 0 and is left out.
- ``entropy_norm``: mean of H_q / ln(n_visible(q)) over the same queries, in [0, 1]; n_visible
  is the number of keys the query may attend to: q + 1 under a plain causal mask (as the
  Active-Dormant Attention Heads code, which divides by ln(q + 1) from the row index), min(q + 1, W)
  in a sliding-window layer, so the value stays in [0, 1] there.

Means are pooled over all (prompt, query) pairs, so long prompts weigh more; ``n`` is the number
of query positions averaged.
"""

from __future__ import annotations

import math

import pandas as pd
import torch

from probes.base import PatternProbe
from workbench.protocol.metrics import MetricInfo
from workbench.protocol.views import PatternView


def _mean(total: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
    """total / n, NaN where nothing was averaged (e.g. only one-token prompts)."""
    return torch.where(n > 0, total / n.clamp_min(1), torch.full_like(total, math.nan))


class EntropyProbe(PatternProbe):
    name = "entropy"
    metrics = ("entropy", "entropy_norm")
    description = "mean attention entropy per query (nats) and entropy / ln(visible keys)"
    needs = ("row_entropy",)
    metric_info = {
        "entropy": MetricInfo(
            "positive",
            "mean entropy of a query's attention row, in nats",
            "attention spread over many keys",
            "attention focused on few keys",
            rank="low",
            unit="nats",
        ),
        "entropy_norm": MetricInfo(
            "bounded",
            "attention entropy divided by ln(number of visible keys)",
            "near-uniform attention over what the query sees",
            "attention on one key",
            rank="low",
        ),
    }

    def on_pattern_chunk(self, chunk: PatternView) -> None:
        h = chunk.row_entropy.double()  # [batch, head, chunk]
        use = (chunk.query_valid & (chunk.query_pos >= 1)).unsqueeze(1)
        use_norm = use & (chunk.n_visible >= 2).unsqueeze(1)
        log_vis = chunk.n_visible.clamp_min(2).double().log().unsqueeze(1)
        L, H = self.n_layers, self.n_heads
        self.acc("sum", L, H)[chunk.layer] += (h * use).sum((0, 2))
        self.acc("n", L, H)[chunk.layer] += use.sum((0, 2))
        self.acc("sum_norm", L, H)[chunk.layer] += (h / log_vis * use_norm).sum((0, 2))
        self.acc("n_norm", L, H)[chunk.layer] += use_norm.sum((0, 2))

    def results(self) -> pd.DataFrame:
        t = self.total
        n, n_norm = t["n"], t["n_norm"]
        return pd.concat(
            [
                self.rows("entropy", _mean(t["sum"], n), n),
                self.rows("entropy_norm", _mean(t["sum_norm"], n_norm), n_norm),
            ],
            ignore_index=True,
        )
