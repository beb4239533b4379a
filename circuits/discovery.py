"""Circuit discovery (edge attribution + a faithfulness target, or iterative path patching), overlap.

:func:`discover_circuit` starts from the logits: every head is path-patched as a sender to the
logits, and heads whose normalised effect exceeds ``threshold`` in absolute value become nodes.
Each round, the strongest new nodes (at most ``max_receivers``) become receivers: every head in
an earlier layer is path-patched into their queries, keys and values together, and senders over
``inner_threshold`` join the circuit with an edge ``sender -> receiver``. The result is a graph
(nodes = heads, edges = paths with their effects).

:func:`find_circuit` is the discovery the CLI runs: edges scored by EAP-IG (and EAP, both
checked against exact edge patching on a sample), then the smallest head circuit and the
smallest edge circuit reaching a faithfulness target under a named ablation, with the
faithfulness-vs-size curves, completeness and minimality (:mod:`circuits.faithfulness`).

:func:`faithfulness`: F(C) / F(M) with every head outside the circuit ablated (per-template-
position mean over the corrupted prompts by default). :func:`overlap`: Jaccard index and recall
of one circuit in another.
Roles: :func:`label_roles` names heads from the graph (direct effect on the logits, writers
into a logit head's query) and from the pattern scores of the ``induction`` probe.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Sequence

import pandas as pd

from circuits.ablation import Ablation, make_ablation
from circuits.baseline import Baseline, baseline
from circuits.faithfulness import Evaluator
from circuits.faithfulness import faithfulness as measure_faithfulness
from circuits.patching import path_patching
from circuits.tasks import Pair
from workbench.errors import WorkbenchError

if TYPE_CHECKING:
    from circuits.edges import EdgeScores
    from circuits.graph import ModelGraph

Head = tuple[int, int]


@dataclass
class Circuit:
    nodes: pd.DataFrame  # layer, head, effect, round
    edges: pd.DataFrame  # sender_layer, sender_head, receiver_layer, receiver_head, receiver, effect
    info: dict = field(default_factory=dict)

    @property
    def heads(self) -> list[Head]:
        return [(int(r.layer), int(r.head)) for r in self.nodes.itertuples()]

    def to_json(self) -> dict:
        return {"nodes": self.nodes.to_dict("records"), "edges": self.edges.to_dict("records"), **self.info}


def discover_circuit(
    model,
    pairs: Sequence[Pair] | Baseline,
    threshold: float = 0.05,
    max_rounds: int = 3,
    max_receivers: int = 6,
    max_rows: int = 512,
    log=lambda *a: None,
    inner_threshold: float | None = None,
) -> Circuit:
    """``threshold`` applies to paths into the logits; ``inner_threshold`` (default threshold / 2)
    to paths into a receiver head's q/k/v, which carry only part of that head's effect."""
    inner = threshold / 2 if inner_threshold is None else inner_threshold
    base = pairs if isinstance(pairs, Baseline) else baseline(model, pairs)
    nodes: dict[Head, dict] = {}
    edges: list[dict] = []
    direct = path_patching(model, base, max_rows=max_rows)
    frontier = []
    for r in direct.itertuples():
        if abs(r.value) > threshold:
            nodes[(r.layer, r.head)] = {"layer": r.layer, "head": r.head, "effect": r.value, "round": 1}
            edges.append(
                {
                    "sender_layer": r.layer,
                    "sender_head": r.head,
                    "receiver_layer": model.n_layers,
                    "receiver_head": -1,
                    "receiver": "logits",
                    "effect": r.value,
                }
            )
            frontier.append((r.layer, r.head, abs(r.value)))
    log(f"round 1: {len(nodes)} heads act on the logits directly")
    for rnd in range(2, max_rounds + 1):
        frontier = sorted(frontier, key=lambda t: -t[2])[:max_receivers]
        new = []
        for layer, h, _ in frontier:
            if layer == 0:
                continue
            res = path_patching(model, base, receivers=[(layer, h, w) for w in ("q", "k", "v")], max_rows=max_rows)
            for r in res.itertuples():
                if abs(r.value) > inner:
                    edges.append(
                        {
                            "sender_layer": r.layer,
                            "sender_head": r.head,
                            "receiver_layer": layer,
                            "receiver_head": h,
                            "receiver": f"{layer}.{h}",
                            "effect": r.value,
                        }
                    )
                    if (r.layer, r.head) not in nodes:
                        nodes[(r.layer, r.head)] = {"layer": r.layer, "head": r.head, "effect": r.value, "round": rnd}
                        new.append((r.layer, r.head, abs(r.value)))
        log(f"round {rnd}: {len(new)} new heads")
        if not new:
            break
        frontier = new
    node_df = pd.DataFrame(list(nodes.values()), columns=["layer", "head", "effect", "round"])
    edge_df = pd.DataFrame(
        edges, columns=["sender_layer", "sender_head", "receiver_layer", "receiver_head", "receiver", "effect"]
    )
    info = {
        "threshold": threshold,
        "inner_threshold": inner,
        "ld_clean": float(base.ld_clean.mean()),
        "ld_corrupted": float(base.ld_corrupted.mean()),
    }
    return Circuit(node_df.sort_values(["layer", "head"]).reset_index(drop=True), edge_df, info)


def faithfulness(
    model,
    pairs: Sequence[Pair] | Baseline,
    heads: Sequence[Head],
    ablation: str | Ablation = "mean",
    reference: Sequence[Pair] | None = None,
) -> dict:
    """F(C) / F(M) with every head outside ``heads`` ablated (default: per-template-position mean
    over the corrupted prompts of ``reference``, else of the pairs); see :mod:`circuits.faithfulness`."""
    base = pairs if isinstance(pairs, Baseline) else baseline(model, pairs)
    abl = ablation if isinstance(ablation, Ablation) else make_ablation(model, base, ablation, reference)
    return measure_faithfulness(Evaluator(model, base, abl), heads)


def overlap(a: Sequence[Head], b: Sequence[Head]) -> dict:
    sa, sb = set(map(tuple, a)), set(map(tuple, b))
    inter = len(sa & sb)
    return {
        "jaccard": inter / max(1, len(sa | sb)),
        "recall_a_in_b": inter / max(1, len(sa)),
        "recall_b_in_a": inter / max(1, len(sb)),
        "shared": sorted(sa & sb),
        "n_a": len(sa),
        "n_b": len(sb),
    }


def label_roles(
    circuit: Circuit, pattern_scores: pd.DataFrame | None = None, task: str = "ioi", cutoff: float = 0.3
) -> pd.DataFrame:
    """Name each node by the evidence: its direct effect on the logits, whether it writes into a
    logit head, and its induction-probe scores (prev_token / duplicate / induction > cutoff)."""
    nodes = circuit.nodes.copy()
    direct = {
        (int(e.sender_layer), int(e.sender_head)): e.effect
        for e in circuit.edges.itertuples()
        if e.receiver == "logits"
    }
    logit_heads = {f"{layer}.{h}" for layer, h in direct}
    feeds = {(int(e.sender_layer), int(e.sender_head)) for e in circuit.edges.itertuples() if e.receiver in logit_heads}
    scores = {}
    if pattern_scores is not None:
        for r in pattern_scores.itertuples():
            scores.setdefault((int(r.layer), int(r.head)), {})[r.metric] = r.value
    roles = []
    for r in nodes.itertuples():
        key, tags = (int(r.layer), int(r.head)), []
        if key in direct:
            if task == "ioi":
                tags.append("name mover" if direct[key] < 0 else "negative name mover")
            else:
                tags.append("direct (lowers LD when patched)" if direct[key] < 0 else "direct (raises LD when patched)")
        if key in feeds:  # writes into a logit head's q/k/v; IOI calls the indirect ones S-inhibition
            tags.append("S-inhibition" if task == "ioi" and key not in direct else "feeds a logit head")
        sc = scores.get(key, {})
        for metric, name in (
            ("induction", "induction"),
            ("duplicate", "duplicate-token"),
            ("prev_token", "previous-token"),
        ):
            if sc.get(metric, 0) > cutoff:
                tags.append(name)
        roles.append(", ".join(tags) or "other")
    nodes["role"] = roles
    return nodes


@dataclass
class CircuitReport:
    """Everything :func:`find_circuit` measured; ``info`` is JSON-ready (circuit.json)."""

    info: dict
    nodes: pd.DataFrame  # the head circuit: layer, head, score, direct, minimality, role
    edges: pd.DataFrame  # the edge circuit: upstream, downstream, score
    head_curve: pd.DataFrame
    edge_curve: pd.DataFrame
    scores: object = None  # EdgeScores of the ranking method

    @property
    def heads(self) -> list[Head]:
        return [(int(r.layer), int(r.head)) for r in self.nodes.itertuples()]


def _spearman(a, b) -> float:
    from scipy.stats import spearmanr

    return float(spearmanr(a, b).statistic) if len(a) > 2 else float("nan")


def find_circuit(
    model,
    pairs: Sequence[Pair],
    reference: Sequence[Pair] | None = None,
    ablation: str = "mean",
    method: str = "eap-ig",
    steps: int = 5,
    target: float = 0.8,
    n_validate: int = 200,
    completeness_random: int = 20,
    greedy_steps: int = 10,
    minimality_random: int = 10,
    prune: bool = True,
    max_rows: int = 512,
    seed: int = 0,
    log=lambda *a: None,
) -> CircuitReport:
    """Score every edge (EAP and EAP-IG), check both against exact edge patching on a sample,
    then find the smallest head circuit and the smallest edge circuit with F(C)/F(M) >= target
    under ``ablation``; completeness and minimality of the head circuit."""
    import time

    import numpy as np

    from circuits.edges import edge_attribution, edge_curve, exact_edge_effects
    from circuits.faithfulness import completeness, head_curve, minimality, prune_heads
    from circuits.graph import ModelGraph

    timing: dict[str, float] = {}
    clock = [time.perf_counter()]

    def lap(name: str) -> None:
        now = time.perf_counter()
        timing[name] = round(now - clock[0], 3)
        clock[0] = now

    g = ModelGraph(model)
    base = baseline(model, pairs)
    ld_clean, ld_corr = float(base.ld_clean.mean()), float(base.ld_corrupted.mean())
    if abs(ld_clean) < 1e-6 or abs(ld_clean - ld_corr) < 1e-6:
        raise WorkbenchError(
            f"the model shows no behaviour to explain (mean LD clean {ld_clean:.2e}, corrupted {ld_corr:.2e})",
            "use a task the model solves (clean LD clearly above the corrupted one), or check the answer tokens",
        )
    abl = make_ablation(model, base, ablation, reference, seed, graph=g)
    lap("baseline_and_ablation")
    solved = float((base.ld_clean > 0).float().mean())
    log(
        f"LD clean {ld_clean:.3f}, corrupted {ld_corr:.3f} over {len(pairs)} pairs "
        f"(correct answer preferred in {solved:.0%}); ablation: {abl.describe()}"
    )
    if solved < 0.8:
        log(
            f"warning: the model prefers the correct answer in only {solved:.0%} of the pairs; "
            "a faithfulness ratio to so small a behaviour is not meaningful"
        )
    eap = edge_attribution(g, base, abl, "eap")
    lap("eap")
    ig = edge_attribution(g, base, abl, "eap-ig", steps)
    lap("eap_ig")
    main = ig if method == "eap-ig" else eap
    ranked = main.ranked()
    rng = np.random.default_rng(seed)
    n_top = min(len(ranked), n_validate // 2)
    sample = _validation_sample(ranked, n_top, n_validate, rng)
    t0 = time.perf_counter()
    exact = (
        (exact_edge_effects(g, base, abl, sample, max_rows=max_rows).double().mean(1) - base.ld_clean.double().mean())
        .cpu()
        .numpy()
    )
    t_exact = time.perf_counter() - t0
    lap("exact_edges")
    est = {name: np.array([float(sc.scores[v, u]) for v, u in sample]) for name, sc in (("eap", eap), (ig.method, ig))}
    validation = {
        "n_edges": len(sample),
        "n_top": n_top,
        "n_random": len(sample) - n_top,
        "sample": "top edges by |score| + uniform random others",
        "spearman": {k: _spearman(v, exact) for k, v in est.items()},
        "spearman_top": {k: _spearman(v[:n_top], exact[:n_top]) for k, v in est.items()},
        "spearman_random": {k: _spearman(v[n_top:], exact[n_top:]) for k, v in est.items()},
        "exact_seconds": round(t_exact, 3),
        "exact_seconds_per_edge": t_exact / max(1, len(sample)),
        "exact_all_edges_seconds_extrapolated": t_exact / max(1, len(sample)) * g.n_edges,
        "eap_seconds": timing["eap"],
        "eap_ig_seconds": timing["eap_ig"],
    }
    log(
        f"{g.n_edges} edges scored; vs exact edge patching on {len(sample)} edges: "
        + ", ".join(f"{k} Spearman {v:.3f}" for k, v in validation["spearman"].items())
        + f"; EAP {timing['eap']:.1f} s, {ig.method} {timing['eap_ig']:.1f} s for all edges, "
        f"exact {t_exact:.1f} s for {len(sample)}"
    )

    # head circuits: heads by |first-order effect of ablating them| (sum of their out-edge scores)
    node = main.node_scores()
    heads_all = [(layer, h) for layer in range(g.L) for h in range(g.H)]
    ranking = sorted(heads_all, key=lambda x: -abs(float(node[g.head_node(*x)])))
    ev = Evaluator(model, base, abl, max_rows)
    hcurve, k = head_curve(ev, ranking, target=target)
    lap("head_curve")
    reached = k is not None
    if not reached:
        k = int(hcurve.k[hcurve.faithfulness.idxmax()])
        log(f"head circuit: no size reaches F >= {target}; best F = {hcurve.faithfulness.max():.3f} at {k} heads")
    circuit = ranking[:k]
    if prune and reached:
        circuit = prune_heads(ev, circuit, target)
    lap("head_prune")
    faith = measure_faithfulness(ev, circuit)
    log(
        f"head circuit: {len(circuit)} heads (top-{k} by {main.method}, then pruned), "
        f"F(C)/F(M) = {faith['faithfulness']:.3f} "
        f"(LD {faith['ld_circuit']:.2f} of {faith['ld_clean']:.2f}; "
        f"every head ablated {faith['ld_all_heads_ablated']:.2f})"
    )
    comp = completeness(ev, circuit, n_random=completeness_random, greedy_steps=greedy_steps, seed=seed)
    lap("completeness")
    mini = minimality(ev, circuit, n_random=minimality_random, seed=seed)
    lap("minimality")
    log(
        f"completeness: max |F(C\\K) - F(M\\K)| = {comp['max_score']:.3f} ({comp['max_relative']:.1%} of F(M)); "
        f"random K mean {comp['random_mean_relative']:.1%}, greedy max {comp['greedy_max_relative']:.1%}"
    )
    log(
        f"minimality: median {mini.relative.median():.1%} of F(C), smallest {mini.relative.min():.1%} "
        f"({int(mini.layer[mini.relative.idxmin()])}.{int(mini['head'][mini.relative.idxmin()])})"
        if len(mini)
        else "minimality: empty circuit"
    )

    ecurve, chosen = edge_curve(g, base, abl, main, target=target, log=log)
    lap("edge_curve")
    edges = _edge_frame(g, main, chosen)

    direct = {x: float(main.scores[g.logits_input, g.head_node(*x)]) for x in circuit}
    nodes = pd.DataFrame(
        {
            "layer": [x[0] for x in circuit],
            "head": [x[1] for x in circuit],
            "score": [float(node[g.head_node(*x)]) for x in circuit],
            "direct": [direct[x] for x in circuit],
        }
    )
    nodes = nodes.merge(
        mini[["layer", "head", "score_alone", "score", "relative"]].rename(
            columns={"score": "minimality", "score_alone": "minimality_alone", "relative": "minimality_relative"}
        ),
        on=["layer", "head"],
        how="left",
    )
    feeds = _feeds(g, main, circuit, direct, ld_clean)
    nodes["feeds"] = [",".join(feeds.get(x, [])) for x in circuit]
    nodes = nodes.sort_values(["layer", "head"]).reset_index(drop=True)
    info = {
        "n_pairs": len(pairs),
        "n_reference": abl.n_reference,
        "ld_clean": ld_clean,
        "ld_corrupted": ld_corr,
        "share_correct": solved,
        "ablation": {"mode": abl.mode, "detail": abl.describe()},
        "target": target,
        "method": main.method,
        "graph": {"n_edges": g.n_edges, "n_upstream": g.n_upstream, "n_downstream": g.n_downstream},
        "edge_validation": validation,
        "head_circuit": {
            "heads": [list(x) for x in circuit],
            "reached_target": reached,
            "prefix_size": k,
            "pruned": prune and reached,
            **faith,
            "completeness": comp,
            "minimality": mini.to_dict("records"),
        },
        "edge_circuit": chosen,
        "curves": {"heads": hcurve.to_dict("records"), "edges": ecurve.to_dict("records")},
        "timing": {**timing, "total": round(sum(timing.values()), 3), "head_forwards": ev.n_forwards},
    }
    return CircuitReport(info, nodes, edges, hcurve, ecurve, main)


def _validation_sample(ranked: list, n_top: int, n_validate: int, rng) -> list:
    """Edges checked against exact patching: the ``n_top`` best ranked plus random others, up to ``n_validate``."""
    rest = ranked[n_top:]
    pick = rng.choice(len(rest), size=min(len(rest), n_validate - n_top), replace=False) if rest else []
    return ranked[:n_top] + [rest[i] for i in sorted(pick)]


def _edge_frame(g: ModelGraph, main: EdgeScores, chosen: dict | None) -> pd.DataFrame:
    """The chosen edge circuit as upstream / downstream / score rows (pops ``keep``: info stays JSON-ready)."""
    import torch

    if chosen is None:
        return pd.DataFrame(columns=["upstream", "downstream", "score"])
    keep = chosen.pop("keep")
    vs, us = torch.nonzero(keep, as_tuple=True)
    return pd.DataFrame(
        {
            "upstream": [g.upstream_name(int(u)) for u in us],
            "downstream": [g.downstream_name(int(v)) for v in vs],
            "score": main.scores[vs, us].numpy(),
        }
    )


def _feeds(
    g: ModelGraph, main: EdgeScores, circuit: list[Head], direct: dict[Head, float], ld_clean: float
) -> dict[Head, list[str]]:
    """Per circuit head, the later direct circuit heads whose q / k / v it writes into, for the role tags."""
    feeds: dict[Head, list[str]] = {}
    for x in circuit:
        for y in circuit:
            if y[0] > x[0] and abs(direct[y]) > 0.05 * abs(ld_clean):
                s = sum(
                    float(main.scores[v, g.head_node(*x)])
                    for v in (g.q_input(*y), g.k_input(y[0], y[1] // g.group), g.v_input(y[0], y[1] // g.group))
                )
                if abs(s) > 0.025 * abs(ld_clean):
                    feeds.setdefault(x, []).append(f"{y[0]}.{y[1]}")
    return feeds


def roles_for(
    nodes: pd.DataFrame, pattern_scores: pd.DataFrame | None, task: str, ld_clean: float, cutoff: float = 0.3
) -> list[str]:
    """Role tags from the evidence: direct effect on the logits (removing the head's edge to the
    logits lowers LD: name mover for IOI; raises it: negative name mover), feeding a direct
    head's q/k/v (S-inhibition for IOI when not direct itself), and induction-probe scores."""
    scores: dict = {}
    if pattern_scores is not None:
        for r in pattern_scores.itertuples():
            scores.setdefault((int(r.layer), int(r.head)), {})[r.metric] = r.value
    out = []
    for r in nodes.itertuples():
        tags, is_direct = [], abs(r.direct) > 0.05 * abs(ld_clean)
        if is_direct:
            if task == "ioi":
                tags.append("name mover" if r.direct < 0 else "negative name mover")
            else:
                tags.append("direct (helps)" if r.direct < 0 else "direct (hurts)")
        if r.feeds:
            tags.append("S-inhibition" if task == "ioi" and not is_direct else f"feeds {r.feeds}")
        sc = scores.get((int(r.layer), int(r.head)), {})
        for metric, name in (
            ("induction", "induction"),
            ("duplicate", "duplicate-token"),
            ("prev_token", "previous-token"),
        ):
            if sc.get(metric, 0) > cutoff:
                tags.append(name)
        out.append(", ".join(tags) or "other")
    return out
