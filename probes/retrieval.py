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

Batching: prompts are left-padded and decoded together with a KV cache; the prefill computes
only the last query's scores per layer (no pattern is materialised), each decoding step one
row per head. Prompts that finished keep decoding in the batch but are no longer scored.

``prefill="auto"`` runs the prefill as one padded batch on GPUs, but prompt by prompt on CPUs
(then merges the caches, left-padded, for batched decoding): with padding, SDPA needs a mask
and leaves PyTorch's fused causal CPU kernel for the generic path: on our 2-core machines the
padded prefill of 8 x 1000-token prompts takes 1.09x the time (benchmarks/bench_retrieval.py).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, ClassVar, Sequence

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from probes.base import Probe
from workbench.attention import AttentionCall, hooked_run
from workbench.errors import WorkbenchError
from workbench.patterns import collate
from workbench.prompts import TokenizedPrompt, pad_token_id


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


class _TopKeyRecorder:
    """Observer: per layer, the top-1 attended key of each head's *last* query."""

    def __init__(self, n_layers: int) -> None:
        self.top: list[Tensor | None] = [None] * n_layers

    def on_attention(self, call: AttentionCall) -> None:
        q = call.query[:, :, -1:, :].float()  # [b, h, 1, d]
        b, h, _, d = q.shape
        k = call.key.float()
        g = h // k.shape[1]
        s = torch.matmul(q.view(b, k.shape[1], g, 1, d), k.unsqueeze(2).transpose(-1, -2)).view(b, h, -1) * call.scaling
        if call.mask is not None:
            row = call.mask[:, :, -1, :]
            if row.dtype == torch.bool:
                s = s.masked_fill(~row, float("-inf"))
            else:
                s = s + row.float()
        self.top[call.layer] = s.argmax(-1)  # [b, h]; softcap is monotone, so it is skipped


@dataclass
class RetrievalOutcome:
    prompt_id: str
    response: str
    recall: float
    counted: bool
    n_steps: int
    scores: Tensor = field(repr=False)  # [layer, head]


def generate_and_score(
    model,
    prompts: Sequence[TokenizedPrompt],
    max_new_tokens: int = 50,
    span: str = "answer",
    batch_size: int = 4,
    stop_at_newline: bool = True,
    interventions: Sequence[object] = (),
    require_correct: bool = True,
    prefill: str = "auto",
) -> list[RetrievalOutcome]:
    """Greedy-decode every prompt (batched, KV cache) and score each head's copying.

    ``prefill``: ``"batched"`` (one padded forward), ``"separate"`` (one unpadded forward per
    prompt, caches merged) or ``"auto"`` (separate on CPU, batched elsewhere)."""
    if prefill not in ("auto", "batched", "separate"):
        raise WorkbenchError(f"unknown prefill {prefill!r}", "use auto, batched or separate")
    key = {"answer": "answer_span", "needle": "needle_span"}.get(span)
    if key is None:
        raise WorkbenchError(f"unknown span {span!r}", "use span=answer (the paper's default) or span=needle")
    for p in prompts:
        if key not in p.meta or "answer" not in p.meta:
            raise WorkbenchError(
                f"prompt {p.id!r} has no needle fields ({key}, answer): the retrieval probe needs niah prompts",
                "use --dataset niah, or a prompts file exported by `workbench dataset niah`",
            )
        s, e = p.meta[key]
        if not 0 <= s < e <= len(p):
            raise WorkbenchError(f"prompt {p.id!r}: {key} {p.meta[key]} is outside its {len(p)} tokens", "fix the span")
    tok = model.tokenizer
    stops = newline_token_ids(tok) if stop_at_newline else set()
    if tok.eos_token_id is not None:
        stops.add(int(tok.eos_token_id))
    pad = pad_token_id(tok)
    dev = model.device
    separate = prefill == "separate" or (prefill == "auto" and dev.type == "cpu")
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    outcomes: dict[int, RetrievalOutcome] = {}
    rec = _TopKeyRecorder(model.n_layers)
    with hooked_run(model.hf_model, rec, *interventions):
        for j in range(0, len(order), batch_size):
            idx = order[j : j + batch_size]
            for i, res in zip(idx, _decode_batch(model, [prompts[i] for i in idx], rec, key, max_new_tokens, stops, pad, dev, separate)):
                outcomes[i] = res
    results = []
    for i, p in enumerate(prompts):
        res = outcomes[i]
        res.recall = rouge1_recall(p.meta["answer"], res.response)
        res.counted = res.recall > 0.5 or not require_correct
        results.append(res)
    return results


