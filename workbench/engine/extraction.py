"""The pattern engine: prompts -> padded batches -> one forward each -> pattern probes reduce in hooks.

:func:`run_pattern_probes` is the data path's middle for every pattern probe of a run: it sorts
prompts by length (so batches carry little padding), pads them on the right with an attention
mask and explicit position ids (a prompt's numbers do not depend on its batch or its padding),
and runs the model's base network once per batch under :func:`workbench.engine.attention.hooked_run`.
The language-model head is skipped: no pattern probe needs logits, and on SmolLM2 it is a
fifth of the forward's work. So is everything after the last layer's attention (that layer's
MLP, the final norm: :class:`~workbench.engine.call.StopAfterLayer`, TransformerLens'
``stop_at_layer``), about 3% of a SmolLM2 forward.

Every pattern probe of the run shares that one forward. Each probe declares what it reads
(``needs`` in ``probes/base.py``) and the engine computes, once per layer for all of them, the
cheapest sufficient thing:

- probes that read weights on named keys and / or row entropies get one
  :class:`~workbench.engine.statistics.LayerStatistics` per layer: the attention function then computes
  the layer's output with a fused kernel that also returns each row's log-sum-exp (and, for
  entropy, one more pass with the keys as values, :mod:`workbench.engine.kernels`), so the statistics
  cost O(T d) next to the forward instead of recomputing every score;
- probes that read whole rows (and every probe, on layers no fused kernel can compute: logit
  soft-capping; entropy under an additive float mask) get the layer's pattern chunks, computed
  once and shared: the exact reference path, which ``attention_path="chunks"`` forces for all.

On CUDA an out-of-memory batch is split in half and retried, the probes' batch accumulators
discarded so nothing is double-counted. Use :func:`workbench.runner.run_probes` to run probes of
any kind; this module is its engine for pattern probes.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, Iterable, Literal, Sequence

import torch
from torch import Tensor

from workbench.engine.attention import hooked_run
from workbench.engine.call import AttentionCall, base_network, stop_after_layer
from workbench.engine.masking import visible_counts
from workbench.engine.patterns import collate, iter_pattern_chunks
from workbench.engine.statistics import LayerPlans, LayerStatistics, statistics_threads
from workbench.errors import WorkbenchError
from workbench.inputs.prompts import TokenizedPrompt, pad_token_id
from workbench.models.device import run_halving_on_oom
from workbench.protocol.probes import PatternProbe
from workbench.protocol.run_context import RunContext
from workbench.protocol.views import BatchInfo

DEFAULT_CHUNK_ELEMENTS = {"cpu": 1 << 22, "cuda": 1 << 26}
AttentionPath = Literal["auto", "chunks"]
STATISTICS_NEEDS = frozenset({"key_weights", "row_entropy"})  # what LayerStatistics answers


class ChunkFeeder:
    """The attention observer: turns each attention call into what each probe reads (layer
    statistics or pattern chunks), computing each once per layer for all probes."""

    def __init__(
        self, probes: Sequence[PatternProbe], chunk_elements: int, attention_path: AttentionPath = "auto"
    ) -> None:
        if attention_path not in ("auto", "chunks"):
            raise WorkbenchError(f"unknown attention path {attention_path!r}", "use auto or chunks")
        self.probes = list(probes)
        self.chunk_elements = chunk_elements
        self._batch: BatchInfo | None = None
        self._n_visible: list[tuple[Tensor | None, Tensor]] = []
        self._plans = LayerPlans()
        needs = {p: frozenset(getattr(p, "needs", ("rows",))) for p in self.probes}
        fast = attention_path == "auto"
        self.stat_probes = [p for p in self.probes if fast and needs[p] <= STATISTICS_NEEDS]
        self.entropy = any("row_entropy" in needs[p] for p in self.stat_probes)
        self._needs = needs

    @property
    def batch(self) -> BatchInfo | None:
        return self._batch

    @batch.setter
    def batch(self, batch: BatchInfo | None) -> None:
        self._batch, self._n_visible, self._plans = batch, [], LayerPlans()

    def wants_statistics(self, call: AttentionCall) -> frozenset[str]:
        """Asked by the attention function before its kernel: the log-sum-exp when a probe reads
        statistics, and E_A[k] when one reads row entropies (not under a float mask, whose bias
        the entropy identity leaves out)."""
        if not self.stat_probes or self._batch is None:
            return frozenset()
        if self.entropy and (call.mask is None or call.mask.dtype == torch.bool):
            return frozenset({"lse", "key_mean"})
        return frozenset({"lse"})

    def n_visible(self, call: AttentionCall) -> Tensor:
        """Keys each query may see, per batch row; computed once per mask (layers share masks)."""
        for mask, n in self._n_visible:
            if mask is call.mask:
                return n
        n = visible_counts(call)
        self._n_visible.append((call.mask, n))
        return n

    def on_attention(self, call: AttentionCall) -> None:
        if not self.probes or self._batch is None:
            return
        with torch.no_grad():
            rows = list(self.probes)
            if call.lse is not None and self.stat_probes:
                served = [
                    p for p in self.stat_probes if "row_entropy" not in self._needs[p] or call.key_mean is not None
                ]
                with statistics_threads(call.query.shape[0] * call.query.shape[1] * call.query.shape[2]):
                    stats = LayerStatistics(call, self._batch, self.n_visible(call), self.chunk_elements, self._plans)
                    for probe in served:
                        probe.on_pattern_chunk(stats)
                rows = [p for p in rows if p not in served]
            if rows:
                for chunk in iter_pattern_chunks(call, self._batch, self.chunk_elements):
                    for probe in rows:
                        probe.on_pattern_chunk(chunk)


@dataclass
class RunStats:
    n_prompts: int = 0
    n_tokens: int | None = 0  # None when the run tokenized nothing (item probes only)
    n_batches: int = 0
    n_oom_splits: int = 0


def _replay(calls: Callable[[BatchInfo], Iterable[AttentionCall]], feeder: ChunkFeeder) -> Callable[[BatchInfo], None]:
    """The forward of a replayed run: a batch's stored attention calls go to the feeder as a live forward's would."""

    def replay(batch: BatchInfo) -> None:
        for call in calls(batch):
            feeder.on_attention(call)

    return replay


def _progress_bar(ctx: RunContext, n_tokens: int):
    """A progress bar over the run's tokens when the context shows progress, else None."""
    if not ctx.show_progress():
        return None
    from tqdm.auto import tqdm

    return tqdm(total=n_tokens, unit="tok", desc="probes", leave=False)


