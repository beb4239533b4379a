"""The probe protocol: every kind of probe a head metric can be, declared in one file.

Plugin authors import these names from ``probes.base`` (which re-exports :mod:`workbench.protocol`)
or from ``workbench.protocol`` itself.

A probe declares its ``name``, the ``metrics`` it reports, a one-line ``description``, its
parameters as a typed schema (``Params``, validated on construction: ``Literal`` choices,
ranges, no NaN) and its ``kind``; optionally what its metrics mean and how to draw them
(``metric_info``), the head roles they support (``roles``, read by :func:`workbench.report.atlas`)
and metric pairs worth a scatter in reports (``scatter_pairs``). The runner
(:func:`workbench.runner.run_probes`) reads the kind and gives each probe what it asked for;
every probe ends with one
:class:`~workbench.protocol.table.ProbeResult` (its table with the ``probe`` column, a summary, the
lines to print).

=================  =========================================================  ================
kind               what the probe does                                        it receives
=================  =========================================================  ================
``PatternProbe``   reduces each layer's attention as it fires (statistics or  tokenized prompts,
                   pattern chunks, as it ``needs``), inside one forward        via the engine
                   shared by every pattern probe of a run
``TokenProbe``     drives its own forwards or decoding over tokens            tokenized prompts
                   (e.g. retrieval: greedy decoding with a KV cache)
``ItemProbe``      reads raw items: image + text, context + text (vhd,        the items as given
                   context), building its own model inputs
=================  =========================================================  ================

A new probe is one module plus one entry point in its package's ``pyproject.toml``
(``[project.entry-points."workbench.probes"] name = "module:Class"``); nothing that dispatches
on names needs an edit. Minimal pattern probe (mean attention to the previous token)::

    class PrevToken(PatternProbe):
        name, metrics = "prev", ("prev_token",)
        description = "mean attention to the previous token"
        needs = ("key_weights",)  # one named key per query: no attention row is formed

        def on_pattern_chunk(self, chunk):
            use = chunk.query_valid & (chunk.query_pos >= 1)
            a = chunk.probs_at(torch.where(use, chunk.batch.first_index[:, None] + chunk.query_pos - 1, -1))
            self.acc("sum", self.n_layers, self.n_heads)[chunk.layer] += (a * use[:, None]).sum((0, 2))
            self.acc("n", self.n_layers, self.n_heads)[chunk.layer] += use.sum()

        def results(self):
            return self.rows("prev_token", self.total["sum"] / self.total["n"], self.total["n"])

Metric definitions: ``docs/metrics.md`` (the docs site's metrics page).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Literal, Mapping, Sequence, TypeVar

import pandas as pd
import torch
from jaxtyping import Float
from torch import Tensor

from workbench.protocol.metrics import MetricInfo
from workbench.protocol.params import Options, options_dict, validate_options
from workbench.protocol.roles import Role
from workbench.protocol.table import ProbeResult, head_rows
from workbench.protocol.views import BatchInfo, PatternView

T = TypeVar("T")

if TYPE_CHECKING:
    from workbench.inputs.prompts import Prompt, TokenizedPrompt
    from workbench.models.loading import LoadedModel
    from workbench.protocol.run_context import RunContext


class NoParams(Options):
    """A probe without parameters."""


class Probe(ABC):
    """What every probe declares, whatever its kind."""

    name: ClassVar[str] = ""
    metrics: ClassVar[tuple[str, ...]] = ()
    description: ClassVar[str] = ""
    kind: ClassVar[Literal["pattern", "tokens", "items"]]
    Params: ClassVar[type[Options]] = NoParams
    # Bumped when a change to the probe changes its numbers: sweeps key their parts on it.
    version: ClassVar[int] = 1
    # How to read and draw each metric (kind: bounded / signed / positive / log; captions):
    # figures, captions and the report's summary read it. Undeclared metrics are inferred.
    metric_info: ClassVar[Mapping[str, MetricInfo]] = {}
    # Head roles the atlas reads off this probe's metrics (thresholds editable by the user).
    roles: ClassVar[tuple[Role, ...]] = ()
    # Metric pairs worth a per-head scatter in reports when both were measured.
    scatter_pairs: ClassVar[tuple[tuple[str, str], ...]] = ()

    def __init__(self, **params: Any) -> None:
        self.options = validate_options(self.Params, params, self.name)
        self.params: dict[str, Any] = options_dict(self.options)

    def config(self) -> dict[str, Any]:
        """Parameters recorded in the result file's metadata."""
        return {"name": self.name, **self.params}

    def rows(self, metric: str, value: Float[Tensor, "layer head"], n: Tensor | int) -> pd.DataFrame:
        """Tidy rows for one ``[layer, head]`` metric tensor."""
        return head_rows(metric, value, n)

    def finish(
        self, table: pd.DataFrame, summary: dict[str, Any] | None = None, lines: Sequence[str] = ()
    ) -> ProbeResult:
        """The probe's result: ``table`` with the ``probe`` column in front."""
        table = table.copy()
        table.insert(0, "probe", self.name)
        return ProbeResult(self.name, table, dict(summary or {}), list(lines))


Need = Literal["rows", "key_weights", "row_entropy"]


