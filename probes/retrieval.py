"""Retrieval-head score (Wu et al., "Retrieval Head Mechanistically Explains Long-Context
Factuality"; nightdessert/Retrieval_Head, retrieval_head_detection.py), batched.

For a needle-in-a-haystack prompt (dataset ``niah``), the model decodes greedily (up to
``max_new_tokens``, default 50). At each step t emitting token y_t, for each head take the key
j* its current query attends to most (top-1), in the forward pass whose logits produce y_t. If
j* lies in the answer span [s, e) and the prompt token at j* equals y_t, the head copied one
needle token: score += 1/(e - s). As in the paper's code:

- the span is the *answer* (their ``real_needle``) inside the needle sentence; ``span="needle"``
  uses the whole needle sentence instead;
- decoding stops after the first token containing a newline (that token is scored), or EOS;
- a prompt counts only if the model retrieved the needle: ROUGE-1 recall (``rouge-score``,
  stemmed) of the answer in the response > 0.5. ``require_correct=False`` counts every prompt.

The per-head score is the mean over counted prompts; ``n`` = counted prompts. Heads above 0.1
are "retrieval heads". The paper's code feeds the last prompt token as the first decoding step;
we take the top-1 key of the prefill's last query, which is the same attention row.

Batching: prompts are decoded together with a KV cache by the decoding engine
(:mod:`workbench.engine.decoding`: left padding, prompt-by-prompt prefill with prefix reuse on CPU);
the prefill computes only the last query's scores per layer (no pattern is materialised), each
decoding step one row per head (:func:`workbench.engine.masking.attention_scores`, so scaling,
soft-capping, grouped KV heads and sliding windows are the model's). Prompts that finished keep
decoding in the batch but are no longer scored. Definitions: docs/metrics.md#retrieval.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Literal, Sequence

import torch
from jaxtyping import Bool, Float, Int
from pydantic import Field
from torch import Tensor

from probes.base import TokenProbe
from workbench.engine.call import AttentionCall
from workbench.engine.decoding import DecodeState, Prefill, greedy_decode
from workbench.engine.masking import attention_scores
from workbench.errors import WorkbenchError
from workbench.inputs.prompts import TokenizedPrompt
from workbench.protocol import params as opt
from workbench.protocol.metrics import MetricInfo
from workbench.protocol.roles import Role
from workbench.protocol.run_context import RunContext
from workbench.protocol.table import ProbeResult

if TYPE_CHECKING:
    from workbench.models.loading import LoadedModel

SPANS = {"answer": "answer_span", "needle": "needle_span"}


def rouge1_recall(reference: str, response: str) -> float:
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rouge1"], use_stemmer=True).score(reference, response)["rouge1"].recall


def newline_token_ids(tokenizer: Any) -> set[int]:
    """Ids whose text contains a newline (the paper stops at '<0x0A>' for Llama-2)."""
    vocab = tokenizer.get_vocab()
    out = set()
    for tok, i in vocab.items():
        text = tokenizer.convert_tokens_to_string([tok])
        if "\n" in text:
            out.add(i)
    return out


class LastQueryReader:
    """Observer: per layer, a per-head reduction of each prompt's last query row (the query whose
    logits give the next token), kept by batch row across the prompt-by-prompt prefill and the
    batched decoding steps. Subclasses say what to keep (:meth:`reduce`) and score it after each
    step (``on_step``)."""

    def __init__(self, n_layers: int, n_heads: int, state: DecodeState, span_key: str) -> None:
        self.state, self.span_key = state, span_key
        self.n_layers, self.n_heads = n_layers, n_heads
        self.kept: list[Tensor | None] = [None] * n_layers  # per layer: [batch, head]
        self.scores: Float[Tensor, "batch layer head"] | None = None

    def reduce(self, call: AttentionCall, scores: Float[Tensor, "rows head key"]) -> Tensor:
        """What to keep of the last query's masked scores (``-inf`` = not visible), ``[rows, head]``."""
        raise NotImplementedError

    def on_step(self, state: DecodeState, y: Int[Tensor, " batch"], active: Bool[Tensor, " batch"]) -> None:
        """Add each row's scores for the token ``y`` just emitted (rows not ``active`` finished)."""
        raise NotImplementedError

    def on_attention(self, call: AttentionCall) -> None:
        n_q = call.query.shape[2]
        s, _ = attention_scores(call, n_q - 1, n_q)  # [rows, head, 1, key]
        kept = self.reduce(call, s[:, :, 0])
        st = self.state
        if st.rows is None:
            self.kept[call.layer] = kept
        else:
            if self.kept[call.layer] is None or self.kept[call.layer].shape[0] != st.size:
                self.kept[call.layer] = torch.zeros(st.size, kept.shape[1], dtype=kept.dtype, device=kept.device)
            self.kept[call.layer][st.rows] = kept

    def step_scores(self, state: DecodeState, device: torch.device) -> Float[Tensor, "batch layer head"]:
        """The running per-prompt scores, zeroed at a batch's first step."""
        if state.step == 0 or self.scores is None or self.scores.shape[0] != state.size:
            self.scores = torch.zeros(state.size, self.n_layers, self.n_heads, dtype=torch.float64, device=device)
        return self.scores

    def spans_and_ids(self, state: DecodeState, device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
        """Per batch row: span start, span end, and the prompt's ids padded with -1 on the right
        (in-prompt coordinates)."""
        lo = torch.tensor([p.meta[self.span_key][0] for p in state.prompts], device=device)
        hi = torch.tensor([p.meta[self.span_key][1] for p in state.prompts], device=device)
        width = max(len(p) for p in state.prompts)
        ids = torch.tensor([p.ids + [-1] * (width - len(p)) for p in state.prompts], device=device)
        return lo, hi, ids


class CopyScorer(LastQueryReader):
    """Each head's top-1 key of its last query, per layer, in in-prompt positions; after each
    step, a head scores 1/len(span) when that key lies in the span and holds the token just
    emitted."""

    def reduce(self, call: AttentionCall, scores: Float[Tensor, "rows head key"]) -> Tensor:
        return scores.argmax(-1) - self.state.key_offset.view(-1, 1)  # softcap is monotone

    def on_step(self, state: DecodeState, y: Int[Tensor, " batch"], active: Bool[Tensor, " batch"]) -> None:
        scores = self.step_scores(state, y.device)
        lo, hi, ids = self.spans_and_ids(state, y.device)
        width = ids.shape[1]
        for layer in range(self.n_layers):
            top = self.kept[layer]  # [b, h]
            tok_at = ids.gather(1, top.clamp(0, width - 1))
            hit = (top >= lo[:, None]) & (top < hi[:, None]) & (tok_at == y[:, None]) & active[:, None]
            scores[:, layer] += hit.double() / (hi - lo).double()[:, None]


@dataclass
class RetrievalOutcome:
    prompt_id: str
    response: str
    recall: float
    counted: bool
    n_steps: int
    scores: Tensor = field(repr=False)  # [layer, head]


def check_niah(prompts: Sequence[TokenizedPrompt], span_key: str) -> None:
    for p in prompts:
        if span_key not in p.meta or "answer" not in p.meta:
            raise WorkbenchError(
                f"prompt {p.id!r} has no needle fields ({span_key}, answer): the retrieval probe needs niah prompts",
                "use --dataset niah, or a prompts file exported by `workbench dataset niah`",
            )
        s, e = p.meta[span_key]
        if not 0 <= s < e <= len(p):
            raise WorkbenchError(
                f"prompt {p.id!r}: {span_key} {p.meta[span_key]} is outside its {len(p)} tokens", "fix the span"
            )


def generate_and_score(
    model: LoadedModel,
    prompts: Sequence[TokenizedPrompt],
    max_new_tokens: int = 50,
    span: Literal["answer", "needle"] = "answer",
    stop_at_newline: bool = True,
    require_correct: bool = True,
    prefill: Prefill = "auto",
    ctx: RunContext | None = None,
    scorer: Callable[[int, int, DecodeState, str], LastQueryReader] = CopyScorer,
) -> list[RetrievalOutcome]:
    """Greedy-decode every prompt (batched, KV cache) and score each head: its copying by
    default, or what another ``scorer(n_layers, n_heads, state, span_key)`` scores after each
    step (the semantic retrieval probe's span mass)."""
    key = SPANS.get(span)
    if key is None:
        raise WorkbenchError(f"unknown span {span!r}", "use span=answer (the paper's default) or span=needle")
    check_niah(prompts, key)
    tok = model.tokenizer
    stops = newline_token_ids(tok) if stop_at_newline else set()
    if tok.eos_token_id is not None:
        stops.add(int(tok.eos_token_id))
    state = DecodeState()
    reader = scorer(model.n_layers, model.n_heads, state, key)
    per_prompt: dict[int, Tensor] = {}  # by prompt object: ids need not be unique here

    def on_step(st: DecodeState, y: Tensor, active: Tensor) -> None:
        reader.on_step(st, y, active)
        for r, p in enumerate(st.prompts):
            per_prompt[id(p)] = reader.scores[r].cpu()

    tokens = greedy_decode(
        model, prompts, max_new_tokens, stops, ctx, observers=[reader], on_step=on_step, state=state, prefill=prefill
    )
    results = []
    for p, toks in zip(prompts, tokens):
        response = tok.decode(toks, skip_special_tokens=True).strip()
        recall = rouge1_recall(p.meta["answer"], response)
        results.append(
            RetrievalOutcome(p.id, response, recall, recall > 0.5 or not require_correct, len(toks), per_prompt[id(p)])
        )
    return results


class RetrievalProbe(TokenProbe):
    """Wu et al.'s retrieval score, a token probe that drives its own greedy decoding."""

    name = "retrieval"
    metrics = ("retrieval",)
    description = "Wu et al. retrieval score on niah prompts: copy-paste attention during greedy decoding"
    metric_info = {
        "retrieval": MetricInfo(
            "bounded",
            "share of the needle the head copied while the model answered (Wu et al.)",
            "a retrieval head (above 0.1 in the paper)",
        ),
    }
    roles = (
        Role(
            "retrieval",
            "R",
            "retrieval",
            0.1,
            "#ff7f00",
            "copies needle tokens while the model answers",
            strict=True,
            look_for="the decoding rows lighting up on the needle (marked): while the model writes the answer, the "
            "head reads it from the needle",
        ),
    )
    scatter_pairs = (("induction", "retrieval"), ("streaming", "retrieval"))

    class Params(opt.Options):
        max_new_tokens: opt.Int = Field(
            50, ge=1, le=4096, description="greedy tokens to decode at most (the paper: ~50)"
        )
        span: Literal["answer", "needle"] = Field(
            "answer", description="answer (the paper's real_needle) or the whole needle sentence"
        )
        stop_at_newline: bool = Field(
            True, description="stop after the first token containing a newline (as the paper)"
        )
        require_correct: bool = Field(True, description="count only prompts answered with ROUGE-1 recall > 0.5")
        prefill: Literal["auto", "batched", "separate"] = Field(
            "auto", description="prompt forward: one padded batch, or prompt by prompt (CPU default)"
        )

    def __init__(self, **params: Any) -> None:
        super().__init__(**params)
        self.outcomes: list[RetrievalOutcome] = []

    def run(self, model: LoadedModel, prompts: Sequence[TokenizedPrompt], ctx: RunContext) -> ProbeResult:
        self.outcomes = generate_and_score(model, prompts, ctx=ctx, **self.params)
        return self.summarise(model, "retrieval", threshold=0.1)

    def summarise(self, model: LoadedModel, metric: str, threshold: float | None) -> ProbeResult:
        """The mean per-head score over counted prompts (``n`` = counted prompts), the summary
        and the printed line; ``threshold``: report the share of heads above it."""
        counted = [o.scores for o in self.outcomes if o.counted]
        n = len(counted)
        nan = torch.full((model.n_layers, model.n_heads), math.nan, dtype=torch.float64)
        table = self.rows(metric, torch.stack(counted).mean(0) if n else nan, n)
        summary: dict[str, Any] = {
            "n_prompts": len(self.outcomes),
            "n_counted": n,
            "accuracy": sum(o.recall > 0.5 for o in self.outcomes) / max(1, len(self.outcomes)),
            "responses": {o.prompt_id: o.response for o in self.outcomes},
        }
        line = f"{metric}: {n}/{len(self.outcomes)} prompts counted (answered correctly: {summary['accuracy']:.0%})"
        if threshold is not None:
            share = float((table.value > threshold).mean()) if n else 0.0
            summary[f"share_above_{threshold}"] = share
            line += f"; {share:.1%} of heads score above {threshold}"
        return self.finish(table, summary, [line])
