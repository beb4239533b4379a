"""The shipped English prose corpus (public domain; see data/README.md).

``make`` cuts passages of whole sentences from random documents: lengths vary between
``min_words`` and ``max_words`` on purpose, so every run exercises padded batches. The corpus
is also the filler for needle-in-a-haystack prompts.
"""
from __future__ import annotations

import gzip
import json
import os
import random
import re
from functools import lru_cache
from pathlib import Path

from workbench.errors import WorkbenchError
from workbench.prompts import Prompt

DESCRIPTION = "passages of public-domain English prose (King James Bible, The Devil's Dictionary)"
_SENT = re.compile(r"(?<=[.!?;:])\s+")


def data_dir() -> Path:
    """The repository's ``data/`` folder, or ``$WORKBENCH_DATA``."""
    env = os.environ.get("WORKBENCH_DATA")
    return Path(env) if env else Path(__file__).resolve().parents[2] / "data"


@lru_cache(maxsize=1)
def load_documents() -> list[dict]:
    path = data_dir() / "prose" / "prose.jsonl.gz"
    if not path.is_file():
        raise WorkbenchError(f"the prose corpus is missing ({path})", "install from a full checkout (pip install -e .) or set WORKBENCH_DATA")
    with gzip.open(path, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def make(n_prompts: int | None = None, seed: int = 0, min_words: int = 40, max_words: int = 200) -> list[Prompt]:
    """``n_prompts`` passages (default 16) of ``min_words``..``max_words`` words, reproducible by seed."""
    n_prompts = 16 if n_prompts is None else n_prompts
    if not 1 <= min_words <= max_words:
        raise WorkbenchError(f"need 1 <= min_words <= max_words, got {min_words}, {max_words}", "fix the dataset options")
    rng = random.Random(seed)
    docs = [d for d in load_documents() if len(d["text"].split()) >= min_words]
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
