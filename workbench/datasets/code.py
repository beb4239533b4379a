"""``code``: passages of real Python source code, the code domain of active-dormant heads.

The corpus ships with the package (``workbench/inputs/code.jsonl.gz``, rebuilt by
``data/code/build.py``): 28 pure-Python modules of CPython 3.11.7's standard library, one document
per module, text as is. The Python standard library is distributed under the Python Software
Foundation License Version 2 (Copyright (c) 2001 Python Software Foundation; All Rights Reserved);
every document records it. Nothing is downloaded at run time.

``make`` cuts each passage from a random module, starting at a random ``def`` / ``class`` line
(so a passage opens on a definition, as a code file's chunk often does) and taking
``min_lines``..``max_lines`` whole lines, common indentation removed (a passage opening on an indented method
followed by top-level code keeps its indentation; lengths vary on purpose, as for ``prose``: runs exercise
padded batches); reproducible by seed. Metadata: ``source`` (the module) and ``line`` (the first
line, counted from 1). Why: Guo et al. (arXiv 2410.13835) find heads that are attention sinks on
one input domain (e.g. Wikipedia) and active on another (GitHub code); prose, code and repeated
random tokens are the workbench's three domains (docs/metrics.md#dormant).
"""

from __future__ import annotations

import random
import re
import textwrap

from pydantic import Field, model_validator

from workbench.errors import WorkbenchError
from workbench.inputs import corpus
from workbench.inputs.prompts import Prompt
from workbench.protocol.params import Int

from .options import DatasetOptions

DESCRIPTION = "passages of Python source code (CPython 3.11 standard library, PSF licence)"
_DEF = re.compile(r"\s*(async\s+def|def|class)\s")


class Options(DatasetOptions):
    min_lines: Int = Field(10, ge=1, description="fewest source lines in a passage")
    max_lines: Int = Field(40, ge=1, description="most source lines in a passage")

    @model_validator(mode="after")
    def _ordered(self) -> "Options":
        if self.min_lines > self.max_lines:
            raise ValueError(f"need min_lines <= max_lines, got {self.min_lines} and {self.max_lines}")
        return self


def load_documents() -> list[dict]:
    """Every module of the shipped code corpus, in file order."""
    return corpus.load_documents("code")


def make(n_prompts: int | None = None, seed: int = 0, min_lines: int = 10, max_lines: int = 40) -> list[Prompt]:
    """``n_prompts`` passages (default 16) of ``min_lines``..``max_lines`` source lines, reproducible by seed."""
    n_prompts = 16 if n_prompts is None else n_prompts
    if not 1 <= min_lines <= max_lines:
        raise WorkbenchError(
            f"need 1 <= min_lines <= max_lines, got {min_lines}, {max_lines}", "fix the dataset options"
        )
    rng = random.Random(seed)
    documents = load_documents()
    docs = [d["text"].splitlines() for d in documents]
    names = [d["id"] for d in documents]
    prompts = []
    for i in range(n_prompts):
        k = rng.randrange(len(docs))
        lines = docs[k]
        target = rng.randint(min_lines, max_lines)
        starts = [j for j, line in enumerate(lines[: max(1, len(lines) - target)]) if _DEF.match(line)] or [0]
        start = rng.choice(starts)
        text = textwrap.dedent("\n".join(lines[start : start + target]))
        prompts.append(Prompt(id=f"code-{seed}-{i:04d}", text=text, meta={"source": names[k], "line": start + 1}))
    return prompts
