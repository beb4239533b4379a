"""Which attention rows of a dataset's prompt a pattern view shows: declared by the dataset itself.

A sweep stores, for the strongest head of each role, its attention on item 0 of the dataset the
role was measured on (:mod:`workbench.runs.views`). What part of that prompt is worth drawing
depends on the dataset, so the dataset says it: a dataset module may define

    def view_rows(ids: list[int], meta: dict, text: str | None, tokenizer) -> PatternRows

(``ids``: the prompt's token ids as the probes saw them, ``meta``: its metadata, ``text``: its
text when it was given as text, ``tokenizer``: the model's). Without one, a
view is :func:`square_rows`: query rows ``0 .. min(T, MAX_SQUARE) - 1``, the square of the
prompt's first tokens (for a causal model the same weights as on the whole prompt, since later
keys are masked). ``niah`` declares the decoding rows over the needle instead, ``counterfact``
the passage and question the context probe reads (the passage marked). A new dataset
touches only its own module; :func:`workbench.datasets.pattern_rows` finds the hook.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

MAX_SQUARE = 64  # a square view shows at most this many query rows (and, on a causal model, keys)


@dataclass(frozen=True)
class PatternRows:
    """What a view draws: the token ids to run (the prompt, possibly continued: a decoding row
    needs the tokens decoded before it), the query rows to keep, how to draw them (``square``:
    query x key; ``strip``: one line per row over every key) and an optional key span to mark
    (``[start, end)``, e.g. the needle, named by ``mark_label``)."""

    ids: list[int]
    queries: list[int]
    view: Literal["square", "strip"] = "square"
    mark: tuple[int, int] | None = None
    mark_label: str = ""


def square_rows(ids: list[int], meta: dict[str, Any], text: str | None = None, tokenizer: Any = None) -> PatternRows:
    """The default: the first ``min(T, MAX_SQUARE)`` query rows of the prompt as a square."""
    return PatternRows(list(ids), list(range(min(len(ids), MAX_SQUARE))), "square")


__all__ = ["MAX_SQUARE", "PatternRows", "square_rows"]
