"""Visual attention entropy at the final generation step (CARVE: Ge et al., "Focusing by
Contrastive Attention: Enhancing VLMs' Visual Reasoning", arXiv 2509.06461; code YuyaoGe/CARVE,
``carve/attention.py``).

The model answers the item (image + question) greedily, up to ``max_new_tokens`` or EOS. At the
final generation step T (the forward that produces the last token y_T), take the attention row of
its query (at the position of y_{T-1}, or of the last prompt token when T = 1) over the N_v image
tokens, a = A[query, visual]. CARVE averages it over heads and takes the entropy

    H_l = - sum_i a_i ln a_i,    H = mean over layers l in L of H_l,

(``layers``: L; empty = every layer). The paper's code slices the visual part of the row without
renormalising it (its weights sum to the row's image mass, not 1); we renormalise the slice to a
distribution, a_i = A_i / sum_j A_j, so the entropy is that of where the head looks *within* the
image, in [0, ln N_v] (``renormalise=False`` keeps the raw slice). The head average is of the raw
weights, renormalised after (CARVE averages the raw maps).

Metrics:
- ``visual_entropy`` (layer, head): the entropy of the head's own visual slice (our per-head
  extension of CARVE), mean over items;
- ``carve_entropy``: per item (``layer = head = -1``, the ``item`` column), CARVE's H: the
  head-averaged slice's entropy, averaged over ``layers``.
The summary holds the head-averaged entropy per layer (mean over items): CARVE reports H falling
with depth.

Generation is the divergence engine's batched greedy decoding
(:func:`workbench.engine.divergence.greedy_continuations`); the final step's row comes from one
teacher-forced left-padded forward over prompt + y_<T, where it is every row's last column.
Image tokens are those the model fills with image features (:func:`probes.var.image_token_id`).
Definitions: docs/metrics.md#carve.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Sequence

import pandas as pd
import torch
from jaxtyping import Bool, Float
from pydantic import Field
from torch import Tensor

from probes.base import ItemProbe, MetricInfo
from probes.var import VisualBatch, visual_batch, visual_items
from workbench.engine.attention import hooked_run
from workbench.engine.call import AttentionCall
from workbench.engine.divergence import greedy_continuations
from workbench.engine.masking import attention_probs
from workbench.errors import WorkbenchError
from workbench.protocol import params as opt
from workbench.protocol.run_context import RunContext
from workbench.protocol.table import ProbeResult

if TYPE_CHECKING:
    from workbench.inputs.prompts import Prompt
    from workbench.models.loading import LoadedModel


def entropy(a: Float[Tensor, "... key"], keep: Bool[Tensor, "... key"], renormalise: bool) -> Float[Tensor, "..."]:
    """- sum a ln a over the kept keys (0 ln 0 = 0), the kept slice first renormalised to sum 1."""
    a = a.double().masked_fill(~keep, 0.0)
    if renormalise:
        a = a / a.sum(-1, keepdim=True)
    return -(a * a.clamp_min(1e-300).log()).sum(-1)


class FinalStepReader:
    """Attention observer: each layer's last-column row over the image tokens, per head and
    head-averaged, as entropies."""

    def __init__(self, n_layers: int, renormalise: bool) -> None:
        self.renormalise = renormalise
        self.batch: VisualBatch | None = None
        self.per_head: list[Tensor | None] = [None] * n_layers  # [batch, head]
        self.mean_heads: list[Tensor | None] = [None] * n_layers  # [batch]

    def on_attention(self, call: AttentionCall) -> None:
        image = self.batch.image  # [b, key]
        probs = attention_probs(call, 1)[:, :, 0]  # [b, h, key]
        self.per_head[call.layer] = entropy(probs, image[:, None], self.renormalise).cpu()
        self.mean_heads[call.layer] = entropy(probs.mean(1), image, self.renormalise).cpu()


class CARVEProbe(ItemProbe):
    """CARVE's visual attention entropy at the final generation step, per head and per item."""

    name = "carve"
    metrics = ("visual_entropy", "carve_entropy")
    description = "CARVE: entropy of the attention on the image tokens at the final generation step"
    metric_info = {
        "visual_entropy": MetricInfo(
            "positive",
            "entropy (nats) of the head's attention over the image tokens at the final step, renormalised",
            "attention spread over the image (CARVE: harder, busier images)",
            "attention focused on a few image tokens",
            module="probes/carve.py",
        ),
        "carve_entropy": MetricInfo(
            "positive",
            "per item: entropy of the head-averaged image attention at the final step, mean over layers",
            "attention spread over the image (CARVE: lower accuracy)",
            "focused visual attention",
            module="probes/carve.py",
        ),
    }

    class Params(opt.Options):
        max_new_tokens: opt.Int = Field(16, ge=1, le=4096, description="answer tokens to generate at most")
        layers: list[opt.Int] = Field(
            default_factory=list, description="layers L averaged in carve_entropy (empty: all; the paper: 20..25)"
        )
        renormalise: bool = Field(True, description="renormalise the visual slice to sum 1 (CARVE's code does not)")

    @classmethod
    def accepts(cls, model: LoadedModel) -> bool:
        return model.is_multimodal

    def run(self, model: LoadedModel, items: Sequence[Prompt], ctx: RunContext) -> ProbeResult:
        p = self.options
        layers = list(p.layers) or list(range(model.n_layers))
        if any(not 0 <= layer < model.n_layers for layer in layers):
            raise WorkbenchError(f"layers {layers} outside 0..{model.n_layers - 1}", "give layers of the model")
        rows = visual_items(model, items, ctx)
        self.tokens = greedy_continuations(model, rows, p.max_new_tokens, ctx)
        reader = FinalStepReader(model.n_layers, p.renormalise)
        per_head = torch.zeros(len(rows), model.n_layers, model.n_heads, dtype=torch.float64)
        mean_heads = torch.zeros(len(rows), model.n_layers, dtype=torch.float64)
        with hooked_run(model.hf_model, *ctx.interventions, reader):
            for idx in ctx.plan([len(r) + p.max_new_tokens for r in rows], model.device):
                reader.batch = visual_batch(model, [rows[i] for i in idx], [self.tokens[i][:-1] for i in idx])
                model.hf_model(**reader.batch.inputs, use_cache=False, logits_to_keep=1)
                per_head[idx] = torch.stack(reader.per_head, 1)
                mean_heads[idx] = torch.stack(reader.mean_heads, 1)
        n = len(rows)
        h = mean_heads[:, layers].mean(1)  # CARVE's H per item
        item_rows = pd.DataFrame(
            {
                "metric": "carve_entropy",
                "layer": -1,
                "head": -1,
                "value": h.numpy(),
                "n": 1,
                "item": [it.id for it in items],
                "step": [len(t) - 1 for t in self.tokens],
                "token": [model.tokenizer.decode(t[-1:]) for t in self.tokens],
            }
        )
        table = pd.concat([self.rows("visual_entropy", per_head.mean(0), n), item_rows], ignore_index=True)
        by_layer = mean_heads.mean(0).tolist()
        summary: dict[str, Any] = {
            "n_items": n,
            "layers": layers,
            "entropy_by_layer": by_layer,
            "answers": {it.id: model.tokenizer.decode(t) for it, t in zip(items, self.tokens)},
        }
        lines = [f"carve: {n} items; head-averaged visual entropy by layer: {', '.join(f'{v:.2f}' for v in by_layer)}"]
        return self.finish(table, summary, lines)
