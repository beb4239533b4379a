"""``sentiment``: few-shot binary sentiment classification, generated from word lists (no download).

A labelled classification task for probes that score a model's choice between label words
(ZeroTuning's head profiling, probes/zerotuning.py). Each prompt is ``n_shots`` solved examples
and one query, as in the ICL classification prompts of ZeroTuning's evaluation (SST-2 style)::

    Review: The acting was wonderful and the ending was not dull.
    Sentiment: positive

    Review: The soundtrack was tedious.
    Sentiment:

The answer is the next token after ``Sentiment:``: one of the label words ``" negative"`` /
``" positive"`` (``meta["choices"]``, in that order; the gold one is ``meta["label"]``, its index
``meta["label_index"]``). A review is one to three clauses "the <aspect> was <adjective>"; with
probability ``negation`` a clause says "was not <adjective>" with the opposite polarity; the
review's label is the majority polarity of its clauses (always odd: 1 or 3 clauses, or 2 clauses
that agree). Negations and mixed clauses keep small models below ceiling, so an intervention can
move accuracy either way: at the defaults SmolLM2-135M-Instruct scores 78% (96 prompts, seed 0),
75% / 72% (48 / 64 prompts, seeds 101 / 202), Gemma-3-270M 88% / 88% (32 / 48 prompts, seeds 101 /
202; data/results/build_zerotuning.py). Labels are balanced within a prompt set (alternating, then
shuffled); the shots are balanced too. Everything follows from ``seed``.
"""

from __future__ import annotations

import random

from pydantic import Field

from workbench.inputs.prompts import Prompt
from workbench.protocol.params import Float, Int

from .options import DatasetOptions

DESCRIPTION = "few-shot binary sentiment of generated reviews (label words ' negative' / ' positive')"
CHOICES = (" negative", " positive")

ASPECTS = tuple(
    "acting, plot, soundtrack, ending, dialogue, pacing, cinematography, cast, script, story, direction, humour, "
    "music, photography, finale, editing, lead performance, screenplay, visual effects, opening scene".split(", ")
)
POSITIVE = tuple(
    "wonderful superb moving brilliant delightful gripping charming excellent beautiful clever memorable touching "
    "fresh powerful funny stunning".split()
)
NEGATIVE = tuple(
    "dull tedious clumsy awful boring weak predictable messy bland painful forgettable shallow lifeless confusing "
    "terrible stale".split()
)


class Options(DatasetOptions):
    n_shots: Int = Field(4, ge=0, le=32, description="solved examples before the query (balanced labels)")
    negation: Float = Field(0.35, ge=0.0, le=1.0, description="chance that a clause is negated ('was not dull')")


def _clause(rng: random.Random, positive: bool, negation: float) -> str:
    aspect = rng.choice(ASPECTS)
    if rng.random() < negation:  # "not <opposite>" carries the wanted polarity
        return f"the {aspect} was not {rng.choice(NEGATIVE if positive else POSITIVE)}"
    return f"the {aspect} was {rng.choice(POSITIVE if positive else NEGATIVE)}"


def review(rng: random.Random, positive: bool, negation: float) -> str:
    """One review whose majority polarity is ``positive``."""
    shape = rng.choice(("one", "two", "three"))
    if shape == "one":
        polarities = [positive]
    elif shape == "two":
        polarities = [positive, positive]
    else:
        polarities = [positive, positive, not positive]
        rng.shuffle(polarities)
    clauses = [_clause(rng, p, negation) for p in polarities]
    if len(clauses) == 1:
        text = clauses[0]
    elif len(clauses) == 2:
        text = f"{clauses[0]} and {clauses[1]}"
    else:
        text = f"{clauses[0]}, {clauses[1]} and {clauses[2]}"
    return text[0].upper() + text[1:] + "."


def _balanced(rng: random.Random, n: int) -> list[bool]:
    labels = [i % 2 == 1 for i in range(n)]
    rng.shuffle(labels)
    return labels


def make(n_prompts: int | None = None, seed: int = 0, n_shots: int = 4, negation: float = 0.35) -> list[Prompt]:
    """``n_prompts`` (default 64) few-shot sentiment prompts, balanced labels, reproducible by seed."""
    n_prompts = 64 if n_prompts is None else n_prompts
    rng = random.Random(seed)
    prompts = []
    for i, positive in enumerate(_balanced(rng, n_prompts)):
        shots = [
            f"Review: {review(rng, p, negation)}\nSentiment:{CHOICES[int(p)]}\n\n" for p in _balanced(rng, n_shots)
        ]
        text = "".join(shots) + f"Review: {review(rng, positive, negation)}\nSentiment:"
        meta = {"choices": list(CHOICES), "label": CHOICES[int(positive)], "label_index": int(positive)}
        prompts.append(Prompt(id=f"sentiment-{seed}-{i:04d}", text=text, meta=meta))
    return prompts