class PatternProbe(Probe):
    """Reduces each layer's attention inside the shared forward.

    ``needs`` says what the probe reads; the engine computes the cheapest sufficient thing once
    per layer for all probes of the run and hands it to :meth:`on_pattern_chunk`:

    - ``"key_weights"``: weights on keys it names, ``key_probs`` / ``probs_at`` / ``mass_in``
      (the first token, the previous token, a window, earlier same tokens);
    - ``"row_entropy"``: each row's entropy (and ``n_visible``);
    - ``"rows"`` (the default): anything, whole rows included (``probs``, ``mass_on``).

    A probe that needs only the first two receives one
    :class:`~workbench.engine.statistics.LayerStatistics` per layer (every query at once, from the
    attention kernel's log-sum-exp: O(T d) beside the forward); otherwise, and where no fused
    kernel fits the layer, :class:`~workbench.engine.patterns.PatternChunk` s of query rows. Both answer
    :class:`~workbench.protocol.views.PatternView`, so the reduction is written once.

    Reductions go into *batch* accumulators (:meth:`acc`) which the engine commits with
    :meth:`end_batch` only when the whole batch succeeded; if a batch fails (say, out of device
    memory, retried in halves) it calls :meth:`abort_batch` and nothing is double-counted.
    :meth:`results` turns the totals into tidy rows ``(metric, layer, head, value, n)``.
    """

    kind: ClassVar[Literal["pattern"]] = "pattern"
    needs: ClassVar[tuple[Need, ...]] = ("rows",)

    def __init__(self, **params: Any) -> None:
        super().__init__(**params)
        self.n_layers = 0
        self.n_heads = 0
        self.device = torch.device("cpu")
        self.total: dict[str, Tensor] = {}
        self._batch: dict[str, Tensor] = {}
        self._per_queries: dict[tuple[int, int], Any] = {}

    # -- lifecycle, called by the extraction engine -------------------------------------------
    def setup(self, n_layers: int, n_heads: int, device: torch.device | str) -> None:
        self.n_layers, self.n_heads, self.device = n_layers, n_heads, torch.device(device)
        self.total, self._batch, self._per_queries = {}, {}, {}

    def begin_batch(self, batch: BatchInfo) -> None:
        self._batch, self._per_queries = {}, {}

    @abstractmethod
    def on_pattern_chunk(self, chunk: PatternView) -> None:
        """Reduce one view of one layer's attention (a chunk of query rows, or the layer's
        statistics for every query) into batch accumulators."""

    def end_batch(self, batch: BatchInfo) -> None:
        """Commit the batch accumulators into the totals."""
        for key, val in self._batch.items():
            if key in self.total:
                self.total[key] += val
            else:
                self.total[key] = val.clone()
        self._batch, self._per_queries = {}, {}

    def abort_batch(self) -> None:
        self._batch, self._per_queries = {}, {}

    def per_queries(self, chunk: PatternView, make: Callable[[], T]) -> T:
        """What the probe derives from the batch and the chunk's queries alone, not from the
        layer's attention (the keys it names, which queries it scores and how many): made by
        ``make`` at the first layer and reused by the others, which see the same query columns
        (``chunk.queries``) with the same positions and validity (a real query always sees
        itself, whatever a layer's mask); kept until the batch ends. On short prompts a probe's
        own small tensor operations per layer were a sizeable part of its statistics' cost."""
        key = (chunk.queries.start, chunk.queries.stop)
        if key not in self._per_queries:
            self._per_queries[key] = make()
        return self._per_queries[key]

    @abstractmethod
    def results(self) -> pd.DataFrame:
        """Tidy rows ``metric, layer, head, value, n`` from the totals."""

    def summarize(self, table: pd.DataFrame) -> tuple[dict[str, Any], list[str]]:
        """Summary facts and lines to print about this probe's table (none by default)."""
        return {}, []

    def result(self) -> ProbeResult:
        table = self.results()
        summary, lines = self.summarize(table)
        return self.finish(table, summary, lines)

    # -- helpers -----------------------------------------------------------------------------
    def acc(self, key: str, *shape: int, dtype: torch.dtype = torch.float64) -> Tensor:
        """A zero-initialised batch accumulator, created on first use (float64: sums of many
        float32 terms stay exact to well below test tolerance)."""
        if key not in self._batch:
            self._batch[key] = torch.zeros(shape, dtype=dtype, device=self.device)
        return self._batch[key]


class TokenProbe(Probe):
    """Drives its own forwards or decoding over tokenized prompts (e.g. retrieval)."""

    kind: ClassVar[Literal["tokens"]] = "tokens"

    @abstractmethod
    def run(self, model: LoadedModel, prompts: Sequence[TokenizedPrompt], ctx: RunContext) -> ProbeResult:
        """Compute the probe's metrics over ``prompts``; batching, interventions and progress
        come from ``ctx``."""


class ItemProbe(Probe):
    """Reads raw items (image + text, context + text) and builds its own model inputs."""

    kind: ClassVar[Literal["items"]] = "items"

    @abstractmethod
    def run(self, model: LoadedModel, items: Sequence[Prompt], ctx: RunContext) -> ProbeResult:
        """Compute the probe's metrics over ``items``; relative file paths in items start at
        ``ctx.root``."""


class DivergenceProbe(ItemProbe):
    """An item probe whose per-head divergence between a condition and its counterfactual
    picks the heads VHR reinforces (``workbench reinforce``)."""

    divergence_metric: ClassVar[str]
    attention_metric: ClassVar[str]

    @classmethod
    @abstractmethod
    def accepts(cls, model: LoadedModel) -> bool:
        """Whether this probe's condition applies to ``model`` (images need a VLM)."""

    @abstractmethod
    def pairs(self, model: LoadedModel, items: Sequence[Prompt], root: Any = None) -> list[Any]:
        """Each item as a :class:`~workbench.inputs.conditions.ConditionPair` (with / without)."""


__all__ = ["DivergenceProbe", "ItemProbe", "Need", "NoParams", "PatternProbe", "Probe", "TokenProbe"]
