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
"""
from __future__ import annotations

from typing import Any, Sequence

import pandas as pd
import torch

from probes.base import Probe
from probes.vhd import divergence_rows
from workbench.conditions import check_lengths, context_pair
from workbench.divergence import Divergence, divergence, final_norm, head_contributions
from workbench.errors import WorkbenchError
from workbench.prompts import Prompt


def first_token(tokenizer: Any, text: str) -> int:
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if not ids:
        raise WorkbenchError(f"target {text!r} tokenizes to nothing", "give a non-empty target (with its leading space)")
    return int(ids[0])


@torch.no_grad()
def direct_effects(
    model: Any, outcome: Divergence, target_a: int, target_b: int
) -> torch.Tensor:
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


class ContextProbe(Probe):
    """Context-aware divergence and context-vs-memory direct effects on context items."""

    name = "context"
    metrics = ("context_divergence", "context_attention", "context_direct_effect", "follows_context", "follows_memory")
    description = "context-aware head divergence |z(with passage) - z(without)|; heads that follow context vs memory"
    needs_patterns = False
    generates = True
    takes_items = True

    def __init__(self, steps: str = "first", max_new_tokens: int = 8, separator: str = "\n") -> None:
        if steps not in ("first", "all"):
            raise WorkbenchError(f"context.steps must be 'first' or 'all', got {steps!r}", "use --param context.steps=all")
        super().__init__(steps=steps, max_new_tokens=int(max_new_tokens), separator=separator)
        self.outcomes: list[Divergence] = []
        self.effects: list[torch.Tensor] = []
        self.follows: list[dict] = []
        self.ambiguous: list[str] = []  # items whose two targets share their first token (not scored)
        self._tokenizer: Any = None

    def run_items(
        self, model: Any, items: Sequence[Prompt], root: Any = None, batch_size: int = 8,
        interventions: Sequence[object] = (),
    ) -> pd.DataFrame:
        pairs = [context_pair(model, it, self.params["separator"]) for it in items]
        check_lengths(pairs, model.n_ctx, self.params["max_new_tokens"] if self.params["steps"] == "all" else 0)
        self.setup(model.n_layers, model.n_heads, model.device)
        self._tokenizer = model.tokenizer
        self.outcomes = divergence(
            model, pairs, steps=self.params["steps"], max_new_tokens=self.params["max_new_tokens"],
            batch_size=batch_size, observers=interventions, keep_z=True, keep_resid=True,
        )
        self.effects, self.follows, self.ambiguous = [], [], []
        for item, out in zip(items, self.outcomes):
            ctx, mem = item.meta.get("target_context"), item.meta.get("target_memory")
            if not (isinstance(ctx, str) and isinstance(mem, str)):
                continue
            a, b = first_token(model.tokenizer, ctx), first_token(model.tokenizer, mem)
            if a == b:  # this tokenizer cannot tell the answers apart by their first token
                self.ambiguous.append(item.id)
                continue
            self.effects.append(direct_effects(model, out, a, b))
            self.follows.append({"item": out.id, "context": float(out.tokens[0] == a), "memory": float(out.tokens[0] == b)})
            out.cond_z = out.base_z = None  # reduced: keep only the distances
        return self.results()

    def results(self) -> pd.DataFrame:
        frames = divergence_rows(self, self.outcomes, "context_divergence", "context_attention")
        if self.effects:
            frames.append(self.rows("context_direct_effect", torch.stack(self.effects).mean(0), len(self.effects)))
        rows = []
        for f in self.follows:
            for metric in ("context", "memory"):
                rows.append({"metric": f"follows_{metric}", "layer": -1, "head": -1, "value": f[metric], "n": 1,
                             "item": f["item"], "step": 0, "token": None})
        if rows:
            frames.append(pd.DataFrame(rows))
        return pd.concat(frames, ignore_index=True)

    def summary(self) -> dict:
        n = len(self.follows)
        return {
            "n_items": len(self.outcomes),
            "n_with_targets": n,
            "skipped_same_first_token": list(self.ambiguous),
            "follows_context": sum(f["context"] for f in self.follows) / n if n else None,
            "follows_memory": sum(f["memory"] for f in self.follows) / n if n else None,
            "answers": {o.id: self._tokenizer.decode(o.tokens) for o in self.outcomes} if self._tokenizer else {},
        }
