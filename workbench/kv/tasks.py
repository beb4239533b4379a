"""The two tasks a cache policy is judged on, each sharing its prefills across every policy.

- :func:`niah_rows`: needle-in-a-haystack accuracy. Each prompt is prefilled once (the
  context, then the question with the full cache for the question-aware protocol); every policy
  then compresses a copy of that store (:meth:`EvictedCache.copy` shares the tensors) and decodes
  greedily against what it kept. Two protocols:

  * ``question-agnostic`` (kvpress' pipeline): the context alone is compressed, then the question
    is read and the answer decoded against the compressed cache;
  * ``question-aware``: context + question are compressed (SnapKV's window then holds the
    question's queries); the first answer token comes from the full-cache prefill, the rest from
    the compressed cache.

  An answer is correct when the decoded text contains the needle's answer (exact substring).
- :func:`loss_rows`: next-token loss on held-out prose: the first ``n - tail`` tokens are the
  compressed context, the last ``tail`` are teacher-forced against it; mean NLL over the tail's
  predictions, and its difference to the full cache.

Prefills are what dominate on long contexts; a practitioner's loop (one prefill per policy and
budget, kvpress) pays them once per grid point, this once per prompt
(``benchmarks/bench_kv.py``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
from torch import Tensor

from workbench.kv.budget import cost, is_full
from workbench.kv.evicted import EvictedCache, continue_forward, prefill
from workbench.kv.policy import CachePolicy

PROTOCOLS = ("question-agnostic", "question-aware")
PolicyFor = Callable[[int], CachePolicy]  # a grid point: the policy for a context of n tokens


@dataclass
class NiahItem:
    """One needle prompt, split where the question starts."""

    id: str
    context: list[int]
    question: list[int]
    answer: str
    length: int
    depth: float


def _decode(
    model: Any, store: EvictedCache, first: Tensor, start: Sequence[int], steps: int, stops: set[int]
) -> list[list[int]]:
    """Greedy tokens from ``first`` (the argmax after the prompt), ``steps`` in all."""
    out = [[int(t)] for t in first]
    pos = list(start)
    for _ in range(steps - 1):
        live = [r for r, toks in enumerate(out) if toks[-1] not in stops]
        if not live:
            break
        logits = continue_forward(model, store, [[out[r][-1]] if r in live else [] for r in range(len(out))], pos)
        for r in live:
            out[r].append(int(logits[r, 0].argmax()))
        pos = [p + 1 if r in live else p for r, p in enumerate(pos)]
    return out


def compression_point(item: NiahItem, protocol: str) -> int:
    """Where the cache is compressed: after the context, or after context + question."""
    return len(item.context) + (len(item.question) if protocol == "question-aware" else 0)


def _read_questions(model: Any, store: EvictedCache, items: Sequence[NiahItem]) -> Tensor:
    """Read each item's question into ``store``; the greedy first answer token of each."""
    logits = continue_forward(model, store, [it.question for it in items], [len(it.context) for it in items])
    return torch.stack([logits[r, len(it.question) - 1] for r, it in enumerate(items)]).argmax(-1)


def niah_answers(
    model: Any,
    items: Sequence[NiahItem],
    policies: Sequence[PolicyFor],
    protocol: str = "question-agnostic",
    max_new_tokens: int = 8,
    window_queries: int = 64,
) -> list[list[list[int]]]:
    """Greedy answer tokens per grid point, per item (``[point][item] -> tokens``); each item's
    policy is made for its own compression point."""
    stops = {int(t) for t in [getattr(model.tokenizer, "eos_token_id", None)] if t is not None}
    base = prefill(model, [it.context for it in items], window_queries)
    aware = protocol == "question-aware"
    if aware:  # the question is read with the full cache, then compressed with the context
        first = _read_questions(model, base, items)
    ends = [compression_point(it, protocol) for it in items]
    after = [len(it.context) + len(it.question) for it in items]
    out = []
    for policy_for in policies:
        store = base.copy().compress([policy_for(n) for n in ends])
        if not aware:
            first = _read_questions(model, store, items)
        out.append(_decode(model, store, first, after, max_new_tokens, stops))
    return out


def niah_rows(
    model: Any,
    items: Sequence[NiahItem],
    policies: Sequence[PolicyFor],
    protocol: str = "question-agnostic",
    max_new_tokens: int = 8,
) -> list[dict[str, Any]]:
    """One row per (grid point, item): accuracy 0/1, with the policy's cost at the compression
    point."""
    answers = niah_answers(model, items, policies, protocol, max_new_tokens)
    rows = []
    for policy_for, per_item in zip(policies, answers):
        for it, toks in zip(items, per_item):
            text = model.tokenizer.decode(toks, skip_special_tokens=True)
            n = compression_point(it, protocol)
            rows.append(
                {
                    **_point(policy_for(n), n),
                    "task": "niah",
                    "protocol": protocol,
                    "length": it.length,
                    "depth": it.depth,
                    "item": it.id,
                    "metric": "accuracy",
                    "value": float(it.answer in text),
                    "response": text,
                }
            )
    return rows


def _tail_nll(model: Any, store: EvictedCache, tails: list[list[int]], starts: list[int]) -> Tensor:
    """Mean NLL of each tail's tokens 2.. given the store and the tail before them."""
    logits = continue_forward(model, store, tails, starts)
    logp = torch.log_softmax(logits[:, :-1].double(), dim=-1)
    target = torch.tensor(tails, device=logits.device)[:, 1:, None]
    return -logp.gather(-1, target)[..., 0].mean(-1).cpu()


def loss_rows(
    model: Any, segments: Sequence[Sequence[int]], policies: Sequence[PolicyFor], tail: int = 256, length: int = 0
) -> list[dict[str, Any]]:
    """Mean next-token NLL of each segment's last ``tail`` tokens against its compressed first
    ``len - tail`` (one row per policy and segment: ``loss``, and ``delta_loss`` against the full
    cache on the same segment, computed once whatever the policies given)."""
    contexts = [list(s[:-tail]) for s in segments]
    tails = [list(s[-tail:]) for s in segments]
    starts = [len(c) for c in contexts]
    base = prefill(model, contexts, window_queries=64)
    full = _tail_nll(model, base.copy(), tails, starts)
    rows = []
    for policy_for in policies:
        per_row = [policy_for(len(c)) for c in contexts]
        whole = all(is_full(p) for p in per_row)
        nll = full if whole else _tail_nll(model, base.copy().compress(per_row), tails, starts)
        for r, c in enumerate(contexts):
            common = {**_point(per_row[r], len(c)), "task": "loss", "protocol": "question-agnostic"}
            common.update(length=length or len(segments[r]), depth=float("nan"), item=f"segment-{r}", response="")
            rows.append({**common, "metric": "loss", "value": float(nll[r])})
            rows.append({**common, "metric": "delta_loss", "value": float(nll[r] - full[r])})
    return rows


def _point(policy: CachePolicy, n: int) -> dict[str, Any]:
    c = cost(policy, n)
    return {
        "policy": policy.name,
        "selector": policy.selector,
        "budget": policy.budget,
        "seed": policy.seed,
        "kv_tokens": c.kv_tokens,
        "kv_fraction": c.kv_fraction,
        "kv_bytes": c.kv_bytes,
        "head_sparsity": c.head_sparsity,
        "n": 1,
    }
