"""What a pattern probe is handed: the batch (:class:`BatchInfo`) and a view of one layer's
attention (:class:`PatternView`).

A probe never sees a whole ``[batch, head, query, key]`` pattern. The engine hands it, per layer,
one of two views that both answer :class:`PatternView`: a chunk of query rows
(:class:`workbench.engine.patterns.PatternChunk`, with the rows themselves) or the layer's
statistics for every query at once (:class:`workbench.engine.statistics.LayerStatistics`, no
rows: only what names its keys or needs the row's entropy). This module declares the shapes; the
engine implements them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from jaxtyping import Bool, Float, Int
from torch import Tensor


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


class PatternView(Protocol):
    """What both views of a layer's attention answer, for the queries they cover (batch columns
    ``queries``; ``query_pos`` / ``query_valid`` / ``n_visible`` per row): a probe that reads only
    this runs on chunks and on :class:`workbench.engine.statistics.LayerStatistics` alike."""

    layer: int
    batch: BatchInfo
    query_pos: Int[Tensor, "batch chunk"]
    query_valid: Bool[Tensor, "batch chunk"]
    n_visible: Int[Tensor, "batch chunk"]

    @property
    def queries(self) -> slice: ...

    @property
    def row_entropy(self) -> Float[Tensor, "batch head chunk"]: ...

    def key_probs(self, key_index: Int[Tensor, " batch"]) -> Float[Tensor, "batch head chunk"]: ...

    def probs_at(self, key_index: Tensor) -> Tensor: ...

    def mass_in(
        self,
        lo: Int[Tensor, "batch chunk"],
        hi: Int[Tensor, "batch chunk"],
        rank: Int[Tensor, "batch pos"] | None = None,
    ) -> Float[Tensor, "batch head chunk"]: ...
