"""The shipped English prose corpus: public-domain documents, package data beside this module.

``prose.jsonl.gz`` holds one JSON document a line (``id``, ``source``, ``text``) from the King
James Bible and The Devil's Dictionary, as packaged by Debian; ``data/prose/build.py`` rebuilds
it. The ``prose`` dataset cuts passages from it, needle-in-a-haystack prompts use it as filler,
and tiny test models train their word-level tokenizer on it. It ships inside the wheel, so a
normal (non-editable) install has it.
"""

from __future__ import annotations

import gzip
import json
from functools import lru_cache
from pathlib import Path

from workbench.errors import WorkbenchError

CORPUS = Path(__file__).with_name("prose.jsonl.gz")


@lru_cache(maxsize=1)
def load_documents() -> list[dict]:
    """Every document of the corpus, in file order."""
    if not CORPUS.is_file():
        raise WorkbenchError(
            f"the prose corpus is missing ({CORPUS})",
            "reinstall the package: pip install --force-reinstall attention-head-workbench",
        )
    with gzip.open(CORPUS, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f]
