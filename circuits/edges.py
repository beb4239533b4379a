"""Edges: attribution scores (EAP, EAP-IG), exact edge patching, and edge circuits.

On the graph of :mod:`circuits.graph` an edge u -> v carries u's output into v's input. To
*remove* an edge, v reads u's ablated output (:mod:`circuits.ablation`) instead of its actual
one, everything else unchanged. Three quantities per edge, all as a change in the logit
difference, mean over prompts, ``LD(edge removed) - LD(clean)`` (negative: the edge helps):

- **exact** (:func:`exact_edge_effects`): one forward per edge (batched, from the receiver's
  layer on) with only that edge removed; the quantity the scores approximate (ACDC's edge
  patching).
- **EAP** (Syed et al. 2023): the first-order estimate ``(a_u' - a_u) . dLD/dx_v`` with the
  gradient taken at the clean input of v alone; one forward and one backward for all edges.
- **EAP-IG** (Hanna et al. 2024): the same with the gradient averaged over ``steps`` inputs on
  the straight line from the ablated to the clean embeddings (``alpha = k / steps``,
  ``k = 1..steps``; ``steps = 1`` is EAP).

An **edge circuit** keeps a set of edges; every other edge is removed at once
(:func:`circuit_ld`), so each input reads ``sum over kept u of a_u + sum over removed u of
a_u'``. :func:`prune_dead` drops edges into components whose output reaches the logits through
no kept edge (they cannot change the result; the size is counted after this).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from jaxtyping import Bool, Float
from torch import Tensor

from circuits.ablation import Ablation
from circuits.baseline import PairBatch
from circuits.fastpath import graph_records
from circuits.graph import ModelGraph, Rows
from workbench.engine.call import AttentionCall
from workbench.engine.edits import QKV, MLPInEdit, QKVEdit, Sites
from workbench.errors import WorkbenchError


def _need_graph_values(abl: Ablation) -> None:
    if abl.embed is None or abl.mlp_out is None:
        raise WorkbenchError(
            "this ablation has no embedding / MLP values (the model is not Llama-family)",
            "edge-level methods need a model circuits.graph supports",
        )


def node_deltas(g: ModelGraph, base, abl: Ablation) -> Float[Tensor, "upstream batch pos d_model"]:
    """a_u' - a_u for every upstream node: its ablated minus its clean output."""
    _need_graph_values(abl)
    rc, _ = graph_records(g, base)
    B, T, _ = rc["embed"].shape
    D = torch.empty(g.n_upstream, B, T, g.d, dtype=g.dtype, device=g.device)
    D[0] = abl.embed - rc["embed"]
    for layer in range(g.L):
        n = g.n_before_attn(layer)
        D[n : n + g.H] = g.head_out(layer, abl.z[layer].to(g.dtype) - rc["z"][layer]).permute(2, 0, 1, 3)
        D[n + g.H] = abl.mlp_out[layer] - rc["mlp_out"][layer]
    return D


def split_gradients(g: ModelGraph, base, embeds: Tensor) -> tuple[Tensor, Tensor]:
    """LD and dLD/dx_v for every downstream input v, each input a separate copy of the
    residual stream (so its gradient holds the others fixed). Returns ``(ld [B],
    grads [V, B, T, d])``; the logits input is non-zero at the read-out positions only."""
    pb = base.pb
    rows = g.rows(pb.clean, pb.last)
    B, T, d = embeds.shape
    with torch.enable_grad():
        x0 = embeds.detach().clone().requires_grad_(True)
        resid, taps = x0, []
        for layer in range(g.L):
            xq = resid.unsqueeze(2).expand(B, T, g.H, d).clone()
            xk = resid.unsqueeze(2).expand(B, T, g.Hkv, d).clone()
            xv = resid.unsqueeze(2).expand(B, T, g.Hkv, d).clone()
            for x in (xq, xk, xv):
                x.retain_grad()
            q = g.q_of(layer, g.norm1(layer, xq), rows, split=True)
            k = g.kv_of(layer, g.norm1(layer, xk), rows, "k", split=True)
            v = g.kv_of(layer, g.norm1(layer, xv), rows, "v", split=True)
            resid = resid + g.attn_out(layer, g.attend(layer, q, k, v, rows))
            xm = resid.clone()
            xm.retain_grad()
            resid = resid + g.mlp(layer, xm)
            taps.append((xq, xk, xv, xm))
        xl = g.read_out(resid, rows).clone()
        xl.retain_grad()
        ld = g.unembed_diff(xl, pb.correct, pb.incorrect)
        ld.sum().backward()
    G = torch.zeros(g.n_downstream, B, T, d, dtype=g.dtype, device=g.device)
    for layer, (xq, xk, xv, xm) in enumerate(taps):
        i = g.q_input(layer, 0)
        G[i : i + g.H] = xq.grad.permute(2, 0, 1, 3)
        G[i + g.H : i + g.H + g.Hkv] = xk.grad.permute(2, 0, 1, 3)
        G[i + g.H + g.Hkv : i + g.H + 2 * g.Hkv] = xv.grad.permute(2, 0, 1, 3)
        G[g.mlp_input(layer)] = xm.grad
    G[g.logits_input, torch.arange(B, device=pb.last.device), pb.last] = xl.grad
    return ld.detach(), G


