"""Prompts: reading the JSONL format, validating, tokenizing.

A prompts file has one JSON object per line with an ``id`` and either ``text`` or ``tokens``
(a list of token ids used exactly as given, nothing prepended). ``text`` is tokenized with the
tokenizer's own defaults; ``prepend_bos=True`` adds BOS explicitly (once, never twice). Any
other fields are kept in ``Prompt.meta`` (datasets put spans and answers there).

Every problem is reported with the file, line and prompt id, before any model runs.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from workbench.errors import WorkbenchError


@dataclass
class Prompt:
    """One input item: text or exact token ids, plus free-form metadata."""

    id: str
    text: str | None = None
    tokens: list[int] | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"id": self.id}
        if self.text is not None:
            out["text"] = self.text
        if self.tokens is not None:
            out["tokens"] = list(self.tokens)
        out.update(self.meta)
        return out


@dataclass
class TokenizedPrompt:
    """A prompt as the model sees it."""

    id: str
    ids: list[int]
    meta: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.ids)


def pad_token_id(tokenizer: Any) -> int:
    """The id to pad batches with: the tokenizer's pad token, else EOS, else 0 (padded positions
    are always masked, so only its being a valid id matters)."""
    for tid in (getattr(tokenizer, "pad_token_id", None), getattr(tokenizer, "eos_token_id", None)):
        if tid is not None:
            return int(tid)
    return 0


def special_prefix(tokenizer: Any) -> list[int]:
    """The special tokens the tokenizer's own defaults put before any text: ``[BOS]`` for Gemma,
    nothing for SmolLM2 / GPT-2. Prompts built in token space (niah, task pairs) start with
    them, so they reach the model as a ``text`` prompt would (Gemma without BOS does not
    answer niah or IOI)."""
    plain = list(tokenizer("a", add_special_tokens=False)["input_ids"])
    full = list(tokenizer("a")["input_ids"])
    for i in range(len(full) - len(plain) + 1):
        if full[i : i + len(plain)] == plain:
            return full[:i]
    return []


def read_prompts(path: str | Path) -> list[Prompt]:
    """Parse a prompts JSONL file; raise :class:`WorkbenchError` naming the first bad line."""
    path = Path(path)
    if not path.is_file():
        raise WorkbenchError(f"prompts file {path} does not exist", "check the path given to --prompts")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise WorkbenchError(f"cannot read prompts file {path}: {exc}", "it must be UTF-8 JSON lines") from exc
    prompts: list[Prompt] = []
    seen: set[str] = set()
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise WorkbenchError(f"{where}: not valid JSON ({exc.msg})", "one JSON object per line") from None
        prompts.append(_prompt_from_obj(obj, where))
        if prompts[-1].id in seen:
            raise WorkbenchError(f"{where}: duplicate prompt id {prompts[-1].id!r}", "give every prompt its own id")
        seen.add(prompts[-1].id)
    if not prompts:
        raise WorkbenchError(f"prompts file {path} has no prompts", "add one JSON object per line")
    return prompts


def _prompt_from_obj(obj: Any, where: str) -> Prompt:
    if not isinstance(obj, dict):
        raise WorkbenchError(f"{where}: expected a JSON object, got {type(obj).__name__}", 'use {"id": ..., "text": ...}')
    if "id" not in obj:
        raise WorkbenchError(f"{where}: missing field 'id'", "every prompt needs an id")
    pid = str(obj["id"])
    has_text, has_tokens = "text" in obj, "tokens" in obj
    if has_text == has_tokens:
        raise WorkbenchError(
            f"{where}: prompt {pid!r} needs exactly one of 'text' or 'tokens'",
            "give text to tokenize, or a list of token ids to use as is",
        )
    meta = {k: v for k, v in obj.items() if k not in ("id", "text", "tokens")}
    if has_text:
        if not isinstance(obj["text"], str):
            raise WorkbenchError(f"{where}: 'text' of prompt {pid!r} must be a string", "quote the text")
        return Prompt(pid, text=obj["text"], meta=meta)
    toks = obj["tokens"]
    if not isinstance(toks, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in toks):
        raise WorkbenchError(f"{where}: 'tokens' of prompt {pid!r} must be a list of integers", "e.g. [1, 523, 88]")
    return Prompt(pid, tokens=toks, meta=meta)


def write_prompts(prompts: Iterable[Prompt], path: str | Path) -> Path:
    """Write prompts as JSONL (the format :func:`read_prompts` accepts)."""
    path = Path(path)
    with open(path, "w", encoding="utf-8") as f:
        for p in prompts:
            f.write(json.dumps(p.to_json(), ensure_ascii=False) + "\n")
    return path


def tokenize_prompts(
    prompts: list[Prompt],
    tokenizer: Any,
    n_ctx: int,
    vocab_size: int,
    prepend_bos: bool = False,
) -> list[TokenizedPrompt]:
    """Tokenize and validate: non-empty, within the context, ids inside the vocabulary."""
    if not prompts:
        raise WorkbenchError("no prompts to run", "give a non-empty --prompts file or --dataset")
    bos = getattr(tokenizer, "bos_token_id", None)
    if prepend_bos and bos is None:
        raise WorkbenchError("--prepend-bos was given but the tokenizer has no BOS token", "drop --prepend-bos")
    out: list[TokenizedPrompt] = []
    for p in prompts:
        if p.tokens is not None:
            ids = list(p.tokens)
        else:
            ids = list(tokenizer(p.text)["input_ids"])
        if prepend_bos and (not ids or ids[0] != bos):
            ids = [bos] + ids
        if not ids:
            raise WorkbenchError(f"prompt {p.id!r} is empty (0 tokens)", "remove it or give it some text")
        if len(ids) > n_ctx:
            raise WorkbenchError(
                f"prompt {p.id!r} has {len(ids)} tokens, longer than the model's context of {n_ctx}",
                "shorten or split the prompt, or use a model with a longer context",
            )
        bad = [t for t in ids if t < 0 or t >= vocab_size]
        if bad:
            raise WorkbenchError(
                f"prompt {p.id!r} has token id {bad[0]} outside the vocabulary [0, {vocab_size})",
                "use ids from this model's tokenizer",
            )
        out.append(TokenizedPrompt(p.id, ids, dict(p.meta)))
    return out
