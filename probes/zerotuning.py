"""ZeroTuning (Han et al., "ZeroTuning: Unlocking the Initial Token's Power to Enhance Large
Language Models Without Training", arXiv 2505.11739; code FeijiangHan/ZeroTuning,
``core algorithms/modelling_llama.py`` and ``eval_classification_final.py``): per-head profiling of
how scaling the attention on the first token changes a labelled classification task.

**Operator.** On a chosen head, every query row's weight on the first key is multiplied by
gamma and the row renormalised: ``a'_0 = gamma a_0 / D``, ``a'_i = a_i / D``, ``D = (gamma - 1) a_0 + 1``.
That is exactly adding ``ln gamma`` to the first key's logit before the softmax, which is how
:class:`FirstKeyScaling` does it (a ``SCORES`` edit of the declared intervention protocol,
:mod:`workbench.engine.edits`); :class:`FirstKeyWeightScaling` is the paper's after-softmax form
(a ``WEIGHTS`` edit), kept to show the two agree (tests/test_zerotuning.py). "The first key" is
each prompt's first *real* token (``Rows.first_key``, whatever the padding). Caveat: Gemma's
tokenizer puts BOS there; SmolLM2's adds no BOS, so on SmolLM2 the operator scales attention on
the prompt's first content token (here "Review"), which is a sink all the same but not the
token the paper means. Give ``--prepend-bos`` to put one there.

**Scoring** (:func:`workbench.engine.scoring.classify`, shared with ACT's accuracy). Each
prompt's ``meta`` holds ``choices`` (label strings, e.g. " negative", " positive"; per prompt)
and the gold ``label`` (or its ``label_index``); a choice is scored by the next-token
log-probability of its first token at the last prompt position, the prediction is the argmax.
The gold label's log-probability is normalised over the prompt's choices' first tokens
(``logprob_over="choices"``, default) or over the whole vocabulary (``"vocab"``).

**Profiling loop** (the code's head search): for each unit (``mode``: ``"index"`` = head index
h in every layer at once, the code's mode 1, default; ``"head"`` = one (layer, head), mode 0;
``"layer"`` = every head of one layer, mode 2) scaled by ``gamma`` (default 2, the notebook's):

- ``zt_accuracy_gain`` = accuracy with the unit scaled minus baseline accuracy;
- ``zt_logprob_gain`` = mean over prompts of the change in the gold label's log-probability
  (a smoother signal than accuracy on small prompt sets).

Rows are per (layer, head): in mode ``index`` every layer's head h carries index h's value, in
mode ``layer`` every head of layer l carries layer l's value; ``n`` = prompts. A unit is
*up-effective* when more first-token attention helps (accuracy gain > 0 at gamma > 1, or < 0 at
gamma < 1), *down-effective* when it hurts.

**Tuning** (:func:`tune`): profile on a validation split, take the dominant type (the larger
of the up- / down-effective sets), grid-search one gamma for all of its heads on validation
accuracy (gamma = 1, no edit, is in the grid), report accuracy on a held-out test split at
gamma = 1 and at the chosen gamma. Never tune and report on the same prompts.

Cost: one forward per prompt per unit (plus the baseline), no gradients. Definitions:
docs/metrics.md#probe-zerotuning.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal, Sequence

import torch
from jaxtyping import Float
from pydantic import Field
from torch import Tensor

from probes.base import TokenProbe
from workbench.engine.call import AttentionCall
from workbench.engine.edits import Rows, ScoresEdit, WeightsEdit, sites_of
from workbench.engine.scoring import Outcome, classify, read_choices
from workbench.errors import WorkbenchError
from workbench.inputs.prompts import TokenizedPrompt
from workbench.protocol import params as opt
from workbench.protocol.metrics import MetricInfo
from workbench.protocol.run_context import RunContext
from workbench.protocol.table import ProbeResult

if TYPE_CHECKING:
    from workbench.models.loading import LoadedModel

Mode = Literal["index", "head", "layer"]
Heads = list[tuple[int, int]]
GRID = (0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 4.0)  # the tuning step's gammas (the notebook: 1..4 step 1)


def _check_gamma(gamma: float) -> float:
    if not (math.isfinite(gamma) and gamma > 0):
        raise WorkbenchError(f"gamma must be a positive number, got {gamma}", "use gamma > 0 (1 changes nothing)")
    return float(gamma)


class FirstKeyScaling(ScoresEdit):
    """ZeroTuning's operator: ``ln gamma`` added to each prompt's first real key's logit on the
    declared heads, every query row. After the softmax this is the first key's weight times gamma
    with the row renormalised (``a'_0 = gamma a_0 / D``, ``a'_i = a_i / D``, ``D = (gamma-1) a_0 + 1``)."""

    label = "zerotuning"

    def __init__(self, heads: Heads, gamma: float) -> None:
        self.where, self.gamma = sites_of(heads), _check_gamma(gamma)

    def sites(self) -> dict[int, frozenset[int]]:
        return self.where

    def edit(self, call: AttentionCall, x: Rows) -> Float[Tensor, "batch head block key"]:
        return x.values + math.log(self.gamma) * x.first_key.to(x.values.dtype)


class FirstKeyWeightScaling(WeightsEdit):
    """The same operator as the paper writes it: the first real key's weight times gamma after
    the softmax (the protocol renormalises the rows)."""

    label = "zerotuning (weights)"

    def __init__(self, heads: Heads, gamma: float) -> None:
        self.where, self.gamma = sites_of(heads), _check_gamma(gamma)

    def sites(self) -> dict[int, frozenset[int]]:
        return self.where

    def edit(self, call: AttentionCall, x: Rows) -> Float[Tensor, "batch head block key"]:
        return torch.where(x.first_key, x.values * self.gamma, x.values)


def units(mode: Mode, n_layers: int, n_heads: int) -> list[tuple[str, Heads]]:
    """The profiling units of ``mode``, as ``(label, [(layer, head), ...])``."""
    if mode == "index":
        return [(f"head {h}", [(layer, h) for layer in range(n_layers)]) for h in range(n_heads)]
    if mode == "layer":
        return [(f"layer {layer}", [(layer, h) for h in range(n_heads)]) for layer in range(n_layers)]
    if mode == "head":
        return [(f"{layer}.{h}", [(layer, h)]) for layer in range(n_layers) for h in range(n_heads)]
    raise WorkbenchError(f"unknown mode {mode!r}", "use mode index, head or layer")


@dataclass
class Profile:
    """The profiling loop's outcome: the baseline and each unit scaled by gamma."""

    gamma: float
    base: Outcome
    units: list[tuple[str, Heads]]
    scaled: list[Outcome] = field(default_factory=list)

    def accuracy_gain(self) -> list[float]:
        return [o.accuracy - self.base.accuracy for o in self.scaled]

    def logprob_gain(self) -> list[float]:
        return [float((o.gold_logprob - self.base.gold_logprob).mean()) for o in self.scaled]

    def effective(self) -> tuple[list[int], list[int]]:
        """Indices of the up-effective and the down-effective units."""
        sign = 1.0 if self.gamma > 1 else -1.0
        gains = [g * sign for g in self.accuracy_gain()]
        return [i for i, g in enumerate(gains) if g > 0], [i for i, g in enumerate(gains) if g < 0]


