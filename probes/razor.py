"""RazorAttention's echo and induction scores per query head (docs/metrics.md#probe-razor).

Source: RazorAttention (Tang et al., 2024, arXiv 2407.15891); the scoring as Huawei's
implementation does it, mindspore-ai/golden-stick,
``mindspore_gs/experimental/long_context_compress/razor_attention/`` (``razor_attention.py``
builds the input, ``wrappers/vllm_mindspore/attention_wrappers.py``, ``RACompressCell``, scores it).

Input: a block of SEG random tokens repeated 4 times after a BOS (dataset ``repeated-random`` with
``period=SEG, repeats=4, prepend_bos=true``; its metadata ``period`` = SEG and ``offset`` = index of
the first random token). For a prompt of S tokens (BOS included), in-prompt rows i and columns j:

- echo mask: ``E[i, j] = 1`` for ``j = i - k*SEG``, ``k >= 1``, ``j >= offset``: the earlier
  occurrences of row i's token (rows ``i - offset >= SEG``, i.e. the three later copies);
- induction mask: ``I[i, j + 1] = 1`` for the same (i, j): the token that followed each of them;
- ``razor_echo = mean over all S x S entries of A * E`` = ``sum(A * E) / S^2`` per head, likewise
  ``razor_induction``; averaged over prompts (``n`` = prompts). This is golden-stick's
  normalisation (``ops.mean`` of the masked S x S matrix): a scaled sum, whose scale depends on S,
  so only heads scored on prompts of the same length compare.
- ``normalise="rows"``: instead, each scored row's attention on its masked keys (summed over k),
  averaged over the scored rows of all prompts (``n`` = rows): 1 for a head that puts all its
  weight on earlier copies (echo) or on the tokens after them (induction), whatever S. This equals
  ``sum(A * E) / (number of scored rows)``; with 4 copies, ``rows = 3 * SEG`` and the two
  normalisations differ by the constant ``S^2 / (3 SEG)``.

Deviations from golden-stick, on purpose (both documented in docs/metrics.md):

- BOS. golden-stick builds its mask in absolute indices, ``i >= SEG, j = i % SEG + m*SEG < i``.
  Since the BOS shifts rows and columns alike, ``j = i - k*SEG`` is still the same token, except
  at ``j = 0``: rows ``i = SEG, 2 SEG, 3 SEG, 4 SEG`` also mark the BOS as an "occurrence" (and
  the first random token as its "successor"), and row SEG (the first copy's last token, which has
  no earlier occurrence) is scored on the BOS alone. BOS is the attention sink, so these 4 entries
  add up to ``4 / S^2`` to echo. Default ``mask="occurrences"`` marks only true occurrences
  (``j >= offset``); ``mask="golden-stick"`` reproduces their mask (``j >= 0``).
- Causality. golden-stick's scoring cell recomputes the attention as softmax(scores + triu * -1e-5),
  a penalty of 1e-5 on future keys where -inf (or -1e5) was surely meant, so its rows spread
  over future keys too. We read the model's own attention (causal, sliding windows included).
- Tokens. golden-stick draws 2500 ids uniformly *with* replacement from [10000, 12500] (so a
  block repeats tokens; its mask ignores those repeats); ``repeated-random`` draws SEG ids without
  replacement from the whole vocabulary minus special tokens, so the masks name every earlier
  occurrence of a row's token.

GQA: scores are per query head; golden-stick then takes the max over each KV head's group of
query heads (``_max_every_group``): :func:`to_kv_heads` (the KV-cache selectors' rule,
``rule="max"``; ``"mean"`` as the kvpress convention).

Cost: every query names at most 3 keys per mask (``repeats - 1``), read from the layer statistics
(:meth:`~workbench.protocol.views.PatternView.probs_at`): O(S x 6 x d) per layer, no S x S matrix.
"""

from __future__ import annotations

import math
from typing import Literal, NamedTuple

import pandas as pd
import torch
from pydantic import Field
from torch import Tensor

from probes.base import PatternProbe
from workbench.kv.selectors import to_kv_heads  # the one GQA aggregation (max / mean / sum)
from workbench.protocol.metrics import MetricInfo
from workbench.protocol.params import Options
from workbench.protocol.views import BatchInfo, PatternView

METRICS = ("razor_echo", "razor_induction")


class Targets(NamedTuple):
    """What the probe reads of a batch's queries, the same in every layer."""

    keys: Tensor  # [batch, query, 2K]: K echo keys (batch columns), then the K keys after them; -1 where none
    scored: Tensor  # [batch, 1, query]: 1.0 on rows with at least one echo key


