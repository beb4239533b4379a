"""One runner for every kind of probe: the door the CLI, sweeps, experiments and notebooks use.

    result = run_probes(model, prompts, [get_probe("entropy"), get_probe("retrieval")])
    result.table            # one tidy table, a `probe` column, every probe's rows
    result.lines()          # what each probe has to say about the run, formatted by the probe

Given the probes of a run, the runner

1. fuses every *pattern* probe into one forward per batch (:mod:`workbench.engine.extraction`), so
   each layer's attention chunks are computed once for all of them;
2. runs every *token* probe (its own forwards or decoding) on the same tokenized prompts;
3. hands *item* probes the items as given (image or context + text), with ``root`` for
   relative paths;

tokenizing only when some probe takes tokens (with the tokenizer's own defaults; BOS only when
asked). It dispatches on the ``kind`` each probe declares (``probes/base.py``), never on names.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

import pandas as pd

from workbench.engine.extraction import RunStats, run_pattern_probes
from workbench.errors import WorkbenchError
from workbench.inputs.batching import BatchSize
from workbench.inputs.prompts import Prompt, TokenizedPrompt, tokenize_prompts
from workbench.protocol.plugins import blaming, check_result
from workbench.protocol.run_context import RunContext
from workbench.protocol.table import ProbeResult

if TYPE_CHECKING:
    from workbench.models.loading import LoadedModel


@dataclass
class RunResult:
    """Every probe's result of one run, and the run's statistics."""

    table: pd.DataFrame
    results: dict[str, ProbeResult] = field(default_factory=dict)
    stats: RunStats = field(default_factory=RunStats)

    def lines(self) -> list[str]:
        return [line for r in self.results.values() for line in r.lines]

    def summaries(self) -> dict[str, dict[str, Any]]:
        return {name: r.summary for name, r in self.results.items() if r.summary}


def _tokens(
    model: LoadedModel, prompts: Sequence[Prompt | TokenizedPrompt], prepend_bos: bool
) -> list[TokenizedPrompt]:
    if all(isinstance(p, TokenizedPrompt) for p in prompts):
        return list(prompts)  # type: ignore[arg-type]
    if not all(isinstance(p, Prompt) for p in prompts):
        raise WorkbenchError(
            "prompts mix raw and tokenized items", "give all prompts as Prompt or all as TokenizedPrompt"
        )
    return tokenize_prompts(list(prompts), model.tokenizer, model.n_ctx, model.vocab_size, prepend_bos=prepend_bos)  # type: ignore[arg-type]


def _probe_names(probes: Sequence[Any], prompts: Sequence[Prompt | TokenizedPrompt]) -> list[str]:
    """The run's probe names, in order, once a run is known to have probes, prompts and no probe twice."""
    if not probes:
        raise WorkbenchError("no probes to run", "name at least one probe")
    if not prompts:
        raise WorkbenchError("no prompts to run", "give a non-empty prompt set")
    names = [p.name for p in probes]
    if len(set(names)) != len(names):
        raise WorkbenchError(
            f"a probe appears twice in one run: {names}", "give each probe once (its parameters apply to the whole run)"
        )
    return names


