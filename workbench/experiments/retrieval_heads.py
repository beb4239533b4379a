"""The causal test of retrieval heads (Wu et al., section 4): mask them and needle retrieval
breaks; mask as many random heads and it does not.

1. Detect: retrieval scores on one set of niah prompts (``seed``).
2. Evaluate on a *different* set (``seed + 1000``: other haystacks and answers) the needle
   accuracy, the share of prompts whose response has ROUGE-1 recall > 0.5 of the answer, with
   (a) nothing ablated, (b) the top-k heads by retrieval score ablated, (c) k heads drawn at
   random from the non-retrieval heads (score <= ``threshold``, not in the top k), ``draws``
   times, for each k.

The result is a tidy table (``metric = needle_accuracy``, ``layer = head = -1``) with the
columns ``condition`` (none / top / random), ``k``, ``draw`` and ``heads`` (the ablated heads).

``mode`` is any ablation of :func:`workbench.engine.interventions.head_ablation`: ``zero``,
``first``, or ``flat`` (the heads' attention uniform over the visible prefix: AttentionInfluence's
check, Hua et al. 2025, Table 6, where masking the top-5% retrieval heads breaks GSM8K and masking
as many random heads does not). Scores measured before (``scores=``, a per-head table) skip the
detection; ``tasks`` adds answer tasks (``{name: prompts}``, each prompt's gold ``meta["answer"]``,
e.g. the ``arithmetic`` dataset), scored by :func:`answer_accuracy` in every condition as metric
``<name>_accuracy``.
"""

from __future__ import annotations

import random
from typing import TYPE_CHECKING, Any, Mapping, Sequence

import pandas as pd
import torch

from workbench.engine.attention import hooked_run
from workbench.engine.interventions import head_ablation
from workbench.engine.patterns import collate
from workbench.errors import WorkbenchError
from workbench.inputs.batching import BatchSize
from workbench.inputs.prompts import TokenizedPrompt, pad_token_id
from workbench.protocol.ranking import rank_heads
from workbench.protocol.registry import get_probe
from workbench.protocol.run_context import RunContext
from workbench.runner import run_probes

if TYPE_CHECKING:
    from workbench.models.loading import LoadedModel


def needle_accuracy(
    model: LoadedModel,
    prompts: Sequence[TokenizedPrompt],
    heads: Sequence[tuple[int, int]],
    mode: str = "zero",
    batch_size: BatchSize = "auto",
    max_new_tokens: int = 20,
) -> float:
    """Share of prompts answered (ROUGE-1 recall > 0.5) with ``heads`` ablated."""
    interventions = [head_ablation(list(heads), mode)] if heads else []
    probe = get_probe("retrieval", max_new_tokens=max_new_tokens, require_correct=False)
    result = run_probes(model, prompts, [probe], batch_size=batch_size, interventions=interventions, progress=False)
    return float(result.results["retrieval"].summary["accuracy"])


def _answer_rows(model: LoadedModel, prompts: Sequence[TokenizedPrompt]) -> list[tuple[list[int], int]]:
    """Each prompt's ids followed by the tokens of a blank, the answer and a newline, and where they start."""
    rows = []
    for p in prompts:
        if "answer" not in p.meta:
            raise WorkbenchError(
                f"prompt {p.id!r} has no gold answer (meta['answer'])", "use a dataset with answers, e.g. arithmetic"
            )
        tail = model.tokenizer(" " + str(p.meta["answer"]).strip() + "\n", add_special_tokens=False)["input_ids"]
        rows.append((list(p.ids) + list(tail), len(p.ids)))
    return rows


_LINE_ENDS: dict[int, torch.Tensor] = {}


def _line_ends(tokenizer: Any, size: int) -> torch.Tensor:
    """Per token id below ``size``: whether its text has a newline with only blanks before it."""
    if id(tokenizer) not in _LINE_ENDS:
        out = torch.zeros(max(size, len(tokenizer)), dtype=torch.bool)
        for token, i in tokenizer.get_vocab().items():
            text = tokenizer.convert_tokens_to_string([token])
            out[i] = "\n" in text and not text.split("\n")[0].strip()
        _LINE_ENDS[id(tokenizer)] = out
    return _LINE_ENDS[id(tokenizer)]