class RazorProbe(PatternProbe):
    name = "razor"
    metrics = METRICS
    description = (
        "RazorAttention's echo and induction scores on repeated random tokens: attention on the earlier "
        "copies of the query's token and on the tokens after them"
    )
    metric_info = {
        "razor_echo": MetricInfo(
            "positive",
            "RazorAttention echo score: attention on earlier copies of the current token (sum over the S x S "
            "matrix / S^2 by default)",
            "an echo head (RazorAttention keeps its whole cache)",
        ),
        "razor_induction": MetricInfo(
            "positive",
            "RazorAttention induction score: attention on the tokens after the earlier copies (sum over the "
            "S x S matrix / S^2 by default)",
            "an induction head (RazorAttention keeps its whole cache)",
        ),
    }
    scatter_pairs = (("razor_echo", "razor_induction"),)
    needs = ("key_weights",)

    class Params(Options):
        normalise: Literal["matrix", "rows"] = Field(
            "matrix",
            description=(
                "matrix: golden-stick's mean over all S x S entries of the masked attention, averaged over prompts; "
                "rows: mean over the scored rows of each row's attention on its masked keys (1 = all of it)"
            ),
        )
        mask: Literal["occurrences", "golden-stick"] = Field(
            "occurrences",
            description=(
                "occurrences: only true earlier occurrences of the row's token; golden-stick: their absolute-index "
                "mask, which also marks the BOS for rows whose index is a multiple of SEG"
            ),
        )

    def begin_batch(self, batch: BatchInfo) -> None:
        super().begin_batch(batch)
        metas = batch.metas or [{} for _ in range(batch.size)]
        dev = batch.input_ids.device
        period = torch.tensor([int(m.get("period", 0) or 0) for m in metas], device=dev)
        offset = torch.tensor([int(m.get("offset", 0) or 0) for m in metas], device=dev)
        base = offset if self.options.mask == "occurrences" else torch.zeros_like(offset)
        lengths = batch.lengths.to(dev)
        # rows i with a key j = i - period >= base: i in [base + period, length)
        rows = torch.where(period > 0, (lengths - base - period).clamp_min(0), 0)
        self._period, self._base = period.view(-1, 1, 1), base.view(-1, 1, 1)
        span = torch.where(period > 0, (lengths - 1 - base) // period.clamp_min(1), 0)
        self._n_keys = max(1, int(span.max()))  # K: the most earlier copies any row has
        if self.options.normalise == "matrix":
            # per prompt: sum / S^2, prompts averaged
            self._scale = torch.where(period > 0, 1.0 / lengths.double() ** 2, 0.0)
            self._count = float((period > 0).sum())
        else:
            self._scale = (period > 0).double()
            self._count = float(rows.sum())

    def _targets(self, chunk: PatternView) -> Targets:
        qpos, valid = chunk.query_pos.unsqueeze(-1), chunk.query_valid.unsqueeze(-1)  # [batch, chunk, 1]
        k = torch.arange(1, self._n_keys + 1, device=qpos.device)
        j = qpos - k * self._period  # in-prompt columns of earlier copies, [batch, chunk, K]
        ok = valid & (self._period > 0) & (j >= self._base)
        col = chunk.batch.first_index.view(-1, 1, 1) + j
        none = torch.full_like(col, -1)
        keys = torch.cat([torch.where(ok, col, none), torch.where(ok, col + 1, none)], dim=-1)
        return Targets(keys, ok.any(-1).float().unsqueeze(1))

    def on_pattern_chunk(self, chunk: PatternView) -> None:
        t = self.per_queries(chunk, lambda: self._targets(chunk))
        a = chunk.probs_at(t.keys)  # [batch, head, chunk, 2K]
        kk = self._n_keys
        per_prompt = torch.stack(
            [(a[..., :kk].sum(-1) * t.scored).sum(-1), (a[..., kk:].sum(-1) * t.scored).sum(-1)]
        )  # [metric, batch, head]
        total = self.acc("sum", len(self.metrics), self.n_layers, self.n_heads)
        total[:, chunk.layer] += (per_prompt.double() * self._scale.view(1, -1, 1)).sum(1)

    def end_batch(self, batch: BatchInfo) -> None:
        self._batch["n"] = torch.tensor(self._count, dtype=torch.float64, device=self.device)
        super().end_batch(batch)

    def results(self) -> pd.DataFrame:
        total = self.total.get("sum", torch.zeros(len(self.metrics), self.n_layers, self.n_heads, dtype=torch.float64))
        n = float(self.total["n"]) if "n" in self.total else 0.0
        frames = []
        for i, metric in enumerate(self.metrics):
            value = total[i] / n if n > 0 else torch.full_like(total[i], math.nan)
            frames.append(self.rows(metric, value, int(n)))
        return pd.concat(frames, ignore_index=True)


Razor = RazorProbe  # the name issue 32's brief gives the entry point


def kv_head_table(table: pd.DataFrame, n_kv_heads: int, rule: Literal["max", "mean"] = "max") -> pd.DataFrame:
    """A tidy head table (``metric, layer, head, value, n``; one run's rows, other columns ignored)
    aggregated to KV heads by :func:`to_kv_heads`: rows ``metric, layer, kv_head, value, n``."""
    frames = []
    for metric, sub in table.groupby("metric", sort=False):
        wide = sub.pivot(index="layer", columns="head", values="value").sort_index().sort_index(axis=1)
        kv = to_kv_heads(torch.tensor(wide.to_numpy(), dtype=torch.float64), n_kv_heads, rule)
        layer, kv_head = torch.meshgrid(torch.arange(kv.shape[0]), torch.arange(kv.shape[1]), indexing="ij")
        frames.append(
            pd.DataFrame(
                {
                    "metric": metric,
                    "layer": wide.index.to_numpy()[layer.flatten().numpy()],
                    "kv_head": kv_head.flatten().numpy(),
                    "value": kv.flatten().numpy(),
                    "n": int(sub["n"].min()),
                }
            )
        )
    return pd.concat(frames, ignore_index=True)


__all__ = ["Razor", "RazorProbe", "kv_head_table", "to_kv_heads"]
