"""Activation, path and attribution patching per head, batched (docs/metrics.md, "Circuits").

Every experiment compares a clean prompt x with a corrupted x' of the same length. The metric is
the logit difference LD = logit(correct) - logit(incorrect) at the last position, and effects
are reported normalised as (LD_patched - LD_clean) / (LD_clean - LD_corrupted): 0 = no effect,
-1 = the whole behaviour destroyed (means over prompts are taken before normalising); the
column ``ld`` keeps the mean patched LD itself.

Heads are edited at their output z (before W_O) and, for path-patching receivers, at their
queries / keys / values, through the ``"workbench"`` attention hook (:mod:`workbench.attention`).
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
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import numpy as np
import pandas as pd
import torch
from jaxtyping import Float, Int
from torch import Tensor

from circuits.tasks import Pair, check_pair
from workbench.attention import AttentionCall, hooked_run
from workbench.errors import WorkbenchError, WorkbenchWarning
from workbench.extraction import base_network
from workbench.patterns import BatchInfo, collate
from workbench.prompts import pad_token_id

Head = tuple[int, int]
COMPONENTS = ("z", "resid_pre", "attn_out", "mlp_out")


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
    return PairBatch(clean, corrupted, clean.lengths - 1, t([p.correct for p in pairs]), t([p.incorrect for p in pairs]))


def _repeat(batch: BatchInfo, m: int) -> BatchInfo:
    r = lambda x: x.repeat(m, *([1] * (x.dim() - 1)))  # noqa: E731
    return BatchInfo(batch.prompt_ids * m, r(batch.input_ids), r(batch.attention_mask), r(batch.positions), r(batch.lengths), r(batch.first_index))


def final_softcap(hf_model: torch.nn.Module, logits: Tensor) -> Tensor:
    """The head's logits as the model's own forward returns them: Gemma 2 soft-caps them,
    ``c tanh(logit / c)`` with ``c = final_logit_softcapping``; others leave them as they are."""
    cap = getattr(hf_model.config.get_text_config(), "final_logit_softcapping", None)
    return logits if not cap else cap * torch.tanh(logits / cap)


def logit_diff(model, batch: BatchInfo, pb: PairBatch, m: int = 1, observers: Sequence[object] = (), grad: bool = False) -> Float[Tensor, " rows"]:
    """LD at each prompt's last position; only the last positions go through the unembedding."""
    with hooked_run(model.hf_model, *observers, grad=grad):
        hidden = base_network(model.hf_model)(
            input_ids=batch.input_ids, attention_mask=batch.attention_mask, position_ids=batch.positions.clamp_min(0), use_cache=False
        ).last_hidden_state
        rows = torch.arange(hidden.shape[0], device=hidden.device)
        logits = final_softcap(model.hf_model, model.hf_model.get_output_embeddings()(hidden[rows, pb.last.repeat(m)]))
        return logits.gather(1, pb.correct.repeat(m)[:, None])[:, 0] - logits.gather(1, pb.incorrect.repeat(m)[:, None])[:, 0]


class ZRecorder:
    """Observer that keeps every layer's z (and, optionally, q / k / v)."""

    def __init__(self, qkv_layers: set[int] = frozenset()) -> None:
        self.z: dict[int, Tensor] = {}
        self.qkv: dict[int, tuple[Tensor, Tensor, Tensor]] = {}
        self.qkv_layers = set(qkv_layers)

    def edit_qkv(self, call: AttentionCall):
        if call.layer in self.qkv_layers:
            self.qkv[call.layer] = (call.query.detach(), call.key.detach(), call.value.detach())
        return call.query, call.key, call.value

    def edit_z(self, call: AttentionCall, z: Tensor) -> Tensor:
        self.z[call.layer] = z.detach()
        return z


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
        base_network(model.hf_model)(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                                     position_ids=batch.positions.clamp_min(0), use_cache=False)


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


class _VariantZPatcher:
    """z edits for m stacked variants: mask[layer] is [m, T or 1, H]; True = take corrupted z.

    Before the variants fork (layers run on the un-repeated batch, see :func:`_fork_at`) the
    run is the clean run, so z passes through unchanged."""

    def __init__(self, base: Baseline, m: int, masks: dict[int, Tensor], freeze: bool) -> None:
        self.base, self.m, self.masks, self.freeze = base, m, masks, freeze

    def replaces_z(self, call: AttentionCall) -> bool:
        return self.freeze and call.query.shape[0] == self.m * self.base.pb.size

    def edit_z(self, call: AttentionCall, z: Tensor) -> Tensor:
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