def profile(
    model: LoadedModel,
    prompts: Sequence[TokenizedPrompt],
    ctx: RunContext | None = None,
    mode: Mode = "index",
    gamma: float = 2.0,
    logprob_over: Literal["choices", "vocab"] = "choices",
) -> Profile:
    """The head-profiling loop: the baseline, then every unit of ``mode`` scaled by ``gamma``."""
    labels = read_choices(model.tokenizer, prompts, "zerotuning")
    out = Profile(
        gamma, classify(model, prompts, labels, ctx, (), logprob_over), units(mode, model.n_layers, model.n_heads)
    )
    for _, heads in out.units:
        out.scaled.append(classify(model, prompts, labels, ctx, [FirstKeyScaling(heads, gamma)], logprob_over))
    return out


def per_head(prof: Profile, values: Sequence[float], n_layers: int, n_heads: int) -> Tensor:
    """A value per unit spread over its (layer, head) cells (NaN where no unit reaches)."""
    grid = torch.full((n_layers, n_heads), math.nan, dtype=torch.float64)
    for (_, heads), v in zip(prof.units, values):
        for layer, head in heads:
            grid[layer, head] = v
    return grid


@dataclass
class Tuned:
    """The tuning step: profile and grid on validation, accuracy on the held-out test split."""

    profile: Profile
    kind: Literal["up", "down", "none"]
    heads: Heads
    val_accuracy: dict[float, float]  # gamma -> validation accuracy
    gamma: float
    test_baseline: float
    test_tuned: float
    n_val: int
    n_test: int
    test_outcomes: tuple[Outcome, Outcome] | None = None  # per test prompt: baseline, tuned


def dominant(prof: Profile) -> tuple[Literal["up", "down", "none"], Heads]:
    """The larger of the up- / down-effective sets (ties: the one with the larger summed |gain|)."""
    up, down = prof.effective()
    gain = prof.accuracy_gain()
    if not up and not down:
        return "none", []
    weight = (len(up), sum(abs(gain[i]) for i in up)), (len(down), sum(abs(gain[i]) for i in down))
    pick, kind = (up, "up") if weight[0] >= weight[1] else (down, "down")
    return kind, sorted({h for i in pick for h in prof.units[i][1]})  # type: ignore[return-value]


