"""Local and global heads by attention span, and the per-token WAAD / FAI they define (Li et al.,
"Attention Illuminates LLM Reasoning", arXiv 2510.13554). Definitions: docs/metrics.md#span.

- ``span`` (per head): the mean distance a head looks back, over response rows R,
  d(l,h) = (1/|R|) sum_{t in R} sum_{s <= t} A[t,s] * (t - s), pooled over every response row of
  every prompt. The heads with the lowest d (``local_share``, 30%) are *local*, the highest
  (``global_share``, 30%) *global*; the head counts are ``round(share x heads)``, ties broken by
  (layer, head).
- ``waad`` (per token t in R, layer = head = -1, ``item`` = prompt id, ``step`` = t): windowed
  average attention distance, sum_s Abar_loc[t,s] min(t - s, W), where Abar_loc is the mean
  pattern of the local heads.
- ``fai`` (per token s): future attention influence, the mean of Abar_glob[t,s] over the rows
  t in R with s + H_lo <= t <= min(N, s + H_hi) (N: the prompt's last position), Abar_glob the
  mean pattern of the global heads; tokens with no such row get no row.

R is every real row by default, or the rows at in-prompt positions >= ``response_start`` (the
parameter, or a prompt's ``meta["response_start"]`` when given). W = 10, H_lo = 10, H_hi = 50 are
not given in the paper's text we read; these are the values of a third-party implementation and
are parameters (``window``, ``horizon_lo``, ``horizon_hi``).

Two passes over the prompts (both through the pattern engine, rows a chunk at a time): the first
gives d and so the head groups, the second accumulates WAAD and FAI directly from each chunk of
the group heads' rows (both are linear in the pattern, so no mean map and no layer's full
pattern is ever held: per batch, two ``[batch, pos]`` sums).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Sequence

import pandas as pd
import torch
from jaxtyping import Bool, Float, Int
from pydantic import Field
from torch import Tensor

from probes.base import PatternProbe, TokenProbe
from workbench.engine.extraction import run_pattern_probes
from workbench.inputs.prompts import TokenizedPrompt
from workbench.protocol.metrics import MetricInfo
from workbench.protocol.params import Float as FloatOpt
from workbench.protocol.params import Int as IntOpt
from workbench.protocol.params import Options
from workbench.protocol.run_context import RunContext
from workbench.protocol.table import ProbeResult
from workbench.protocol.views import BatchInfo, PatternView

if TYPE_CHECKING:
    from workbench.models.loading import LoadedModel

ITEM_COLUMNS = ["metric", "layer", "head", "value", "n", "item", "step", "token"]


def response_starts(batch: BatchInfo, default: int) -> Int[Tensor, " batch"]:
    """Each prompt's first response position: ``meta["response_start"]`` or ``default``."""
    metas = batch.metas or [{}] * batch.size
    starts = [int((m or {}).get("response_start", default)) for m in metas]
    return torch.tensor(starts, dtype=torch.long, device=batch.input_ids.device)


def distances(chunk: PatternView, n_keys: int) -> Int[Tensor, "batch chunk key"]:
    """t - s for every query of the chunk and key column (in-prompt positions)."""
    key_pos = torch.arange(n_keys, device=chunk.query_pos.device)[None, :] - chunk.batch.first_index.view(-1, 1)
    return chunk.query_pos.unsqueeze(-1) - key_pos.unsqueeze(1)


def response_rows(chunk: PatternView, default: int) -> Bool[Tensor, "batch chunk"]:
    return chunk.query_valid & (chunk.query_pos >= response_starts(chunk.batch, default).view(-1, 1))


class SpanPass(PatternProbe):
    """First pass: the summed distance sum_s A[t,s] * (t - s) over response rows, per head."""

    name = "span_pass"
    metrics = ("span",)

    class Params(Options):
        response_start: IntOpt = Field(0, ge=0, description="first response position")

    def _query_terms(self, chunk: PatternView) -> tuple[Tensor, Tensor]:
        """Which rows are response rows, and t - s against every key column of the batch."""
        width = chunk.batch.input_ids.shape[1]
        return response_rows(chunk, self.options.response_start), distances(chunk, width).clamp_min(0).float()

    def on_pattern_chunk(self, chunk: PatternView) -> None:
        p = chunk.probs  # [batch, head, chunk, key]
        use, dist = self.per_queries(chunk, lambda: self._query_terms(chunk))
        d = (p * dist[..., : p.shape[-1]].unsqueeze(1)).sum(-1)  # [batch, head, chunk]
        L, H = self.n_layers, self.n_heads
        self.acc("sum", L, H)[chunk.layer] += (d * use.unsqueeze(1)).sum((0, 2)).double()
        self.acc("n", L, H)[chunk.layer] += use.sum()

    def results(self) -> pd.DataFrame:
        t, n = self.total["sum"], self.total["n"]
        return self.rows("span", torch.where(n > 0, t / n.clamp_min(1), torch.full_like(t, math.nan)), n)