class _QKVPatcher:
    """q / k / v edits for stacked variants: values[layer] = (which, head, tensor [m*b, T, d]);
    with ``last`` (``[m*b]``) only each row's read-out position is patched."""

    def __init__(self, patches: dict[int, list[tuple[str, int, Tensor]]], last: Tensor | None = None) -> None:
        self.patches, self.last = patches, last

    def edit_qkv(self, call: AttentionCall):
        q, k, v = call.query, call.key, call.value
        todo = self.patches.get(call.layer)
        if not todo:
            return q, k, v
        q, k, v = q.clone(), k.clone(), v.clone()
        for which, idx, value in todo:
            t = {"q": q, "k": k, "v": v}[which]
            if self.last is None:
                t[:, idx] = value
            else:
                r = torch.arange(t.shape[0], device=t.device)
                t[r, idx, self.last] = value[r, self.last]
        return q, k, v


@contextlib.contextmanager
def _fork_at(model, layer: int, m: int, b: int):
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

    handles = [blk.register_forward_pre_hook(pre, with_kwargs=True) for blk in _blocks(model)[layer:]]
    try:
        yield True
    finally:
        for h in handles:
            h.remove()


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


def activation_patching(model, pairs: Sequence[Pair] | Baseline, component: str = "z", per_position: bool = False,
                        heads: Sequence[Head] | None = None, max_rows: int = 512, n_boot: int = 0) -> pd.DataFrame:
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
        units = [(l, h, p) for l, h in (heads or [(l, h) for l in range(model.n_layers) for h in range(model.n_heads)]) for p in positions]
    else:
        units = [(l, -1, p) for l in range(model.n_layers) for p in positions]
    per_chunk = max(1, max_rows // b)
    lds = []
    for sl in _chunks(len(units), per_chunk):
        chunk = units[sl]
        m = len(chunk)
        batch = _repeat(base.pb.clean, m)
        if component == "z":
            masks: dict[int, Tensor] = {}
            for i, (l, h, p) in enumerate(chunk):
                mk = masks.setdefault(l, torch.zeros(m, T, model.n_heads, dtype=torch.bool, device=model.device))
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
    out = pd.DataFrame({"component": component, "layer": [u[0] for u in units], "head": [u[1] for u in units],
                        "position": [u[2] for u in units], "value": eff, "ld": ld.double().mean(1).cpu().numpy()})
    if n_boot > 0:
        out["ci_low"], out["ci_high"] = lo, hi
    return out


def _blocks(model) -> list:
    return list(model.bridge.blocks)


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
        rows = [(i, p) for i, (l, _, p) in enumerate(chunk) if l == layer]

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
    block = _blocks(model)[layer]
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
    handles = [_hook(model, l, component, lambda t, l=l: store.__setitem__(l, t.detach()) or t) for l in range(model.n_layers)]
    try:
        logit_diff(model, base.pb.corrupted, base.pb)
    finally:
        for h in handles:
            h.remove()
    return store


def path_patching(model, pairs: Sequence[Pair] | Baseline, senders: Sequence[Head] | None = None,
                  receivers: Sequence[tuple[int, int, str]] | None = None, max_rows: int = 512, n_boot: int = 0,
                  engine: str = "auto", positions: str = "all") -> pd.DataFrame:
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
    recv = list(receivers or [])
    for l, h, which in recv:
        if which not in ("q", "k", "v") or not (0 <= l < model.n_layers and 0 <= h < model.n_heads):
            raise WorkbenchError(f"bad receiver {l}.{h}.{which}", "receivers are LAYER.HEAD with q, k or v, inside the model")
    first_recv = min((l for l, _, _ in recv), default=model.n_layers)
    if senders is None:
        senders = [(l, h) for l in range(first_recv) for h in range(model.n_heads)]
    senders = list(senders)
    if not senders:
        raise WorkbenchError("no sender heads precede the receivers", "choose receivers in later layers")
    late = [s for s in senders if s[0] >= first_recv]
    if late:
        raise WorkbenchError(f"sender {late[0][0]}.{late[0][1]} does not precede receiver layer {first_recv}",
                             "receivers must be in later layers than all senders")
    if positions not in ("all", "last"):
        raise WorkbenchError(f"unknown receiver positions {positions!r}", "use all or last")
    if g is not None:
        from circuits import fastpath

        ld = fastpath.to_receivers(g, base, senders, recv, max_rows, positions) if recv else fastpath.to_logits(g, base, senders)
        return _path_frame(base, senders, ld, recv, n_boot)
    b = base.pb.size
    group = model.n_heads // model.n_kv_heads
    order = sorted(range(len(senders)), key=lambda i: senders[i])  # chunks of nearby layers fork late
    senders = [senders[i] for i in order]
    per_chunk = max(1, max_rows // b)
    lds = []
    for sl in _chunks(len(senders), per_chunk):
        chunk = senders[sl]
        m = len(chunk)
        masks: dict[int, Tensor] = {}
        for i, (l, h) in enumerate(chunk):
            masks.setdefault(l, torch.zeros(m, 1, model.n_heads, dtype=torch.bool, device=model.device))[i, 0, h] = True
        frozen = _VariantZPatcher(base, m, masks, freeze=True)
        with _fork_at(model, min(l for l, _ in chunk), m, b) as forked:
            batch = base.pb.clean if forked else _repeat(base.pb.clean, m)
            if not recv:
                lds.append(logit_diff(model, batch, base.pb, m, [frozen]))
                continue
            rec = ZRecorder(qkv_layers={l for l, _, _ in recv})
            logit_diff(model, batch, base.pb, m, [rec, frozen])
        patches: dict[int, list] = {}
        for l, h, which in recv:
            q, k, v = rec.qkv[l]
            idx = h if which == "q" else h // group
            src = {"q": q, "k": k, "v": v}[which][:, idx]
            patches.setdefault(l, []).append((which, idx, src))
        with _fork_at(model, first_recv, m, b) as forked:
            batch = base.pb.clean if forked else _repeat(base.pb.clean, m)
            lds.append(logit_diff(model, batch, base.pb, m, [_QKVPatcher(patches, base.pb.last.repeat(m) if positions == "last" else None)]))
    ld = torch.cat(lds).view(len(senders), b)
    ld[torch.tensor(order)] = ld.clone()  # back to the caller's order
    senders = [senders[order.index(i)] for i in range(len(order))]
    return _path_frame(base, senders, ld, recv, n_boot)


def _path_frame(base: Baseline, senders: list[Head], ld: Tensor, recv: list, n_boot: int) -> pd.DataFrame:
    eff, lo, hi = _effects(base, ld, n_boot)
    out = pd.DataFrame({"layer": [s[0] for s in senders], "head": [s[1] for s in senders], "value": eff,
                        "ld": ld.double().mean(1).cpu().numpy(),
                        "receiver": "logits" if not recv else ",".join(f"{l}.{h}.{w}" for l, h, w in recv)})
    if n_boot > 0:
        out["ci_low"], out["ci_high"] = lo, hi
    return out


class _GradZ:
    def __init__(self) -> None:
        self.z: dict[int, Tensor] = {}

    def edit_z(self, call: AttentionCall, z: Tensor) -> Tensor:
        z.retain_grad()
        self.z[call.layer] = z
        return z


def attribution_patching(model, pairs: Sequence[Pair] | Baseline) -> pd.DataFrame:
    """First-order estimate of every head's activation-patching effect: one forward, one backward."""
    base = pairs if isinstance(pairs, Baseline) else baseline(model, pairs)
    params = [p for p in model.hf_model.parameters() if p.requires_grad]
    for p in params:
        p.requires_grad_(False)
    emb = model.hf_model.get_input_embeddings()
    handle = emb.register_forward_hook(lambda mod, a, out: out.requires_grad_(True))
    rec = _GradZ()
    try:
        ld = logit_diff(model, base.pb.clean, base.pb, observers=[rec], grad=True)
        ld.mean().backward()
    finally:
        handle.remove()
        for p in params:
            p.requires_grad_(True)
    rows = []
    for layer in range(model.n_layers):
        z = rec.z[layer]
        # the gradient of the mean LD already carries 1/N: the sum over pairs is the mean estimate
        est = (z.grad * (base.z_corrupted[layer] - z.detach())).sum((0, 1, 3))  # [H]
        for h in range(model.n_heads):
            rows.append({"layer": layer, "head": h, "value": float(est[h]) / base.denominator})
    return pd.DataFrame(rows)