def _probe_batch(batch: BatchInfo, probes: Sequence[PatternProbe], forward: Callable[[BatchInfo], None]) -> None:
    """One batch through the probes' batch protocol: begin, forward, end, or abort if the forward fails."""
    for p in probes:
        p.begin_batch(batch)
    try:
        forward(batch)
    except Exception:  # nothing of a failed batch is counted (it may be retried in halves)
        for p in probes:
            p.abort_batch()
        raise
    for p in probes:
        p.end_batch(batch)


def run_pattern_probes(
    model,
    prompts: Sequence[TokenizedPrompt],
    probes: Sequence[PatternProbe],
    ctx: RunContext | None = None,
    forward: Callable[[BatchInfo], None] | None = None,
    calls: Callable[[BatchInfo], Iterable[AttentionCall]] | None = None,
) -> RunStats:
    """Run the pattern probes over ``prompts`` on ``model`` (a :class:`~workbench.models.loading.LoadedModel`)
    in one forward per batch; the probes hold the totals (``probe.results()``).

    ``forward`` replaces the model call (tests use it to simulate out-of-memory). Interventions
    in ``ctx`` (e.g. :class:`~workbench.engine.interventions.HeadAblation`) edit head outputs during the
    run; probes see each layer's queries and keys as the edited model computes them.

    ``calls`` replaces the model altogether: each batch's attention calls come from it (replayed
    from an activation store, :mod:`workbench.store.replay`) and go to the probes exactly as a
    live forward's would; ``model`` then needs only ``n_layers``, ``n_heads``, ``device`` and
    ``tokenizer``.
    """
    ctx = ctx or RunContext()
    if not prompts:
        raise WorkbenchError("no prompts to run", "give a non-empty prompt set")
    device = model.device
    chunk_elements = ctx.chunk_elements or DEFAULT_CHUNK_ELEMENTS.get(device.type, 1 << 22)
    for p in probes:
        p.setup(model.n_layers, model.n_heads, device)
    feeder = ChunkFeeder(probes, chunk_elements, ctx.attention_path)
    pad_id = pad_token_id(model.tokenizer)

    def model_forward(batch: BatchInfo) -> None:
        # the probes read attention only: the forward ends after the last layer's attention call
        with stop_after_layer(model.n_layers - 1):
            base_network(model.hf_model)(
                input_ids=batch.input_ids,
                attention_mask=batch.attention_mask,
                position_ids=batch.positions.clamp_min(0),
                use_cache=False,
            )

    if calls is not None and ctx.interventions:
        raise WorkbenchError(
            "interventions edit a model's forward; replayed attention has none", "run interventions on the live model"
        )
    forward = forward or (_replay(calls, feeder) if calls is not None else model_forward)
    # attention observers only: the plain HF modules, without the bridge's wrappers around them
    session = (
        contextlib.nullcontext()
        if calls is not None
        else hooked_run(model.hf_model, feeder, *ctx.interventions, unwrap=True)
    )
    stats = RunStats(n_prompts=len(prompts), n_tokens=sum(len(p) for p in prompts))
    bar = _progress_bar(ctx, stats.n_tokens)

    def run(idx: list[int]) -> None:
        batch = collate(
            [prompts[i].ids for i in idx],
            pad_id,
            device,
            prompt_ids=[prompts[i].id for i in idx],
            metas=[prompts[i].meta for i in idx],
        )
        feeder.batch = batch
        _probe_batch(batch, probes, forward)
        stats.n_batches += 1
        if bar is not None:
            bar.update(int(batch.lengths.sum()))

    def count_split() -> None:
        stats.n_oom_splits += 1

    def too_big(i: int) -> WorkbenchError:
        return WorkbenchError(
            f"out of memory on a single prompt of {len(prompts[i])} tokens",
            "use --dtype bfloat16, a smaller chunk budget, or shorter prompts",
        )

    try:
        with session:
            run_halving_on_oom(ctx.plan([len(p) for p in prompts], device), run, device, too_big, on_split=count_split)
    finally:
        feeder.batch = None
        if bar is not None:
            bar.close()
    return stats
