"""Semantic retrieval-head score (CompressKV: TUDa-HWAI/CompressKV,
``Retrieval_Head_Identification/semantic_retrieval_head_detection.py``), batched.

Wu et al.'s retrieval score (:mod:`probes.retrieval`) credits a head only when its top-1 key is
the needle token being emitted. CompressKV's variant credits the attention *mass*: on a
needle-in-a-haystack prompt (dataset ``niah``) decoded greedily, at each step t emitting y_t,
if y_t is one of the span's tokens, every head adds the total attention weight of its query
(the one whose logits produced y_t) on the whole span [s, e):

    score(prompt) = sum over steps t of c_t * sum_{j in [s, e)} A[t, j],

and the head's score is the mean over counted prompts (ROUGE-1 recall of the answer > 0.5, as
in the retrieval probe; ``require_correct=False`` counts every prompt). ``n`` = counted prompts.

Normalisation, as in the authors' code (``retrieval_calculate``):

- no division by the span length (Wu et al. divide by it) nor by the number of steps: a prompt's
  score is a sum of attention masses, so it can exceed 1 (up to the number of needle tokens
  emitted, times c_t);
- c_t, the weight of a step: the code loops over the span's positions and adds the mass once
  per position whose token equals y_t, so a token occurring twice in the span adds the mass
  twice (``count="occurrences"``, the default); ``count="once"`` adds it once;
- the span is the *answer* (their ``real_needle``, found by token-set overlap; our ``niah``
  prompts know it exactly); ``span="needle"`` takes the whole needle sentence;
- decoding stops after a newline token (their ``<0x0A>``) or EOS, at most 50 tokens; the first
  step is the prefill's last query (their code feeds the last prompt token first: same row);
- the mean is over the prompts that passed (failed prompts add nothing, not zeros).

Batching, KV cache, left padding, prompt-by-prompt prefill and the last-query bookkeeping are
the retrieval probe's (:class:`probes.retrieval.LastQueryReader`,
:func:`probes.retrieval.generate_and_score`); the weights are the softmax of
:func:`workbench.engine.masking.attention_scores` (the model's scaling, soft-cap, grouped KV
heads, sliding windows; padded keys masked). Definitions: docs/metrics.md#semantic_retrieval.
"""

from __future__ import annotations

from functools import partial
from typing import TYPE_CHECKING, Any, Literal, Sequence

import torch
from jaxtyping import Bool, Float, Int
from pydantic import Field
from torch import Tensor

from probes.base import MetricInfo
from probes.retrieval import LastQueryReader, RetrievalProbe, generate_and_score
from workbench.engine.call import AttentionCall
from workbench.engine.decoding import DecodeState
from workbench.protocol.run_context import RunContext
from workbench.protocol.table import ProbeResult

if TYPE_CHECKING:
    from workbench.inputs.prompts import TokenizedPrompt
    from workbench.models.loading import LoadedModel

Count = Literal["occurrences", "once"]


class SpanMassScorer(LastQueryReader):
    """Each head's attention mass on the span from its last query, per layer; after each step,
    a row whose emitted token occurs in its span adds that mass (times the occurrences)."""

    def __init__(self, n_layers: int, n_heads: int, state: DecodeState, span_key: str, count: Count) -> None:
        super().__init__(n_layers, n_heads, state, span_key)
        self.count = count

    def reduce(self, call: AttentionCall, scores: Float[Tensor, "rows head key"]) -> Float[Tensor, "rows head"]:
        st = self.state
        rows = range(len(st.prompts)) if st.rows is None else st.rows.tolist()
        lo = torch.tensor([st.prompts[r].meta[self.span_key][0] for r in rows], device=scores.device)
        hi = torch.tensor([st.prompts[r].meta[self.span_key][1] for r in rows], device=scores.device)
        pos = torch.arange(scores.shape[-1], device=scores.device)[None] - st.key_offset.view(-1, 1)  # in-prompt
        inside = (pos >= lo[:, None]) & (pos < hi[:, None])  # [rows, key]
        weights = torch.softmax(scores.double(), -1)
        return (weights * inside[:, None]).sum(-1)

    def on_step(self, state: DecodeState, y: Int[Tensor, " batch"], active: Bool[Tensor, " batch"]) -> None:
        scores = self.step_scores(state, y.device)
        lo, hi, ids = self.spans_and_ids(state, y.device)
        pos = torch.arange(ids.shape[1], device=y.device)[None]
        in_span = (pos >= lo[:, None]) & (pos < hi[:, None]) & (ids == y[:, None])
        hits = in_span.sum(1).double()  # [batch]: occurrences of y in the span
        if self.count == "once":
            hits = hits.clamp(max=1)
        hits = hits * active
        for layer in range(self.n_layers):
            scores[:, layer] += self.kept[layer] * hits[:, None]


class SemanticRetrievalProbe(RetrievalProbe):
    """CompressKV's semantic retrieval score, a token probe that drives its own greedy decoding."""

    name = "semantic_retrieval"
    metrics = ("semantic_retrieval",)
    description = "CompressKV semantic retrieval score on niah prompts: attention mass on the needle while emitting it"
    metric_info = {
        "semantic_retrieval": MetricInfo(
            "positive",
            "attention mass on the needle summed over the steps that emit needle tokens (CompressKV)",
            "a semantic retrieval head: attends to the needle as a whole while the model answers",
        ),
    }
    roles = ()  # CompressKV ranks heads per layer (top-k), it declares no threshold
    scatter_pairs = (("retrieval", "semantic_retrieval"),)

    class Params(RetrievalProbe.Params):
        count: Count = Field(
            "occurrences",
            description="add the mass once per span position holding the emitted token (the authors' code) or once",
        )

    def run(self, model: LoadedModel, prompts: Sequence[TokenizedPrompt], ctx: RunContext) -> ProbeResult:
        params: dict[str, Any] = dict(self.params)
        scorer = partial(SpanMassScorer, count=params.pop("count"))
        self.outcomes = generate_and_score(model, prompts, ctx=ctx, scorer=scorer, **params)
        return self.summarise(model, "semantic_retrieval", threshold=None)
