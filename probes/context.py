"""Context-aware head divergence for text models, and which heads follow the context or memory.

The construction of VHD (:mod:`probes.vhd`) with a context passage as the condition:

    context_divergence[l, h] = || z[l, h](y_t | y_<t, context, text) - z[l, h](y_t | y_<t, text) ||_2

With knowledge-conflict items (a passage that contradicts what the model knows, with the answer
the passage implies in ``target_context`` and the one the model knows in ``target_memory``) the
probe also reports *which way* each head pushes, in the run with the context:

- ``context_direct_effect`` (layer, head): the head's direct effect on
  ``logit(target_context) - logit(target_memory)`` at the answer position: the logit difference
  minus the logit difference with the head's write ``z_h W_O[h]`` removed from the final
  residual stream (through the model's own final norm, so exact for any norm). Positive: the
  head follows the context; negative: it follows memory (PH3's context and memory heads, "Cutting
  Off the Head Ends the Conflict", found there by path patching; the direct effect is the
  one-forward version of the heads-to-logits paths).
- ``context_attention`` (layer, head): attention mass on the passage at the answer position
  (its tokens after position 0, see below).
- per item (``layer = head = -1``, ``item`` column): ``follows_context`` / ``follows_memory``,
  1 when the greedy first token is the first token of that target.

Only the first answer token is scored by default (``steps="first"``); the targets are compared
by their first token, and items whose two targets share it under this tokenizer are left out of
the direct effects and ``follows_*`` (listed in the summary), not of the divergence.

``context_attention`` leaves out position 0: in a model that prepends no BOS (SmolLM2) that is the
passage's first token, where sink heads put nearly all their weight without reading anything.
Definitions: docs/metrics.md#context_divergence.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal, Sequence

import pandas as pd
import torch
from jaxtyping import Float
from pydantic import Field
from torch import Tensor

from probes.base import DivergenceProbe
from workbench.engine.divergence import Divergence, divergence_rows, final_norm, head_contributions, measure
from workbench.errors import WorkbenchError
from workbench.inputs.conditions import ConditionPair, passage_pair
from workbench.inputs.prompts import Prompt
from workbench.protocol.metrics import MetricInfo
from workbench.protocol.params import Int, Options
from workbench.protocol.roles import Role
from workbench.protocol.run_context import RunContext
from workbench.protocol.table import ProbeResult

if TYPE_CHECKING:
    from workbench.models.loading import LoadedModel


def first_token(tokenizer: Any, text: str) -> int:
    """The first token id of ``text`` (no special tokens); an empty target is an error."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if not ids:
        raise WorkbenchError(
            f"target {text!r} tokenizes to nothing", "give a non-empty target (with its leading space)"
        )
    return int(ids[0])


@torch.no_grad()
def direct_effects(
    model: LoadedModel, outcome: Divergence, target_a: int, target_b: int
) -> Float[Tensor, "layer head"]:
    """``[layer, head]``: logit-difference (a - b) minus the same with one head's write removed,
    at the first step of the conditioned run."""
    hf = model.hf_model
    norm = final_norm(hf)
    unembed = hf.get_output_embeddings()
    w = unembed.weight
    direction = (w[target_a] - w[target_b]).float()
    resid = outcome.cond_resid[0].to(w.device)  # [d_model]
    z = outcome.cond_z[0]  # [layer, head, d_head]
    removed = []
    for layer, module in enumerate(outcome.modules):
        removed.append(resid - head_contributions(module, z[layer].to(w.device)))
    x = torch.cat([resid[None], *removed])  # [1 + layer*head, d_model]
    logits = norm(x.to(w.dtype)).float() @ direction
    return (logits[0] - logits[1:]).view(len(outcome.modules), -1).double().cpu()


