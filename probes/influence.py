"""AttentionInfluence (Hua et al., ByteDance Seed, "AttentionInfluence: Adopting Attention Head
Influence for Weak-to-Strong Pretraining Data Selection", arXiv 2505.07293; no code released).

A document matters for reasoning when the model's loss on it depends on its retrieval heads. Mask
the important heads (:class:`~workbench.engine.interventions.HeadFlattening`: their attention
weights uniform over each row's visible prefix, our reading of the paper's 1/L, App. C) and
compare the document's loss with and without the mask:

    AI(x) = (L_masked - L_base) / L_base,

L = the mean next-token cross-entropy over the document's tokens (positions 1 .. n-1 predicted
from their prefix), base = the unmodified model, masked = the heads flattened. Both forwards run
over the same padded batches through :func:`workbench.engine.scoring.token_losses`, composed with
the run's own interventions.

The heads: ``heads`` ("L.H,..."), or the share ``top`` (default 0.05, the paper's top 5%) of the
model's heads ranked by ``metric`` (default ``retrieval``, Wu et al.'s score) read from a workbench
results file ``scores``: the per-head rows of that metric for this model (``scores_model``, or the
run's model name when the file holds several), averaged over the file's rows weighted by ``n``
(several niah lengths become one score per head, as the paper averages over its samples);
k = ceil(top x heads), at least one; ties broken by (layer, head).

Rows: one per document (``layer = head = -1``, ``item`` = the prompt id, ``n`` = tokens scored)
for ``attention_influence``, ``loss_base`` and ``loss_masked``. The summary holds the mean AI and
the documents in the top ``keep`` share (default 0.2: the paper keeps the top 20% of a domain;
compare scores within a domain). Definitions: docs/metrics.md#influence.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import pandas as pd
import torch
from pydantic import Field

from probes.base import MetricInfo, TokenProbe
from workbench.engine.interventions import HeadFlattening, parse_heads
from workbench.engine.scoring import token_losses
from workbench.errors import WorkbenchError
from workbench.inputs.prompts import TokenizedPrompt
from workbench.protocol import params as opt
from workbench.protocol.ranking import rank_heads
from workbench.protocol.run_context import RunContext
from workbench.protocol.table import ProbeResult

if TYPE_CHECKING:
    from workbench.models.loading import LoadedModel

ITEM_COLUMNS = ["metric", "layer", "head", "value", "n", "item"]


def head_scores(table: pd.DataFrame, metric: str, model: str | None = None) -> pd.Series:
    """One score per ``(layer, head)``: ``metric``'s per-head rows (of ``model`` when the table holds
    several models), averaged over the table's rows weighted by ``n`` (NaN rows skipped)."""
    if "metric" not in table.columns or not {"layer", "head", "value"} <= set(table.columns):
        raise WorkbenchError(
            "the scores file is not a workbench results table (no metric / layer / head / value columns)",
            "give a parquet written by `workbench probe` or `workbench sweep`, e.g. data/results/cross_model.parquet",
        )
    rows = table[(table["metric"] == metric) & (table["layer"] >= 0) & (table["head"] >= 0)]
    if rows.empty:
        known = sorted(set(table["metric"].dropna()))
        raise WorkbenchError(
            f"the scores file has no per-head rows of metric {metric!r}",
            f"choose influence.metric from: {', '.join(known[:20])}, or measure it first (workbench probe retrieval)",
        )
    if "model" in rows.columns and rows["model"].nunique() > 1:
        models = sorted(rows["model"].unique())
        if model not in models:
            raise WorkbenchError(
                f"the scores file holds {metric} for several models ({', '.join(models)}), none named {model!r}",
                "name the model whose scores to use: influence.scores_model=NAME",
            )
        rows = rows[rows["model"] == model]
    rows = rows.dropna(subset=["value"])
    weight = rows["n"].clip(lower=0).astype(float) if "n" in rows.columns else pd.Series(1.0, index=rows.index)
    rows = rows.assign(w=weight, wv=weight * rows["value"])
    g = rows.groupby(["layer", "head"])[["w", "wv"]].sum()
    plain = rows.groupby(["layer", "head"])["value"].mean()
    return (g["wv"] / g["w"]).where(g["w"] > 0, plain).rename(metric)


def top_heads(scores: pd.Series, share: float, n_layers: int, n_heads: int) -> list[tuple[int, int]]:
    """The ``ceil(share x heads)`` (at least one) best-scoring heads; heads without a score rank
    last, ties go to the lower (layer, head)."""
    layers = scores.index.get_level_values(0)
    heads = scores.index.get_level_values(1)
    if (layers >= n_layers).any() or (heads >= n_heads).any():
        raise WorkbenchError(
            f"the scores name heads up to {int(layers.max())}.{int(heads.max())}, outside this model's "
            f"{n_layers} layers x {n_heads} heads (scores of another model?)",
            "give the scores measured on this model (influence.scores_model=NAME picks one model of the file)",
        )
    k = max(1, math.ceil(share * n_layers * n_heads - 1e-9))
    every = [(layer, head) for layer in range(n_layers) for head in range(n_heads)]
    value = {(int(a), int(b)): float(v) for (a, b), v in scores.items()}
    return rank_heads(every, value.get)[:k]


