"""Active-dormant heads (Guo et al., "Active-Dormant Attention Heads", arXiv 2410.13835; code:
GuoTianYu2000/Active-Dormant-Attention, ``LLM/intervene_each_head.py``, ``MoveAttentionToBOSHook``).

A head is *dormant* on an input domain when it puts its attention on the first token and does
nothing there: sending all of its attention to the first token leaves the model's predictions
unchanged. It is *active-dormant* when it is dormant on one domain and active on another (the
paper's example: heads that are sinks on Wikipedia and work on GitHub code). Definitions:
docs/metrics.md#dormant.

For each chosen head h, over the run's prompts (one run per domain; the table's ``dataset``
column says which):

- ``dormancy_dloss`` = L_redirected(h) - L_base, where L is the token-weighted mean next-token
  cross-entropy (nats) over every real next-token position of every prompt (position t predicts
  token t + 1, t = 0 .. T - 2; :func:`workbench.engine.scoring.token_losses`), and "redirected"
  means h's attention all on the prompt's first real token at every query, i.e. its output z = the
  first token's value vector (:class:`~workbench.engine.interventions.HeadAblation` ``"first"``, a
  ``Z`` edit of the declared protocol). One forward per head; the run's own interventions
  (``--ablate``) are in both forwards. n = the number of scored positions, sum(T - 1).
- ``first_token_attention``: the observational proxy, the mean weight the head's queries at
  positions 1 .. T - 1 put on the first real token (query 0 sees only itself and is left out),
  token-weighted over prompts, from one forward of the pattern engine (the sink probe's
  ``key_probs`` view). n = sum(T - 1). Reported for every head.

A head whose ``|dormancy_dloss|`` is at most ``dormant_below`` is dormant on the domain (the
summary lists them). :func:`active_dormant` reads the rows of several domains (several runs'
tables, concatenated) and lists the heads dormant on one domain and active (``dormancy_dloss``
at least ``active_above``) on another. Neither threshold is fixed by the paper for LLMs [U]: both
are parameters, in nats.

"First token" is each prompt's first real token, wherever padding put it; for a model whose
tokenizer puts BOS first (Gemma) it is BOS, for SmolLM2 (no BOS) the prompt's first word.
"""

from __future__ import annotations

from itertools import permutations
from typing import TYPE_CHECKING, Any, Sequence

import pandas as pd
import torch
from jaxtyping import Float
from pydantic import Field
from torch import Tensor

from probes.base import PatternProbe, TokenProbe
from workbench.engine.extraction import run_pattern_probes
from workbench.engine.interventions import HeadAblation, parse_heads
from workbench.engine.scoring import token_losses
from workbench.errors import WorkbenchError
from workbench.inputs.prompts import TokenizedPrompt
from workbench.protocol import params as opt
from workbench.protocol.metrics import MetricInfo
from workbench.protocol.run_context import RunContext
from workbench.protocol.table import ProbeResult
from workbench.protocol.views import PatternView

if TYPE_CHECKING:
    from workbench.models.loading import LoadedModel

DLOSS, FIRST = "dormancy_dloss", "first_token_attention"


class FirstTokenAttention(PatternProbe):
    """Sum over real queries at positions >= 1 of the weight on the prompt's first real token."""

    name = "dormant_first_token"
    metrics = (FIRST,)
    needs = ("key_weights",)

    def on_pattern_chunk(self, chunk: PatternView) -> None:
        use = self.per_queries(chunk, lambda: (chunk.query_valid & (chunk.query_pos >= 1)).unsqueeze(1))
        a0 = chunk.key_probs(chunk.batch.first_index)  # [batch, head, chunk]
        self.acc("sum", self.n_layers, self.n_heads)[chunk.layer] += (a0 * use).sum((0, 2))

    def results(self) -> pd.DataFrame:
        return self.rows(FIRST, self.total["sum"], 0)


def mean_loss(losses: Sequence[Tensor]) -> tuple[float, int]:
    """Token-weighted mean of per-prompt per-token losses, and the number of tokens."""
    n = sum(len(x) for x in losses)
    if n == 0:
        raise WorkbenchError("no next-token positions to score", "give prompts of at least 2 tokens")
    return float(sum(float(x.sum()) for x in losses) / n), n


def layer_list(spec: str, n_layers: int) -> list[int]:
    """``"0,3,10-12"`` -> ``[0, 3, 10, 11, 12]``, checked against the model."""
    out: list[int] = []
    for part in (s.strip() for s in spec.split(",") if s.strip()):
        lo, _, hi = part.partition("-")
        try:
            a, b = int(lo), int(hi or lo)
        except ValueError:
            raise WorkbenchError(f"dormant.layers: bad layer {part!r}", "write layers as 0,3,10-12") from None
        if not 0 <= a <= b < n_layers:
            raise WorkbenchError(
                f"dormant.layers: {part!r} is outside layers 0-{n_layers - 1}", "pick layers inside that range"
            )
        out.extend(range(a, b + 1))
    if not out:
        raise WorkbenchError("dormant.layers: no layers given", "write layers as 0,3,10-12")
    return sorted(set(out))


