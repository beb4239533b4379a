"""kvpress' budgets in the workbench's terms, and the items file both sides read (pure Python).

kvpress (NVIDIA/kvpress 0.5.5) gives every press a ``compression_ratio`` and keeps, per layer and
KV head, ``n_kept = max(1, int(k_len * (1 - compression_ratio)))`` of the ``k_len`` context keys
(``kvpress/utils.py``, ``compute_n_kept``; float arithmetic as written: ``k_len=2000, ratio=0.9``
keeps 199, not 200). What each press keeps, and the workbench policy that keeps the same keys:

* ``StreamingLLMPress(compression_ratio, n_sink=4)`` (``streaming_llm_press.py``): the first
  ``n_sink`` keys and the last ``n_kept - n_sink`` -> ``Window(sink=n_sink, recent=n_kept - n_sink)``.
* ``SnapKVPress(compression_ratio, window_size=64, kernel_size=5)`` (``snapkv_press.py``): the last
  ``window_size`` keys always (inside ``n_kept``), plus the ``n_kept - window_size`` earlier keys with
  the highest group-mean, average-pooled window attention ->
  ``Budget(capacity=n_kept - window_size, window=window_size, kernel=kernel_size, pooling="avg")``.
* ``DuoAttentionPress(head_compression_ratio)`` (``duo_attention_press.py``): the
  ``round(L * Hkv * head_compression_ratio)`` KV heads with the lowest scores (over all layers at
  once) become streaming heads keeping ``sink_size`` first and ``recent_size`` last keys ->
  ``Window(sink=sink_size, recent=recent_size)`` on those heads, ``Full`` on the others.

Outside these formulas kvpress' choice is arbitrary (``topk`` among equal scores), so the mapping
refuses it: ``n_kept < n_sink`` (StreamingLLM) or ``n_kept < window_size`` (SnapKV).

This module imports nothing outside the standard library, so the tests run it without the
kvpress venv; ``benchmarks/bench_kv.py`` uses it on the workbench side.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

ITEMS_VERSION = 1


def n_kept(k_len: int, compression_ratio: float) -> int:
    """kvpress' ``compute_n_kept``: keys kept per KV head of ``k_len`` at ``compression_ratio``."""
    if compression_ratio >= 1.0:
        return 0
    return max(1, int(k_len * (1 - compression_ratio)))


def streaming_window(k_len: int, compression_ratio: float, n_sink: int = 4) -> dict[str, int]:
    """``Window`` arguments equal to ``StreamingLLMPress(compression_ratio, n_sink)`` on ``k_len`` keys."""
    if not 0 <= compression_ratio < 1:
        raise ValueError(f"StreamingLLMPress needs 0 <= compression_ratio < 1, got {compression_ratio}")
    if k_len <= n_sink:
        raise ValueError(f"StreamingLLMPress needs more than n_sink={n_sink} keys, got {k_len}")
    kept = n_kept(k_len, compression_ratio)
    if kept < n_sink:
        raise ValueError(f"{kept} kept keys < n_sink={n_sink}: kvpress keeps an arbitrary subset of the sinks")
    return {"sink": n_sink, "recent": kept - n_sink}


def snapkv_budget(
    k_len: int, compression_ratio: float, window_size: int = 64, kernel_size: int = 5
) -> dict[str, Any]:
    """``Budget`` arguments equal to ``SnapKVPress(compression_ratio, window_size, kernel_size)``."""
    if not 0 <= compression_ratio < 1:
        raise ValueError(f"SnapKVPress needs 0 <= compression_ratio < 1, got {compression_ratio}")
    if k_len <= window_size:
        raise ValueError(f"SnapKVPress needs more than window_size={window_size} keys, got {k_len}")
    kept = n_kept(k_len, compression_ratio)
    if kept < window_size:
        raise ValueError(
            f"{kept} kept keys < window_size={window_size}: kvpress keeps an arbitrary subset of the window"
        )
    return {"capacity": kept - window_size, "window": window_size, "kernel": kernel_size, "pooling": "avg"}