MIN_SHARED_PREFIX = 32  # tokens; shorter shared prefixes are not worth copying a cache for


def _common_prefix(a: Sequence[int], b: Sequence[int], limit: int) -> int:
    n = min(len(a), len(b), limit)
    if n <= 0:
        return 0
    diff = np.asarray(a[:n]) != np.asarray(b[:n])
    return int(diff.argmax()) if diff.any() else n


def _prefix_tree(rows: Sequence[Sequence[int]]) -> list[tuple[int, int | None, int]]:
    """An order to prefill ``rows`` in, each with the already-prefilled row whose prefix it
    reuses and the shared length: ``(row, parent or None, shared)``.

    Prim's maximum spanning tree over shared-prefix lengths, so the tokens computed are as few
    as prefix reuse allows (on one haystack with needles at depths c_1 >= ... >= c_n, the sum of
    c_2..c_n is saved). A row always recomputes at least its last token.
    """
    n = len(rows)
    share = [[0] * n for _ in range(n)]
    for i in range(n):
        for j in range(i + 1, n):
            share[i][j] = share[j][i] = _common_prefix(rows[i], rows[j], min(len(rows[i]), len(rows[j])) - 1)
    order = [(0, None, 0)]
    done = {0}
    best = {j: (share[0][j], 0) for j in range(1, n)}
    while best:
        j = max(best, key=lambda k: best[k][0])
        s, parent = best.pop(j)
        order.append((j, parent, s) if s >= MIN_SHARED_PREFIX else (j, None, 0))
        done.add(j)
        for k in best:
            if share[j][k] > best[k][0]:
                best[k] = (share[j][k], j)
    return order


def _separate_prefill(model, batch, rec) -> tuple[Any, Tensor]:
    """Prefill each prompt alone (no padding, no mask), then merge the KV caches left-padded to
    the batch width; top keys are shifted into padded coordinates. Returns (cache, last logits).

    Where a prompt shares a prefix with one prefilled before it (niah prompts on one haystack, as
    in the paper's grid, share everything before the earlier needle), that prefix's KV cache is
    reused instead of recomputed (order and reuse from :func:`_prefix_tree`)."""
    from transformers import DynamicCache

    b, width = batch.input_ids.shape
    caches: list[Any] = [None] * b
    logits: list[Tensor | None] = [None] * b
    tops: list[list[Tensor | None]] = [[None] * b for _ in rec.top]
    rows = [batch.input_ids[r, int(batch.first_index[r]) :].tolist() for r in range(b)]
    for r, parent, shared in _prefix_tree(rows):
        ids, first = rows[r], int(batch.first_index[r])
        cache = DynamicCache()
        if parent is not None:  # the KV of the shared prefix is the same computation: reuse it
            for layer, kv in enumerate(caches[parent].layers):
                cache.update(kv.keys[..., :shared, :], kv.values[..., :shared, :], layer)
        out = model.hf_model(
            input_ids=torch.tensor([ids[shared:]], device=batch.input_ids.device), past_key_values=cache, use_cache=True,
            position_ids=torch.arange(shared, len(ids), device=batch.input_ids.device)[None], logits_to_keep=1,
        )
        caches[r], logits[r] = out.past_key_values, out.logits[:, -1]
        for layer, top in enumerate(rec.top):
            tops[layer][r] = top + first
    merged = DynamicCache()
    for layer in range(len(caches[0].layers)):
        ks, vs = [], []
        for c in caches:
            k, v = c.layers[layer].keys, c.layers[layer].values
            pad = width - k.shape[2]
            ks.append(torch.nn.functional.pad(k, (0, 0, pad, 0)))
            vs.append(torch.nn.functional.pad(v, (0, 0, pad, 0)))
        merged.update(torch.cat(ks), torch.cat(vs), layer)
    rec.top = [torch.cat(t) for t in tops]
    return merged, torch.cat(logits)


