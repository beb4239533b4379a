"""Passages of the shipped English prose corpus (:mod:`workbench.inputs.corpus`; public domain).

``make`` cuts passages of whole sentences from random documents: lengths vary between
``min_words`` and ``max_words`` on purpose, so every run exercises padded batches. The corpus
is also the filler for needle-in-a-haystack prompts.
"""

from __future__ import annotations

import random
import re

from pydantic import Field, model_validator

from workbench.errors import WorkbenchError
from workbench.inputs.corpus import load_documents
from workbench.inputs.prompts import Prompt
from workbench.protocol.params import Int

from .options import DatasetOptions

DESCRIPTION = "passages of public-domain English prose (King James Bible, The Devil's Dictionary)"
_SENT = re.compile(r"(?<=[.!?;:])\s+")


class Options(DatasetOptions):
    min_words: Int = Field(40, ge=1)
    max_words: Int = Field(200, ge=1)

    @model_validator(mode="after")
    def _ordered(self) -> "Options":
        if self.min_words > self.max_words:
            raise ValueError(f"need min_words <= max_words, got {self.min_words} and {self.max_words}")
        return self


def make(n_prompts: int | None = None, seed: int = 0, min_words: int = 40, max_words: int = 200) -> list[Prompt]:
    """``n_prompts`` passages (default 16) of ``min_words``..``max_words`` words, reproducible by seed."""
    n_prompts = 16 if n_prompts is None else n_prompts
    if not 1 <= min_words <= max_words:
        raise WorkbenchError(
            f"need 1 <= min_words <= max_words, got {min_words}, {max_words}", "fix the dataset options"
        )
    rng = random.Random(seed)
    docs = [d for d in load_documents() if len(d["text"].split()) >= min_words]
    if not docs:
        longest = max(len(d["text"].split()) for d in load_documents())
        raise WorkbenchError(
            f"prose.min_words: no document has {min_words} words (the longest has {longest})",
            f"use min_words of at most {longest}",
        )
    prompts = []
    for i in range(n_prompts):
        doc = rng.choice(docs)
        sents = _SENT.split(doc["text"])
        target = rng.randint(min_words, max_words)
        start = rng.randrange(len(sents))
        words: list[str] = []
        j = start
        while j < len(sents) and len(words) < target:
            words.extend(sents[j].split())
            j += 1
        if len(words) < min_words:  # ran off the end: take the document's tail instead
            words = doc["text"].split()[-target:]
        text = " ".join(words[:max_words])
        prompts.append(Prompt(id=f"prose-{seed}-{i:04d}", text=text, meta={"source": doc["id"]}))
    return prompts
