"""Path patching on the explicit graph, computing only the positions the read-out needs.

In a path-patching run every head except the sender is frozen at its clean output. A frozen
head's output does not depend on the current residual stream, so *no attention mixes
positions* in that run: between the sender's layer and the read-out, each position's residual
evolves on its own (the frozen attention adds the clean attention output, the MLP acts on that
position alone). Hence:

- **sender -> logits**: only the final position matters. Start from the clean residual at the
  sender's layer at that one position, add the clean attention outputs and the sender's change
  ``W_O^s (z'_s - z_s)``, recompute the MLPs there, unembed. One row per (sender, prompt)
  instead of a full forward of every position: the work drops by the sequence length and by
  the layers below the sender.
- **sender -> receiver q / k / v** (first run): every position is still independent, so no
  attention is computed between the sender and the receiver's layer; the receiver's input is
  read at its layer. The second run (the clean run with the receiver's q / k / v patched) is a
  normal forward from the receiver's layer on.

:func:`tests.test_patching` proves both equal to full recomputation (the attention-hook
implementation and a serial one with plain transformers hooks).
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from circuits.graph import ModelGraph, Rows
from workbench.engine.call import AttentionCall
from workbench.engine.edits import QKV, QKVEdit, Sites

Head = tuple[int, int]


def graph_records(g: ModelGraph, base) -> tuple[dict, dict]:
    """The clean and corrupted runs recorded by the explicit forward (cached on ``base``)."""
    key = ("graph", id(g))
    if key not in base.cache:
        pb = base.pb
        rc, rx = {}, {}
        with torch.no_grad():
            g.logit_diff(pb.clean, pb.last, pb.correct, pb.incorrect, record=rc)
            g.logit_diff(pb.corrupted, pb.last, pb.correct, pb.incorrect, record=rx)
        base.cache[key] = (rc, rx)
    return base.cache[key]


def graph_baseline(g: ModelGraph, model, pairs):
    """A :class:`~circuits.baseline.Baseline` from the graph's own clean and corrupted runs
    (the attention-hook runs of :func:`~circuits.baseline.baseline` would repeat them)."""
    from circuits.baseline import Baseline, pair_batch

    pb = pair_batch(model, pairs)
    rc, rx = {}, {}
    with torch.no_grad():
        ld_c = g.logit_diff(pb.clean, pb.last, pb.correct, pb.incorrect, record=rc)
        ld_x = g.logit_diff(pb.corrupted, pb.last, pb.correct, pb.incorrect, record=rx)
    base = Baseline(pb, ld_c, ld_x, rc["z"], rx["z"], pairs=list(pairs))
    base.cache[("graph", id(g))] = (rc, rx)
    return base


def _chunks_by_layer(senders: Sequence[Head], per_chunk: int) -> list[list[int]]:
    order = sorted(range(len(senders)), key=lambda i: senders[i])
    return [order[i : i + per_chunk] for i in range(0, len(order), per_chunk)]


@torch.no_grad()
def to_logits(g: ModelGraph, base, senders: Sequence[Head], max_rows: int = 1 << 14) -> Tensor:
    """Mean-free patched LD ``[sender, prompt]`` of every sender -> logits path."""
    rc, rx = graph_records(g, base)
    pb = base.pb
    B = pb.size
    bi, last = torch.arange(B, device=pb.last.device), pb.last
    out = torch.empty(len(senders), B, dtype=g.dtype, device=g.device)
    for chunk in _chunks_by_layer(senders, max(1, max_rows // B)):
        h: Tensor | None = None
        ids: list[int] = []
        for layer in range(senders[chunk[0]][0], g.L):
            new = [i for i in chunk if senders[i][0] == layer]
            if new:  # these variants equal the clean run up to here: start them from it
                start = rc["resid_pre"][layer][bi, last].expand(len(new), B, g.d)
                h = start.clone() if h is None else torch.cat([h, start])
                ids += new
            if h is None:
                continue
            h = h + rc["attn_out"][layer][bi, last]
            if new:
                heads = [senders[i][1] for i in new]
                dz = (rx["z"][layer] - rc["z"][layer])[bi, last][:, heads]  # [B, n, d_head]
                delta = g.head_out(layer, dz[:, None], heads)[:, 0]  # [B, n, d]
                h[-len(new) :] += delta.transpose(0, 1)
            h = h + g.mlp(layer, h)
        out[ids] = g.unembed_diff(h, pb.correct, pb.incorrect)
    return out


@torch.no_grad()
def to_receivers(
    g: ModelGraph,
    base,
    senders: Sequence[Head],
    receivers: Sequence[tuple[int, int, str]],
    max_rows: int = 512,
    positions: str = "all",
) -> Tensor:
    """Patched LD ``[sender, prompt]`` of sender -> receiver q / k / v paths (patched together),
    the receivers' inputs patched at every position, or with ``positions="last"`` at the
    read-out position only (Wang et al.'s END)."""
    if positions == "last":
        return _to_receivers_last(g, base, senders, receivers)
    rc, rx = graph_records(g, base)
    pb = base.pb
    B = pb.size
    rows = g.rows(pb.clean, pb.last)
    first, top = min(r[0] for r in receivers), max(r[0] for r in receivers)
    out = torch.empty(len(senders), B, dtype=g.dtype, device=g.device)
    for chunk in _chunks_by_layer(senders, max(1, max_rows // B)):
        m = len(chunk)
        got = _run1_receiver_inputs(g, rc, rx, rows, senders, chunk, receivers, top)
        # run 2: the clean run with the receivers' inputs patched, from the first receiver's layer
        edit = ReceiverPatch(_receiver_patches(g, got, m, B))
        rows_m = rows.repeat(m)
        hh = g.forward(rc["resid_pre"][first].repeat(m, 1, 1), rows_m, start=first, edits=[edit])
        ld = g.unembed_diff(g.read_out(hh, rows_m), pb.correct.repeat(m), pb.incorrect.repeat(m))
        out[chunk] = ld.view(m, B)
    return out


def _receiver_inputs(
    g: ModelGraph, layer: int, normed: Tensor, rows: Rows, here: Sequence[tuple[int, int, str]]
) -> dict[tuple[int, int, str], Tensor]:
    """The q / k / v (a k / v receiver reads its group's KV head) of the receivers in ``layer``, head axis kept."""
    got: dict[tuple[int, int, str], Tensor] = {}
    for lr, hr, which in here:
        if which == "q":
            got[(lr, hr, which)] = g.q_of(layer, normed, rows, heads=[hr])
        else:
            got[(lr, hr, which)] = g.kv_of(layer, normed, rows, which, heads=[hr // g.group])
    return got


def _run1_receiver_inputs(
    g: ModelGraph,
    rc: dict,
    rx: dict,
    rows: Rows,
    senders: Sequence[Head],
    chunk: list[int],
    receivers: Sequence[tuple[int, int, str]],
    top: int,
) -> dict[tuple[int, int, str], Tensor]:
    """Run 1 for one chunk: the receivers' inputs ``[m, B, T, d_head]`` along each sender's path, every position."""
    m, l0 = len(chunk), senders[chunk[0]][0]
    # run 1: every head frozen but the sender -> positions independent, no attention needed
    h = rc["resid_pre"][l0].unsqueeze(0).repeat(m, 1, 1, 1)  # [m, B, T, d]
    got: dict[tuple[int, int, str], Tensor] = {}
    for layer in range(l0, top + 1):
        here = [r for r in receivers if r[0] == layer]
        if here:
            normed = g.norm1(layer, h)
            got.update({key: t[..., 0, :] for key, t in _receiver_inputs(g, layer, normed, rows, here).items()})
        if layer == top:
            break
        h = h + rc["attn_out"][layer]
        idx = [j for j, i in enumerate(chunk) if senders[i][0] == layer]
        if idx:
            heads = [senders[chunk[j]][1] for j in idx]
            delta = g.head_out(layer, (rx["z"][layer] - rc["z"][layer])[:, :, heads], heads)  # [B, T, n, d]
            h[idx] += delta.permute(2, 0, 1, 3)
        h = h + g.mlp(layer, h)
    return got


def _receiver_patches(
    g: ModelGraph, got: dict[tuple[int, int, str], Tensor], m: int, B: int
) -> dict[int, list[tuple[str, int, Tensor]]]:
    """Run 1's receiver inputs as run 2's patches per layer: (which, q or KV head, value ``[m*B, T, d_head]``)."""
    patches: dict[int, list[tuple[str, int, Tensor]]] = {}
    for (lr, hr, which), val in got.items():
        patches.setdefault(lr, []).append(
            (which, hr if which == "q" else hr // g.group, val.reshape(m * B, *val.shape[2:]))
        )
    return patches


class ReceiverPatch(QKVEdit):
    """Write ``patches`` (per layer: ``(which, head or KV head, value [rows, pos, d_head])``) into
    the receivers' queries / keys / values."""

    label = "receiver q/k/v patch"

    def __init__(self, patches: dict[int, list[tuple[str, int, Tensor]]]) -> None:
        self.patches = patches

    def sites(self) -> Sites:
        return {layer: None for layer in self.patches}

    def edit(self, call: AttentionCall, x: QKV) -> QKV:
        todo = self.patches.get(call.layer)
        if not todo:
            return x
        q, k, v = x.query.clone(), x.key.clone(), x.value.clone()  # [rows, head, pos, d_head]
        for which, idx, val in todo:
            {"q": q, "k": k, "v": v}[which][:, idx] = val
        return QKV(q, k, v)


@torch.no_grad()
def _to_receivers_last(
    g: ModelGraph, base, senders: Sequence[Head], receivers: Sequence[tuple[int, int, str]]
) -> Tensor:
    """Receivers patched at the read-out position only: both runs live at that one position.

    Run 1 is :func:`to_logits` stopped at the receivers' layer. In run 2 only the read-out
    position's residual changes (a patched query, key or value there is read by that position
    alone, under the causal mask), so each later layer computes one query row against the
    clean keys / values of the other positions: a decoding step per (sender, prompt)."""
    rc, rx = graph_records(g, base)
    pb = base.pb
    B, S = pb.size, len(senders)
    bi, last = torch.arange(B, device=pb.last.device), pb.last
    rows = g.rows(pb.clean, pb.last)
    first, top = min(r[0] for r in receivers), max(r[0] for r in receivers)
    one = lambda t: t[bi, last][:, None]  # noqa: E731  [B, 1, ...] at the read-out position
    cos, sin = one(rows.cos), one(rows.sin)
    r1 = Rows(cos, sin, rows.mask[bi, :, last][:, :, None], torch.zeros_like(last))
    got = _last_run1(g, rc, rx, bi, last, r1, senders, receivers, top)
    # run 2: clean run from the first receiver's layer, the read-out position recomputed alone
    rm = Rows(
        cos.repeat(S, 1, 1, 1), sin.repeat(S, 1, 1, 1), rows.mask[bi, :, last][:, :, None].repeat(S, 1, 1, 1), None
    )
    x = _last_run2(g, rc, got, rm, bi, last, S, first)
    return g.unembed_diff(x[:, 0], pb.correct.repeat(S), pb.incorrect.repeat(S)).view(S, B)


def _last_run1(
    g: ModelGraph,
    rc: dict,
    rx: dict,
    bi: Tensor,
    last: Tensor,
    r1: Rows,
    senders: Sequence[Head],
    receivers: Sequence[tuple[int, int, str]],
    top: int,
) -> dict[tuple[int, int, str], Tensor]:
    """Run 1 at the read-out position: the receivers' inputs ``[S, B, d_head]`` along every sender's path."""
    S, B = len(senders), len(bi)
    # run 1: every sender's path to the receivers' layer, at the read-out position
    h = rc["resid_pre"][0][bi, last].new_zeros(S, B, g.d)
    started = torch.zeros(S, dtype=torch.bool)
    got: dict[tuple[int, int, str], Tensor] = {}
    for layer in range(min(s[0] for s in senders), top + 1):
        new = [i for i, s in enumerate(senders) if s[0] == layer]
        if new:
            h[new] = rc["resid_pre"][layer][bi, last]
            started[new] = True
        here = [r for r in receivers if r[0] == layer]
        if here:
            normed = g.norm1(layer, h)[:, :, None]  # [S, B, 1, d]
            got.update({key: t[:, :, 0, 0] for key, t in _receiver_inputs(g, layer, normed, r1, here).items()})
        if layer == top:
            break
        h[started] += rc["attn_out"][layer][bi, last]
        if new:
            heads = [senders[i][1] for i in new]
            dz = (rx["z"][layer] - rc["z"][layer])[bi, last][:, heads]
            h[new] += g.head_out(layer, dz[:, None], heads)[:, 0].transpose(0, 1)
        h[started] = h[started] + g.mlp(layer, h[started])
    return got


def _last_run2(
    g: ModelGraph,
    rc: dict,
    got: dict[tuple[int, int, str], Tensor],
    rm: Rows,
    bi: Tensor,
    last: Tensor,
    S: int,
    first: int,
) -> Tensor:
    """Run 2 at the read-out position: its residual ``[S*B, 1, d]`` after the last layer, receivers patched."""
    B = len(bi)
    x = rc["resid_pre"][first][bi, last].expand(S, B, g.d).reshape(S * B, 1, g.d)
    rr = torch.arange(S * B, device=x.device)
    lastm = last.repeat(S)
    for layer in range(first, g.L):
        normed = g.norm1(layer, x)
        q, k1, v1 = g.q_of(layer, normed, rm), g.kv_of(layer, normed, rm, "k"), g.kv_of(layer, normed, rm, "v")
        for (lr, hr, which), val in got.items():
            if lr == layer:
                t = {"q": q, "k": k1, "v": v1}[which]
                t[:, 0, hr if which == "q" else hr // g.group] = val.reshape(S * B, -1)
        K = rc["k"][layer].repeat(S, 1, 1, 1)  # [S*B, T, kv, d]: clean keys / values of every position
        V = rc["v"][layer].repeat(S, 1, 1, 1)
        K[rr, lastm], V[rr, lastm] = k1[:, 0], v1[:, 0]
        z = g.attend(layer, q, K, V, rm)
        x = x + g.attn_out(layer, z)
        x = x + g.mlp(layer, x)
    return x
