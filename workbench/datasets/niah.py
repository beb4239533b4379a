"""``niah``: needle-in-a-haystack prompts for the retrieval-head score (Wu et al.).

A haystack of the shipped prose corpus, a needle sentence carrying a random fact the model
cannot guess, inserted at a sentence boundary at ``depth`` (0 = start, 1 = end) of a context of
``context_len`` tokens, then the question; prompts start with the tokenizer's default special
prefix (BOS for Gemma, nothing for SmolLM2). Prompts are built from token pieces, so the needle's
exact token span is known (no fuzzy search as in the paper's code, whose ``find_needle_idx``
matches 90% token-set overlap). Fields (in ``meta``): ``needle_span`` and ``answer_span``
([start, end) token indices), ``answer`` (the text the model must produce: the paper's
``real_needle``), ``question``, ``depth``, ``context_len``.

Pattern views (:mod:`workbench.datasets.view`): :func:`view_rows` declares the decoding rows
over the needle, the rows the retrieval score reads.

The default needle follows the paper's structure with a random answer:
"The secret passphrase for the {place} is {number}." (a 5-digit number; ``answer_digits=0``
gives "{word} {word} {number}" instead, which SmolLM2-135M recalls only partly).
"""

from __future__ import annotations

import random
from typing import Annotated, Any

from pydantic import Field, field_validator, model_validator

from workbench.errors import WorkbenchError
from workbench.inputs.corpus import corpus_ids
from workbench.inputs.prompts import Prompt, special_prefix
from workbench.protocol.params import Float, Int

from .options import MAX_TOKENS, MAX_TOTAL_TOKENS, DatasetOptions, check_template
from .view import PatternRows

DESCRIPTION = "needle-in-a-haystack over the prose corpus: grid of context length x depth, for the retrieval score"
PLACES = [
    "old lighthouse",
    "blue door",
    "northern gate",
    "river house",
    "clock tower",
    "stone bridge",
    "green library",
    "harbor office",
]
WORDS = [
    "amber",
    "falcon",
    "velvet",
    "cactus",
    "marble",
    "orchid",
    "pepper",
    "saffron",
    "tundra",
    "walnut",
    "zephyr",
    "copper",
    "lantern",
    "meadow",
]
NEEDLE = "\nThe secret passphrase for the {place} is {answer}.\n"
QUESTION = (
    "\nBased on the content of the book, what is the secret passphrase for the {place}?\n"
    "Answer: The secret passphrase for the {place} is"
)


Length = Annotated[Int, Field(ge=1, le=MAX_TOKENS)]
Depth = Annotated[Float, Field(ge=0, le=1)]


class Options(DatasetOptions):
    context_len: Length | Annotated[list[Length], Field(min_length=1)] = 1024
    depths: Depth | Annotated[list[Depth], Field(min_length=1)] | None = None
    needle: str = NEEDLE
    question: str = QUESTION
    n_ctx: Int | None = Field(None, ge=1)
    answer_digits: Int = Field(5, ge=0, le=18)
    shared_haystack: bool = False

    @field_validator("needle")
    @classmethod
    def _needle(cls, text: str) -> str:
        return check_template(text, required=("place", "answer"), once=("answer",))

    @field_validator("question")
    @classmethod
    def _question(cls, text: str) -> str:
        return check_template(text, required=(), allowed=("place",))

    @model_validator(mode="after")
    def _size(self) -> "Options":
        lengths = self.context_len if isinstance(self.context_len, list) else [self.context_len]
        n_depths = len(self.depths) if isinstance(self.depths, list) else 1 if self.depths is not None else 5
        total = max(lengths) * (self.n_prompts or len(lengths) * n_depths)
        if total > MAX_TOTAL_TOKENS:
            raise ValueError(
                f"the prompts would be up to {total} tokens in all, more than {MAX_TOTAL_TOKENS}; "
                "ask for fewer or shorter prompts"
            )
        return self


