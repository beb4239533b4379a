"""What every patching experiment starts from: a batch of clean / corrupted pairs, their logit
differences and every head's output z in both runs.

:func:`baseline` runs the clean and the corrupted prompts once (:class:`Baseline`); the logit
difference LD = logit(correct) - logit(incorrect) at the last position is :func:`logit_diff`,
with a soft-capped model's final cap applied (:func:`final_softcap`). :func:`fork_at` lets ``m``
stacked variants share the layers before their first edit. Both engines of :mod:`circuits.patching`
(hooks, and the explicit graph of :mod:`circuits.fastpath`) build on this module.
"""

from __future__ import annotations

import contextlib
import warnings
from dataclasses import dataclass, field
from typing import Sequence

import torch
from jaxtyping import Float, Int
from torch import Tensor

from circuits.tasks import Pair, check_pair
from workbench.engine.attention import hooked_run
from workbench.engine.call import AttentionCall, base_network
from workbench.engine.edits import QKV, QKVReader, Sites, ZReader
from workbench.engine.patterns import collate
from workbench.errors import WorkbenchError, WorkbenchWarning
from workbench.inputs.prompts import pad_token_id
from workbench.protocol.views import BatchInfo


@dataclass
class PairBatch:
    clean: BatchInfo
    corrupted: BatchInfo
    last: Int[Tensor, " batch"]
    correct: Int[Tensor, " batch"]
    incorrect: Int[Tensor, " batch"]

    @property
    def size(self) -> int:
        return self.clean.size


def pair_batch(model, pairs: Sequence[Pair]) -> PairBatch:
    if not pairs:
        raise WorkbenchError("no prompt pairs", "give a non-empty task or pairs file")
    for p in pairs:
        check_pair(p)  # before any forward: one degenerate pair would silently dilute the mean
        if len(p.clean) > model.n_ctx:
            raise WorkbenchError(f"pair {p.id!r} is longer than the model's context", "shorten it")
    pad = pad_token_id(model.tokenizer)
    dev = model.device
    clean = collate([p.clean for p in pairs], pad, dev)
    corrupted = collate([p.corrupted for p in pairs], pad, dev)
    t = lambda xs: torch.tensor(xs, device=dev)  # noqa: E731
    return PairBatch(
        clean, corrupted, clean.lengths - 1, t([p.correct for p in pairs]), t([p.incorrect for p in pairs])
    )


def repeat_rows(batch: BatchInfo, m: int) -> BatchInfo:
    r = lambda x: x.repeat(m, *([1] * (x.dim() - 1)))  # noqa: E731
    return BatchInfo(
        batch.prompt_ids * m,
        r(batch.input_ids),
        r(batch.attention_mask),
        r(batch.positions),
        r(batch.lengths),
        r(batch.first_index),
    )


def final_softcap(hf_model: torch.nn.Module, logits: Tensor) -> Tensor:
    """The head's logits as the model's own forward returns them: Gemma 2 soft-caps them,
    ``c tanh(logit / c)`` with ``c = final_logit_softcapping``; others leave them as they are."""
    cap = getattr(hf_model.config.get_text_config(), "final_logit_softcapping", None)
    return logits if not cap else cap * torch.tanh(logits / cap)


def logit_diff(
    model, batch: BatchInfo, pb: PairBatch, m: int = 1, observers: Sequence[object] = (), grad: bool = False
) -> Float[Tensor, " rows"]:
    """LD at each prompt's last position; only the last positions go through the unembedding."""
    with hooked_run(model.hf_model, *observers, grad=grad):
        hidden = base_network(model.hf_model)(
            input_ids=batch.input_ids,
            attention_mask=batch.attention_mask,
            position_ids=batch.positions.clamp_min(0),
            use_cache=False,
        ).last_hidden_state
        rows = torch.arange(hidden.shape[0], device=hidden.device)
        logits = final_softcap(model.hf_model, model.hf_model.get_output_embeddings()(hidden[rows, pb.last.repeat(m)]))
        return (
            logits.gather(1, pb.correct.repeat(m)[:, None])[:, 0]
            - logits.gather(1, pb.incorrect.repeat(m)[:, None])[:, 0]
        )


