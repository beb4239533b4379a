"""Shipped and generated prompt sets, by name.

Each dataset is a function ``make(n_prompts, seed, **options) -> list[Prompt]`` with an option
schema (``Options``, :mod:`workbench.protocol.params`) next to it; the output can be written as a prompts
JSONL file and read back with ``--prompts``.
"""

from __future__ import annotations

import inspect
from typing import Any, Callable

from pydantic import BaseModel

from workbench.errors import WorkbenchError
from workbench.inputs.prompts import Prompt
from workbench.protocol.params import validate_options

from . import arithmetic, code, counterfact, niah, prose, repeated, sentiment, shapes
from .options import MAX_PROMPTS
from .view import PatternRows, square_rows

DATASETS: dict[str, tuple[Callable[..., list[Prompt]], str]] = {
    "prose": (prose.make, prose.DESCRIPTION),
    "repeated-random": (repeated.make, repeated.DESCRIPTION),
    "niah": (niah.make, niah.DESCRIPTION),
    "shapes": (shapes.make, shapes.DESCRIPTION),
    "counterfact": (counterfact.make, counterfact.DESCRIPTION),
    "code": (code.make, code.DESCRIPTION),
    "sentiment": (sentiment.make, sentiment.DESCRIPTION),
    "arithmetic": (arithmetic.make, arithmetic.DESCRIPTION),
}
NEEDS_TOKENIZER = {"repeated-random", "niah"}
# The option schema of each dataset (one field per make() parameter, the tokenizer aside).
OPTIONS: dict[str, type[BaseModel]] = {
    "prose": prose.Options,
    "repeated-random": repeated.Options,
    "niah": niah.Options,
    "shapes": shapes.Options,
    "counterfact": counterfact.Options,
    "code": code.Options,
    "sentiment": sentiment.Options,
    "arithmetic": arithmetic.Options,
}


def make_dataset(
    name: str, n_prompts: int | None = None, seed: int = 0, tokenizer: Any = None, **options
) -> list[Prompt]:
    """Build the named dataset; unknown names and options, values of the wrong type or out of
    range, and absurd sizes fail (one WorkbenchError naming the option) before any work.

    ``repeated-random`` and ``niah`` are built in token space and need the model's tokenizer.
    """
    if name not in DATASETS:
        raise WorkbenchError(f"unknown dataset {name!r}", f"choose from: {', '.join(DATASETS)}")
    if isinstance(n_prompts, int) and not isinstance(n_prompts, bool):
        if n_prompts < 1:
            raise WorkbenchError(f"--n-prompts must be at least 1, got {n_prompts}", "ask for 1 or more prompts")
        if n_prompts > MAX_PROMPTS:
            raise WorkbenchError(
                f"--n-prompts must be at most {MAX_PROMPTS}, got {n_prompts}",
                f"ask for at most {MAX_PROMPTS} prompts (n_prompts in a sweep config), "
                "or split the work into several runs",
            )
    opts = validate_options(OPTIONS[name], {"n_prompts": n_prompts, "seed": seed, **options}, name, noun="option")
    kwargs = opts.model_dump(exclude_unset=True)
    if name in NEEDS_TOKENIZER:
        kwargs["tokenizer"] = tokenizer
    return DATASETS[name][0](**kwargs)


def pattern_rows(
    name: str | None, ids: list[int], meta: dict[str, Any], text: str | None = None, tokenizer: Any = None
) -> PatternRows:
    """The rows a pattern view of one of dataset ``name``'s prompts shows (``ids``: its tokens as
    the probes saw them, ``meta``: its metadata, ``text``: its text if it has one): what the
    dataset's module declares in its ``view_rows(ids, meta, text, tokenizer)``
    (:mod:`workbench.datasets.view`), else the square of the first rows
    (:func:`workbench.datasets.view.square_rows`); a prompts file (``name`` None) gets the square."""
    hook = getattr(inspect.getmodule(DATASETS[name][0]), "view_rows", None) if name in DATASETS else None
    return (hook or square_rows)(list(ids), dict(meta), text, tokenizer)
