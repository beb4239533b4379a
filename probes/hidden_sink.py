"""Hidden attention sinks and their calibration (ACT: Yu et al., "Unveiling and Harnessing Hidden
Attention Sinks: Enhancing Large Language Models without Training through Attention Calibration",
ICML 2024; GATECH-EIC/ACT, ``models/llama_modelling_aug.py``). Definitions:
docs/metrics.md#hidden-sink-rate and docs/metrics.md#act-dloss.

In one head and one prompt of T tokens, the mean attention key s receives is
alpha_s = sum_t A[t,s] / (number of query rows that see s), i.e. ``(A / arange(T, 0, -1)).sum(-2)``
under a causal mask (their code). A *hidden sink* is a key s > 0 (counted from the prompt's
first real token: the first token is the ordinary sink) with alpha_s > ``threshold`` (0.1).
``min_rows`` (default 1, as ACT) can refuse keys seen by too few rows: under ACT's rule the last
token (seen by its own row only) is a sink whenever it attends to itself by more than 0.1.

- ``hidden_sink_rate`` (probe ``hidden_sink``): share of prompts with at least one hidden sink.
- ``hidden_sink_mass``: attention the prompt's rows put on its hidden sinks,
  (1/T) sum_t sum_{s sink} A[t,s], averaged over prompts (0 for a prompt without one).
- ``hidden_sink_count``: number of hidden sinks per prompt, averaged over prompts.

**Calibration** (:class:`SinkCalibration`, a ``WEIGHTS`` edit): in each head it declares, it
finds the hidden sinks of every prompt from the layer's own attention in the same forward (as
ACT does: a head is calibrated alone, so its layer's pattern is the unedited one), multiplies
their columns by ``beta`` (0.4) and gives the freed mass (1 - beta) sum_{s sink} A[t,s] to the
row's other visible keys in proportion to their attention, so every row still sums to 1 (a row
with no weight outside the sinks is left as it was). Probe ``act`` scores each scanned head by
the change in mean next-token loss when that head alone is calibrated (``act_dloss``; one
forward per head, as ACT's search), and on labelled prompts (``meta["choices"]`` and the gold
``label`` or ``label_index``, e.g. dataset ``sentiment``; scored by
:func:`workbench.engine.scoring.classify`, as ZeroTuning is) the change in accuracy (``act_dacc``).
ACT keeps a head when calibrating it raises accuracy on a calibration set; its script scans
heads 0-3 of layers 2-30 (``layers`` / ``heads`` parameters; default every head).

Differences from the code: ACT drops the *first* index above the threshold (``indices[1:]``),
which is position 0 only when the first token is itself a sink; we drop position 0 by
definition. Padding is excluded (rows and keys), positions count from the first real token.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Iterable, Sequence

import pandas as pd
import torch
from jaxtyping import Bool, Float
from pydantic import Field
from torch import Tensor

from probes.base import PatternProbe, TokenProbe
from workbench.engine.call import AttentionCall
from workbench.engine.edits import Rows, WeightsEdit, sites_of
from workbench.engine.masking import attention_scores, first_visible_key, key_visibility
from workbench.engine.scoring import Choices, classify, is_labelled, read_choices, token_losses
from workbench.inputs.prompts import TokenizedPrompt
from workbench.protocol.metrics import MetricInfo
from workbench.protocol.params import Float as FloatOpt
from workbench.protocol.params import Int, Options
from workbench.protocol.roles import Role
from workbench.protocol.run_context import RunContext
from workbench.protocol.table import ProbeResult
from workbench.protocol.views import BatchInfo, PatternView

if TYPE_CHECKING:
    from workbench.models.loading import LoadedModel

DETECT_ELEMENTS = 1 << 22  # scores per block when the calibration edit detects a layer's sinks


class SinkOptions(Options):
    threshold: FloatOpt = Field(
        0.1, ge=0.0, le=1.0, description="a key s > 0 is a hidden sink when its mean incoming attention exceeds this"
    )
    min_rows: Int = Field(
        1, ge=1, description="only keys seen by at least this many query rows can be sinks (1: every key, as ACT)"
    )


def sink_mask(
    col: Float[Tensor, "*lead key"], seen: Float[Tensor, "*lead key"], key_pos: Tensor, threshold: float, min_rows: int
) -> Bool[Tensor, "*lead key"]:
    """Hidden sinks from column sums and the number of rows that see each key (``key_pos``: the
    keys' in-prompt positions, broadcast against ``col``; padding negative)."""
    alpha = col / seen.clamp_min(1)
    return (alpha > threshold) & (seen >= min_rows) & (key_pos >= 1)


class HiddenSinkProbe(PatternProbe):
    name = "hidden_sink"
    metrics = ("hidden_sink_rate", "hidden_sink_mass", "hidden_sink_count")
    description = "keys past the first whose mean incoming attention exceeds a threshold (ACT hidden sinks)"
    needs = ("rows",)  # column sums need every row of a layer
    metric_info = {
        "hidden_sink_rate": MetricInfo(
            "bounded",
            "share of prompts with a hidden sink (a key s > 0 with mean attention > threshold)",
            "the head has hidden sinks on most prompts",
        ),
        "hidden_sink_mass": MetricInfo(
            "bounded", "attention share the prompt's rows put on its hidden sinks", "attention parked on hidden sinks"
        ),
        "hidden_sink_count": MetricInfo("positive", "number of hidden sinks per prompt", "many hidden sinks"),
    }
    roles = (
        Role(
            "hidden_sink",
            "H",
            "hidden_sink_mass",
            0.3,
            "#6a51a3",
            "parks attention on tokens past the first",
            look_for="bright columns on tokens past the first that many queries park their weight on",
        ),
    )
    Params = SinkOptions

    def on_pattern_chunk(self, chunk: PatternView) -> None:
        p = chunk.probs  # [batch, head, chunk, key]
        b, _, _, n_keys = p.shape
        width = chunk.batch.input_ids.shape[1]
        valid = chunk.query_valid
        col = (p * valid[:, None, :, None]).sum(2)
        # rows that see key k: the n_visible keys ending at the query (causal, sliding window)
        key_pos = torch.arange(n_keys, device=p.device)[None, None, :] - chunk.batch.first_index.view(-1, 1, 1)
        q = chunk.query_pos.unsqueeze(-1)
        sees = valid.unsqueeze(-1) & (key_pos <= q) & (key_pos > q - chunk.n_visible.unsqueeze(-1))
        L, H = self.n_layers, self.n_heads
        self.acc("col", b, L, H, width)[:, chunk.layer, :, :n_keys] += col.double()
        self.acc("seen", b, L, width)[:, chunk.layer, :n_keys] += sees.sum(1).double()

    def end_batch(self, batch: BatchInfo) -> None:
        col, seen = self._batch.pop("col"), self._batch.pop("seen").unsqueeze(2)  # [b, L, H|1, key]
        key_pos = batch.positions.view(batch.size, 1, 1, -1)
        sinks = sink_mask(col, seen, key_pos, self.options.threshold, self.options.min_rows)
        count = sinks.sum(-1).double()  # [b, L, H]
        self._batch["hits"] = (count > 0).double().sum(0)
        self._batch["count"] = count.sum(0)
        self._batch["mass"] = ((col * sinks).sum(-1) / batch.lengths.double().view(-1, 1, 1)).sum(0)
        self._batch["n"] = count.new_full(count.shape[1:], float(batch.size))
        super().end_batch(batch)

    def results(self) -> pd.DataFrame:
        t = self.total
        return pd.concat(
            [
                self.rows(f"hidden_sink_{m}", t[k] / t["n"], t["n"])
                for m, k in (("rate", "hits"), ("mass", "mass"), ("count", "count"))
            ],
            ignore_index=True,
        )


def layer_sinks(call: AttentionCall, threshold: float, min_rows: int) -> Bool[Tensor, "batch head key"]:
    """Every head's hidden sinks in one layer call (no KV cache), per batch row, from the
    layer's own attention computed a block of query rows at a time; padding rows and keys are
    left out (a padding key is one no query sees)."""
    b, h, n_q, _ = call.query.shape
    n_k = call.key.shape[2]
    dev = call.query.device
    allowed = key_visibility(call).allowed
    real_key = torch.ones(b, n_k, dtype=torch.bool, device=dev)
    if allowed is not None:
        seen_any = allowed.any(1).any(1).expand(b, -1)
        real_key = torch.zeros_like(real_key)
        real_key[:, : seen_any.shape[1]] = seen_any
    real_query = real_key[:, n_k - n_q :]
    col = torch.zeros(b, h, n_k, dtype=torch.float64, device=dev)
    seen = torch.zeros_like(col)
    step = max(1, DETECT_ELEMENTS // max(1, b * h * n_k))
    for q0 in range(0, n_q, step):
        s, vis = attention_scores(call, q0, min(n_q, q0 + step))
        rows = real_query[:, None, q0 : q0 + step, None]
        p = torch.softmax(s, dim=-1).nan_to_num(0.0)
        col[..., : vis.k_end] += (p * rows).sum(2).double()
        seen[..., : vis.k_end] += (torch.isfinite(s) & rows).sum(2).double()
    key_pos = torch.arange(n_k, device=dev)[None, :] - first_visible_key(call)[:, None]
    key_pos = torch.where(real_key, key_pos, -1)
    return sink_mask(col, seen, key_pos[:, None, :], threshold, min_rows)


class SinkCalibration(WeightsEdit):
    """ACT's calibration of the heads ``[(layer, head), ...]``: each prompt's hidden sinks,
    found from the layer's own attention in the same forward, get ``beta`` times their weight;
    the rest of each row takes the freed mass in proportion to its weights. ``prompts_with_sinks``
    counts, per declared head, the prompts (batch rows) it found sinks in."""

    def __init__(self, heads: Iterable[tuple[int, int]], threshold: float = 0.1, beta: float = 0.4, min_rows: int = 1):
        self.where = sites_of(heads)
        self.threshold, self.beta, self.min_rows = threshold, beta, min_rows
        names = [f"{layer}.{head}" for layer in sorted(self.where) for head in sorted(self.where[layer])]
        self.label = f"act calibration of {', '.join(names)}"
        self.prompts_with_sinks: dict[tuple[int, int], int] = {}
        self._call: AttentionCall | None = None
        self._sinks: Tensor | None = None

    def sites(self) -> dict[int, frozenset[int]]:
        return self.where

    def _detect(self, call: AttentionCall) -> Tensor:
        if self._call is not call:
            self._call, self._sinks = call, layer_sinks(call, self.threshold, self.min_rows)
            for head in self.where.get(call.layer, ()):
                key = (call.layer, head)
                found = int(self._sinks[:, head].any(-1).sum())
                self.prompts_with_sinks[key] = self.prompts_with_sinks.get(key, 0) + found
        assert self._sinks is not None
        return self._sinks

    def edit(self, call: AttentionCall, x: Rows) -> Float[Tensor, "batch head block key"]:
        p = x.values
        sink = self._detect(call)[:, :, None, : p.shape[-1]]  # [batch, head, 1, key]
        zero = torch.zeros((), dtype=p.dtype, device=p.device)
        on = torch.where(sink, p, zero).sum(-1, keepdim=True)
        rest = torch.where(sink | ~x.visible, zero, p).sum(-1, keepdim=True)
        grow = torch.where(rest > 0, 1 + (1 - self.beta) * on / rest.clamp_min(torch.finfo(p.dtype).tiny), 1.0)
        return torch.where(sink, p * self.beta, p * grow)  # heads not declared: restored by the protocol

    def detach(self) -> None:
        """Drop the last layer call held (its tensors) once the forwards are done."""
        self._call, self._sinks = None, None


def _mean_losses(losses: Sequence[Tensor]) -> Float[Tensor, " prompt"]:
    return torch.stack([x.mean() if x.numel() else torch.tensor(math.nan, dtype=torch.float64) for x in losses])


class ActProbe(TokenProbe):
    name = "act"
    metrics = ("act_dloss", "act_dacc", "act_sinks")
    description = "change in next-token loss (and accuracy) when one head's hidden sinks are calibrated (ACT)"
    metric_info = {
        "act_dloss": MetricInfo(
            "signed",
            "change in mean next-token loss when the head's hidden sinks are calibrated (ACT)",
            "calibrating the head hurts",
            "calibrating the head helps",
        ),
        "act_dacc": MetricInfo(
            "signed",
            "change in accuracy on labelled prompts when the head is calibrated (ACT's head selection)",
            "calibrating the head helps",
            "calibrating the head hurts",
        ),
        "act_sinks": MetricInfo(
            "bounded",
            "share of prompts in which the calibrated head had hidden sinks",
            "the calibration had sinks to act on",
        ),
    }

    class Params(SinkOptions):
        beta: FloatOpt = Field(0.4, ge=0.0, le=1.0, description="a hidden sink keeps this share of its attention")
        layers: list[int] | None = Field(None, description="layers to scan (None: every layer; ACT: 2..30)")
        heads: list[int] | None = Field(None, description="heads to scan in each layer (None: every head; ACT: 0..3)")

    def scan(self, model: LoadedModel) -> list[tuple[int, int]]:
        layers = self.options.layers if self.options.layers is not None else range(model.n_layers)
        heads = self.options.heads if self.options.heads is not None else range(model.n_heads)
        return [(layer, head) for layer in layers for head in heads if layer < model.n_layers and head < model.n_heads]

    def run(self, model: LoadedModel, prompts: Sequence[TokenizedPrompt], ctx: RunContext) -> ProbeResult:
        o = self.options
        base = _mean_losses(token_losses(model, prompts, ctx))
        scored = ~torch.isnan(base)
        choices = read_choices(model.tokenizer, prompts, "act's accuracy") if is_labelled(prompts) else None
        correct = _correct(model, prompts, choices, ctx, ()) if choices is not None else None
        shape = (model.n_layers, model.n_heads)
        dloss, dacc, sinks = (torch.full(shape, math.nan, dtype=torch.float64) for _ in range(3))
        for layer, head in self.scan(model):
            edit = SinkCalibration([(layer, head)], o.threshold, o.beta, o.min_rows)
            losses = _mean_losses(token_losses(model, prompts, ctx, [edit]))
            dloss[layer, head] = (losses - base)[scored].mean()
            sinks[layer, head] = edit.prompts_with_sinks.get((layer, head), 0) / len(prompts)
            edit.detach()
            if correct is not None:
                again = SinkCalibration([(layer, head)], o.threshold, o.beta, o.min_rows)
                dacc[layer, head] = (_correct(model, prompts, choices, ctx, [again]) - correct).mean()
                again.detach()
        parts = [self.rows("act_dloss", dloss, int(scored.sum())), self.rows("act_sinks", sinks, len(prompts))]
        if correct is not None:
            parts.append(self.rows("act_dacc", dacc, len(prompts)))
        table = pd.concat(parts, ignore_index=True)
        table = table[table.value.notna()].reset_index(drop=True)  # the heads scanned
        summary = {"base_loss": float(base[scored].mean()), "scanned": len(self.scan(model))}
        lines = [f"act: mean next-token loss {summary['base_loss']:.4f} before calibration"]
        if correct is not None:
            summary["base_accuracy"] = float(correct.mean())
            lines.append(f"act: accuracy {summary['base_accuracy']:.3f} before calibration")
        return self.finish(table, summary, lines)


def _correct(
    model: LoadedModel, prompts: Sequence[TokenizedPrompt], choices: Choices, ctx: RunContext, edits: Sequence
) -> Tensor:
    """1.0 where the prompt's gold choice is the best-scored one (:func:`workbench.engine.scoring.classify`)."""
    return classify(model, prompts, choices, ctx, edits).correct.double()
