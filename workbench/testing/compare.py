"""A probe against its definition: run it as users do, recompute it the slow way, compare per head.

:func:`assert_probe_matches` is the check every built-in metric passes (``tests/test_metrics.py``
does the same by hand), packaged for plugin authors: the probe runs through
:func:`workbench.runner.run_probes` on one *padded* batch of prompts of unequal lengths (so padding,
per-prompt offsets and masks are exercised), on every attention path the engine may give a
pattern probe (layer statistics and pattern chunks), and each ``(metric, layer, head)`` value is
compared with what ``reference_fn`` computes from a plain eager model
(:mod:`workbench.testing.eager`)::

    from workbench.testing import assert_probe_matches

    def reference(ref):
        # ref.patterns[i][layer]: [head, query, key] attention of prompt i, unpadded, float64
        sums, n = {}, 0
        for pats in ref.patterns:
            for q in range(1, pats[0].shape[-1]):
                n += 1
                for layer, A in enumerate(pats):
                    for head in range(A.shape[0]):
                        sums[layer, head] = sums.get((layer, head), 0.0) + float(A[head, q, q - 1])
        return {"prev_token": {k: (v / n, n) for k, v in sums.items()}}

    def test_prev(tiny_model_dir):           # fixture: workbench.testing.fixtures
        assert_probe_matches(PrevToken(), reference, tiny_model_dir)
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence, Union

import pandas as pd
import torch

from workbench.inputs.prompts import TokenizedPrompt
from workbench.models.loading import LoadedModel, load_model
from workbench.runner import run_probes
from workbench.testing.eager import attention_windows, eager_model, eager_patterns

# Unequal on purpose: one padded batch holds a long prompt, short ones and a one-token prompt
# (where a probe may have nothing to measure), longer than the tiny Gemma's sliding window of 8.
DEFAULT_LENGTHS = (13, 4, 21, 1, 8)

# What a reference gives: metric -> (layer, head) -> value, or (value, n) to check the count too.
Expected = Mapping[str, Mapping[tuple[int, int], Union[float, tuple[float, int]]]]


def unequal_prompts(
    vocab_size: int, lengths: Sequence[int] = DEFAULT_LENGTHS, seed: int = 0, avoid: Sequence[int] = ()
) -> list[TokenizedPrompt]:
    """Prompts of random token ids with the given (unequal) ``lengths``: run together, they make
    one right-padded batch. ``avoid``: ids never drawn (the tokenizer's special tokens)."""
    skip = set(avoid)
    allowed = [i for i in range(vocab_size) if i not in skip]
    rng = random.Random(seed)
    return [TokenizedPrompt(f"p{i}", [rng.choice(allowed) for _ in range(n)]) for i, n in enumerate(lengths)]


@dataclass
class ReferenceInputs:
    """What a reference function is given: the plain eager model and the prompts, unpadded."""

    model: Any
    """The plain transformers model (eager attention, float32; :func:`~workbench.testing.eager.eager_model`)."""
    prompts: list[TokenizedPrompt]
    """The prompts the probe ran on, in order."""

    @property
    def ids(self) -> list[list[int]]:
        """Each prompt's token ids."""
        return [list(p.ids) for p in self.prompts]

    @cached_property
    def patterns(self) -> list[list[torch.Tensor]]:
        """Per prompt, per layer, the ``[head, query, key]`` attention (float64), computed on first use."""
        return [eager_patterns(self.model, ids) for ids in self.ids]

    @cached_property
    def windows(self) -> list[int | None]:
        """Per layer, the sliding window in keys, or None (:func:`~workbench.testing.eager.attention_windows`)."""
        return attention_windows(self.model)


def probe_values(table: pd.DataFrame, probe: str | None = None) -> dict[tuple[str, int, int], tuple[float, int]]:
    """``(metric, layer, head) -> (value, n)`` of one probe's rows of a tidy table; an
    AssertionError if a key occurs twice (per-item rows are not per-head values)."""
    rows = table if probe is None or "probe" not in table else table[table.probe == probe]
    out: dict[tuple[str, int, int], tuple[float, int]] = {}
    for r in rows.itertuples():
        key = (str(r.metric), int(r.layer), int(r.head))
        assert key not in out, f"{key} occurs twice: compare per-item rows with a check of your own"
        out[key] = (float(r.value), int(r.n))
    return out


def _expected(want: Expected) -> dict[tuple[str, int, int], tuple[float, int | None]]:
    out: dict[tuple[str, int, int], tuple[float, int | None]] = {}
    for metric, heads in want.items():
        for (layer, head), v in heads.items():
            value, n = v if isinstance(v, tuple) else (v, None)
            out[(str(metric), int(layer), int(head))] = (float(value), None if n is None else int(n))
    return out


def _coverage(got: Mapping, want: Mapping) -> list[str]:
    """Metrics and heads one side has and the other has not."""
    problems = []
    for metric in sorted({k[0] for k in got} | {k[0] for k in want}):
        g = {k[1:] for k in got if k[0] == metric}
        w = {k[1:] for k in want if k[0] == metric}
        if not w:
            problems.append(f"{metric}: the probe reports it and the reference gives no values for it")
        elif not g:
            problems.append(f"{metric}: the reference gives values and the probe reports no rows")
        elif g != w:
            only = f"only in the probe {sorted(g - w)}, only in the reference {sorted(w - g)}"
            problems.append(f"{metric}: the (layer, head)s differ: {only}")
    return problems


def differences(got: Mapping, want: Mapping, atol: float) -> list[str]:
    """Every disagreement between ``got`` (:func:`probe_values`) and ``want`` (``(metric, layer,
    head) -> (value, n or None)``), worst value first; empty when they agree within ``atol``."""
    problems = _coverage(got, want)
    off = []
    for key in sorted(set(got) & set(want)):
        (g, gn), (w, wn) = got[key], want[key]
        metric, layer, head = key
        if wn is not None and gn != wn:
            problems.append(f"{metric} layer {layer} head {head}: n is {gn}, the reference counts {wn}")
        if math.isnan(g) and math.isnan(w):
            continue
        diff = abs(g - w)
        if not diff <= atol:  # NaN on one side only is a difference too
            off.append((diff if not math.isnan(diff) else math.inf, key, g, w))
    for diff, (metric, layer, head), g, w in sorted(off, key=lambda o: -o[0]):
        problems.append(f"{metric} layer {layer} head {head}: probe {g:.8g}, reference {w:.8g} (|diff| {diff:.3g})")
    return problems


def _as_prompts(prompts: Sequence[TokenizedPrompt | Sequence[int]]) -> list[TokenizedPrompt]:
    return [p if isinstance(p, TokenizedPrompt) else TokenizedPrompt(f"p{i}", list(p)) for i, p in enumerate(prompts)]


def _model(model_dir: str | Path | LoadedModel, device: str) -> LoadedModel:
    return model_dir if isinstance(model_dir, LoadedModel) else load_model(str(model_dir), device=device)


def assert_probe_matches(
    probe: Any,
    reference_fn: Callable[[ReferenceInputs], Expected],
    model_dir: str | Path | LoadedModel,
    prompts: Sequence[TokenizedPrompt | Sequence[int]] | None = None,
    atol: float = 1e-5,
    *,
    attention_paths: Sequence[str] | None = None,
    device: str = "cpu",
) -> pd.DataFrame:
    """Run ``probe`` on one padded batch of ``prompts`` and compare every ``(metric, layer, head)``
    value with ``reference_fn``; an AssertionError lists the disagreements, worst first.

    Args:
        probe: a probe instance (its parameters are kept) or class; each run gets a fresh instance.
        reference_fn: given a :class:`ReferenceInputs` (the eager model, the prompts unpadded and
            their patterns), returns ``{metric: {(layer, head): value}}``; a value may be
            ``(value, n)`` to check the row's ``n`` too. Every metric the probe reports must
            have values, for exactly the heads the probe reports.
        model_dir: a model folder (the ``tiny_model_dir`` fixture), any name
            :func:`workbench.load_model` takes, or a loaded model.
        prompts: token-id lists or :class:`~workbench.inputs.prompts.TokenizedPrompt` s of at least
            two different lengths; default :func:`unequal_prompts` (the model's special tokens avoided).
        atol: the largest absolute difference allowed (the probe runs in float32, the reference in float64).
        attention_paths: ``run_probes``' ``attention_path`` values to run; default both ``"auto"``
            (layer statistics where the probe's ``needs`` allow) and ``"chunks"`` for a pattern probe.
        device: where the model runs, when ``model_dir`` is not loaded yet.

    Returns:
        The probe's tidy table from the last run, for further checks.
    """
    probe = probe() if isinstance(probe, type) else probe
    model = _model(model_dir, device)
    if prompts is None:
        prompts = unequal_prompts(model.vocab_size, avoid=getattr(model.tokenizer, "all_special_ids", None) or ())
    prompts = _as_prompts(prompts)
    if len({len(p) for p in prompts}) < 2:
        raise ValueError("give prompts of at least two different lengths, so that the batch is padded")
    want = _expected(reference_fn(ReferenceInputs(eager_model(model.source), prompts)))
    if attention_paths is None:
        attention_paths = ("auto", "chunks") if probe.kind == "pattern" else ("auto",)
    table = pd.DataFrame()
    for path in attention_paths:
        fresh = type(probe)(**probe.params)
        run = run_probes(model, prompts, [fresh], batch_size=len(prompts), progress=False, attention_path=path)
        if probe.kind == "pattern":
            assert run.stats.n_batches == 1, f"the prompts ran in {run.stats.n_batches} batches, not one padded batch"
        table = run.table[run.table.probe == probe.name]
        problems = differences(probe_values(table), want, atol)
        if problems:
            raise AssertionError(_message(f"probe {probe.name!r} (attention path {path!r})", problems, atol))
    return table


def _message(who: str, problems: list[str], atol: float, show: int = 12) -> str:
    more = f"\n  ... and {len(problems) - show} more" if len(problems) > show else ""
    return f"{who} disagrees with its reference (atol {atol:g}):\n  " + "\n  ".join(problems[:show]) + more


__all__ = [
    "DEFAULT_LENGTHS",
    "Expected",
    "ReferenceInputs",
    "assert_probe_matches",
    "differences",
    "probe_values",
    "unequal_prompts",
]
