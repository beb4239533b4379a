"""Attention patterns, one chunk of query positions at a time.

A probe never sees a whole ``[batch, head, query, key]`` pattern. For each layer, the extraction
engine walks the query positions in chunks sized to a memory budget (``chunk_elements``
scores at a time), and for each chunk computes the scores from the layer's own queries and keys
exactly as the model did (:mod:`workbench.masking`: scaling, soft-capping, causal / padding /
sliding-window mask, grouped KV heads), softmax-normalises them in float32 and hands a :class:`PatternChunk` to every probe.
Keys beyond the chunk's last visible key are never computed, which halves the work under a
causal mask. Peak extra memory is ``O(chunk_elements)``, linear in sequence length.

Quantities are computed lazily and shared between probes: ``probs`` (the pattern rows),
``row_entropy`` (from the log-partition function, no extra log pass) and ``key_probs`` (the
weight on one key per prompt, e.g. the first token).
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Iterator

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from workbench.attention import AttentionCall
from workbench.masking import NEG, attention_scores

@dataclass
class BatchInfo:
    """A padded batch and where its real tokens are."""

    prompt_ids: list[str]
    input_ids: Int[Tensor, "batch pos"]
    attention_mask: Int[Tensor, "batch pos"]
    positions: Int[Tensor, "batch pos"]  # position within the prompt, -1 on padding
    lengths: Int[Tensor, " batch"]
    first_index: Int[Tensor, " batch"]  # index of each prompt's first real token
    metas: list[dict] | None = None

    @property
    def size(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def valid(self) -> Bool[Tensor, "batch pos"]:
        return self.positions >= 0


def collate(
    ids: list[list[int]],
    pad_id: int,
    device: torch.device | str = "cpu",
    padding_side: str = "right",
    prompt_ids: list[str] | None = None,
    metas: list[dict] | None = None,
) -> BatchInfo:
    """Pad token lists into a batch with attention mask and per-prompt position ids.

    Right padding keeps every real token at the index it has alone, so causal attention over
    real tokens is untouched by padding; left padding (for generation) is supported through the
    explicit ``positions``.
    """
    lengths = torch.tensor([len(x) for x in ids], dtype=torch.long)
    width = int(lengths.max())
    input_ids = torch.full((len(ids), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(ids), width), dtype=torch.long)
    for i, row in enumerate(ids):
        sl = slice(0, len(row)) if padding_side == "right" else slice(width - len(row), width)
        input_ids[i, sl] = torch.tensor(row, dtype=torch.long)
        mask[i, sl] = 1
    positions = torch.where(mask.bool(), mask.cumsum(-1) - 1, torch.full_like(mask, -1))
    first = (width - lengths) if padding_side == "left" else torch.zeros_like(lengths)
    return BatchInfo(
        prompt_ids=list(prompt_ids or [str(i) for i in range(len(ids))]),
        input_ids=input_ids.to(device),
        attention_mask=mask.to(device),
        positions=positions.to(device),
        lengths=lengths.to(device),
        first_index=first.to(device),
        metas=metas,
    )


class PatternChunk:
    """Attention weights of one layer for query positions ``[q_start, q_end)`` of a batch.

    Rows of padding queries are present but marked invalid (``query_valid``); probes must mask
    with it. Keys run over ``[0, n_keys)``.
    """

    def __init__(
        self,
        layer: int,
        q_start: int,
        q_end: int,
        batch: BatchInfo,
        shifted_scores: Float[Tensor, "batch head chunk key"],
        n_visible: Int[Tensor, "batch chunk"],
        query_offset: int = 0,
    ) -> None:
        self.layer = layer
        self.q_start = q_start
        self.q_end = q_end
        self.batch = batch
        self._u = shifted_scores  # scores minus the row max; masked entries ~ NEG
        self.n_visible = n_visible
        self._qo = query_offset
        pos = batch.positions[:, query_offset + q_start : query_offset + q_end]
        self.query_pos: Int[Tensor, "batch chunk"] = pos
        self.query_valid: Bool[Tensor, "batch chunk"] = (pos >= 0) & (n_visible > 0)

    @property
    def n_keys(self) -> int:
        return self._u.shape[-1]

    @cached_property
    def _exp(self) -> Float[Tensor, "batch head chunk key"]:
        return torch.exp(self._u)

    @cached_property
    def _z(self) -> Float[Tensor, "batch head chunk"]:
        return self._exp.sum(-1)

    @cached_property
    def probs(self) -> Float[Tensor, "batch head chunk key"]:
        """The pattern rows A[q, k]; all-zero rows for queries that see no key."""
        p = self._exp / self._z.unsqueeze(-1)
        return p * (self.n_visible > 0)[:, None, :, None]

    @cached_property
    def row_entropy(self) -> Float[Tensor, "batch head chunk"]:
        """H_q = -sum_k A[q,k] ln A[q,k] = ln Z - sum_k e_k u_k / Z  (nats)."""
        e, u, z = self._exp, self._u, self._z
        dot = (e.unsqueeze(-2) @ u.unsqueeze(-1)).squeeze(-1).squeeze(-1)
        return (torch.log(z) - dot / z).clamp_min(0.0)

    def key_probs(self, key_index: Int[Tensor, " batch"]) -> Float[Tensor, "batch head chunk"]:
        """A[q, key_index[b]] for every head and query of the chunk."""
        b, h, c, _ = self._u.shape
        idx = key_index.clamp(max=self.n_keys - 1).view(b, 1, 1, 1).expand(b, h, c, 1)
        return self._exp.gather(-1, idx).squeeze(-1) / self._z

    def probs_at(self, key_index: Int[Tensor, "batch chunk"]) -> Float[Tensor, "batch head chunk"]:
        """A[q, key_index[b, q]] per query (0 where the index is negative or not visible)."""
        b, h, c, _ = self._u.shape
        ok = (key_index >= 0) & (key_index < self.n_keys)
        idx = key_index.clamp(0, self.n_keys - 1).view(b, 1, c, 1).expand(b, h, c, 1)
        return self._exp.gather(-1, idx).squeeze(-1) / self._z * ok.unsqueeze(1)

    def mass_on(self, keys: Bool[Tensor, "batch chunk key"]) -> Float[Tensor, "batch head chunk"]:
        """sum_k A[q, k] over the keys selected per query (any of the chunk's keys)."""
        sel = keys[..., : self.n_keys].to(self._exp.dtype).unsqueeze(1)
        return (self._exp * sel).sum(-1) / self._z

    @property
    def key_positions(self) -> Int[Tensor, "batch key"]:
        """In-prompt position of each key of the chunk (-1 on padding)."""
        return self.batch.positions[:, : self.n_keys]

    @property
    def key_tokens(self) -> Int[Tensor, "batch key"]:
        return self.batch.input_ids[:, : self.n_keys]

    @property
    def query_tokens(self) -> Int[Tensor, "batch chunk"]:
        return self.batch.input_ids[:, self._qo + self.q_start : self._qo + self.q_end]


def iter_pattern_chunks(
    call: AttentionCall, batch: BatchInfo, chunk_elements: int = 1 << 22
) -> Iterator[PatternChunk]:
    """Yield the layer's attention pattern in chunks of query rows (float32, exact masking,
    :func:`workbench.masking.attention_scores`)."""
    b, h, n_q, _ = call.query.shape
    n_keys = call.key.shape[2]
    rows = max(1, chunk_elements // max(1, b * h * n_keys))
    # Queries index into batch.positions: with a KV cache the queries are the last n_q tokens.
    query_offset = batch.positions.shape[1] - n_q
    for q0 in range(0, n_q, rows):
        q1 = min(n_q, q0 + rows)
        s, vis = attention_scores(call, q0, q1, fill=NEG)
        n_visible = vis.n_visible(b, s.device)
        s.sub_(s.amax(-1, keepdim=True))
        yield PatternChunk(call.layer, q0, q1, batch, s, n_visible, query_offset=query_offset)
