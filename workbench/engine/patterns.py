"""Attention patterns, one chunk of query positions at a time.

A probe never sees a whole ``[batch, head, query, key]`` pattern. For each layer, the extraction
engine walks the query positions in chunks sized to a memory budget (``chunk_elements``
scores at a time), and for each chunk computes the scores from the layer's own queries and keys
exactly as the model did (:mod:`workbench.engine.masking`: scaling, soft-capping, causal / padding /
sliding-window mask, grouped KV heads), softmax-normalises them in float32 and hands a
:class:`PatternChunk` to every probe.
Keys beyond the chunk's last visible key are never computed, which halves the work under a
causal mask. Peak extra memory is ``O(chunk_elements)``, linear in sequence length.

Quantities are computed lazily and shared between probes: ``probs`` (the pattern rows),
``row_entropy`` (from the log-partition function, no extra log pass) and ``key_probs`` (the
weight on one key per prompt, e.g. the first token).

A chunk is one of two *views* of a layer's attention a pattern probe may be handed
(:class:`PatternView`); the other, :class:`workbench.engine.statistics.LayerStatistics`, covers every
query of the layer at once without its rows, and answers only what names its keys
(``key_probs``, ``probs_at``, ``mass_in``) or needs the row's entropy. A probe that reads only
those runs unchanged on either view (``needs`` in ``probes/base.py``).
"""

from __future__ import annotations

from functools import cached_property
from typing import Iterator

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from workbench.engine.call import AttentionCall
from workbench.engine.masking import NEG, attention_scores
from workbench.protocol.views import BatchInfo


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


def same_token_ranges(
    batch: BatchInfo,
) -> tuple[Int[Tensor, "batch pos"], Int[Tensor, "batch pos"], Int[Tensor, "batch pos"]]:
    """Earlier occurrences of each query's token as a key range in a per-row order: ``(rank,
    lo, hi)`` such that the real keys of row b holding the token of query column q at an earlier
    position are exactly the columns k with ``lo[b, q] <= rank[b, k] < hi[b, q]``.

    ``rank`` sorts each row's real positions by (token id, position), padding last, so a token's
    occurrences are consecutive and the earlier ones of an occurrence lie just before it
    (``hi`` is the query's own rank, ``lo`` its token's first); padding queries get empty ranges.
    With it, echo-like sums over scattered keys become one banded product
    (:meth:`workbench.engine.statistics.LayerStatistics.mass_in`).
    """
    ids, valid = batch.input_ids, batch.valid
    b, width = ids.shape
    col = torch.arange(width, device=ids.device).expand(b, -1)
    key = torch.where(valid, ids, int(ids.max()) + 1) * width + col  # (token, position); padding last
    order = key.argsort(dim=1)
    rank = torch.empty_like(order).scatter_(1, order, col)
    tok = key.gather(1, order) // width
    new = torch.ones_like(valid)
    new[:, 1:] = tok[:, 1:] != tok[:, :-1]
    first = torch.cummax(torch.where(new, col, 0), dim=1).values  # rank of each group's first item
    lo = first.gather(1, rank)
    return rank, torch.where(valid, lo, 0), torch.where(valid, rank, 0)


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
        """A[q, key_index[b]] for every head and query of the chunk (0 past the chunk's last
        visible key)."""
        return self.probs_at(key_index.view(-1, 1).expand(-1, self._u.shape[2]))

    def probs_at(self, key_index: Int[Tensor, "batch chunk *n"]) -> Float[Tensor, "batch head chunk *n"]:
        """A[q, key_index[b, q]] per query, or per named key when ``key_index`` has a trailing
        axis of n keys (0 where an index is negative or not visible)."""
        b, h, c, _ = self._u.shape
        one = key_index.dim() == 2
        key_index = key_index.unsqueeze(-1) if one else key_index
        ok = (key_index >= 0) & (key_index < self.n_keys)
        idx = key_index.clamp(0, self.n_keys - 1).unsqueeze(1).expand(b, h, c, key_index.shape[-1])
        p = self._exp.gather(-1, idx) / self._z.unsqueeze(-1) * ok.unsqueeze(1)
        return p.squeeze(-1) if one else p

    def mass_on(self, keys: Bool[Tensor, "batch chunk key"]) -> Float[Tensor, "batch head chunk"]:
        """sum_k A[q, k] over the keys selected per query (any of the chunk's keys)."""
        sel = keys[..., : self.n_keys].to(self._exp.dtype).unsqueeze(1)
        return (self._exp * sel).sum(-1) / self._z

    def mass_in(
        self,
        lo: Int[Tensor, "batch chunk"],
        hi: Int[Tensor, "batch chunk"],
        rank: Int[Tensor, "batch pos"] | None = None,
    ) -> Float[Tensor, "batch head chunk"]:
        """sum_k A[q, k] over the keys k with ``lo[b, q] <= rank[b, k] < hi[b, q]``: a key range
        per query, in column order by default or in the per-row order ``rank`` gives."""
        r = torch.arange(self.n_keys, device=lo.device) if rank is None else rank[:, None, : self.n_keys]
        return self.mass_on((r >= lo.unsqueeze(-1)) & (r < hi.unsqueeze(-1)))

    @property
    def queries(self) -> slice:
        """The batch columns of the chunk's queries."""
        return slice(self._qo + self.q_start, self._qo + self.q_end)

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


def iter_pattern_chunks(call: AttentionCall, batch: BatchInfo, chunk_elements: int = 1 << 22) -> Iterator[PatternChunk]:
    """Yield the layer's attention pattern in chunks of query rows (float32, exact masking,
    :func:`workbench.engine.masking.attention_scores`)."""
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