def duo_streaming_heads(scores: list[list[float]], head_compression_ratio: float) -> list[tuple[int, int]]:
    """The (layer, KV head) pairs ``DuoAttentionPress`` makes streaming: the lowest
    ``round(numel * head_compression_ratio)`` scores over all layers (Python's ``round``: half to even).
    Scores must be distinct: kvpress sorts with numpy's default (unstable) ``argsort``."""
    flat = [(float(s), layer, kv) for layer, row in enumerate(scores) for kv, s in enumerate(row)]
    if len({s for s, _, _ in flat}) != len(flat):
        raise ValueError("DuoAttention head scores must be distinct (kvpress breaks ties arbitrarily)")
    n = round(len(flat) * head_compression_ratio)
    return sorted((layer, kv) for _, layer, kv in sorted(flat)[:n])


def duo_reported_ratio(n_streaming: int, n_heads: int, sink: int, recent: int, k_len: int) -> float:
    """``DuoAttentionPress.compression_ratio_``: the fraction of streaming KV heads times the fraction of
    a streaming head's keys that are masked (``1 - (sink + recent) / k_len``; not clipped at 0)."""
    return n_streaming / n_heads * (1 - (sink + recent) / k_len)


@dataclass
class NiahItem:
    """One needle prompt cut at the question: ``context + question`` is the whole prompt; the
    expected continuation is ``answer_ids`` (whose text contains ``answer``)."""

    id: str
    context: list[int]
    question: list[int]
    answer_ids: list[int]
    answer: str
    length: int = 0
    depth: float = 0.0


@dataclass
class LossItem:
    """A prose segment: the cache is compressed after ``tokens[:-tail]``; the NLL of the last ``tail``."""

    id: str
    tokens: list[int]
    tail: int


@dataclass
class Items:
    """Everything the kvpress loop reads: items, presses with their ratios, protocols."""

    niah: list[NiahItem] = field(default_factory=list)
    loss: list[LossItem] = field(default_factory=list)
    presses: list[dict[str, Any]] = field(default_factory=list)
    protocols: list[str] = field(default_factory=lambda: ["question-agnostic"])
    max_new_tokens: int = 8
    score_answers: bool = False  # also the answer's teacher-forced NLL on niah rows (extra work)
    version: int = ITEMS_VERSION


def _check(items: Items) -> None:
    for it in items.niah:
        if not (it.context and it.question and it.answer_ids):
            raise ValueError(f"niah item {it.id}: context, question and answer ids must be non-empty")
    for it in items.loss:
        if not 1 <= it.tail < len(it.tokens):
            raise ValueError(f"loss item {it.id}: tail {it.tail} must be in [1, {len(it.tokens) - 1}]")
    for p in items.presses:
        if p.get("name") not in ("streaming_llm", "snapkv", "duo_attention"):
            raise ValueError(f"unknown press {p.get('name')!r}")
    for proto in items.protocols:
        if proto not in ("question-agnostic", "question-aware"):
            raise ValueError(f"unknown protocol {proto!r}")


def write_items(items: Items, path: str | Path) -> Path:
    _check(items)
    path = Path(path)
    path.write_text(json.dumps(asdict(items)))
    return path


def read_items(path: str | Path) -> Items:
    raw = json.loads(Path(path).read_text())
    if raw.get("version") != ITEMS_VERSION:
        raise ValueError(f"items file version {raw.get('version')} != {ITEMS_VERSION}")
    items = Items(
        niah=[NiahItem(**x) for x in raw["niah"]],
        loss=[LossItem(**x) for x in raw["loss"]],
        presses=raw["presses"],
        protocols=raw["protocols"],
        max_new_tokens=raw["max_new_tokens"],
        score_answers=raw.get("score_answers", False),
        version=raw["version"],
    )
    _check(items)
    return items


def answer_correct(text: str, answer: str) -> bool:
    """niah accuracy: the expected answer appears verbatim in the decoded continuation."""
    return answer in text