def influence(base: Sequence[torch.Tensor], masked: Sequence[torch.Tensor]) -> list[float]:
    """AI per document from its per-token losses without and with the mask (NaN when the document
    has no predicted token or a zero base loss)."""
    out = []
    for b, m in zip(base, masked):
        lb = float(b.mean()) if len(b) else math.nan
        lm = float(m.mean()) if len(m) else math.nan
        out.append((lm - lb) / lb if lb and math.isfinite(lb) else math.nan)
    return out


class AttentionInfluenceProbe(TokenProbe):
    """Per-document AttentionInfluence: relative loss increase with the important heads flattened."""

    name = "influence"
    metrics = ("attention_influence", "loss_base", "loss_masked")
    description = "AttentionInfluence: a document's relative loss increase when its top retrieval heads are flattened"
    metric_info = {
        "attention_influence": MetricInfo(
            "signed",
            "relative increase of the document's mean loss with the chosen heads' attention made uniform",
            "the document needs those heads (the paper keeps the top 20%)",
            "the document is easier without them",
            module="probes/influence.py",
        ),
        "loss_base": MetricInfo(
            "positive",
            "the document's mean next-token loss",
            "a harder document",
            unit="nats",
            module="probes/influence.py",
        ),
        "loss_masked": MetricInfo(
            "positive",
            "the document's mean next-token loss with the chosen heads flattened",
            "a harder document",
            unit="nats",
            module="probes/influence.py",
        ),
    }

    class Params(opt.Options):
        heads: str | None = Field(None, description="heads to flatten, LAYER.HEAD comma list (instead of scores)")
        scores: str | None = Field(
            None, description="results parquet whose per-head metric ranks the heads (e.g. retrieval scores)"
        )
        metric: str = Field("retrieval", description="the metric of the scores file that ranks the heads")
        scores_model: str | None = Field(
            None, description="the model of the scores file to use when it holds several (default: the run's model)"
        )
        top: opt.Float = Field(0.05, gt=0, le=1, description="share of all heads to flatten, best-scoring first")
        keep: opt.Float = Field(0.2, gt=0, le=1, description="share of documents the summary keeps, highest AI first")

    def __init__(self, **params: Any) -> None:
        super().__init__(**params)
        self.chosen: list[tuple[int, int]] = []

    def choose_heads(self, model: LoadedModel) -> list[tuple[int, int]]:
        """The heads to flatten, from ``heads`` or ranked from the ``scores`` file."""
        p = self.options
        if p.heads is not None and p.scores is not None:
            raise WorkbenchError(
                "influence: both heads and scores were given", "give influence.heads=L.H,... or influence.scores=FILE"
            )
        if p.heads is not None:
            try:
                return parse_heads(p.heads, model.n_layers, model.n_heads)
            except WorkbenchError as exc:
                raise WorkbenchError(
                    f"influence.heads: {exc.message}",
                    "write heads as LAYER.HEAD, e.g. 3.1,7.0 "
                    f"(this model: layers 0-{model.n_layers - 1}, heads 0-{model.n_heads - 1})",
                ) from None
        if p.scores is None:
            raise WorkbenchError(
                "influence: no heads to flatten",
                "give influence.heads=L.H,... or influence.scores=RESULTS.parquet (per-head retrieval scores, "
                "e.g. data/results/cross_model.parquet)",
            )
        path = Path(p.scores)
        if not path.is_file():
            raise WorkbenchError(f"influence.scores: no file {path}", "give a results parquet that exists")
        scores = head_scores(pd.read_parquet(path), p.metric, p.scores_model or model.name)
        return top_heads(scores, p.top, model.n_layers, model.n_heads)

    def run(self, model: LoadedModel, prompts: Sequence[TokenizedPrompt], ctx: RunContext) -> ProbeResult:
        self.chosen = self.choose_heads(model)
        base = token_losses(model, prompts, ctx)
        masked = token_losses(model, prompts, ctx, [HeadFlattening(self.chosen)])
        ai = influence(base, masked)
        rows = []
        for p, b, m, a in zip(prompts, base, masked, ai):
            n = len(b)
            for metric, value in (
                ("attention_influence", a),
                ("loss_base", float(b.mean()) if n else math.nan),
                ("loss_masked", float(m.mean()) if n else math.nan),
            ):
                rows.append({"metric": metric, "layer": -1, "head": -1, "value": value, "n": n, "item": p.id})
        return self.finish(pd.DataFrame(rows, columns=ITEM_COLUMNS), *self.summarize(prompts, ai))

    def summarize(self, prompts: Sequence[TokenizedPrompt], ai: Sequence[float]) -> tuple[dict[str, Any], list[str]]:
        scored = sorted(((a, p.id) for p, a in zip(prompts, ai) if math.isfinite(a)), key=lambda t: (-t[0], t[1]))
        kept = scored[: math.ceil(self.options.keep * len(scored))] if scored else []
        mean = sum(a for a, _ in scored) / len(scored) if scored else math.nan
        heads = ",".join(f"{layer}.{head}" for layer, head in self.chosen)
        summary = {
            "heads": heads,
            "n_heads": len(self.chosen),
            "n_documents": len(scored),
            "n_skipped": len(ai) - len(scored),
            "mean": mean,
            "keep": self.options.keep,
            "threshold": kept[-1][0] if kept else math.nan,
            "top_documents": [i for _, i in kept],
        }
        lines = [
            f"influence: {len(self.chosen)} heads flattened ({heads}); mean AI {mean:+.4f} over {len(scored)} documents"
            + (f", top {self.options.keep:.0%} from AI >= {summary['threshold']:+.4f}" if kept else "")
        ]
        return summary, lines