def answer_accuracy(
    model: LoadedModel,
    prompts: Sequence[TokenizedPrompt],
    heads: Sequence[tuple[int, int]] = (),
    mode: str = "zero",
    batch_size: BatchSize = 16,
) -> float:
    """Share of prompts whose greedy answer, up to the first newline and stripped, is
    ``meta["answer"]``, with ``heads`` ablated by ``mode``.

    Computed teacher-forced in one forward per batch: a prompt is right when, fed the tokens of
    a blank, the answer and a newline, the model's argmax at each step is the next of those tokens and its
    argmax after the answer begins a new line (a token whose text up to its first newline is
    blank). That is greedy decoding's exact match, for answers the model would write in those
    tokens (digit by digit, for the tokenizers of SmolLM2 and Gemma 3)."""
    rows = _answer_rows(model, prompts)
    ctx = RunContext(batch_size=batch_size, interventions=[head_ablation(list(heads), mode)] if heads else ())
    ends_line = _line_ends(model.tokenizer, model.vocab_size)
    right = 0
    with hooked_run(model.hf_model, *ctx.interventions) as hf, torch.no_grad():
        for idx in ctx.plan([len(rows[i][0]) for i in range(len(rows))], model.device):
            batch = collate([rows[i][0] for i in idx], pad_token_id(model.tokenizer), model.device)
            lo = min(rows[i][1] for i in idx) - 1  # logits only where answers are predicted (a large vocabulary)
            hi = max(len(rows[i][0]) for i in idx) - 1
            logits = hf(
                input_ids=batch.input_ids,
                attention_mask=batch.attention_mask,
                position_ids=batch.positions.clamp_min(0),
                use_cache=False,
                logits_to_keep=torch.arange(lo, hi, device=model.device),
            ).logits
            top = logits.argmax(-1).cpu()
            for row, i in enumerate(idx):
                ids, start = rows[i]
                said = top[row, start - 1 - lo : len(ids) - 1 - lo].tolist()  # predictions of the answer tokens
                right += said[:-1] == ids[start:-1] and bool(ends_line[said[-1]])
    return right / len(rows)


def retrieval_ablation(
    model: LoadedModel,
    detect: Sequence[TokenizedPrompt],
    evaluate: Sequence[TokenizedPrompt],
    ks: Sequence[int] = (5, 10, 20),
    draws: int = 3,
    threshold: float = 0.1,
    mode: str = "zero",
    seed: int = 0,
    batch_size: BatchSize = "auto",
    max_new_tokens: int = 20,
    log=print,
    scores: pd.DataFrame | None = None,
    tasks: Mapping[str, Sequence[TokenizedPrompt]] | None = None,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Returns (retrieval scores per head, accuracy per condition and task: ``needle_accuracy``
    on ``evaluate`` when it is not empty, ``<name>_accuracy`` for each of ``tasks``)."""
    if scores is None:
        detection = run_probes(
            model,
            detect,
            [get_probe("retrieval", max_new_tokens=max_new_tokens)],
            batch_size=batch_size,
            progress=False,
        )
        scores = detection.table
        found = detection.results["retrieval"].summary["n_counted"]
        log(f"detection: {found}/{len(detect)} prompts answered")
    filled = scores.fillna({"value": -1.0})  # unscored heads: below every score, and in the random pool
    value = {(int(r.layer), int(r.head)): float(r.value) for r in filled.itertuples()}
    order = rank_heads(value, value.get)
    rng = random.Random(seed)
    rows = []

    def evaluations() -> dict[str, tuple[Any, int]]:
        out: dict[str, tuple[Any, int]] = {}
        if evaluate:
            out["needle_accuracy"] = (
                lambda hs: needle_accuracy(model, evaluate, hs, mode, batch_size, max_new_tokens),
                len(evaluate),
            )
        for name, prompts in (tasks or {}).items():
            out[f"{name}_accuracy"] = (lambda hs, ps=prompts: answer_accuracy(model, ps, hs, mode), len(prompts))
        return out

    measures = evaluations()

    def record(condition: str, k: int, draw: int, heads: list[tuple[int, int]]) -> None:
        for metric, (measure, n) in measures.items():
            acc = measure(heads)
            rows.append(
                {
                    "metric": metric,
                    "condition": condition,
                    "k": k,
                    "draw": draw,
                    "heads": ",".join(f"{layer}.{h}" for layer, h in heads),
                    "value": acc,
                    "n": n,
                }
            )
            log(f"  {condition:6s} k={k:<3d} draw={draw}: {metric.replace('_', ' ')} {acc:.0%}")

    log(f"{sum(v > threshold for v in value.values())} heads score above {threshold}")
    record("none", 0, 0, [])
    for k in ks:
        top = order[:k]
        record("top", k, 0, top)
        pool = [hd for hd in order if value[hd] <= threshold and hd not in top]
        for d in range(draws):
            record("random", k, d, rng.sample(pool, min(k, len(pool))))
    table = pd.DataFrame(rows)
    table.insert(0, "probe", "retrieval-ablation")
    table["layer"] = -1
    table["head"] = -1
    return scores, table
