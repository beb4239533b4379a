"""Next-token tasks for head gating: token ids with the target tokens at the end.

Gating needs no counterfactual prompt: a task is a list of :class:`GateExample` (prompt tokens
followed by target tokens); the loss reads the log-probability of the target tokens only. Tasks:

- ``ioi``: the IOI prompts of :func:`circuits.tasks.ioi` (clean), target = the indirect object
  (one token), so gating and path patching read the same prompts.
- ``niah``: needle-in-a-haystack prompts of :mod:`workbench.datasets.niah` (short contexts by
  default, ``context_len=256``), target = the answer span (the needle's number, its tokens).
- ``aba``: the reference package's copying pattern (``CHGDataset.from_pattern_task("aba")``):
  lines ``" a^ b^ a"``, then ``" a^ b^"`` whose target is ``" a"``, ``a, b`` two different
  words. Its pool is every alphabetic word of two or more letters that is one token with its
  leading space, sorted (the package's pool comes from ``list(set(...))`` and changes with
  Python's hash seed; ours is the same on every run).
- a JSONL file of ``{"text": ..., "target": ...}`` (optional ``"id"``), tokenized as given
  (mind the target's leading space).

Every prompt starts with the tokenizer's special prefix (BOS for Gemma), as text prompts do.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from workbench.errors import WorkbenchError
from workbench.inputs.prompts import json_kind, read_lines, special_prefix

TASKS = ("ioi", "niah", "aba")


@dataclass(frozen=True)
class GateExample:
    """One prompt with its target: ``ids`` = prompt tokens + target tokens; the last
    ``n_target`` tokens are predicted (each from the position before it)."""

    id: str
    ids: tuple[int, ...]
    n_target: int

    @property
    def prompt(self) -> tuple[int, ...]:
        return self.ids[: -self.n_target]

    @property
    def target(self) -> tuple[int, ...]:
        return self.ids[-self.n_target :]


def _encode(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def example(tokenizer: Any, eid: str, text: str, target: str, prefix: list[int] | None = None) -> GateExample:
    """``prefix + tokens(text) + tokens(target)``; an empty target is refused."""
    tgt = _encode(tokenizer, target)
    if not tgt:
        raise WorkbenchError(
            f"example {eid!r}: the target {target!r} is no tokens, so there is nothing to predict",
            "give every example a non-empty target",
        )
    ids = (special_prefix(tokenizer) if prefix is None else prefix) + _encode(tokenizer, text) + tgt
    return GateExample(eid, tuple(ids), len(tgt))


def ioi_task(tokenizer: Any, n: int = 64, seed: int = 0) -> list[GateExample]:
    """IOI (clean prompts), target = the indirect object's token."""
    from circuits.tasks import ioi

    return [GateExample(p.id, tuple(p.clean) + (p.correct,), 1) for p in ioi(tokenizer, n=n, seed=seed)]


def niah_task(
    tokenizer: Any, n: int = 64, seed: int = 0, context_len: int = 256, n_ctx: int | None = None
) -> list[GateExample]:
    """Needle-in-a-haystack at ``context_len`` tokens (depths 0, 0.25, ... 1, cycled), target =
    the answer span (``" " + answer``, as the needle holds it)."""
    from workbench.datasets.niah import make

    prompts = make(n_prompts=n, seed=seed, tokenizer=tokenizer, context_len=context_len, n_ctx=n_ctx)
    out = []
    for p in prompts:
        lo, hi = p.meta["answer_span"]
        answer = list(p.tokens[lo:hi])  # the needle's own answer tokens
        out.append(GateExample(p.id, tuple(p.tokens) + tuple(answer), len(answer)))
    return out


def word_pool(tokenizer: Any) -> list[str]:
    """Alphabetic words (two or more letters) that are one token with a leading space, sorted."""
    pool = set()
    for tok in tokenizer.get_vocab():
        word = tok.lstrip("\u2581").lstrip("\u0120")
        if len(word) >= 2 and word.isascii() and word.isalpha() and len(_encode(tokenizer, " " + word)) == 1:
            pool.add(word)
    return sorted(pool)