@dataclass
class EdgeScores:
    """Scores ``[downstream, upstream]`` (NaN where there is no edge) and how they were made."""

    graph: ModelGraph
    scores: Float[Tensor, "downstream upstream"]
    method: str

    def ranked(self) -> list[tuple[int, int]]:
        """Existing edges ``(v, u)``, largest |score| first."""
        s = self.scores.abs().nan_to_num(-1.0).flatten()
        n = int(torch.isfinite(self.scores).sum())
        idx = torch.argsort(s, descending=True, stable=True)[:n]
        U = self.scores.shape[1]
        return [(int(i) // U, int(i) % U) for i in idx]

    def frame(self) -> pd.DataFrame:
        g = self.graph
        vs, us = torch.nonzero(torch.isfinite(self.scores), as_tuple=True)
        return pd.DataFrame(
            {
                "upstream": [g.upstream_name(int(u)) for u in us],
                "downstream": [g.downstream_name(int(v)) for v in vs],
                "u": us.numpy(),
                "v": vs.numpy(),
                "score": self.scores[vs, us].numpy(),
                "method": self.method,
            }
        )

    def node_scores(self) -> Float[Tensor, " upstream"]:
        """Sum over each upstream node's out-edges: the first-order effect of ablating the node."""
        return self.scores.nan_to_num(0.0).sum(0)


def edge_attribution(g: ModelGraph, base, abl: Ablation, method: str = "eap-ig", steps: int = 5) -> EdgeScores:
    """EAP (gradient at the clean input) or EAP-IG (``steps`` points from the ablated input)."""
    if method not in ("eap", "eap-ig"):
        raise WorkbenchError(f"unknown edge attribution {method!r}", "use eap or eap-ig")
    if steps < 1:
        raise WorkbenchError(f"integrated gradients need at least one step, got {steps}", "use --ig-steps 1 or more")
    _need_graph_values(abl)
    rc, _ = graph_records(g, base)
    clean, ablated = rc["embed"], abl.embed.to(g.dtype)
    alphas = [1.0] if method == "eap" else [k / steps for k in range(1, steps + 1)]
    G = None
    for a in alphas:
        _, gk = split_gradients(g, base, ablated + a * (clean - ablated))
        G = gk if G is None else G.add_(gk)
    G /= len(alphas)
    D = node_deltas(g, base, abl)
    B = clean.shape[0]
    S = (G.flatten(1) @ D.flatten(1).T).double() / B  # [V, U]
    S[~g.edge_mask().to(S.device)] = float("nan")
    return EdgeScores(g, S.cpu(), method if method == "eap" else f"eap-ig{steps}")


@torch.no_grad()
def exact_edge_effects(g: ModelGraph, base, abl: Ablation, edges: list[tuple[int, int]], max_rows: int = 512) -> Tensor:
    """Patched LD ``[edge, prompt]`` with only edge ``(v, u)`` removed, each by its own forward."""
    rc, _ = graph_records(g, base)
    D = node_deltas(g, base, abl)
    pb = base.pb
    B = pb.size
    bi = torch.arange(B, device=pb.last.device)
    rows = g.rows(pb.clean, pb.last)
    out = torch.empty(len(edges), B, dtype=g.dtype, device=g.device)
    by_layer = _edges_by_layer(g, edges)
    final = rc["resid_pre"][g.L][bi, pb.last]
    for i in by_layer.pop(g.L, []):
        out[i] = g.unembed_diff(final + D[edges[i][1]][bi, pb.last], pb.correct, pb.incorrect)
    per = max(1, max_rows // B)
    for layer, ids in sorted(by_layer.items()):
        h0 = rc["resid_pre"][layer]
        for c in range(0, len(ids), per):
            chunk = ids[c : c + per]
            out[chunk] = _chunk_edge_ld(g, pb, layer, h0, D, rows, [edges[i] for i in chunk]).view(len(chunk), B)
    return out


def _edges_by_layer(g: ModelGraph, edges: list[tuple[int, int]]) -> dict[int, list[int]]:
    """Indices of ``edges`` grouped by the receiver's layer, so each layer's edges share forwards; rejects non-edges."""
    by_layer: dict[int, list[int]] = {}
    for i, (v, u) in enumerate(edges):
        if not (0 <= v < g.n_downstream and 0 <= u < g.n_readable(v)):
            raise WorkbenchError(
                f"no edge {u} -> {v} in this graph", "edges go from an earlier writer to a later reader"
            )
        by_layer.setdefault(g.downstream_layer(v), []).append(i)
    return by_layer


def _split_edges(
    g: ModelGraph, layer: int, chunk: list[tuple[int, int]]
) -> tuple[list[tuple[int, str, int, int]], list[tuple[int, int]]]:
    """Sort a chunk's edges into ``layer``: (variant, q/k/v, head, writer) and (variant, writer) for the MLP input."""
    qkv, mlp_in = [], []
    for j, (v, u) in enumerate(chunk):
        r = v - g.q_input(layer, 0)
        if r == g.H + 2 * g.Hkv:
            mlp_in.append((j, u))
        else:
            which = "q" if r < g.H else ("k" if r < g.H + g.Hkv else "v")
            idx = r if r < g.H else (r - g.H if r < g.H + g.Hkv else r - g.H - g.Hkv)
            qkv.append((j, which, idx, u))
    return qkv, mlp_in


class _EdgeQKV(QKVEdit):
    """Each variant ``j`` of the stacked batch reads upstream node ``u``'s ablated output in one
    q / k / v input of layer ``layer``: the head's input is recomputed from ``h0 + D[u]``."""

    label = "edge q/k/v inputs"

    def __init__(self, g: ModelGraph, layer: int, h0: Tensor, D: Tensor, rows: Rows, B: int, qkv) -> None:
        self.g, self.layer, self.h0, self.D, self.rows, self.B, self.qkv = g, layer, h0, D, rows, B, qkv

    def sites(self) -> Sites:
        return {self.layer: None}

    def edit(self, call: AttentionCall, x: QKV) -> QKV:
        g, layer, B = self.g, self.layer, self.B
        q, k, v = x.query.clone(), x.key.clone(), x.value.clone()  # [rows, head, pos, d_head]
        for j, which, idx, u in self.qkv:
            normed = g.norm1(layer, self.h0 + self.D[u])
            sl = slice(j * B, (j + 1) * B)
            if which == "q":
                q[sl, idx] = g.q_of(layer, normed, self.rows, heads=[idx])[:, :, 0]
            else:
                {"k": k, "v": v}[which][sl, idx] = g.kv_of(layer, normed, self.rows, which, heads=[idx])[:, :, 0]
        return QKV(q, k, v)


class _EdgeMLPIn(MLPInEdit):
    """Variant ``j``'s MLP of layer ``layer`` reads upstream node ``u``'s ablated output (``+ D[u]``)."""

    label = "edge MLP inputs"

    def __init__(self, layer: int, D: Tensor, B: int, mlp_in: list[tuple[int, int]]) -> None:
        self.layer, self.D, self.B, self.mlp_in = layer, D, B, mlp_in

    def sites(self) -> Sites:
        return {self.layer: None}

    def edit(self, call: int, x: Tensor) -> Tensor:
        x = x.clone()
        for j, u in self.mlp_in:
            x[j * self.B : (j + 1) * self.B] += self.D[u]
        return x


def _edge_editors(
    g: ModelGraph,
    layer: int,
    h0: Tensor,
    D: Tensor,
    rows: Rows,
    B: int,
    qkv: list[tuple[int, str, int, int]],
    mlp_in: list[tuple[int, int]],
) -> list[QKVEdit | MLPInEdit]:
    """The interventions that make each variant's input read u's ablated output."""
    edits: list[QKVEdit | MLPInEdit] = [_EdgeQKV(g, layer, h0, D, rows, B, qkv)] if qkv else []
    return edits + ([_EdgeMLPIn(layer, D, B, mlp_in)] if mlp_in else [])


def _chunk_edge_ld(
    g: ModelGraph, pb: PairBatch, layer: int, h0: Tensor, D: Tensor, rows: Rows, chunk: list[tuple[int, int]]
) -> Tensor:
    """LD ``[edge * prompt]`` of a chunk of edges into ``layer``, one stacked forward from that layer on."""
    B = pb.size
    m = len(chunk)
    qkv, mlp_in = _split_edges(g, layer, chunk)
    edits = _edge_editors(g, layer, h0, D, rows, B, qkv, mlp_in)
    rows_m = rows.repeat(m)
    h = g.forward(h0.repeat(m, 1, 1), rows_m, start=layer, edits=edits)
    return g.unembed_diff(g.read_out(h, rows_m), pb.correct.repeat(m), pb.incorrect.repeat(m))


@torch.no_grad()
def circuit_ld(g: ModelGraph, base, abl: Ablation, keep: Bool[Tensor, "downstream upstream"]) -> Tensor:
    """LD ``[prompt]`` of the edge circuit ``keep``: every input reads its kept edges' actual
    outputs and the ablated outputs of all other writers."""
    _need_graph_values(abl)
    rc, _ = graph_records(g, base)
    pb = base.pb
    rows = g.rows(pb.clean, pb.last)
    B, T, d = rc["embed"].shape
    dt = g.dtype
    K = keep.to(device=g.device, dtype=dt)
    D = torch.empty(g.n_upstream, B, T, d, dtype=dt, device=g.device)
    D[0] = rc["embed"] - abl.embed
    S = abl.embed.to(dt).clone()  # sum of every writer's ablated output so far
    for layer in range(g.L):
        n = g.n_before_attn(layer)
        i = g.q_input(layer, 0)

        def mix(rows_: slice, n: int) -> Tensor:
            """S + sum over kept writers u < n of D_u, for each input in ``rows_``: [B, T, inputs, d]."""
            k = K[rows_, :n]
            cols = torch.nonzero(k.any(0)).flatten()
            out = S.unsqueeze(2).expand(B, T, k.shape[0], d)
            if len(cols) == 0:
                return out
            got = k[:, cols] @ D.index_select(0, cols).view(len(cols), -1) if len(cols) < n else k @ D[:n].view(n, -1)
            return out + got.view(k.shape[0], B, T, d).permute(1, 2, 0, 3)

        xq = mix(slice(i, i + g.H), n)
        xk = mix(slice(i + g.H, i + g.H + g.Hkv), n)
        xv = mix(slice(i + g.H + g.Hkv, i + g.H + 2 * g.Hkv), n)
        q = g.q_of(layer, g.norm1(layer, xq), rows, split=True)
        k = g.kv_of(layer, g.norm1(layer, xk), rows, "k", split=True)
        v = g.kv_of(layer, g.norm1(layer, xv), rows, "v", split=True)
        z = g.attend(layer, q, k, v, rows)
        heads_abl = g.head_out(layer, abl.z[layer].to(dt))
        D[n : n + g.H] = (g.head_out(layer, z) - heads_abl).permute(2, 0, 1, 3)
        S = S + heads_abl.sum(2)
        bo = g.layers[layer].bo
        if bo is not None:  # the output bias is no head's: always present
            S = S + bo
        xm = mix(slice(g.mlp_input(layer), g.mlp_input(layer) + 1), n + g.H)[:, :, 0]
        mo = g.mlp(layer, xm)
        D[n + g.H] = mo - abl.mlp_out[layer]
        S = S + abl.mlp_out[layer]
    bi = torch.arange(B, device=pb.last.device)
    cols = torch.nonzero(K[g.logits_input]).flatten()
    final = S[bi, pb.last] + torch.einsum("n,nbd->bd", K[g.logits_input, cols], D.index_select(0, cols)[:, bi, pb.last])
    return g.unembed_diff(final, pb.correct, pb.incorrect)


def _owners(g: ModelGraph, v: int) -> list[int]:
    """The upstream node(s) whose computation input ``v`` feeds."""
    layer, r = divmod(v, g.H + 2 * g.Hkv + 1)
    if r < g.H:
        return [g.head_node(layer, r)]
    if r < g.H + 2 * g.Hkv:
        kv = (r - g.H) % g.Hkv
        return [g.head_node(layer, kv * g.group + j) for j in range(g.group)]
    return [g.mlp_node(layer)]


def prune_dead(g: ModelGraph, keep: Tensor) -> Tensor:
    """Drop kept edges into inputs whose components reach the logits through no kept edge
    (top layer first, so a component that loses its last live reader loses its inputs too)."""
    keep = keep.clone()
    alive_in = torch.zeros(g.n_downstream, dtype=torch.bool)
    alive_in[g.logits_input] = True
    alive = torch.zeros(g.n_upstream, dtype=torch.bool)
    alive[0] = True
    for layer in range(g.L - 1, -1, -1):
        # writers of this layer (heads, then the MLP) are alive if a kept edge leaves them into an alive input
        live_cols = (keep & alive_in[:, None]).any(0)
        mlp = g.mlp_node(layer)
        alive[mlp] = bool(live_cols[mlp])
        if not alive[mlp]:
            keep[g.mlp_input(layer)] = False
        alive_in[g.mlp_input(layer)] = bool(alive[mlp])
        live_cols = (keep & alive_in[:, None]).any(0)
        for h in range(g.H):
            alive[g.head_node(layer, h)] = bool(live_cols[g.head_node(layer, h)])
        for v in range(g.q_input(layer, 0), g.mlp_input(layer)):
            alive_in[v] = any(bool(alive[o]) for o in _owners(g, v))
            if not alive_in[v]:
                keep[v] = False
    return keep


def circuit_size(g: ModelGraph, keep: Tensor) -> dict:
    """Edges, and heads / MLPs with a kept out-edge, of a pruned edge circuit."""
    writers = torch.nonzero(keep.any(0)).flatten().tolist()
    names = [g.upstream_name(u) for u in writers if u > 0]
    return {
        "edges": int(keep.sum()),
        "heads": sum(n.startswith("a") for n in names),
        "mlps": sum(n.startswith("m") for n in names),
    }


def keep_top(g: ModelGraph, ranked: list[tuple[int, int]], k: int) -> Tensor:
    keep = torch.zeros(g.n_downstream, g.n_upstream, dtype=torch.bool)
    if k > 0:
        idx = torch.tensor(ranked[:k])
        keep[idx[:, 0], idx[:, 1]] = True
    return keep


def edge_curve(
    g: ModelGraph,
    base,
    abl: Ablation,
    scores: EdgeScores,
    sizes: list[int] | None = None,
    target: float | None = None,
    log=lambda *a: None,
) -> tuple[pd.DataFrame, dict | None]:
    """Faithfulness F(C)/F(M) of the top-k edge circuits on a log grid of k; with ``target``,
    the smallest k reaching it (bisection between the grid points around the first crossing).
    Returns the curve and the chosen circuit (``None`` when no size reaches the target)."""
    ranked = scores.ranked()
    E = len(ranked)
    ld_clean = float(base.ld_clean.mean())
    if sizes is None:
        sizes = sorted({0, E} | {int(round(x)) for x in np.geomspace(1, E, 28)})
    rows, cache = [], {}

    def evaluate(k: int) -> float:
        if k not in cache:
            keep = prune_dead(g, keep_top(g, ranked, k))
            ld = float(circuit_ld(g, base, abl, keep).mean())
            cache[k] = (ld, keep)
            rows.append({"k": k, **circuit_size(g, keep), "ld": ld, "faithfulness": ld / ld_clean})
        return cache[k][0] / ld_clean

    for k in sizes:
        evaluate(k)
    chosen = None
    if target is not None:
        grid = sorted(sizes)
        hit = next((i for i, k in enumerate(grid) if evaluate(k) >= target), None)
        if hit is not None:
            lo, hi = (grid[hit - 1], grid[hit]) if hit > 0 else (grid[0], grid[0])
            while hi - lo > 1:
                mid = (lo + hi) // 2
                if evaluate(mid) >= target:
                    hi = mid
                else:
                    lo = mid
            ld, keep = cache[hi]
            chosen = {"k": hi, "keep": keep, "ld": ld, "faithfulness": ld / ld_clean, **circuit_size(g, keep)}
            log(
                f"edge circuit: {chosen['edges']} edges ({chosen['heads']} heads, {chosen['mlps']} MLPs) "
                f"reach F = {chosen['faithfulness']:.3f} >= {target}"
            )
        else:
            log(f"edge circuit: no size reaches F >= {target} (best {max(r['faithfulness'] for r in rows):.3f})")
    curve = pd.DataFrame(rows).sort_values("k").reset_index(drop=True)
    return curve, chosen
