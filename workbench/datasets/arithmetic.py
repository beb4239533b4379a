"""``arithmetic``: few-shot addition, a small reasoning task for causal checks of heads.

Each prompt is ``n_shots`` solved additions of two ``digits``-digit numbers, one a line, then an
unsolved one::

    12 + 35 = 47
    58 + 17 = 75
    ...
    56 + 21 =

The gold answer (the sum's digits, no leading space) is ``meta["answer"]``, with the operands in
``meta["a"]`` / ``meta["b"]``. A model answers right when its greedy continuation, up to the first
newline, is the answer once stripped (exact match). This stands in for GSM8K in AttentionInfluence's
causal check (Hua et al. 2025, Table 6: masking the top retrieval heads breaks GSM8K, masking as
many random heads does not), at the scale of 100M-parameter models. Text prompts: tokenized with the
tokenizer's own defaults.
"""

from __future__ import annotations

import random

from pydantic import Field

from workbench.inputs.prompts import Prompt
from workbench.protocol.params import Int

from .options import DatasetOptions

DESCRIPTION = "few-shot addition of two n-digit numbers (gold answer in meta): a reasoning check for head masking"


class Options(DatasetOptions):
    n_shots: Int = Field(4, ge=0, le=64)
    digits: Int = Field(2, ge=1, le=9)


def make(n_prompts: int | None = None, seed: int = 0, n_shots: int = 4, digits: int = 2) -> list[Prompt]:
    """``n_prompts`` prompts (default 16) of ``n_shots`` worked additions and one question."""
    n_prompts = 16 if n_prompts is None else n_prompts
    rng = random.Random(seed)
    lo, hi = 10 ** (digits - 1) if digits > 1 else 0, 10**digits - 1

    def pair() -> tuple[int, int]:
        return rng.randint(lo, hi), rng.randint(lo, hi)

    prompts = []
    for i in range(n_prompts):
        shots = [pair() for _ in range(n_shots)]
        a, b = pair()
        text = "".join(f"{x} + {y} = {x + y}\n" for x, y in shots) + f"{a} + {b} ="
        prompts.append(Prompt(id=f"add-{seed}-{i:04d}", text=text, meta={"answer": str(a + b), "a": a, "b": b}))
    return prompts