def aba_task(tokenizer: Any, n: int = 64, seed: int = 0, n_lines: int = 5, pool_size: int = 5000) -> list[GateExample]:
    """The package's "aba" copying pattern: ``n_lines - 1`` complete lines ``" a^ b^ a"`` and a last
    line ``" a^ b^"``, target ``" a"``; words from :func:`word_pool` (a seeded sample of
    ``pool_size``)."""
    if n_lines < 1:
        raise WorkbenchError(f"n_lines must be at least 1, got {n_lines}", "e.g. n_lines=5 (the package's default)")
    rng = random.Random(f"aba-{seed}")
    pool = word_pool(tokenizer)
    if len(pool) < 2:
        raise WorkbenchError("the tokenizer has fewer than two one-token words", "use another task")
    pool = sorted(rng.sample(pool, min(pool_size, len(pool))))
    prefix = special_prefix(tokenizer)
    out = []
    for i in range(n):
        lines = []
        for _ in range(n_lines - 1):
            a, b = rng.sample(pool, 2)
            lines.append(f" {a}^ {b}^ {a}")
        a, b = rng.sample(pool, 2)
        lines.append(f" {a}^ {b}^")
        out.append(example(tokenizer, f"aba-{seed}-{i:04d}", "\n".join(lines), f" {a}", prefix))
    return out


def read_task(path: str | Path, tokenizer: Any) -> list[GateExample]:
    """A JSONL file of ``{"text", "target"}`` objects (optional ``"id"``), one per line."""
    path = Path(path)
    prefix = special_prefix(tokenizer)
    out = []
    for lineno, line in enumerate(read_lines(path, "task"), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise WorkbenchError(
                f"{path}:{lineno}: not JSON ({exc.msg})", 'write one {"text", "target"} per line'
            ) from None
        if not isinstance(obj, dict):
            raise WorkbenchError(
                f"{path}:{lineno}: expected an object, got {json_kind(obj)}", 'e.g. {"text": "...", "target": " x"}'
            )
        for key in ("text", "target"):
            if not isinstance(obj.get(key), str):
                raise WorkbenchError(
                    f"{path}:{lineno}: {key!r} must be a string, got {json_kind(obj.get(key))}",
                    'write one {"text": "...", "target": " x"} per line',
                )
        out.append(example(tokenizer, str(obj.get("id", f"line{lineno}")), obj["text"], obj["target"], prefix))
    if not out:
        raise WorkbenchError(f"{path} holds no examples", 'write one {"text": "...", "target": " x"} per line')
    return out


def make_task(
    name: str, tokenizer: Any, n: int = 64, seed: int = 0, n_ctx: int | None = None, context_len: int = 256
) -> list[GateExample]:
    """The task ``name`` (``ioi``, ``niah``, ``aba``) or a JSONL file's examples, checked against
    the context ``n_ctx``."""
    if name == "ioi":
        task = ioi_task(tokenizer, n, seed)
    elif name == "niah":
        task = niah_task(tokenizer, n, seed, context_len, n_ctx)
    elif name == "aba":
        task = aba_task(tokenizer, n, seed)
    elif name.endswith(".jsonl") or Path(name).is_file():
        task = read_task(name, tokenizer)
    else:
        raise WorkbenchError(f"unknown gating task {name!r}", f"choose from: {', '.join(TASKS)}, or a .jsonl file")
    check_task(task, n_ctx)
    return task


def check_task(task: Sequence[GateExample], n_ctx: int | None) -> None:
    """Refuse an empty task, an example without target or prompt, or one longer than the context."""
    if not task:
        raise WorkbenchError("the task has no examples", "give n >= 1 or a JSONL file with examples")
    for ex in task:
        if ex.n_target < 1 or ex.n_target >= len(ex.ids):
            raise WorkbenchError(
                f"example {ex.id!r} needs a prompt and a non-empty target (got {len(ex.ids) - ex.n_target} prompt "
                f"and {ex.n_target} target tokens)",
                "give every example some text before its target",
            )
        if n_ctx is not None and len(ex.ids) - 1 > n_ctx:
            raise WorkbenchError(
                f"example {ex.id!r} is {len(ex.ids)} tokens with its target, longer than the model's context "
                f"of {n_ctx}",
                "shorten the text or the target (or use a shorter context_len)",
            )