class ZRecorder(ZReader):
    """A ``Z`` reader that keeps every layer's z (as the model went on with it)."""

    def __init__(self) -> None:
        self.z: dict[int, Tensor] = {}

    def read(self, call: AttentionCall, z: Tensor) -> None:
        self.z[call.layer] = z.detach()


class QKVRecorder(QKVReader):
    """A ``QKV`` reader that keeps the queries, keys and values of ``layers``."""

    def __init__(self, layers: set[int]) -> None:
        self.layers = set(layers)
        self.qkv: dict[int, tuple[Tensor, Tensor, Tensor]] = {}

    def sites(self) -> Sites:
        return {layer: None for layer in self.layers}

    def read(self, call: AttentionCall, x: QKV) -> None:
        self.qkv[call.layer] = (x.query.detach(), x.key.detach(), x.value.detach())


@dataclass
class Baseline:
    pb: PairBatch
    ld_clean: Tensor
    ld_corrupted: Tensor
    z_clean: dict[int, Tensor]
    z_corrupted: dict[int, Tensor]
    corrupted_components: dict[str, dict[int, Tensor]] = field(default_factory=dict)  # filled on first use
    pairs: list[Pair] = field(default_factory=list)
    cache: dict = field(default_factory=dict)  # per-engine records (e.g. the explicit graph's clean run)

    @property
    def denominator(self) -> float:
        d = float(self.ld_clean.mean() - self.ld_corrupted.mean())
        return d if abs(d) > 1e-9 else float("nan")


def baseline(model, pairs: Sequence[Pair]) -> Baseline:
    pb = pair_batch(model, pairs)
    rc, rx = ZRecorder(), ZRecorder()
    ld_c = logit_diff(model, pb.clean, pb, observers=[rc])
    ld_x = logit_diff(model, pb.corrupted, pb, observers=[rx])
    warn_if_flat(ld_c, ld_x)
    return Baseline(pb, ld_c, ld_x, rc.z, rx.z, pairs=list(pairs))


def hooked_forward(model, batch: BatchInfo, observers: Sequence[object] = ()) -> None:
    """One forward of the base network (no LM head) with the observers attached."""
    with hooked_run(model.hf_model, *observers):
        base_network(model.hf_model)(
            input_ids=batch.input_ids,
            attention_mask=batch.attention_mask,
            position_ids=batch.positions.clamp_min(0),
            use_cache=False,
        )


def warn_if_flat(ld_clean: Tensor, ld_corrupted: Tensor, rel: float = 1e-3) -> None:
    """Warn (:class:`WorkbenchWarning`) when the mean clean and corrupted logit differences are
    nearly equal, |LD_clean - LD_corrupted| < rel * max(1, |LD_clean|, |LD_corrupted|): the
    normalised effects divide by that difference and mean nothing (NaN below 1e-9)."""
    c, x = float(ld_clean.double().mean()), float(ld_corrupted.double().mean())
    if abs(c - x) < rel * max(1.0, abs(c), abs(x)):
        warnings.warn(
            f"the mean logit differences of the clean ({c:.4g}) and corrupted ({x:.4g}) prompts are nearly equal, "
            "so normalised effects (divided by their difference) are meaningless; the ld column is still valid. "
            "Use pairs whose corruption changes the model's preference",
            WorkbenchWarning,
            stacklevel=3,
        )


@contextlib.contextmanager
def fork_at(model, layer: int, m: int, b: int):
    """Run layers before ``layer`` once on the ``b`` clean rows, then repeat every batch-shaped
    input of the later blocks ``m`` times: the variants are identical to the clean run until
    their first edit, so the shared prefix is computed once (a large saving when senders sit
    in late layers)."""
    if m == 1 or layer <= 0:
        yield False
        return

    def grow(x):
        if isinstance(x, Tensor) and x.dim() > 0 and x.shape[0] == b:
            return x.repeat(m, *([1] * (x.dim() - 1)))
        if isinstance(x, tuple):
            return tuple(grow(v) for v in x)
        return x

    def pre(mod, args, kwargs):
        return tuple(grow(a) for a in args), {k: grow(v) for k, v in kwargs.items()}

    handles = [blk.register_forward_pre_hook(pre, with_kwargs=True) for blk in decoder_blocks(model)[layer:]]
    try:
        yield True
    finally:
        for h in handles:
            h.remove()


def decoder_blocks(model) -> list:
    return list(model.bridge.blocks)
