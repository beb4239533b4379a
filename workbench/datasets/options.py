"""What every dataset's option schema shares: the prompt count and its cap, the seed, and the
check of text templates with ``{placeholders}``.

Each dataset module defines ``class Options(DatasetOptions)`` next to its ``make()``, with one
field per ``make()`` parameter (the tokenizer aside) and the same default; ``make_dataset``
validates through it before any work (:mod:`workbench.protocol.params`).
"""

from __future__ import annotations

import string

from pydantic import Field

from workbench.protocol.params import Int, Options

MAX_PROMPTS = 1_000_000  # a typo such as --n-prompts 100000000 fails at once, not after hours
MAX_TOKENS = 1 << 20  # the longest prompt a dataset builds (tokens)
MAX_TOTAL_TOKENS = 100_000_000  # all prompts of a token-space dataset together


class DatasetOptions(Options):
    n_prompts: Int | None = Field(
        None, ge=1, le=MAX_PROMPTS, json_schema_extra={"fix": f"ask for 1 to {MAX_PROMPTS} prompts"}
    )
    seed: Int = 0


def check_template(
    text: str, required: tuple[str, ...], allowed: tuple[str, ...] = (), once: tuple[str, ...] = ()
) -> str:
    """``text`` must name every ``required`` placeholder, no other than ``required + allowed``,
    and ``once`` ones exactly once, literally (the code splits the text at them)."""
    try:
        names = [name for _, name, _, _ in string.Formatter().parse(text) if name is not None]
    except ValueError as exc:
        raise ValueError(f"is not a valid template ({exc}); write braces as {{{{ and }}}}") from None
    missing = [n for n in required if n not in names]
    if missing:
        raise ValueError(
            f"needs the placeholders {', '.join('{' + n + '}' for n in required)} "
            f"(missing {', '.join('{' + n + '}' for n in missing)})"
        )
    unknown = [n for n in names if n not in required + allowed]
    if unknown:
        known = ", ".join("{" + n + "}" for n in required + allowed)
        raise ValueError(f"unknown placeholder {{{unknown[0]}}} (allowed: {known})")
    for n in once:
        if text.count("{" + n + "}") != 1:
            raise ValueError(f"needs {{{n}}} exactly once, written as is, got it {names.count(n)} times")
    return text
