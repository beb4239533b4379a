"""Activation, path and attribution patching per head, batched (docs/metrics.md, "Circuits").

Every experiment compares a clean prompt x with a corrupted x' of the same length. The metric is
the logit difference LD = logit(correct) - logit(incorrect) at the last position, and effects
are reported normalised as (LD_patched - LD_clean) / (LD_clean - LD_corrupted): 0 = no effect,
-1 = the whole behaviour destroyed (means over prompts are taken before normalising); the
column ``ld`` keeps the mean patched LD itself.

Heads are edited at their output z (before W_O) and, for path-patching receivers, at their
queries / keys / values, through the ``"workbench"`` attention hook (:mod:`workbench.engine.attention`).
Instead of one forward per patched head, ``m`` variants are stacked along the batch dimension
(``m x prompts`` rows), in chunks of at most ``max_rows`` rows, and each variant's rows get
their own edit.

- :func:`activation_patching`: the head's z (all positions, or one position) or a layer's
  ``resid_pre`` / ``attn_out`` / ``mlp_out`` taken from the corrupted run; nothing frozen.
- :func:`path_patching`: sender heads -> receiver. Run x with every head frozen to its clean z
  except the sender, which takes its corrupted z, MLPs recomputed; the receiver is the logits
  (read directly) or the q / k / v input of receiver heads (recorded in that run, then patched
  into a normal clean run). With grouped-query attention, a k or v receiver is the KV head the
  receiver shares with its group.
- :func:`attribution_patching`: grad(LD) . (z' - z) for every head from one forward and one
  backward on the clean prompts (Nanda's first-order approximation).
"""

from __future__ import annotations

import contextlib
import warnings
from typing import TYPE_CHECKING, Iterator, Sequence

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from circuits.baseline import (
    Baseline,
    QKVRecorder,
    baseline,
    decoder_blocks,
    fork_at,
    logit_diff,
    repeat_rows,
)
from circuits.tasks import Pair
from workbench.engine.call import AttentionCall
from workbench.engine.edits import EVERY, QKV, QKVEdit, Sites, ZEdit, ZReader
from workbench.engine.frozen import frozen
from workbench.errors import WorkbenchError

if TYPE_CHECKING:
    from circuits.graph import ModelGraph

Head = tuple[int, int]


COMPONENTS = ("z", "resid_pre", "attn_out", "mlp_out")


class _VariantZPatcher(ZEdit):
    """z edits for m stacked variants: mask[layer] is [m, T or 1, H]; True = take corrupted z.
    With ``freeze`` every other head's z is the clean run's (path patching's frozen run).

    Before the variants fork (layers run on the un-repeated batch, see :func:`fork_at`) the
    run is the clean run, so z passes through unchanged."""

    label = "activation patching"

    def __init__(self, base: Baseline, m: int, masks: dict[int, Tensor], freeze: bool) -> None:
        self.base, self.m, self.masks, self.freeze = base, m, masks, freeze

    def sites(self) -> Sites:
        return EVERY if self.freeze else {layer: None for layer in self.masks}

    def replaces(self, call: AttentionCall) -> bool:
        return self.freeze and call.query.shape[0] == self.m * self.base.pb.size

    def edit(self, call: AttentionCall, z: Tensor) -> Tensor:
        mask = self.masks.get(call.layer)
        b = self.base.pb.size
        if (mask is None and not self.freeze) or z.shape[0] != self.m * b:
            return z
        zz = z.view(self.m, b, *z.shape[1:])
        clean = self.base.z_clean[call.layer].unsqueeze(0)
        src = clean.expand_as(zz) if self.freeze else zz
        if mask is not None:
            src = torch.where(mask[:, None, :, :, None], self.base.z_corrupted[call.layer].unsqueeze(0), src)
        return src.reshape(z.shape)


class _QKVPatcher(QKVEdit):
    """q / k / v edits for stacked variants: values[layer] = (which, head, tensor [m*b, T, d]);
    with ``last`` (``[m*b]``) only each row's read-out position is patched."""

    label = "path patching (receivers)"

    def __init__(self, patches: dict[int, list[tuple[str, int, Tensor]]], last: Tensor | None = None) -> None:
        self.patches, self.last = patches, last

    def sites(self) -> Sites:
        return {layer: None for layer in self.patches}

    def edit(self, call: AttentionCall, x: QKV) -> QKV:
        q, k, v = x
        todo = self.patches.get(call.layer)
        if not todo:
            return x
        q, k, v = q.clone(), k.clone(), v.clone()
        for which, idx, value in todo:
            t = {"q": q, "k": k, "v": v}[which]
            if self.last is None:
                t[:, idx] = value
            else:
                r = torch.arange(t.shape[0], device=t.device)
                t[r, idx, self.last] = value[r, self.last]
        return QKV(q, k, v)