def tune(
    model: LoadedModel,
    val: Sequence[TokenizedPrompt],
    test: Sequence[TokenizedPrompt],
    ctx: RunContext | None = None,
    mode: Mode = "index",
    gamma: float = 2.0,
    grid: Sequence[float] = GRID,
) -> Tuned:
    """ZeroTuning's tuning step without touching ``test`` until the choice is made: profile
    ``val`` at ``gamma``, take the dominant type's heads, pick the grid gamma with the best
    validation accuracy (ties: the one nearest 1 in log scale; gamma = 1 is always a candidate),
    then measure the test accuracy with and without it."""
    ids = {p.id for p in val}
    if any(p.id in ids for p in test):
        raise WorkbenchError("the validation and test splits share prompts", "tune and report on disjoint prompts")
    prof = profile(model, val, ctx, mode, gamma)
    kind, heads = dominant(prof)
    labels = read_choices(model.tokenizer, val, "zerotuning")
    acc = {1.0: prof.base.accuracy}
    for g in grid:
        if heads and g != 1.0:
            acc[float(g)] = classify(model, val, labels, ctx, [FirstKeyScaling(heads, g)]).accuracy
    best = max(acc, key=lambda g: (acc[g], -abs(math.log(g))))
    test_labels = read_choices(model.tokenizer, test, "zerotuning")
    base = classify(model, test, test_labels, ctx)
    tuned = base if best == 1.0 else classify(model, test, test_labels, ctx, [FirstKeyScaling(heads, best)])
    return Tuned(prof, kind, heads, acc, best, base.accuracy, tuned.accuracy, len(val), len(test), (base, tuned))


class ZeroTuningProbe(TokenProbe):
    """ZeroTuning's head profiling on labelled classification prompts (dataset ``sentiment``)."""

    name = "zerotuning"
    metrics = ("zt_accuracy_gain", "zt_logprob_gain")
    description = "ZeroTuning: accuracy change when a head's attention on the first token is scaled by gamma"
    metric_info = {
        "zt_accuracy_gain": MetricInfo(
            "signed",
            "classification accuracy with the head's first-token attention scaled by gamma, minus baseline",
            "scaling helps (up-effective at gamma > 1)",
            "scaling hurts (down-effective at gamma > 1)",
            rank="abs",
        ),
        "zt_logprob_gain": MetricInfo(
            "signed",
            "mean change of the gold label's log-probability when the head's first-token attention is scaled",
            "the gold label gains probability",
            "the gold label loses probability",
            rank="abs",
            unit="nats",
        ),
    }

    class Params(opt.Options):
        mode: Mode = Field(
            "index",
            description="unit scaled at once: index (head h of every layer, the code's mode 1), head, or layer",
        )
        gamma: opt.Float = Field(2.0, gt=0, le=100, description="factor on the first token's attention weight")
        logprob_over: Literal["choices", "vocab"] = Field(
            "choices", description="normalise the gold label's log-probability over the choices or the vocabulary"
        )

    def run(self, model: LoadedModel, prompts: Sequence[TokenizedPrompt], ctx: RunContext) -> ProbeResult:
        p = self.params
        prof = profile(model, prompts, ctx, p["mode"], p["gamma"], p["logprob_over"])
        L, H, n = model.n_layers, model.n_heads, len(prompts)
        import pandas as pd

        table = pd.concat(
            [
                self.rows("zt_accuracy_gain", per_head(prof, prof.accuracy_gain(), L, H), n),
                self.rows("zt_logprob_gain", per_head(prof, prof.logprob_gain(), L, H), n),
            ],
            ignore_index=True,
        )
        up, down = prof.effective()
        gains = prof.accuracy_gain()
        summary = {
            "n_prompts": n,
            "mode": p["mode"],
            "gamma": p["gamma"],
            "baseline_accuracy": prof.base.accuracy,
            "unit_accuracy": {label: o.accuracy for (label, _), o in zip(prof.units, prof.scaled)},
            "up_effective": [prof.units[i][0] for i in up],
            "down_effective": [prof.units[i][0] for i in down],
        }
        best = max(range(len(gains)), key=lambda i: gains[i]) if gains else None
        lines = [
            f"zerotuning: baseline accuracy {prof.base.accuracy:.1%} on {n} prompts; gamma {p['gamma']:g} "
            f"({p['mode']}): {len(up)} up-effective, {len(down)} down-effective of {len(prof.units)} units"
            + (f"; best {prof.units[best][0]} {gains[best]:+.1%}" if best is not None else "")
        ]
        return self.finish(table, summary, lines)
