"""The probe protocol: what a new head metric implements, in one file.

A probe declares its ``name``, the ``metrics`` it reports and its parameters, then reduces
:class:`~workbench.patterns.PatternChunk` s as each layer fires. Reductions go into *batch*
accumulators (:meth:`Probe.acc`) which the engine commits with :meth:`end_batch` only when the
whole batch succeeded; if a batch fails (say, CUDA out of memory, retried in halves) it calls
:meth:`abort_batch` and nothing is double-counted. :meth:`results` turns the totals into tidy
rows ``(metric, layer, head, value, n)``.

Minimal example (mean attention to the previous token)::

    class PrevToken(Probe):
        name, metrics = "prev", ("prev_token",)

        def on_pattern_chunk(self, chunk):
            ...  # chunk.probs, chunk.query_valid, chunk.layer
            self.acc("sum", self.n_layers, self.n_heads)[chunk.layer] += ...

        def results(self):
            return self.rows("prev_token", self.total["sum"] / self.total["n"], self.total["n"])
"""
from __future__ import annotations

from typing import Any, ClassVar

import pandas as pd
import torch
from torch import Tensor

from workbench.patterns import BatchInfo, PatternChunk


class Probe:
    """Base class for per-head metrics computed inside the forward pass."""

    name: ClassVar[str] = ""
    metrics: ClassVar[tuple[str, ...]] = ()
    description: ClassVar[str] = ""
    needs_patterns: ClassVar[bool] = True
    generates: ClassVar[bool] = False  # True: the probe drives its own decoding via run()

    def __init__(self, **params: Any) -> None:
        self.params: dict[str, Any] = params
        self.n_layers = 0
        self.n_heads = 0
        self.device = torch.device("cpu")
        self.total: dict[str, Tensor] = {}
        self._batch: dict[str, Tensor] = {}

    # -- lifecycle ---------------------------------------------------------------------------
    def setup(self, n_layers: int, n_heads: int, device: torch.device) -> None:
        self.n_layers, self.n_heads, self.device = n_layers, n_heads, torch.device(device)
        self.total, self._batch = {}, {}

    def begin_batch(self, batch: BatchInfo) -> None:
        self._batch = {}

    def on_pattern_chunk(self, chunk: PatternChunk) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def end_batch(self, batch: BatchInfo) -> None:
        """Commit the batch accumulators into the totals."""
        for key, val in self._batch.items():
            if key in self.total:
                self.total[key] += val
            else:
                self.total[key] = val.clone()
        self._batch = {}

    def abort_batch(self) -> None:
        self._batch = {}

    def results(self) -> pd.DataFrame:  # pragma: no cover - abstract
        raise NotImplementedError

    # -- helpers -----------------------------------------------------------------------------
    def acc(self, key: str, *shape: int, dtype: torch.dtype = torch.float64) -> Tensor:
        """A zero-initialised batch accumulator, created on first use (float64: sums of many
        float32 terms stay exact to well below test tolerance)."""
        if key not in self._batch:
            self._batch[key] = torch.zeros(shape, dtype=dtype, device=self.device)
        return self._batch[key]

    def rows(self, metric: str, value: Tensor, n: Tensor | int) -> pd.DataFrame:
        """Tidy rows for one ``[layer, head]`` metric tensor."""
        value = value.detach().double().cpu()
        n_t = torch.as_tensor(n).expand_as(value).cpu() if not isinstance(n, int) else torch.full(value.shape, n)
        layer, head = torch.meshgrid(torch.arange(value.shape[0]), torch.arange(value.shape[1]), indexing="ij")
        return pd.DataFrame(
            {
                "metric": metric,
                "layer": layer.flatten().numpy(),
                "head": head.flatten().numpy(),
                "value": value.flatten().numpy(),
                "n": n_t.flatten().numpy().astype("int64"),
            }
        )

    def config(self) -> dict[str, Any]:
        """Parameters recorded in the result file's metadata."""
        return {"name": self.name, **self.params}