class MapPass(PatternProbe):
    """Second pass: per prompt, WAAD at every row and FAI's numerator at every key, from the
    local and global heads' rows (``local`` / ``global_``: ``[layer, head]`` masks)."""

    name = "span_map"
    metrics = ("waad", "fai")

    class Params(Options):
        response_start: IntOpt = Field(0, ge=0, description="first response position")
        window: IntOpt = Field(10, ge=1, description="W")
        horizon_lo: IntOpt = Field(10, ge=0, description="H_lo")
        horizon_hi: IntOpt = Field(50, ge=0, description="H_hi")

    def __init__(self, local: Tensor, global_: Tensor, **params) -> None:
        super().__init__(**params)
        self.local, self.global_ = local.bool().cpu(), global_.bool().cpu()
        self.items: dict[str, tuple[Tensor, Tensor]] = {}  # prompt id -> (waad, fai) per position
        self._pending: dict[str, tuple[Tensor, Tensor]] = {}

    def begin_batch(self, batch: BatchInfo) -> None:
        super().begin_batch(batch)
        self._pending = {}

    def _query_terms(self, chunk: PatternView) -> tuple[Tensor, Tensor]:
        """Against every key column of the batch: min(t - s, W), and the FAI window (t in R,
        s + H_lo <= t <= s + H_hi; t <= N holds for every real row)."""
        o = self.options
        dist = distances(chunk, chunk.batch.input_ids.shape[1])
        rows = response_rows(chunk, o.response_start).unsqueeze(-1)
        window = rows & (dist >= o.horizon_lo) & (dist <= o.horizon_hi)
        return dist.clamp(0, o.window).float(), window.float()

    def on_pattern_chunk(self, chunk: PatternView) -> None:
        p = chunk.probs
        b, _, _, n_keys = p.shape
        width = chunk.batch.input_ids.shape[1]
        loc, glob = self.local[chunk.layer].tolist(), self.global_[chunk.layer].tolist()
        near, window = self.per_queries(chunk, lambda: self._query_terms(chunk))  # [batch, chunk, width]
        if any(loc):
            w = (p[:, [h for h, x in enumerate(loc) if x]] * near[..., :n_keys].unsqueeze(1)).sum((1, 3))
            self.acc("waad", b, width)[:, chunk.queries] += w.double()  # [batch, chunk]
        if any(glob):
            g = p[:, [h for h, x in enumerate(glob) if x]].sum(1)  # [batch, chunk, key]
            self.acc("fai", b, width)[:, :n_keys] += (g * window[..., :n_keys]).sum(1).double()

    def end_batch(self, batch: BatchInfo) -> None:
        o = self.options
        n_loc, n_glob = int(self.local.sum()), int(self.global_.sum())
        width = batch.input_ids.shape[1]
        waad = self._batch.pop("waad", torch.zeros(batch.size, width, dtype=torch.float64)).cpu() / max(1, n_loc)
        fai = self._batch.pop("fai", torch.zeros(batch.size, width, dtype=torch.float64)).cpu()
        starts = response_starts(batch, o.response_start).cpu()
        for i, pid in enumerate(batch.prompt_ids):
            n, first, r0 = int(batch.lengths[i]), int(batch.first_index[i]), int(starts[i])
            pos = torch.arange(n)
            w = waad[i, first : first + n].clone()
            w[pos < r0] = math.nan
            # rows t in R with s + H_lo <= t <= min(N, s + H_hi), N = n - 1
            count = (pos + o.horizon_hi).clamp_max(n - 1) - torch.maximum(pos + o.horizon_lo, torch.tensor(r0)) + 1
            count = count.clamp_min(0).double()
            f = torch.where(count > 0, fai[i, first : first + n] / (n_glob * count).clamp_min(1), math.nan)
            self._pending[pid] = (w, f if n_glob else torch.full_like(f, math.nan))
        super().end_batch(batch)
        self.items.update(self._pending)
        self._pending = {}

    def abort_batch(self) -> None:
        super().abort_batch()
        self._pending = {}

    def results(self) -> pd.DataFrame:
        return pd.DataFrame(columns=ITEM_COLUMNS)


