"""How a run is asked to go, shared by every probe and engine in it.

A :class:`RunContext` carries what is not the model, the inputs or the probes: the batch size
(a whole number, or ``"auto"``: a padded-token budget, see :mod:`workbench.inputs.batching`),
interventions active in every forward (head ablation, scaling), progress display, the chunk
budget of the pattern engine and its attention path (``"auto"``: each pattern probe gets the
cheapest view that answers what it reads; ``"chunks"``: every probe reads full pattern chunks,
the exact reference path), and the folder that relative file paths in items start from.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Sequence

import torch

from workbench.inputs.batching import BatchSize, batch_token_budget, plan_batches
from workbench.protocol.ordering import ordered


@dataclass
class RunContext:
    batch_size: BatchSize = "auto"
    max_batch_tokens: int | None = None  # the "auto" budget; default per device
    chunk_elements: int | None = None  # pattern engine: scores per chunk; default per device
    attention_path: Literal["auto", "chunks"] = "auto"  # pattern engine: statistics where they suffice, or chunks
    interventions: Sequence[Any] = field(default_factory=tuple)  # observers active in every forward
    progress: bool | None = None  # None: a bar when stderr is a terminal
    root: Path | None = None  # where relative paths in items (images) start
    # where a probe's own edits and ``interventions`` edit the same point of the same heads: None
    # (refused, the order would be arbitrary), "given,probe" or "probe,given" (--order)
    order: Literal["given,probe", "probe,given"] | None = None

    def with_edits(self, *own: Any) -> list[Any]:
        """The observers of a forward in which an intervening probe applies its ``own`` edits
        beside the run's ``interventions`` (``--ablate``), composed as :attr:`order` says: without
        an order, edits of the same point of the same head are refused when the run starts
        (:func:`workbench.engine.edits.check_conflicts`); with one, they apply in that order."""
        given = list(self.interventions)
        if self.order is None or not given or not own:
            return [*given, *own]
        first, second = (given, list(own)) if self.order == "given,probe" else (list(own), given)
        return [ordered(*first, *second)]

    def plan(self, lengths: Sequence[int], device: torch.device | str) -> list[list[int]]:
        """Batches of item indices for items of these lengths (padded tokens each will take)."""
        return plan_batches(lengths, self.batch_size, batch_token_budget(device, self.max_batch_tokens))

    def show_progress(self) -> bool:
        import sys

        return bool(self.progress) if self.progress is not None else sys.stderr.isatty()
