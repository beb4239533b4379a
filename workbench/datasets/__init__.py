"""Shipped and generated prompt sets, by name.

Each dataset is a function ``make(n_prompts, seed, **options) -> list[Prompt]``; the output can
be written as a prompts JSONL file and read back with ``--prompts``.
"""
from __future__ import annotations

from typing import Any, Callable

from workbench.errors import WorkbenchError
from workbench.prompts import Prompt

from . import counterfact, niah, prose, repeated, shapes

DATASETS: dict[str, tuple[Callable[..., list[Prompt]], str]] = {
    "prose": (prose.make, prose.DESCRIPTION),
    "repeated-random": (repeated.make, repeated.DESCRIPTION),
    "niah": (niah.make, niah.DESCRIPTION),
    "shapes": (shapes.make, shapes.DESCRIPTION),
    "counterfact": (counterfact.make, counterfact.DESCRIPTION),
}
NEEDS_TOKENIZER = {"repeated-random", "niah"}


def make_dataset(name: str, n_prompts: int | None = None, seed: int = 0, tokenizer: Any = None, **options) -> list[Prompt]:
    """Build the named dataset; unknown names and options fail with the valid choices.

    ``repeated-random`` and ``niah`` are built in token space and need the model's tokenizer.
    """
    if name not in DATASETS:
        raise WorkbenchError(f"unknown dataset {name!r}", f"choose from: {', '.join(DATASETS)}")
    if n_prompts is not None and n_prompts < 1:
        raise WorkbenchError(f"--n-prompts must be at least 1, got {n_prompts}", "ask for 1 or more prompts")
    if name in NEEDS_TOKENIZER:
        options["tokenizer"] = tokenizer
    try:
        return DATASETS[name][0](n_prompts=n_prompts, seed=seed, **options)
    except TypeError as exc:
        raise WorkbenchError(f"bad option for dataset {name!r}: {exc}", "see `workbench datasets`") from None
