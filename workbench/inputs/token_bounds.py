"""A cheap lower bound on a text's token count, to refuse far-too-long prompts before tokenizing.

Tokenizing a 50 MB prompt line took 36 s and 5.7 GB only to fail the context-length check.
:func:`min_tokens` bounds the count from below in time proportional to the context, never by
tokenizing the text. Two bounds, each used only where its premise holds for the tokenizer:

- **bytes**: a *lossless* tokenizer (``decode(encode(t)) == t`` on a probe with whitespace runs,
  control characters, compatibility characters, rare Unicode and special-token text) spells
  every byte of the text with some token, and no token spells more than ``M`` bytes, ``M`` the
  longest vocabulary entry in UTF-8 (byte-level BPE and SentencePiece entries are never
  shorter than the bytes they stand for: ``Ġ``, ``▁`` and ``<0x41>`` each spell one byte). So
  ``n_tokens >= n_bytes / M``. A word-level vocabulary is not lossless (it drops whitespace and
  maps a whole unknown word to one ``[UNK]``), so this bound is not used for it.
- **pre-tokens**: where every pre-token becomes at least one token (word-level, WordPiece and
  Unigram models emit ``[UNK]`` rather than nothing; a lossless BPE has a token for every byte),
  the text is pre-tokenized in segments of about 8 characters per context token; all but two
  pre-tokens at each side of a cut (the cut may split one, and look-ahead rules may regroup
  whitespace) are pre-tokens of the whole text. Counting stops once the count exceeds what is
  asked, so for ordinary text the work is one segment, and memory stays bounded for any text.
  Text holding special-token text is not counted (one special token would be split into
  several pre-tokens).

Both are computed once per tokenizer object (cached) and only for texts longer than the context.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Any

# Lossy tokenizers fail on some of these: whitespace runs and tabs (dropped or collapsed),
# control characters (removed), compatibility characters (NFKC), combining marks (NFC), rare
# characters (unknown token), zero-width space, a long unknown word, special-token text.
_PROBES = (
    "Ab  c\t\td\n\n e\r\nf \x00\x01\x7f é e\u0301 ﬁ ① Ａ 😀 𠀋 \u200b xqzjvkwpfh [UNK] <unk> <|endoftext|>   z",
    "   leading spaces\n",
)
_SLACK = 2


@dataclass(frozen=True)
class _Bounds:
    lossless: bool  # decode(encode(t)) == t on the probes
    max_bytes: int  # no token spells more bytes than this
    per_pretoken: bool  # every pre-token becomes at least one token
    specials: tuple[str, ...]  # added-token texts (split out before pre-tokenizing)
    stripping: tuple[str, ...]  # added tokens that swallow neighbouring whitespace (unbounded bytes)


_cache: "weakref.WeakKeyDictionary[Any, _Bounds]" = weakref.WeakKeyDictionary()


def _round_trips(tokenizer: Any) -> bool:
    for probe in _PROBES:
        try:
            ids = tokenizer(probe, add_special_tokens=False)["input_ids"]
            text = tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)
        except Exception:  # noqa: BLE001 - a tokenizer that cannot even do this gets no bound
            return False
        if text != probe and text != " " + probe:  # a prefix space added by the tokenizer is allowed
            return False
    return True


def _bounds(tokenizer: Any) -> _Bounds:
    try:
        return _cache[tokenizer]
    except (KeyError, TypeError):
        pass
    added = list(getattr(tokenizer, "added_tokens_decoder", {}).values())
    specials = tuple(sorted({str(getattr(a, "content", a)) for a in added} - {""}))
    stripping = tuple(str(a.content) for a in added if getattr(a, "lstrip", False) or getattr(a, "rstrip", False))
    vocab = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    max_bytes = max(
        [len(str(t).encode("utf-8")) for t in vocab if t is not None] + [len(s.encode("utf-8")) for s in specials] + [1]
    )
    lossless = _round_trips(tokenizer)
    model = getattr(getattr(tokenizer, "backend_tokenizer", None), "model", None)
    kind = type(model).__name__
    per_pretoken = kind in ("WordLevel", "WordPiece", "Unigram") or (kind == "BPE" and lossless)
    out = _Bounds(lossless, max_bytes, per_pretoken, specials, stripping)
    try:
        _cache[tokenizer] = out
    except TypeError:
        pass
    return out


def _pretokens(tokenizer: Any, text: str) -> int | None:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return None
    if backend.normalizer is not None:
        text = backend.normalizer.normalize_str(text)
    if backend.pre_tokenizer is None:
        return 1 if text else 0
    return len(backend.pre_tokenizer.pre_tokenize_str(text))


def min_tokens(tokenizer: Any, text: str, enough: int) -> int:
    """A lower bound on ``len(tokenizer(text, add_special_tokens=False)["input_ids"])``.

    Cheap: the bound stops growing once it exceeds ``enough`` (pass the context length), and
    texts no longer than ``enough`` characters are not looked at (no bound can exceed it).
    Returns 0 when no bound applies to this tokenizer.
    """
    if len(text) <= enough:
        return 0
    b = _bounds(tokenizer)
    best = 0
    if b.lossless and not any(s in text for s in b.stripping):
        n_bytes = len(text)  # every character is at least one byte: O(1) first
        if -(-n_bytes // b.max_bytes) <= enough:
            n_bytes = len(text.encode("utf-8", "surrogatepass"))
        best = -(-n_bytes // b.max_bytes)
        if best > enough:
            return best
    if b.per_pretoken:
        best = max(best, _pretoken_bound(tokenizer, text, enough, b))
    return best


def _pretoken_bound(tokenizer: Any, text: str, enough: int, b: _Bounds) -> int:
    """Pre-tokens counted segment by segment (bounded memory), minus the slack at each cut,
    until the count exceeds ``enough``; 0 when special-token text shows up (it would be split)."""
    step = max(64, 8 * (enough + 2 * _SLACK + 1))
    reach = max((len(sp) for sp in b.specials), default=0)  # a special token straddling a cut is seen
    total = 0
    for start in range(0, len(text), step):
        if any(sp in text[start : start + step + reach] for sp in b.specials):
            return 0
        n = _pretokens(tokenizer, text[start : start + step])
        if n is None:
            return 0
        total += n if len(text) <= step else max(0, n - 2 * _SLACK)
        if total > enough:
            break
    return total