def _decode_batch(model, batch_prompts, rec, key, max_new_tokens, stops, pad, dev, separate=False) -> list[RetrievalOutcome]:
    from transformers import DynamicCache

    batch = collate([p.ids for p in batch_prompts], pad, dev, padding_side="left")
    b, width = batch.input_ids.shape
    L, H = model.n_layers, model.n_heads
    lo = torch.tensor([p.meta[key][0] for p in batch_prompts], device=dev) + batch.first_index
    hi = torch.tensor([p.meta[key][1] for p in batch_prompts], device=dev) + batch.first_index
    seq = batch.input_ids  # every token so far, padded coordinates (keys index into it)
    mask = batch.attention_mask
    pos = batch.positions.clamp_min(0)
    scores = torch.zeros(b, L, H, dtype=torch.float64, device=dev)
    active = torch.ones(b, dtype=torch.bool, device=dev)
    generated: list[list[int]] = [[] for _ in range(b)]
    cache = DynamicCache()
    inp = seq
    for step in range(max_new_tokens):
        # logits_to_keep=1: only the last position goes through the LM head (the prefill would
        # otherwise build [batch, context, vocab] logits nobody reads)
        if step == 0 and separate and b > 1:
            cache, last = _separate_prefill(model, batch, rec)
        else:
            out = model.hf_model(input_ids=inp, attention_mask=mask, position_ids=pos, past_key_values=cache, use_cache=True, logits_to_keep=1)
            cache, last = out.past_key_values, out.logits[:, -1]
        y = last.argmax(-1)  # [b]
        for layer in range(L):
            top = rec.top[layer]  # [b, h]
            tok_at = seq.gather(1, top)
            hit = (top >= lo[:, None]) & (top < hi[:, None]) & (tok_at == y[:, None]) & active[:, None]
            scores[:, layer] += hit.double() / (hi - lo).double()[:, None]
        for r in range(b):
            if active[r]:
                generated[r].append(int(y[r]))
                if int(y[r]) in stops:
                    active[r] = False
        if not active.any():
            break
        seq = torch.cat([seq, y[:, None]], dim=1)
        mask = torch.cat([mask, torch.ones(b, 1, dtype=mask.dtype, device=dev)], dim=1)
        pos = pos[:, -1:] + 1
        inp = y[:, None]
    tok = model.tokenizer
    return [
        RetrievalOutcome(p.id, tok.decode(g, skip_special_tokens=True).strip(), 0.0, False, len(g), scores[r].cpu())
        for r, (p, g) in enumerate(zip(batch_prompts, generated))
    ]


class RetrievalProbe(Probe):
    """Wraps :func:`generate_and_score` in the probe interface (a generation probe)."""

    name = "retrieval"
    metrics = ("retrieval",)
    description = "Wu et al. retrieval score on niah prompts: copy-paste attention during greedy decoding"
    needs_patterns: ClassVar[bool] = False
    generates: ClassVar[bool] = True

    def __init__(self, max_new_tokens: int = 50, span: str = "answer", stop_at_newline: bool = True, require_correct: bool = True) -> None:
        super().__init__(max_new_tokens=int(max_new_tokens), span=str(span), stop_at_newline=bool(stop_at_newline), require_correct=bool(require_correct))
        self.outcomes: list[RetrievalOutcome] = []

    def run(self, model, prompts: Sequence[TokenizedPrompt], batch_size: int | str = 4, interventions: Sequence[object] = ()) -> pd.DataFrame:
        bs = 4 if batch_size == "auto" else int(batch_size)
        self.setup(model.n_layers, model.n_heads, model.device)
        self.outcomes = generate_and_score(model, prompts, batch_size=bs, interventions=interventions, **self.params)
        return self.results()

    def results(self) -> pd.DataFrame:
        counted = [o.scores for o in self.outcomes if o.counted]
        n = len(counted)
        value = torch.stack(counted).mean(0) if n else torch.full((self.n_layers, self.n_heads), math.nan, dtype=torch.float64)
        return self.rows("retrieval", value, n)

    def summary(self) -> dict:
        return {
            "n_prompts": len(self.outcomes),
            "n_counted": sum(o.counted for o in self.outcomes),
            "accuracy": sum(o.recall > 0.5 for o in self.outcomes) / max(1, len(self.outcomes)),
            "responses": {o.prompt_id: o.response for o in self.outcomes},
        }