class DormantProbe(TokenProbe):
    """Per head: the loss change when its attention is all sent to the first token, and how much
    attention it puts there already."""

    name = "dormant"
    metrics = (DLOSS, FIRST)
    description = "active-dormant heads: loss change when a head's attention is all on the first token"
    metric_info = {
        DLOSS: MetricInfo(
            "signed",
            "change in mean next-token loss when the head's attention is all sent to the first token",
            "the head is active on this domain",
            "redirecting the head helps",
            rank="abs",
            unit="nats",
            module="probes/dormant.py",
        ),
        FIRST: MetricInfo(
            "bounded",
            "mean attention of queries 1..T-1 on the prompt's first token",
            "a sink on this domain",
            module="probes/dormant.py",
        ),
    }
    scatter_pairs = ((FIRST, DLOSS),)

    class Params(opt.Options):
        heads: str | None = Field(None, description="heads to redirect, LAYER.HEAD comma list (default: every head)")
        layers: str | None = Field(
            None, description="redirect every head of these layers only, e.g. 0,3,10-12 (ignored when heads is given)"
        )
        dormant_below: opt.Float = Field(
            0.005, ge=0, description="a head with |dormancy_dloss| at most this (nats) is dormant on the domain"
        )

    def chosen(self, model: LoadedModel) -> list[tuple[int, int]]:
        """The heads to redirect, from ``heads`` / ``layers`` (every head by default)."""
        p = self.options
        if p.heads is not None:
            try:
                return parse_heads(p.heads, model.n_layers, model.n_heads)
            except WorkbenchError as exc:
                raise WorkbenchError(f"dormant.heads: {exc.message}", exc.fix) from None
        layers = layer_list(p.layers, model.n_layers) if p.layers is not None else range(model.n_layers)
        return [(layer, head) for layer in layers for head in range(model.n_heads)]

    def dloss(
        self, model: LoadedModel, prompts: Sequence[TokenizedPrompt], ctx: RunContext, heads: list[tuple[int, int]]
    ) -> tuple[Float[Tensor, "layer head"], float, int]:
        """``dormancy_dloss`` of ``heads`` (NaN elsewhere), the base loss and the token count."""
        base, n = mean_loss(token_losses(model, prompts, ctx))
        out = torch.full((model.n_layers, model.n_heads), float("nan"), dtype=torch.float64)
        for layer, head in heads:
            redirected, _ = mean_loss(token_losses(model, prompts, ctx, [HeadAblation([(layer, head)], "first")]))
            out[layer, head] = redirected - base
        return out, base, n

    def run(self, model: LoadedModel, prompts: Sequence[TokenizedPrompt], ctx: RunContext) -> ProbeResult:
        heads = self.chosen(model)
        dloss, base, n = self.dloss(model, prompts, ctx, heads)
        first = FirstTokenAttention()
        run_pattern_probes(model, prompts, [first], ctx)
        attention = first.total["sum"].cpu() / n
        measured = ~dloss.isnan()
        rows = self.rows(DLOSS, dloss, n)
        table = pd.concat([rows[measured.flatten().numpy()], self.rows(FIRST, attention, n)], ignore_index=True)
        return self.finish(table, *self.summarize(dloss, base, n))

    def summarize(self, dloss: Tensor, base: float, n: int) -> tuple[dict[str, Any], list[str]]:
        below = self.options.dormant_below
        dormant = [f"{layer}.{head}" for layer, head in (dloss.abs() <= below).nonzero().tolist()]
        measured = int((~dloss.isnan()).sum())
        summary = {"loss_base": base, "n_tokens": n, "n_heads_redirected": measured, "dormant_heads": dormant}
        line = (
            f"dormant: base loss {base:.4f} nats over {n} tokens; {len(dormant)} of {measured} heads change it "
            f"by at most {below:g} nats when redirected to the first token"
        )
        return summary, [line]


def active_dormant(
    table: pd.DataFrame, dormant_below: float = 0.005, active_above: float = 0.02, metric: str = DLOSS
) -> pd.DataFrame:
    """Heads dormant on one domain and active on another, from the ``dormant`` probe's rows of
    several domains (runs' tidy tables concatenated; ``dataset`` names the domain).

    A head is dormant on domain D when ``|dormancy_dloss| <= dormant_below`` there and active on
    domain E when ``dormancy_dloss >= active_above`` there (nats). One row per (model, head,
    dormant domain, active domain), with both domains' ``dormancy_dloss`` (``dloss_dormant``,
    ``dloss_active``) and, when the rows have it, their ``first_token_attention``
    (``attention_dormant``, ``attention_active``); sorted by model, layer, head. A head dormant
    on two domains and active on a third gives two rows.
    """
    if dormant_below < 0 or active_above <= dormant_below:
        raise WorkbenchError(
            f"need 0 <= dormant_below < active_above, got {dormant_below} and {active_above}", "fix the thresholds"
        )
    t = table if "model" in table.columns else table.assign(model="")
    t = t[(t["layer"] >= 0) & (t["head"] >= 0)]
    keys = ["model", "layer", "head"]
    wide = t[t["metric"] == metric].pivot_table(index=keys, columns="dataset", values="value", aggfunc="first")
    att = t[t["metric"] == FIRST].pivot_table(index=keys, columns="dataset", values="value", aggfunc="first")
    rows = []
    for dormant_on, active_on in permutations(wide.columns, 2):
        pair = wide[[dormant_on, active_on]].dropna()
        hit = pair[(pair[dormant_on].abs() <= dormant_below) & (pair[active_on] >= active_above)]
        for (model, layer, head), v in hit.iterrows():
            row = {"model": model, "layer": layer, "head": head, "dormant_on": dormant_on, "active_on": active_on}
            row.update(dloss_dormant=v[dormant_on], dloss_active=v[active_on])
            for side, domain in (("attention_dormant", dormant_on), ("attention_active", active_on)):
                has = (model, layer, head) in att.index and domain in att.columns
                row[side] = att.loc[(model, layer, head), domain] if has else float("nan")
            rows.append(row)
    columns = [*keys, "dormant_on", "active_on", "dloss_dormant", "dloss_active", "attention_dormant",
               "attention_active"]
    out = pd.DataFrame(rows, columns=columns)
    return out.sort_values([*keys, "dormant_on", "active_on"], ignore_index=True)