def _chunks(n: int, size: int) -> Iterator[slice]:
    for i in range(0, n, size):
        yield slice(i, min(n, i + size))


def _effects(base: Baseline, ld: Tensor, n_boot: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Normalised effect per variant (ld: [m, prompts]), with bootstrap 95% CIs over prompts."""
    c, x, p = base.ld_clean.double().cpu().numpy(), base.ld_corrupted.double().cpu().numpy(), ld.double().cpu().numpy()
    eff = (p.mean(1) - c.mean()) / base.denominator
    if n_boot <= 0:
        nan = np.full_like(eff, np.nan)
        return eff, nan, nan
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(c), size=(n_boot, len(c)))
    # resamples whose denominator is 0 give inf / NaN and, when all are, nanpercentile warns:
    # the CI is then NaN by design (baseline() already warned), not a numpy warning on the terminal
    with np.errstate(divide="ignore", invalid="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        boots = (p[:, idx].mean(-1) - c[idx].mean(-1)) / (c[idx].mean(-1) - x[idx].mean(-1))  # [m, n_boot]
        return eff, np.nanpercentile(boots, 2.5, axis=1), np.nanpercentile(boots, 97.5, axis=1)


def activation_patching(
    model,
    pairs: Sequence[Pair] | Baseline,
    component: str = "z",
    per_position: bool = False,
    heads: Sequence[Head] | None = None,
    max_rows: int = 512,
    n_boot: int = 0,
) -> pd.DataFrame:
    """Patch one head (or one layer component) at a time from the corrupted run into the clean run.

    Returns tidy rows: ``component, layer, head (-1 for layer components), position (-1 = all),
    value`` (normalised effect) and, with ``n_boot``, ``ci_low`` / ``ci_high``.
    """
    if component not in COMPONENTS:
        raise WorkbenchError(f"unknown component {component!r}", f"choose from: {', '.join(COMPONENTS)}")
    base = pairs if isinstance(pairs, Baseline) else baseline(model, pairs)
    b, T = base.pb.size, base.pb.clean.input_ids.shape[1]
    positions = list(range(T)) if per_position else [-1]
    if component == "z":
        units = [
            (layer, h, p)
            for layer, h in (heads or [(layer, h) for layer in range(model.n_layers) for h in range(model.n_heads)])
            for p in positions
        ]
    else:
        units = [(layer, -1, p) for layer in range(model.n_layers) for p in positions]
    per_chunk = max(1, max_rows // b)
    lds = []
    for sl in _chunks(len(units), per_chunk):
        chunk = units[sl]
        m = len(chunk)
        batch = repeat_rows(base.pb.clean, m)
        if component == "z":
            masks: dict[int, Tensor] = {}
            for i, (layer, h, p) in enumerate(chunk):
                mk = masks.setdefault(layer, torch.zeros(m, T, model.n_heads, dtype=torch.bool, device=model.device))
                if p < 0:
                    mk[i, :, h] = True
                else:
                    mk[i, p, h] = True
            lds.append(logit_diff(model, batch, base.pb, m, [_VariantZPatcher(base, m, masks, freeze=False)]))
        else:
            with _component_patch(model, base, component, chunk):
                lds.append(logit_diff(model, batch, base.pb, m))
    ld = torch.cat(lds).view(len(units), b)
    eff, lo, hi = _effects(base, ld, n_boot)
    out = pd.DataFrame(
        {
            "component": component,
            "layer": [u[0] for u in units],
            "head": [u[1] for u in units],
            "position": [u[2] for u in units],
            "value": eff,
            "ld": ld.double().mean(1).cpu().numpy(),
        }
    )
    if n_boot > 0:
        out["ci_low"], out["ci_high"] = lo, hi
    return out


@contextlib.contextmanager
def _component_patch(model, base: Baseline, component: str, chunk: list[tuple[int, int, int]]):
    """Torch hooks that replace a layer's residual input, attention output or MLP output, per
    variant, with the corrupted run's (recorded first, with the same hooks in record mode)."""
    if component not in base.corrupted_components:
        base.corrupted_components[component] = _record_components(model, base, component)
    corrupted = base.corrupted_components[component]
    m, b = len(chunk), base.pb.size
    handles = []
    for layer in {u[0] for u in chunk}:
        rows = [(i, p) for i, (lyr, _, p) in enumerate(chunk) if lyr == layer]

        def swap(t: Tensor, layer=layer, rows=rows) -> Tensor:
            t = t.clone()
            tv = t.view(m, b, *t.shape[1:])
            for i, p in rows:
                if p < 0:
                    tv[i] = corrupted[layer]
                else:
                    tv[i, :, p] = corrupted[layer][:, p]
            return t

        handles.append(_hook(model, layer, component, swap))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def _hook(model, layer: int, component: str, fn):
    block = decoder_blocks(model)[layer]
    if component == "resid_pre":

        def pre(mod, args, kwargs):
            if args:
                return (fn(args[0]), *args[1:]), kwargs
            kwargs["hidden_states"] = fn(kwargs["hidden_states"])
            return args, kwargs

        return block.register_forward_pre_hook(pre, with_kwargs=True)
    target = block.attn.original_component if component == "attn_out" else block.mlp

    def post(mod, args, output):
        if isinstance(output, tuple):
            return (fn(output[0]), *output[1:])
        return fn(output)

    return target.register_forward_hook(post)


def _record_components(model, base: Baseline, component: str) -> dict[int, Tensor]:
    store: dict[int, Tensor] = {}
    handles = [
        _hook(model, layer, component, lambda t, layer=layer: store.__setitem__(layer, t.detach()) or t)
        for layer in range(model.n_layers)
    ]
    try:
        logit_diff(model, base.pb.corrupted, base.pb)
    finally:
        for h in handles:
            h.remove()
    return store


def path_patching(
    model,
    pairs: Sequence[Pair] | Baseline,
    senders: Sequence[Head] | None = None,
    receivers: Sequence[tuple[int, int, str]] | None = None,
    max_rows: int = 512,
    n_boot: int = 0,
    engine: str = "auto",
    positions: str = "all",
) -> pd.DataFrame:
    """Effect of each sender head on the receiver through paths that avoid every other head.

    ``receivers``: ``None`` for the logits, else ``(layer, head, which)`` with ``which`` in
    q / k / v (patched together when several are given). Every sender must sit in an earlier
    layer than every receiver.

    ``positions``: where receivers' q / k / v are patched: ``"all"`` positions, or ``"last"``
    (the read-out position only, as Wang et al. patch the name movers' queries at END).

    ``engine``: ``"graph"`` computes only the read-out positions on the explicit graph
    (:mod:`circuits.fastpath`, Llama-family models), ``"hooks"`` recomputes full forwards
    through the attention hook (any architecture); ``"auto"`` takes the graph when it can.
    """
    g, base = _path_setup(model, pairs, engine)
    recv = list(receivers or [])
    _check_receivers(model, recv)
    first_recv = min((layer for layer, _, _ in recv), default=model.n_layers)
    senders = _check_senders(model, senders, first_recv)
    if positions not in ("all", "last"):
        raise WorkbenchError(f"unknown receiver positions {positions!r}", "use all or last")
    if g is not None:
        from circuits import fastpath

        ld = (
            fastpath.to_receivers(g, base, senders, recv, max_rows, positions)
            if recv
            else fastpath.to_logits(g, base, senders)
        )
        return _path_frame(base, senders, ld, recv, n_boot)
    b = base.pb.size
    group = model.n_heads // model.n_kv_heads
    order = sorted(range(len(senders)), key=lambda i: senders[i])  # chunks of nearby layers fork late
    senders = [senders[i] for i in order]
    per_chunk = max(1, max_rows // b)
    lds = [
        _path_chunk_ld(model, base, senders[sl], recv, first_recv, positions, group)
        for sl in _chunks(len(senders), per_chunk)
    ]
    ld = torch.cat(lds).view(len(senders), b)
    ld[torch.tensor(order)] = ld.clone()  # back to the caller's order
    senders = [senders[order.index(i)] for i in range(len(order))]
    return _path_frame(base, senders, ld, recv, n_boot)


def _path_setup(model, pairs: Sequence[Pair] | Baseline, engine: str) -> tuple[ModelGraph | None, Baseline]:
    """Check ``engine`` and return (graph or None, baseline): the baseline runs on the graph when there is one."""
    if engine not in ("auto", "graph", "hooks"):
        raise WorkbenchError(f"unknown engine {engine!r}", "use auto, graph or hooks")
    g = None
    if engine != "hooks":
        from circuits.graph import ModelGraph, graph_for

        g = graph_for(model) if engine == "auto" else ModelGraph(model)
    if isinstance(pairs, Baseline):
        base = pairs
    elif g is not None:
        from circuits.fastpath import graph_baseline

        base = graph_baseline(g, model, pairs)  # the clean / corrupted runs once, on the graph
    else:
        base = baseline(model, pairs)
    return g, base


def _check_receivers(model, recv: list[tuple[int, int, str]]) -> None:
    """Reject receivers that are not LAYER.HEAD.{q,k,v} inside the model, before any patching run."""
    for layer, h, which in recv:
        if which not in ("q", "k", "v") or not (0 <= layer < model.n_layers and 0 <= h < model.n_heads):
            raise WorkbenchError(
                f"bad receiver {layer}.{h}.{which}", "receivers are LAYER.HEAD with q, k or v, inside the model"
            )


def _check_senders(model, senders: Sequence[Head] | None, first_recv: int) -> list[Head]:
    """Sender heads as a list (default: every head before ``first_recv``); all must precede the receivers."""
    if senders is None:
        senders = [(layer, h) for layer in range(first_recv) for h in range(model.n_heads)]
    senders = list(senders)
    if not senders:
        raise WorkbenchError("no sender heads precede the receivers", "choose receivers in later layers")
    late = [s for s in senders if s[0] >= first_recv]
    if late:
        raise WorkbenchError(
            f"sender {late[0][0]}.{late[0][1]} does not precede receiver layer {first_recv}",
            "receivers must be in later layers than all senders",
        )
    return senders


def _path_chunk_ld(
    model,
    base: Baseline,
    chunk: list[Head],
    recv: list[tuple[int, int, str]],
    first_recv: int,
    positions: str,
    group: int,
) -> Tensor:
    """Patched LD of one chunk of senders on the hooks engine: the frozen run, then the receivers' run."""
    b = base.pb.size
    m = len(chunk)
    masks: dict[int, Tensor] = {}
    for i, (layer, h) in enumerate(chunk):
        masks.setdefault(layer, torch.zeros(m, 1, model.n_heads, dtype=torch.bool, device=model.device))[i, 0, h] = True
    frozen = _VariantZPatcher(base, m, masks, freeze=True)
    with fork_at(model, min(layer for layer, _ in chunk), m, b) as forked:
        batch = base.pb.clean if forked else repeat_rows(base.pb.clean, m)
        if not recv:
            return logit_diff(model, batch, base.pb, m, [frozen])
        rec = QKVRecorder({layer for layer, _, _ in recv})
        logit_diff(model, batch, base.pb, m, [rec, frozen])
    patches = _receiver_patches(rec, recv, group)
    with fork_at(model, first_recv, m, b) as forked:
        batch = base.pb.clean if forked else repeat_rows(base.pb.clean, m)
        return logit_diff(
            model,
            batch,
            base.pb,
            m,
            [_QKVPatcher(patches, base.pb.last.repeat(m) if positions == "last" else None)],
        )


def _receiver_patches(rec: QKVRecorder, recv: list[tuple[int, int, str]], group: int) -> dict[int, list]:
    """The recorded q / k / v of each receiver (its KV head for k / v under grouped-query attention), per layer."""
    patches: dict[int, list] = {}
    for layer, h, which in recv:
        q, k, v = rec.qkv[layer]
        idx = h if which == "q" else h // group
        src = {"q": q, "k": k, "v": v}[which][:, idx]
        patches.setdefault(layer, []).append((which, idx, src))
    return patches


def _path_frame(base: Baseline, senders: list[Head], ld: Tensor, recv: list, n_boot: int) -> pd.DataFrame:
    eff, lo, hi = _effects(base, ld, n_boot)
    out = pd.DataFrame(
        {
            "layer": [s[0] for s in senders],
            "head": [s[1] for s in senders],
            "value": eff,
            "ld": ld.double().mean(1).cpu().numpy(),
            "receiver": "logits" if not recv else ",".join(f"{layer}.{h}.{w}" for layer, h, w in recv),
        }
    )
    if n_boot > 0:
        out["ci_low"], out["ci_high"] = lo, hi
    return out


class _GradZ(ZReader):
    """Keeps every layer's z with its gradient retained (attribution patching)."""

    def __init__(self) -> None:
        self.z: dict[int, Tensor] = {}

    def read(self, call: AttentionCall, z: Tensor) -> None:
        z.retain_grad()
        self.z[call.layer] = z


def attribution_patching(model, pairs: Sequence[Pair] | Baseline) -> pd.DataFrame:
    """First-order estimate of every head's activation-patching effect: one forward, one backward."""
    base = pairs if isinstance(pairs, Baseline) else baseline(model, pairs)
    emb = model.hf_model.get_input_embeddings()
    handle = emb.register_forward_hook(lambda mod, a, out: out.requires_grad_(True))
    rec = _GradZ()
    try:
        with frozen(model.hf_model):
            ld = logit_diff(model, base.pb.clean, base.pb, observers=[rec], grad=True)
            ld.mean().backward()
    finally:
        handle.remove()
    rows = []
    for layer in range(model.n_layers):
        z = rec.z[layer]
        # the gradient of the mean LD already carries 1/N: the sum over pairs is the mean estimate
        est = (z.grad * (base.z_corrupted[layer] - z.detach())).sum((0, 1, 3))  # [H]
        for h in range(model.n_heads):
            rows.append({"layer": layer, "head": h, "value": float(est[h]) / base.denominator})
    return pd.DataFrame(rows)
