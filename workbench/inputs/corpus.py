"""The shipped corpora, package data beside this module: English prose (public domain) and code.

``prose.jsonl.gz`` holds one JSON document a line (``id``, ``source``, ``text``) from the King
James Bible and The Devil's Dictionary, as packaged by Debian; ``data/prose/build.py`` rebuilds
it. The ``prose`` dataset cuts passages from it, needle-in-a-haystack prompts use it as filler,
and tiny test models train their word-level tokenizer on it. It ships inside the wheel, so a
normal (non-editable) install has it. ``code.jsonl.gz`` (the same layout; ``data/code/build.py``)
holds Python standard-library modules for the ``code`` dataset.
"""

from __future__ import annotations

import gzip
import json
import random
from functools import lru_cache
from pathlib import Path
from typing import Any

from workbench.errors import WorkbenchError

CORPUS = Path(__file__).with_name("prose.jsonl.gz")


@lru_cache(maxsize=None)
def load_documents(name: str = "prose") -> list[dict]:
    """Every document of the corpus ``name`` (``prose`` or ``code``), in file order."""
    path = CORPUS.with_name(f"{name}.jsonl.gz")
    if not path.is_file():
        raise WorkbenchError(
            f"the {name} corpus is missing ({path})",
            "reinstall the package: pip install --force-reinstall attention-head-workbench",
        )
    with gzip.open(path, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def corpus_ids(tokenizer: Any, n: int, rng: random.Random, name: str = "prose") -> list[int]:
    """``n`` token ids of the corpus ``name``: its documents joined (each ended by a newline, no
    special tokens) from one drawn at random with ``rng``, wrapping round at the end. The filler
    of needle-in-a-haystack prompts, DuoAttention's passkey books and the KV grid's loss text."""
    docs = load_documents(name)
    i = rng.randrange(len(docs))
    ids: list[int] = []
    while len(ids) < n:
        ids += tokenizer(docs[i % len(docs)]["text"] + "\n", add_special_tokens=False)["input_ids"]
        i += 1
    return ids[:n]
