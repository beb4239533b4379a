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
(:mod:`workbench.engine.divergence`). Definitions: docs/metrics.md#vhd.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal, Sequence

import pandas as pd
from jaxtyping import Float
from pydantic import Field
from torch import Tensor

from probes.base import DivergenceProbe
from workbench.engine.divergence import divergence_rows, measure
from workbench.inputs.conditions import ConditionPair, image_pair
from workbench.inputs.prompts import Prompt
from workbench.protocol.metrics import MetricInfo
from workbench.protocol.params import Int, Options
from workbench.protocol.run_context import RunContext
from workbench.protocol.table import ProbeResult

if TYPE_CHECKING:
    from workbench.models.loading import LoadedModel


def t_vhd(div: Float[Tensor, "step layer head"], top_k: int) -> Float[Tensor, " step"]:
    """``[step, layer, head]`` VHD -> ``[step]``: per layer the sum of its top-k heads, summed."""
    k = min(int(top_k), div.shape[-1])
    return div.topk(k, dim=-1).values.sum(-1).sum(-1)


class VHDProbe(DivergenceProbe):
    """Vision-aware head divergence of a vision-language model on (image, text) items."""

    name = "vhd"
    metrics = ("vhd", "image_attention", "t_vhd")
    description = "vision-aware head divergence: |z(with image) - z(without)| per head; T-VHD per generated token"
    metric_info = {
        "vhd": MetricInfo(
            "log",
            "distance between the head's output with and without the image (VHD)",
            "the image changes what the head writes",
            module="probes/vhd.py",
        ),
        "image_attention": MetricInfo(
            "bounded",
            "attention mass on the image tokens at the generation positions",
            "the head reads the image",
            module="probes/vhd.py",
        ),
        "t_vhd": MetricInfo(
            "positive",
            "per generated token: sum over layers of the layer's top-k VHD",
            "the token depends on the image",
            "the token is produced with little regard to the image (hallucination signal)",
        ),
    }
    scatter_pairs = (("image_attention", "vhd"),)
    divergence_metric = "vhd"
    attention_metric = "image_attention"

    class Params(Options):
        steps: Literal["first", "all"] = Field(
            "first", description="first: the first generated token (the paper); all: every answer token"
        )
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
        outcomes = self.outcomes = measure(
            self, model, items, ctx
        )  # kept per item (tokens, per-step divergences) for inspection
        frames = divergence_rows(self, model, outcomes, "vhd", "image_attention")
        rows = []
        for o in outcomes:
            for step, value in enumerate(t_vhd(o.divergence, p.top_k).tolist()):
                tok = model.tokenizer.decode([o.tokens[step]]) if step < len(o.tokens) else ""
                rows.append(
                    {
                        "metric": "t_vhd",
                        "layer": -1,
                        "head": -1,
                        "value": value,
                        "n": 1,
                        "item": o.id,
                        "step": step,
                        "token": tok,
                    }
                )
        frames.append(pd.DataFrame(rows, columns=["metric", "layer", "head", "value", "n", "item", "step", "token"]))
        answers = {o.id: model.tokenizer.decode(o.tokens) for o in outcomes}
        return self.finish(
            pd.concat(frames, ignore_index=True),
            {"n_items": len(outcomes), "answers": answers},
            [f"vhd: {len(outcomes)} items ({p.steps} generated token{'s' if p.steps == 'all' else ''})"],
        )
