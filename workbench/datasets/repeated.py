"""``repeated-random``: random token sequences repeated (TransformerLens head_detector, RazorAttention).

Each prompt is ``repeats`` copies of ``period`` random token ids drawn without replacement from
the vocabulary minus the special tokens, so within a period no token repeats (the only earlier
occurrence of a token is its copy one period back). Metadata: ``period`` and ``offset`` (index
of the first random token). Like every prompt built in token space, a prompt starts with what
the tokenizer's own defaults put before text (BOS for Gemma, nothing for SmolLM2 / GPT-2):
``prepend_bos`` unset; ``true`` forces a BOS, ``false`` forces none.

A pattern view (:func:`view_rows`) shows the first copy and the start of the second, where the
induction stripe (``period - 1`` keys left of the diagonal), the duplicate stripe (``period``
keys left) and the previous-token sub-diagonal all are.
"""

from __future__ import annotations

import random
from typing import Any

from pydantic import Field, model_validator

from workbench.errors import WorkbenchError
from workbench.inputs.prompts import Prompt, special_prefix
from workbench.protocol.params import Int

from .options import MAX_TOKENS, MAX_TOTAL_TOKENS, DatasetOptions
from .view import MAX_SQUARE, PatternRows

DESCRIPTION = (
    "random token sequences repeated (period n, default 2 copies): induction / duplicate / previous-token / echo heads"
)


class Options(DatasetOptions):
    period: Int = Field(50, ge=2)
    repeats: Int = Field(2, ge=2)
    prepend_bos: bool | None = None
    vocab_size: Int | None = Field(None, ge=1)

    @model_validator(mode="after")
    def _size(self) -> "Options":
        length = self.period * self.repeats
        if length > MAX_TOKENS:
            raise ValueError(f"each prompt would be {length} tokens (period x repeats), more than {MAX_TOKENS}")
        total = length * (self.n_prompts or 16)
        if total > MAX_TOTAL_TOKENS:
            raise ValueError(
                f"the prompts would be {total} tokens in all, more than {MAX_TOTAL_TOKENS}; "
                "ask for fewer or shorter prompts"
            )
        return self


def make(
    n_prompts: int | None = None,
    seed: int = 0,
    tokenizer: Any = None,
    period: int = 50,
    repeats: int = 2,
    prepend_bos: bool | None = None,
    vocab_size: int | None = None,
) -> list[Prompt]:
    if tokenizer is None and vocab_size is None:
        raise WorkbenchError(
            "repeated-random needs the model's tokenizer (to know the vocabulary)", "pass tokenizer= or --model"
        )
    if period < 2 or repeats < 2:
        raise WorkbenchError(f"need period >= 2 and repeats >= 2, got {period}, {repeats}", "e.g. period=50, repeats=2")
    n_prompts = 16 if n_prompts is None else n_prompts
    size = vocab_size or len(tokenizer)
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    if hasattr(tokenizer, "get_added_vocab"):
        special |= set(tokenizer.get_added_vocab().values())
    pool = [t for t in range(size) if t not in special]
    if len(pool) < period:
        raise WorkbenchError(f"period {period} exceeds the {len(pool)} ordinary tokens", "use a smaller period")
    rng = random.Random(seed)
    if prepend_bos is None:
        prefix = special_prefix(tokenizer) if tokenizer is not None else []
    elif prepend_bos:
        bos = getattr(tokenizer, "bos_token_id", None)
        if bos is None:
            raise WorkbenchError("prepend_bos was asked for but the tokenizer has no BOS token", "drop prepend_bos")
        prefix = [bos]
    else:
        prefix = []
    prompts = []
    for i in range(n_prompts):
        seq = rng.sample(pool, period)
        prompts.append(
            Prompt(
                id=f"rep-{seed}-{i:04d}", tokens=prefix + seq * repeats, meta={"period": period, "offset": len(prefix)}
            )
        )
    return prompts



def view_rows(ids: list[int], meta: dict[str, Any], text: str | None = None, tokenizer: Any = None) -> PatternRows:
    """A repeated prompt's pattern view: the second copy's first ``MAX_SQUARE`` query rows (its
    first tokens, where a repeat is first seen) over every key before them, i.e. the first copy
    and the start of the second. The default square of the prompt's first ``MAX_SQUARE`` tokens
    would show no repeat at all once ``period`` reaches ``MAX_SQUARE``. A prompt of at most
    ``2 x MAX_SQUARE`` tokens is shown whole."""
    n = len(ids)
    if n <= 2 * MAX_SQUARE:
        return PatternRows(list(ids), list(range(n)), "square")
    start = int(meta.get("offset", 0)) + int(meta.get("period", 0))
    start = min(max(0, start), n - 1)
    return PatternRows(list(ids), list(range(start, min(n, start + MAX_SQUARE))), "square")