def _encode(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def make(
    n_prompts: int | None = None,
    seed: int = 0,
    tokenizer: Any = None,
    context_len: int | list[int] = 1024,
    depths: float | list[float] | None = None,
    needle: str = NEEDLE,
    question: str = QUESTION,
    n_ctx: int | None = None,
    answer_digits: int = 5,
    shared_haystack: bool = False,
) -> list[Prompt]:
    """A grid of ``context_len`` x ``depths``, cycled until ``n_prompts`` (default: the grid once).

    ``shared_haystack=True`` builds every prompt on the same haystack text (as the paper does:
    one book, needles at varying depths and lengths), so prompts share the prefix before their
    needle; the retrieval probe then prefills that prefix once. Default: a haystack drawn per prompt.
    """
    if tokenizer is None:
        raise WorkbenchError("niah needs the model's tokenizer", "pass tokenizer= or --model")
    lengths = [int(x) for x in (context_len if isinstance(context_len, (list, tuple)) else [context_len])]
    depths = (
        [0.0, 0.25, 0.5, 0.75, 1.0]
        if depths is None
        else (list(depths) if isinstance(depths, (list, tuple)) else [depths])
    )
    for d in depths:
        if not 0.0 <= float(d) <= 1.0:
            raise WorkbenchError(f"depth {d} is outside [0, 1]", "give depths as fractions, e.g. 0,0.5,1")
    if "{answer}" not in needle or "{place}" not in needle:
        raise WorkbenchError(
            "the needle wording needs {place} and {answer} placeholders", "e.g. 'The code for the {place} is {answer}.'"
        )
    grid = [(L, float(d)) for L in lengths for d in depths]
    n_prompts = len(grid) if n_prompts is None else n_prompts
    rng = random.Random(seed)
    hay_seed = f"haystack-{seed}"  # its own stream: the default prompts do not change
    period_ids = set(_encode(tokenizer, ".")) | set(_encode(tokenizer, ".\n"))
    prefix = special_prefix(tokenizer)
    prompts = []
    for i in range(n_prompts):
        L, depth = grid[i % len(grid)]
        place = rng.choice(PLACES)
        answer = (
            str(rng.randrange(10 ** (answer_digits - 1), 10**answer_digits))
            if answer_digits
            else f"{rng.choice(WORDS)} {rng.choice(WORDS)} {rng.randrange(1000, 10000)}"
        )
        head, tail = needle.split("{answer}")
        pre_ids = _encode(tokenizer, head.format(place=place))
        ans_ids = _encode(tokenizer, " " + answer if not head.endswith(" ") else answer)
        post_ids = _encode(tokenizer, tail.format(place=place))
        needle_ids = pre_ids + ans_ids + post_ids
        q_ids = _encode(tokenizer, question.format(place=place))
        n_hay = L - len(prefix) - len(needle_ids) - len(q_ids)
        if n_hay < 1:
            raise WorkbenchError(
                f"context length {L} is too short for the needle and question "
                f"({len(prefix) + len(needle_ids) + len(q_ids)} tokens)",
                "use a longer --context-len",
            )
        if n_ctx is not None and L > n_ctx:
            raise WorkbenchError(
                f"context length {L} exceeds the model's context of {n_ctx}", "use a shorter --context-len"
            )
        hay = corpus_ids(tokenizer, n_hay, random.Random(hay_seed) if shared_haystack else rng)
        cut = int(round(n_hay * depth))
        if 0 < cut < n_hay:  # back up to a sentence end, as the paper's code does
            j = cut
            while j > 0 and hay[j - 1] not in period_ids:
                j -= 1
            cut = j if j > 0 else cut
        tokens = prefix + hay[:cut] + needle_ids + hay[cut:] + q_ids
        s = len(prefix) + cut
        meta = {
            "needle_span": [s, s + len(needle_ids)],
            "answer_span": [s + len(pre_ids), s + len(pre_ids) + len(ans_ids)],
            "answer": answer,
            "question": question.format(place=place),
            "depth": depth,
            "context_len": L,
        }
        prompts.append(Prompt(id=f"niah-{seed}-{i:04d}-L{L}-d{depth:g}", tokens=tokens, meta=meta))
    return prompts


def view_rows(ids: list[int], meta: dict[str, Any], text: str | None = None, tokenizer: Any = None) -> PatternRows:
    """A niah prompt's pattern view: the decoding rows that emit the answer, over every key, the
    needle marked. The retrieval score (``probes/retrieval.py``) reads, at each greedy step, the
    query whose logits give the next token: the prompt's last position for the first answer
    token, then each emitted token's. Here the answer is fed as the model emits it when it
    retrieves the needle (the counted prompts): the prompt followed by the answer's tokens but the
    last, and the rows are ``T - 1 .. T + len(answer) - 2``, each predicting one answer token."""
    s, e = (int(x) for x in meta["answer_span"])
    answer = list(ids[s:e])
    n = len(ids)
    needle = meta.get("needle_span")
    return PatternRows(
        list(ids) + answer[:-1],
        [n - 1 + k for k in range(len(answer))],
        "strip",
        (int(needle[0]), int(needle[1])) if needle else None,
        "needle",
    )