def head_groups(
    span: Float[Tensor, "layer head"], local_share: float, global_share: float
) -> tuple[Bool[Tensor, "layer head"], Bool[Tensor, "layer head"]]:
    """The bottom ``local_share`` and top ``global_share`` of heads by span (NaN spans excluded),
    ``round(share x heads)`` each, ties broken by (layer, head)."""
    flat = span.flatten().double()
    ok = ~torch.isnan(flat)
    n = int(ok.sum())
    order = [i for i in sorted(range(flat.numel()), key=lambda i: (float(flat[i]), i)) if ok[i]]
    n_loc, n_glob = round(local_share * n), round(global_share * n)
    local, global_ = torch.zeros_like(ok), torch.zeros_like(ok)
    local[order[:n_loc]] = True
    if n_glob:
        global_[order[-n_glob:]] = True
    return local.view(span.shape), global_.view(span.shape)


class SpanProbe(TokenProbe):
    name = "span"
    metrics = ("span", "waad", "fai")
    description = "mean look-back distance per head (local / global heads) and per-token WAAD and FAI"
    metric_info = {
        "span": MetricInfo(
            "positive",
            "mean distance t - s a head's attention looks back over response rows",
            "a global head (reads far back)",
            "a local head (reads nearby tokens)",
        ),
        "waad": MetricInfo(
            "positive", "per token: windowed attention distance of the local heads' mean pattern", "looks back further"
        ),
        "fai": MetricInfo(
            "bounded",
            "per token: mean attention the global heads pay it from 10-50 tokens later",
            "later tokens read it",
        ),
    }

    class Params(Options):
        response_start: IntOpt = Field(
            0, ge=0, description="response rows R start at this position (a prompt's meta response_start wins)"
        )
        local_share: FloatOpt = Field(0.3, ge=0.0, le=1.0, description="share of heads, lowest span, called local")
        global_share: FloatOpt = Field(0.3, ge=0.0, le=1.0, description="share of heads, highest span, called global")
        window: IntOpt = Field(10, ge=1, description="WAAD caps each distance at this window W (unverified: 10)")
        horizon_lo: IntOpt = Field(10, ge=0, description="FAI reads rows at least H_lo tokens later (unverified: 10)")
        horizon_hi: IntOpt = Field(50, ge=0, description="FAI reads rows at most H_hi tokens later (unverified: 50)")

    def run(self, model: LoadedModel, prompts: Sequence[TokenizedPrompt], ctx: RunContext) -> ProbeResult:
        o = self.options
        first = SpanPass(response_start=o.response_start)
        run_pattern_probes(model, prompts, [first], ctx)
        spans = first.results()
        span = torch.tensor(spans.value.to_numpy()).view(model.n_layers, model.n_heads)
        local, global_ = head_groups(span, o.local_share, o.global_share)
        second = MapPass(
            local,
            global_,
            response_start=o.response_start,
            window=o.window,
            horizon_lo=o.horizon_lo,
            horizon_hi=o.horizon_hi,
        )
        run_pattern_probes(model, prompts, [second], ctx)
        table = pd.concat([spans, self._item_rows(model, prompts, second, local, global_)], ignore_index=True)
        summary = {
            "local_heads": [[int(x) for x in ij] for ij in local.nonzero().tolist()],
            "global_heads": [[int(x) for x in ij] for ij in global_.nonzero().tolist()],
        }
        lines = [
            f"span: {int(local.sum())} local heads (mean layer {_mean_layer(local):.1f}), "
            f"{int(global_.sum())} global heads (mean layer {_mean_layer(global_):.1f})"
        ]
        return self.finish(table, summary, lines)

    @staticmethod
    def _item_rows(
        model: LoadedModel, prompts: Sequence[TokenizedPrompt], second: MapPass, local: Tensor, global_: Tensor
    ) -> pd.DataFrame:
        rows = []
        for p in prompts:
            waad, fai = second.items[p.id]
            for metric, values, n in (("waad", waad, int(local.sum())), ("fai", fai, int(global_.sum()))):
                for step, v in enumerate(values.tolist()):
                    if not math.isnan(v):
                        rows.append((metric, -1, -1, v, n, p.id, step, model.tokenizer.decode([p.ids[step]])))
        return pd.DataFrame(rows, columns=ITEM_COLUMNS)


def _mean_layer(mask: Tensor) -> float:
    idx = mask.nonzero()
    return float(idx[:, 0].double().mean()) if len(idx) else math.nan
