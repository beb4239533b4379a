"""Batched extraction: prompts -> padded batches -> one forward each -> probes reduce in hooks.

``run_probes(model, prompts, probes)`` is the data path's middle: it sorts prompts by length
(so batches carry little padding), pads them on the right with an attention mask and explicit
position ids (a prompt's numbers do not depend on its batch or its padding), and runs the
model's base network once per batch under :func:`workbench.attention.native_attention`. The
language-model head is skipped: no probe here needs logits, and on SmolLM2 it is a fifth of
the forward's work.

Every probe of the run shares that one forward, and each layer's pattern chunks are computed
once and shared by all pattern probes. Batch size is fixed or ``"auto"`` (a token budget per
batch); on CUDA an out-of-memory batch is split in half and retried, the probes' batch
accumulators discarded so nothing is double-counted.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Callable, Sequence

import pandas as pd
import torch

from probes.base import Probe
from workbench.attention import AttentionCall, hooked_run
from workbench.device import run_halving_on_oom
from workbench.errors import WorkbenchError
from workbench.patterns import BatchInfo, collate, iter_pattern_chunks
from workbench.prompts import TokenizedPrompt, pad_token_id

DEFAULT_CHUNK_ELEMENTS = {"cpu": 1 << 22, "cuda": 1 << 26}
DEFAULT_BATCH_TOKENS = {"cpu": 2048, "cuda": 32768}


class ProbeRunner:
    """The observer: turns each attention call into pattern chunks for the probes."""

    def __init__(self, probes: Sequence[Probe], chunk_elements: int) -> None:
        self.probes = list(probes)
        self.pattern_probes = [p for p in self.probes if p.needs_patterns]
        self.chunk_elements = chunk_elements
        self.batch: BatchInfo | None = None

    def on_attention(self, call: AttentionCall) -> None:
        if not self.pattern_probes or self.batch is None:
            return
        with torch.no_grad():
            for chunk in iter_pattern_chunks(call, self.batch, self.chunk_elements):
                for probe in self.pattern_probes:
                    probe.on_pattern_chunk(chunk)


def plan_batches(lengths: Sequence[int], batch_size: int | str, max_tokens: int) -> list[list[int]]:
    """Group prompt indices, longest first; ``"auto"`` fills batches up to ``max_tokens`` padded tokens."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    batches: list[list[int]] = []
    if batch_size == "auto":
        for i in order:
            if batches and (len(batches[-1]) + 1) * lengths[batches[-1][0]] <= max_tokens:
                batches[-1].append(i)
            else:
                batches.append([i])
        return batches
    bs = int(batch_size)
    if bs < 1:
        raise WorkbenchError(f"batch size must be at least 1, got {bs}", "use --batch-size N or auto")
    return [order[j : j + bs] for j in range(0, len(order), bs)]


def base_network(hf_model: torch.nn.Module) -> torch.nn.Module:
    """The model without its language-model head (``LlamaModel`` inside ``LlamaForCausalLM``)."""
    base = getattr(hf_model, "base_model", None)
    return base if isinstance(base, torch.nn.Module) else hf_model


@dataclass
class RunStats:
    n_prompts: int = 0
    n_tokens: int = 0
    n_batches: int = 0
    n_oom_splits: int = 0


def run_probes(
    model,
    prompts: Sequence[TokenizedPrompt],
    probes: Sequence[Probe],
    batch_size: int | str = "auto",
    progress: bool | None = None,
    chunk_elements: int | None = None,
    max_batch_tokens: int | None = None,
    forward: Callable[[BatchInfo], None] | None = None,
    interventions: Sequence[object] = (),
) -> tuple[pd.DataFrame, RunStats]:
    """Run ``probes`` over ``prompts`` on ``model`` (a :class:`~workbench.models.LoadedModel`).

    Returns the tidy per-head table (columns ``probe, metric, layer, head, value, n``) and run
    statistics. ``forward`` replaces the model call (tests use it to simulate out-of-memory).
    ``interventions`` (e.g. :class:`~workbench.interventions.HeadAblation`) edit head outputs
    during the run; probes see each layer's queries and keys as the edited model computes them.
    """
    if not prompts:
        raise WorkbenchError("no prompts to run", "give a non-empty prompt set")
    if not probes:
        raise WorkbenchError("no probes to run", "name at least one probe")
    device = model.device
    chunk_elements = chunk_elements or DEFAULT_CHUNK_ELEMENTS.get(device.type, 1 << 22)
    max_batch_tokens = max_batch_tokens or DEFAULT_BATCH_TOKENS.get(device.type, 2048)
    for p in probes:
        p.setup(model.n_layers, model.n_heads, device)
    runner = ProbeRunner(probes, chunk_elements)
    pad_id = pad_token_id(model.tokenizer)
    base = base_network(model.hf_model)

    def model_forward(batch: BatchInfo) -> None:
        base(
            input_ids=batch.input_ids,
            attention_mask=batch.attention_mask,
            position_ids=batch.positions.clamp_min(0),
            use_cache=False,
        )

    forward = forward or model_forward
    stats = RunStats(n_prompts=len(prompts), n_tokens=sum(len(p) for p in prompts))
    bar = None
    if progress or (progress is None and sys.stderr.isatty()):
        from tqdm.auto import tqdm

        bar = tqdm(total=stats.n_tokens, unit="tok", desc="probes", leave=False)

    def run(idx: list[int]) -> None:
        batch = collate(
            [prompts[i].ids for i in idx], pad_id, device,
            prompt_ids=[prompts[i].id for i in idx], metas=[prompts[i].meta for i in idx],
        )
        runner.batch = batch
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
        with hooked_run(model.hf_model, runner, *interventions):
            run_halving_on_oom(
                plan_batches([len(p) for p in prompts], batch_size, max_batch_tokens), run, device, too_big,
                on_split=count_split,
            )
    finally:
        runner.batch = None
        if bar is not None:
            bar.close()
    frames = []
    for p in probes:
        df = p.results()
        df.insert(0, "probe", p.name)
        frames.append(df)
    return pd.concat(frames, ignore_index=True), stats