def run_probes(
    model: LoadedModel,
    prompts: Sequence[Prompt | TokenizedPrompt],
    probes: Sequence[Any],
    *,
    batch_size: BatchSize = "auto",
    prepend_bos: bool = False,
    interventions: Sequence[Any] = (),
    order: str | None = None,
    root: str | Path | None = None,
    progress: bool | None = None,
    chunk_elements: int | None = None,
    max_batch_tokens: int | None = None,
    forward: Callable[[Any], None] | None = None,
    attention_path: str = "auto",
) -> RunResult:
    """Run ``probes`` (of any kind) over ``prompts`` on ``model``; one :class:`RunResult`.

    Args:
        model: a :class:`~workbench.models.loading.LoadedModel`.
        prompts: :class:`~workbench.inputs.prompts.Prompt` s (raw: text or token ids, plus fields such as
            ``image`` / ``context`` that item probes read) or, for runs without item probes,
            already :class:`~workbench.inputs.prompts.TokenizedPrompt` s.
        probes: probe instances (``workbench.protocol.registry.get_probe``); names must be unique.
        batch_size: items per forward, or ``"auto"`` (a padded-token budget, ``max_batch_tokens``).
        prepend_bos: add BOS to text prompts (never twice).
        interventions: observers active in every forward (``HeadAblation``, ``HeadScaling``).
        order: where an intervening probe's own edits and ``interventions`` edit the same point of
            the same heads: ``"given,probe"`` or ``"probe,given"``; None refuses the overlap
            (:meth:`~workbench.protocol.run_context.RunContext.with_edits`).
        root: folder that relative paths in items (images) start from.
        forward: replaces the pattern engine's model call (tests simulate out-of-memory with it).
        attention_path: ``"auto"`` (each pattern probe reads the cheapest sufficient view: layer
            statistics from the kernel's log-sum-exp, or pattern chunks) or ``"chunks"`` (every
            pattern probe reads full chunks: the exact reference path).
    """
    names = _probe_names(probes, prompts)
    ctx = RunContext(
        batch_size=batch_size,
        max_batch_tokens=max_batch_tokens,
        chunk_elements=chunk_elements,
        attention_path=attention_path,  # type: ignore[arg-type]
        interventions=tuple(interventions),
        order=order,  # type: ignore[arg-type]
        progress=progress,
        root=Path(root) if root is not None else None,
    )
    wants_tokens = [p for p in probes if p.kind in ("pattern", "tokens")]
    if wants_tokens and any(isinstance(p, Prompt) and "image" in p.meta for p in prompts):
        raise WorkbenchError(
            f"{', '.join(p.name for p in wants_tokens)} read the prompts' text only, and these items carry images",
            "run the image probes (e.g. vhd) on their own, and text probes on text prompts",
        )
    tokenized = _tokens(model, prompts, prepend_bos) if wants_tokens else []
    if any(p.kind == "items" for p in probes) and not all(isinstance(p, Prompt) for p in prompts):
        raise WorkbenchError(
            "item probes read raw items (text with an image or a context), not token ids",
            "pass Prompt items (e.g. from read_prompts or make_dataset), not tokenized prompts",
        )
    stats = RunStats(n_prompts=len(prompts), n_tokens=sum(len(p) for p in tokenized) if tokenized else None)
    with blaming(probes):  # a plugin's own code raised: name it, not "internal error"
        done, stats = _run_kinds(model, prompts, tokenized, probes, ctx, stats, forward)
    for p in probes:
        check_result(p, done[p.name].table, model.n_layers, model.n_heads)
    ordered = {n: done[n] for n in names}
    table = pd.concat([r.table for r in ordered.values()], ignore_index=True)
    return RunResult(table, ordered, stats)


def _run_kinds(
    model: LoadedModel,
    prompts: Sequence[Any],
    tokenized: list[TokenizedPrompt],
    probes: Sequence[Any],
    ctx: RunContext,
    stats: RunStats,
    forward: Callable[[Any], None] | None,
) -> tuple[dict[str, ProbeResult], RunStats]:
    """Each probe by its kind: the pattern probes in one shared forward, then the token and item
    probes, each its own run."""
    done: dict[str, ProbeResult] = {}
    pattern = [p for p in probes if p.kind == "pattern"]
    if pattern:
        stats = run_pattern_probes(model, tokenized, pattern, ctx, forward=forward)
        for p in pattern:
            done[p.name] = p.result()
    for p in probes:
        if p.kind == "tokens":
            done[p.name] = p.run(model, tokenized, ctx)
        elif p.kind == "items":
            done[p.name] = p.run(model, list(prompts), ctx)
    return done, stats
