"""Shipped and generated prompt sets, by name.

Each dataset is a function ``make(n_prompts, seed, **options) -> list[Prompt]``; the output can
be written as a prompts JSONL file and read back with ``--prompts``.
"""
from __future__ import annotations

from typing import Callable

from workbench.errors import WorkbenchError
from workbench.prompts import Prompt

from . import prose

DATASETS: dict[str, tuple[Callable[..., list[Prompt]], str]] = {
    "prose": (prose.make, prose.DESCRIPTION),
}


def make_dataset(name: str, n_prompts: int | None = None, seed: int = 0, **options) -> list[Prompt]:
    """Build the named dataset; unknown names fail with the list of known ones."""
    if name not in DATASETS:
        raise WorkbenchError(f"unknown dataset {name!r}", f"choose from: {', '.join(DATASETS)}")
    if n_prompts is not None and n_prompts < 1:
        raise WorkbenchError(f"--n-prompts must be at least 1, got {n_prompts}", "ask for 1 or more prompts")
    return DATASETS[name][0](n_prompts=n_prompts, seed=seed, **options)
