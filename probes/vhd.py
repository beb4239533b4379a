"""Vision-aware head divergence (He et al., "Cracking the Code of Hallucination in LVLMs with
Vision-aware Head Divergence", ACL 2025).

    VHD[l, h] = || z[l, h](y_t | y_<t, x_V, x_T) - z[l, h](y_t | y_<t, x_T) ||_2

the distance between a head's output (before W_O) at a generation position with the image and
without it, same text; y_<t are the tokens the model generated with the image. ``T-VHD`` of a
generated token is the sum over layers of that layer's top-k VHD.

Metrics:
- ``vhd`` (layer, head): the mean over items and generation steps (``steps="first"``: only
  the position that generates the first token, the paper's default; ``"all"``: every token of
  the greedy answer, up to ``max_new_tokens``).
- ``image_attention`` (layer, head): the head's attention mass on the image tokens at the same
  positions (the complement is the "text attention" VHR's set-aside rule uses).
- ``t_vhd``: one row per (item, step) with ``layer = head = -1`` and the item id, step and
  token text in the ``item`` / ``step`` / ``token`` columns. ``top_k`` defaults to 5 (the
  paper leaves k to the model size; configurable with ``--param vhd.top_k=K``).

The counterfactual is "no image" (placeholder removed, text processed as a text-only prompt),
or the item's ``counter_image`` when given. Computed with two teacher-forced batched forwards
(:mod:`workbench.divergence`). Definitions: docs/metrics.md#vhd.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal, Sequence

import pandas as pd
import torch
from jaxtyping import Float
from pydantic import Field
from torch import Tensor

from probes.base import DivergenceProbe, Probe
from workbench.conditions import ConditionPair, check_lengths, image_pair
from workbench.context import RunContext
from workbench.divergence import Divergence, divergence
from workbench.metric_kinds import MetricInfo
from workbench.params import Int, Options
from workbench.prompts import Prompt
from workbench.results import ProbeResult

if TYPE_CHECKING:
    from workbench.models import LoadedModel


def t_vhd(div: Float[Tensor, "step layer head"], top_k: int) -> Float[Tensor, " step"]:
    """``[step, layer, head]`` VHD -> ``[step]``: per layer the sum of its top-k heads, summed."""
    k = min(int(top_k), div.shape[-1])
    return div.topk(k, dim=-1).values.sum(-1).sum(-1)


def divergence_rows(probe: Probe, model: LoadedModel, outcomes: Sequence[Divergence], metric: str, attention_metric: str) -> list[pd.DataFrame]:
    """Per-head means over every (item, step), and the attention mass on the condition."""
    n = sum(o.divergence.shape[0] for o in outcomes)
    if n == 0:
        nan = torch.full((model.n_layers, model.n_heads), float("nan"), dtype=torch.float64)
        return [probe.rows(metric, nan, 0), probe.rows(attention_metric, nan, 0)]
    div = torch.cat([o.divergence for o in outcomes]).double()
    attn = torch.cat([o.condition_attention for o in outcomes]).double()
    return [probe.rows(metric, div.mean(0), n), probe.rows(attention_metric, attn.mean(0), n)]


class VHDProbe(DivergenceProbe):
    """Vision-aware head divergence of a vision-language model on (image, text) items."""

    name = "vhd"
    metrics = ("vhd", "image_attention", "t_vhd")
    description = "vision-aware head divergence: |z(with image) - z(without)| per head; T-VHD per generated token"
    metric_info = {
        "vhd": MetricInfo("log", "distance between the head's output with and without the image (VHD)", "the image changes what the head writes",
                      module="probes/vhd.py"),
        "image_attention": MetricInfo("bounded", "attention mass on the image tokens at the generation positions", "the head reads the image",
                                  module="probes/vhd.py"),
        "t_vhd": MetricInfo("positive", "per generated token: sum over layers of the layer's top-k VHD", "the token depends on the image",
                        "the token is produced with little regard to the image (hallucination signal)"),
    }
    scatter_pairs = (('image_attention', 'vhd'),)
    divergence_metric = "vhd"
    attention_metric = "image_attention"

    class Params(Options):
        steps: Literal["first", "all"] = Field("first", description="first: the first generated token (the paper); all: every answer token")
        max_new_tokens: Int = Field(16, ge=1, le=4096, description="answer tokens to generate at most (steps=all)")
        top_k: Int = Field(5, ge=1, description="T-VHD: sum of each layer's top-k head divergences")

    @classmethod
    def accepts(cls, model: LoadedModel) -> bool:
        return model.is_multimodal

    def pairs(self, model: LoadedModel, items: Sequence[Prompt], root: Any = None) -> list[ConditionPair]:
        return [image_pair(model, it, root) for it in items]

    def run(self, model: LoadedModel, items: Sequence[Prompt], ctx: RunContext) -> ProbeResult:
        """Build each item's pair (with / without its image) and reduce the divergences."""
        p = self.options
        pairs = self.pairs(model, items, ctx.root)
        check_lengths(pairs, model.n_ctx, p.max_new_tokens if p.steps == "all" else 0)
        outcomes = divergence(model, pairs, steps=p.steps, max_new_tokens=p.max_new_tokens, ctx=ctx)
        self.outcomes = outcomes  # per item: tokens and per-step divergences, for inspection
        frames = divergence_rows(self, model, outcomes, "vhd", "image_attention")
        rows = []
        for o in outcomes:
            for step, value in enumerate(t_vhd(o.divergence, p.top_k).tolist()):
                tok = model.tokenizer.decode([o.tokens[step]]) if step < len(o.tokens) else ""
                rows.append({"metric": "t_vhd", "layer": -1, "head": -1, "value": value, "n": 1,
                             "item": o.id, "step": step, "token": tok})
        frames.append(pd.DataFrame(rows, columns=["metric", "layer", "head", "value", "n", "item", "step", "token"]))
        answers = {o.id: model.tokenizer.decode(o.tokens) for o in outcomes}
        return self.finish(pd.concat(frames, ignore_index=True), {"n_items": len(outcomes), "answers": answers},
                           [f"vhd: {len(outcomes)} items ({p.steps} generated token{'s' if p.steps == 'all' else ''})"])
