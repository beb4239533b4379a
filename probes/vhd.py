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
(:mod:`workbench.divergence`).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import pandas as pd
import torch

from probes.base import Probe
from workbench.conditions import check_lengths, image_pair
from workbench.divergence import Divergence, divergence
from workbench.errors import WorkbenchError
from workbench.prompts import Prompt


def t_vhd(div: torch.Tensor, top_k: int) -> torch.Tensor:
    """``[step, layer, head]`` VHD -> ``[step]``: per layer the sum of its top-k heads, summed."""
    k = min(int(top_k), div.shape[-1])
    return div.topk(k, dim=-1).values.sum(-1).sum(-1)


def divergence_rows(probe: Probe, outcomes: Sequence[Divergence], metric: str, attention_metric: str) -> list[pd.DataFrame]:
    """Per-head means over every (item, step), and the attention mass on the condition."""
    n = sum(o.divergence.shape[0] for o in outcomes)
    if n == 0:
        nan = torch.full((probe.n_layers, probe.n_heads), float("nan"), dtype=torch.float64)
        return [probe.rows(metric, nan, 0), probe.rows(attention_metric, nan, 0)]
    div = torch.cat([o.divergence for o in outcomes]).double()
    attn = torch.cat([o.condition_attention for o in outcomes]).double()
    return [probe.rows(metric, div.mean(0), n), probe.rows(attention_metric, attn.mean(0), n)]


class VHDProbe(Probe):
    """Vision-aware head divergence of a vision-language model on (image, text) items."""

    name = "vhd"
    metrics = ("vhd", "image_attention", "t_vhd")
    description = "vision-aware head divergence: |z(with image) - z(without)| per head; T-VHD per generated token"
    needs_patterns = False
    generates = True
    takes_items = True  # reads raw items (image + text) instead of tokenized prompts

    def __init__(self, steps: str = "first", max_new_tokens: int = 16, top_k: int = 5) -> None:
        if steps not in ("first", "all"):
            raise WorkbenchError(f"vhd.steps must be 'first' or 'all', got {steps!r}", "use --param vhd.steps=all")
        if int(max_new_tokens) < 1 or int(top_k) < 1:
            raise WorkbenchError("vhd.max_new_tokens and vhd.top_k must be at least 1", "give positive integers")
        super().__init__(steps=steps, max_new_tokens=int(max_new_tokens), top_k=int(top_k))
        self.outcomes: list[Divergence] = []
        self._tokenizer: Any = None

    def run_items(
        self, model: Any, items: Sequence[Prompt], root: str | Path | None = None, batch_size: int = 8,
        interventions: Sequence[object] = (),
    ) -> pd.DataFrame:
        """Build each item's pair (with / without its image) and reduce the divergences."""
        pairs = [image_pair(model, it, root) for it in items]
        check_lengths(pairs, model.n_ctx, self.params["max_new_tokens"] if self.params["steps"] == "all" else 0)
        self.setup(model.n_layers, model.n_heads, model.device)
        self._tokenizer = model.tokenizer
        self.outcomes = divergence(
            model, pairs, steps=self.params["steps"], max_new_tokens=self.params["max_new_tokens"],
            batch_size=batch_size, observers=interventions,
        )
        return self.results()

    def results(self) -> pd.DataFrame:
        frames = divergence_rows(self, self.outcomes, "vhd", "image_attention")
        rows = []
        for o in self.outcomes:
            for step, value in enumerate(t_vhd(o.divergence, self.params["top_k"]).tolist()):
                tok = self._tokenizer.decode([o.tokens[step]]) if step < len(o.tokens) else ""
                rows.append({"metric": "t_vhd", "layer": -1, "head": -1, "value": value, "n": 1,
                             "item": o.id, "step": step, "token": tok})
        frames.append(pd.DataFrame(rows, columns=["metric", "layer", "head", "value", "n", "item", "step", "token"]))
        return pd.concat(frames, ignore_index=True)

    def summary(self) -> dict:
        return {
            "n_items": len(self.outcomes),
            "answers": {o.id: self._tokenizer.decode(o.tokens) for o in self.outcomes} if self._tokenizer else {},
        }