class ContextProbe(DivergenceProbe):
    """Context-aware divergence and context-vs-memory direct effects on context items."""

    name = "context"
    metrics = ("context_divergence", "context_attention", "context_direct_effect", "follows_context", "follows_memory")
    description = "context-aware head divergence |z(with passage) - z(without)|; heads that follow context vs memory"
    metric_info = {
        "context_divergence": MetricInfo(
            "log",
            "distance between the head's output with and without the context passage",
            "the passage changes what the head writes",
        ),
        "context_attention": MetricInfo(
            "bounded",
            "attention mass on the passage at the answer position",
            "the head reads the passage",
            module="probes/context.py",
        ),
        "context_direct_effect": MetricInfo(
            "signed",
            "the head's direct effect on logit(context answer) - logit(memory answer)",
            "the head pushes towards the passage's answer (context head)",
            "the head pushes towards the remembered answer (memory head)",
            rank="abs",
            unit="logits",
            module="probes/context.py",
        ),
        "follows_context": MetricInfo("bounded", "share of items whose greedy answer starts with the passage's answer"),
        "follows_memory": MetricInfo("bounded", "share of items whose greedy answer starts with the remembered answer"),
    }
    roles = (
        Role(
            "context",
            "C",
            "context_direct_effect",
            0.2,
            "#b15928",
            "pushes the answer towards the passage (direct effect)",
            look_for="the last row (the answer position, where the direct effect is measured): a head that pushes "
            "the passage's answer reads the passage (marked), often its false answer",
        ),
        Role(
            "memory",
            "M",
            "context_direct_effect",
            0.2,
            "#6a51a3",
            "pushes the answer towards what the model remembers",
            sign=-1,
            look_for="the last row (the answer position, where the direct effect is measured): a head that pushes "
            "the remembered answer reads the question, not the passage (marked)",
        ),
    )
    scatter_pairs = (("context_attention", "context_direct_effect"),)
    divergence_metric = "context_divergence"
    attention_metric = "context_attention"

    class Params(Options):
        steps: Literal["first", "all"] = Field(
            "first", description="first: the first answer token; all: every answer token"
        )
        max_new_tokens: Int = Field(8, ge=1, le=4096, description="answer tokens to generate at most (steps=all)")
        separator: str = Field("\n", description="text placed between the passage and the question")

    @classmethod
    def accepts(cls, model: LoadedModel) -> bool:
        return not model.is_multimodal

    def pairs(self, model: LoadedModel, items: Sequence[Prompt], root: Any = None) -> list[ConditionPair]:
        return [passage_pair(model, it, self.options.separator) for it in items]

    def run(self, model: LoadedModel, items: Sequence[Prompt], ctx: RunContext) -> ProbeResult:
        outcomes = self.outcomes = measure(self, model, items, ctx, keep_z=True, keep_resid=True)  # kept for inspection
        effects, follows, ambiguous = [], [], []
        for item, out in zip(items, outcomes):
            ctx_t, mem_t = item.meta.get("target_context"), item.meta.get("target_memory")
            if not (isinstance(ctx_t, str) and isinstance(mem_t, str)):
                continue
            a, b = first_token(model.tokenizer, ctx_t), first_token(model.tokenizer, mem_t)
            if a == b:  # this tokenizer cannot tell the answers apart by their first token
                ambiguous.append(item.id)
                continue
            effects.append(direct_effects(model, out, a, b))
            follows.append({"item": out.id, "context": float(out.tokens[0] == a), "memory": float(out.tokens[0] == b)})
            out.cond_z = out.base_z = None  # reduced: keep only the distances
        frames = divergence_rows(self, model, outcomes, "context_divergence", "context_attention")
        if effects:
            frames.append(self.rows("context_direct_effect", torch.stack(effects).mean(0), len(effects)))
        rows = [
            {
                "metric": f"follows_{m}",
                "layer": -1,
                "head": -1,
                "value": f[m],
                "n": 1,
                "item": f["item"],
                "step": 0,
                "token": None,
            }
            for f in follows
            for m in ("context", "memory")
        ]
        if rows:
            frames.append(pd.DataFrame(rows))
        n = len(follows)
        summary = {
            "n_items": len(outcomes),
            "n_with_targets": n,
            "skipped_same_first_token": ambiguous,
            "follows_context": sum(f["context"] for f in follows) / n if n else None,
            "follows_memory": sum(f["memory"] for f in follows) / n if n else None,
            "answers": {o.id: model.tokenizer.decode(o.tokens) for o in outcomes},
        }
        lines = [f"context: {len(outcomes)} items"]
        if n:
            lines.append(
                f"context: follows the context on {summary['follows_context']:.0%}, "
                f"memory on {summary['follows_memory']:.0%} of {n} items"
            )
        if ambiguous:
            lines.append(
                f"context: {len(ambiguous)} items not scored for direct effects "
                "(their two targets start with the same token for this tokenizer)"
            )
        return self.finish(pd.concat(frames, ignore_index=True), summary, lines)
