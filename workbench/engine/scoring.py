"""What a model predicts under a set of interventions: per-token losses and next-token logits.

The intervening probes (AttentionInfluence, active-dormant heads, ZeroTuning, ACT calibration)
all ask one question: how does the model's prediction change when some heads are edited? They
answer it with two forwards over the same padded batches, one with their edits and one
without, and this module is that forward, written once:

- :func:`token_losses`: each prompt's next-token cross-entropy at every real position
  (``loss[t]`` predicts token ``t + 1``), float64 on the CPU;
- :func:`last_logits`: each prompt's logits at its last real token (the next-token
  distribution a classification prompt is scored by).

Batches are right-padded with explicit positions (a prompt's numbers do not depend on its batch);
``edits`` are :mod:`workbench.engine.edits` interventions, composed with the run's own
(``ctx.interventions``, ``--ablate``) as ``ctx.order`` says (:meth:`RunContext.with_edits`); the
run starts through :func:`workbench.engine.attention.hooked_run`, so conflicting edits are refused
before anything runs.
"""

from __future__ import annotations

import inspect
from typing import TYPE_CHECKING, Any, Callable, Iterator, Sequence

import torch
from jaxtyping import Float
from torch import Tensor

from workbench.engine.attention import hooked_run
from workbench.engine.patterns import collate
from workbench.errors import WorkbenchError
from workbench.inputs.prompts import TokenizedPrompt, pad_token_id
from workbench.protocol.run_context import RunContext
from workbench.protocol.views import BatchInfo

if TYPE_CHECKING:
    from workbench.models.loading import LoadedModel


def _keeps_logits(hf_model: torch.nn.Module) -> bool:
    """Whether the model's forward can project only chosen positions onto the vocabulary."""
    return "logits_to_keep" in inspect.signature(hf_model.forward).parameters


def _batches(
    model: LoadedModel,
    prompts: Sequence[TokenizedPrompt],
    ctx: RunContext,
    edits: Sequence[Any],
    last_only: bool = False,
) -> Iterator[tuple[list[int], BatchInfo, Float[Tensor, "batch pos vocab"]]]:
    """``(indices, batch, logits)`` for every batch of ``prompts``, forwards run with ``edits``;
    ``last_only``: logits at each prompt's last real token only (``[batch, 1, vocab]``), projected
    there alone when the model allows (the vocabulary projection of every position was about half
    of a short prompt's forward on Gemma-3-270M)."""
    if not prompts:
        raise WorkbenchError("no prompts to score", "give a non-empty prompt set")
    pad = pad_token_id(model.tokenizer)
    keep = _keeps_logits(model.hf_model)
    with hooked_run(model.hf_model, *ctx.with_edits(*edits)) as hf:
        for idx in ctx.plan([len(p) for p in prompts], model.device):
            batch = collate(
                [prompts[i].ids for i in idx],
                pad,
                model.device,
                prompt_ids=[prompts[i].id for i in idx],
                metas=[prompts[i].meta for i in idx],
            )
            last = (batch.lengths - 1)[:, None]
            kwargs = {"logits_to_keep": last} if last_only and keep else {}
            out = hf(
                input_ids=batch.input_ids,
                attention_mask=batch.attention_mask,
                position_ids=batch.positions.clamp_min(0),
                use_cache=False,
                **kwargs,
            )
            logits = out.logits
            if last_only and not keep:
                logits = logits[torch.arange(len(idx), device=logits.device)[:, None], last]
            yield idx, batch, logits


def token_losses(
    model: LoadedModel, prompts: Sequence[TokenizedPrompt], ctx: RunContext | None = None, edits: Sequence[Any] = ()
) -> list[Float[Tensor, " pos_minus_1"]]:
    """Each prompt's next-token cross-entropy (nats) at positions ``0 .. len - 2`` under ``edits``."""
    ctx = ctx or RunContext()
    out: list[Tensor | None] = [None] * len(prompts)
    for idx, batch, logits in _batches(model, prompts, ctx, edits):
        logp = torch.log_softmax(logits[:, :-1].double(), dim=-1)
        nll = -logp.gather(-1, batch.input_ids[:, 1:, None]).squeeze(-1)
        for row, i in enumerate(idx):
            n = int(batch.lengths[row])
            out[i] = nll[row, : n - 1].cpu()
    return out  # type: ignore[return-value]


def last_logits(
    model: LoadedModel,
    prompts: Sequence[TokenizedPrompt],
    ctx: RunContext | None = None,
    edits: Sequence[Any] = (),
    select: Callable[[Tensor], Tensor] | None = None,
) -> Float[Tensor, "prompt vocab"]:
    """Each prompt's logits (float32, CPU) at its last real token under ``edits``; ``select``
    keeps part of the vocabulary (say, a classification task's label tokens) before the copy."""
    ctx = ctx or RunContext()
    rows: list[Tensor | None] = [None] * len(prompts)
    for idx, batch, logits in _batches(model, prompts, ctx, edits, last_only=True):
        last = logits[:, 0]
        last = select(last) if select is not None else last
        for row, i in enumerate(idx):
            rows[i] = last[row].float().cpu()
    return torch.stack(rows)  # type: ignore[arg-type]
