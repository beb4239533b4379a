"""What a model predicts under a set of interventions: per-token losses and next-token logits.

The intervening probes (AttentionInfluence, active-dormant heads, ZeroTuning, ACT calibration)
all ask one question: how does the model's prediction change when some heads are edited? They
answer it with two forwards over the same padded batches, one with their edits and one
without, and this module is that forward, written once:

- :func:`token_losses`: each prompt's next-token cross-entropy at every real position
  (``loss[t]`` predicts token ``t + 1``), float64 on the CPU;
- :func:`last_logits`: each prompt's logits at its last real token (the next-token
  distribution a classification prompt is scored by);
- :func:`read_choices` / :func:`classify`: a labelled classification task scored from those
  logits, one convention for every probe that asks for accuracy (ZeroTuning, ACT). A prompt's
  ``meta`` holds ``choices`` (label strings, per prompt) and the gold one as ``label`` (the
  string) or ``label_index`` (its index; both given: they must agree). A choice is scored by the
  next-token log-probability of its first token at the last real token; the prediction is the
  best-scored choice.

Batches are right-padded with explicit positions (a prompt's numbers do not depend on its batch);
``edits`` are :mod:`workbench.engine.edits` interventions, composed with the run's own
(``ctx.interventions``, ``--ablate``) as ``ctx.order`` says (:meth:`RunContext.with_edits`); the
run starts through :func:`workbench.engine.attention.hooked_run`, so conflicting edits are refused
before anything runs.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Iterator, Literal, Sequence

import torch
from jaxtyping import Bool, Float, Int
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


@dataclass
class Choices:
    """A labelled classification task: per prompt, its choices' first token ids and the gold index."""

    token_ids: list[list[int]]
    gold: Int[Tensor, " prompt"]


def is_labelled(prompts: Sequence[TokenizedPrompt]) -> bool:
    """Whether every prompt carries ``choices`` and a gold ``label`` or ``label_index``."""
    return bool(prompts) and all(
        p.meta and "choices" in p.meta and ("label" in p.meta or "label_index" in p.meta) for p in prompts
    )


def _gold(p: TokenizedPrompt, choices: list[str], who: str) -> int:
    label, index = p.meta.get("label"), p.meta.get("label_index")
    if label is not None and label not in choices:
        raise WorkbenchError(f"prompt {p.id!r}: label {label!r} is not one of its choices {choices}", "fix the labels")
    if index is not None and (isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < len(choices)):
        raise WorkbenchError(
            f"prompt {p.id!r}: label_index {index!r} does not index its {len(choices)} choices", "fix the labels"
        )
    if label is not None and index is not None and choices[index] != label:
        raise WorkbenchError(
            f"prompt {p.id!r}: label {label!r} and label_index {index} ({choices[index]!r}) disagree",
            "give one of them, or make them agree",
        )
    if label is None and index is None:
        raise WorkbenchError(
            f"prompt {p.id!r} has no choices/label in its meta: {who} needs labelled classification prompts",
            "use --dataset sentiment, or give each prompt 'choices' (label strings) and the gold 'label'",
        )
    return choices.index(label) if label is not None else int(index)


def read_choices(tokenizer: Any, prompts: Sequence[TokenizedPrompt], who: str = "this probe") -> Choices:
    """Each prompt's choices (first tokens) and gold index, checked: every prompt labelled, the
    gold among its choices, its choices' first tokens distinct (``who`` names the asker in errors)."""
    if not prompts:
        raise WorkbenchError("no prompts to classify", "give a non-empty labelled prompt set")
    token_ids, gold = [], []
    for p in prompts:
        choices = p.meta.get("choices") if p.meta else None
        if not isinstance(choices, list) or len(choices) < 2 or not all(isinstance(c, str) for c in choices):
            raise WorkbenchError(
                f"prompt {p.id!r} has no choices/label in its meta: {who} needs labelled classification prompts",
                "use --dataset sentiment, or give each prompt 'choices' (2 or more label strings) and the gold 'label'",
            )
        ids = [tokenizer(c, add_special_tokens=False)["input_ids"] for c in choices]
        if any(not i for i in ids) or len({i[0] for i in ids}) < len(ids):
            raise WorkbenchError(
                f"prompt {p.id!r}: the choices {choices} do not start with distinct tokens",
                "use label words whose first tokens differ",
            )
        token_ids.append([i[0] for i in ids])
        gold.append(_gold(p, choices, who))
    return Choices(token_ids, torch.tensor(gold, dtype=torch.long))


def choice_logprobs(
    model: LoadedModel,
    prompts: Sequence[TokenizedPrompt],
    choices: Choices,
    ctx: RunContext | None = None,
    edits: Sequence[Any] = (),
    over: Literal["choices", "vocab"] = "choices",
) -> Float[Tensor, "prompt choice"]:
    """Float64 log-probability of each prompt's choices (their first tokens) as the next token,
    normalised over the vocabulary (``over="vocab"``) or over the prompt's own choices; a prompt
    with fewer choices than the most has ``-inf`` in the columns past its own."""
    vocab = sorted({t for ids in choices.token_ids for t in ids})
    col = {t: k for k, t in enumerate(vocab)}
    keep = torch.tensor(vocab)

    def select(logits: Tensor) -> Tensor:
        return torch.log_softmax(logits.float(), dim=-1)[:, keep.to(logits.device)]

    lp = last_logits(model, prompts, ctx, edits, select=select).double()  # [prompt, vocab of the choices]
    width = max(len(ids) for ids in choices.token_ids)
    out = torch.full((len(prompts), width), float("-inf"), dtype=torch.float64)
    for r, ids in enumerate(choices.token_ids):
        out[r, : len(ids)] = lp[r, [col[t] for t in ids]]
    if over == "choices":
        out = out - torch.logsumexp(out, dim=-1, keepdim=True)
    return out


@dataclass
class Outcome:
    """Per prompt: right or wrong, and the gold choice's log-probability."""

    correct: Bool[Tensor, " prompt"]
    gold_logprob: Float[Tensor, " prompt"]

    @property
    def accuracy(self) -> float:
        return float(self.correct.double().mean())


def classify(
    model: LoadedModel,
    prompts: Sequence[TokenizedPrompt],
    choices: Choices,
    ctx: RunContext | None = None,
    edits: Sequence[Any] = (),
    over: Literal["choices", "vocab"] = "choices",
) -> Outcome:
    """Each prompt's prediction (its best-scored choice) against its gold choice, under ``edits``."""
    lp = choice_logprobs(model, prompts, choices, ctx, edits, over)
    return Outcome(lp.argmax(-1) == choices.gold, lp.gather(1, choices.gold[:, None])[:, 0])
