"""Prompts: reading the JSONL format, validating, tokenizing.

A prompts file has one JSON object per line with an ``id`` and either ``text`` or ``tokens``
(a list of token ids used exactly as given, nothing prepended, even with ``prepend_bos``: their
metadata, such as niah's answer span, indexes those exact tokens). ``text`` is tokenized with the
tokenizer's own defaults; ``prepend_bos=True`` adds BOS to text explicitly (once, never twice). Any
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


def read_lines(path: Path, what: str) -> list[str]:
    """The lines of a UTF-8 text file (a byte-order mark is allowed); not UTF-8 fails naming
    the first bad line."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise WorkbenchError(
            f"cannot read {what} file {path}: {exc.strerror or exc}", "check the path and its permissions"
        ) from None
    try:
        return raw.decode("utf-8-sig").splitlines()
    except UnicodeDecodeError as exc:
        lineno = raw.count(b"\n", 0, exc.start) + 1
        raise WorkbenchError(
            f"{path}:{lineno}: not UTF-8 text (byte {raw[exc.start]:#04x})", f"save the {what} file as UTF-8 JSON lines"
        ) from None


def json_kind(value: Any) -> str:
    """How a JSON value is called in messages: "a list", "null", ..."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    return {str: "a string", list: "a list", dict: "an object"}.get(type(value), type(value).__name__)


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
    lines = read_lines(path, "prompts")
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
        raise WorkbenchError(
            f"{where}: expected a JSON object, got {type(obj).__name__}", 'use {"id": ..., "text": ...}'
        )
    if "id" not in obj:
        raise WorkbenchError(f"{where}: missing field 'id'", "every prompt needs an id")
    if isinstance(obj["id"], bool) or not isinstance(obj["id"], (str, int)):
        raise WorkbenchError(
            f"{where}: 'id' must be a string or an integer, got {json_kind(obj['id'])}", 'e.g. "id": "p1"'
        )
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
    """Write prompts as JSONL (the format :func:`read_prompts` accepts), atomically."""
    from workbench.files.atomic import atomic_write

    def write(f) -> None:
        for p in prompts:
            f.write((json.dumps(p.to_json(), ensure_ascii=False) + "\n").encode("utf-8"))

    return atomic_write(path, write)


CHEAP_CHECK_CHARS = 200_000  # texts longer than this (and 8 x the context) get a lower bound first


def tokenize_prompts(
    prompts: list[Prompt],
    tokenizer: Any,
    n_ctx: int,
    vocab_size: int,
    prepend_bos: bool = False,
) -> list[TokenizedPrompt]:
    """Tokenize and validate: non-empty, within the context, ids inside the vocabulary.

    Far-too-long prompts are refused before they are tokenized or copied: a token list by its
    length, a text by a cheap lower bound on its token count (:func:`workbench.inputs.token_bounds.min_tokens`),
    with the same context-length error a normal too-long prompt gets.
    """
    if not prompts:
        raise WorkbenchError("no prompts to run", "give a non-empty --prompts file or --dataset")
    bos = getattr(tokenizer, "bos_token_id", None) if tokenizer is not None else None
    if prepend_bos and bos is None:
        raise WorkbenchError("--prepend-bos was given but the tokenizer has no BOS token", "drop --prepend-bos")
    out: list[TokenizedPrompt] = []
    for p in prompts:
        ids = _prompt_ids(p, tokenizer, n_ctx)
        if prepend_bos and p.tokens is None and (not ids or ids[0] != bos):  # token ids are used exactly as given
            ids = [bos] + ids
        if not ids:
            raise WorkbenchError(f"prompt {p.id!r} is empty (0 tokens)", "remove it or give it some text")
        if len(ids) > n_ctx:
            raise _too_long(p.id, len(ids), n_ctx)
        bad = [t for t in ids if t < 0 or t >= vocab_size]
        if bad:
            raise WorkbenchError(
                f"prompt {p.id!r} has token id {bad[0]} outside the vocabulary [0, {vocab_size})",
                "use ids from this model's tokenizer",
            )
        out.append(TokenizedPrompt(p.id, ids, dict(p.meta)))
    return out


def _prompt_ids(p: Prompt, tokenizer: Any, n_ctx: int) -> list[int]:
    """A prompt's token ids as given or as the tokenizer makes them, refusing a far-too-long one
    before it is copied or tokenized (its length, or a cheap lower bound on a long text's count)."""
    from workbench.inputs.token_bounds import min_tokens

    if p.tokens is not None:
        if len(p.tokens) > n_ctx:
            raise _too_long(p.id, len(p.tokens), n_ctx)
        return list(p.tokens)
    # only for texts costly to tokenize; shorter ones get the exact count
    at_least = min_tokens(tokenizer, p.text, n_ctx) if len(p.text) > max(CHEAP_CHECK_CHARS, 8 * n_ctx) else 0
    if at_least > n_ctx:
        raise _too_long(p.id, at_least, n_ctx, lower_bound=True)
    return list(tokenizer(p.text)["input_ids"])


def _too_long(pid: str, n_tokens: int, n_ctx: int, lower_bound: bool = False) -> WorkbenchError:
    """The context-length error, for an exact count or a lower bound on it."""
    return WorkbenchError(
        f"prompt {pid!r} has {'at least ' if lower_bound else ''}{n_tokens} tokens, "
        f"longer than the model's context of {n_ctx}",
        "shorten or split the prompt, or use a model with a longer context",
    )
