"""Circuit discovery by iterative path patching, faithfulness, and overlap between circuits.

:func:`discover_circuit` starts from the logits: every head is path-patched as a sender to the
logits, and heads whose normalised effect exceeds ``threshold`` in absolute value become nodes.
Each round, the strongest new nodes (at most ``max_receivers``) become receivers: every head in
an earlier layer is path-patched into their queries, keys and values together, and senders over
``inner_threshold`` join the circuit with an edge ``sender -> receiver``. The result is a graph
(nodes = heads, edges = paths with their effects).

:func:`faithfulness`: the share of the clean logit difference kept when every head *outside* the
circuit is mean-ablated (its output replaced by its mean over the corrupted prompts),
LD_circuit / LD_clean. :func:`overlap`: Jaccard index and recall of one circuit in another.
Roles: :func:`label_roles` names heads from the graph (direct effect on the logits, writers
into a logit head's query) and from the pattern scores of the ``induction`` probe.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import pandas as pd

from circuits.patching import Baseline, baseline, logit_diff, path_patching
from circuits.tasks import Pair
from workbench.interventions import HeadAblation, head_means
from workbench.prompts import TokenizedPrompt

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


def discover_circuit(model, pairs: Sequence[Pair] | Baseline, threshold: float = 0.05, max_rounds: int = 3,
                     max_receivers: int = 6, max_rows: int = 512, log=lambda *a: None, inner_threshold: float | None = None) -> Circuit:
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
            edges.append({"sender_layer": r.layer, "sender_head": r.head, "receiver_layer": model.n_layers, "receiver_head": -1,
                          "receiver": "logits", "effect": r.value})
            frontier.append((r.layer, r.head, abs(r.value)))
    log(f"round 1: {len(nodes)} heads act on the logits directly")
    for rnd in range(2, max_rounds + 1):
        frontier = sorted(frontier, key=lambda t: -t[2])[:max_receivers]
        new = []
        for l, h, _ in frontier:
            if l == 0:
                continue
            res = path_patching(model, base, receivers=[(l, h, w) for w in ("q", "k", "v")], max_rows=max_rows)
            for r in res.itertuples():
                if abs(r.value) > inner:
                    edges.append({"sender_layer": r.layer, "sender_head": r.head, "receiver_layer": l, "receiver_head": h,
                                  "receiver": f"{l}.{h}", "effect": r.value})
                    if (r.layer, r.head) not in nodes:
                        nodes[(r.layer, r.head)] = {"layer": r.layer, "head": r.head, "effect": r.value, "round": rnd}
                        new.append((r.layer, r.head, abs(r.value)))
        log(f"round {rnd}: {len(new)} new heads")
        if not new:
            break
        frontier = new
    node_df = pd.DataFrame(list(nodes.values()), columns=["layer", "head", "effect", "round"])
    edge_df = pd.DataFrame(edges, columns=["sender_layer", "sender_head", "receiver_layer", "receiver_head", "receiver", "effect"])
    info = {"threshold": threshold, "inner_threshold": inner, "ld_clean": float(base.ld_clean.mean()), "ld_corrupted": float(base.ld_corrupted.mean())}
    return Circuit(node_df.sort_values(["layer", "head"]).reset_index(drop=True), edge_df, info)


def faithfulness(model, pairs: Sequence[Pair] | Baseline, heads: Sequence[Head]) -> dict:
    """LD with every head outside ``heads`` mean-ablated, as a share of the clean LD."""
    base = pairs if isinstance(pairs, Baseline) else baseline(model, pairs)
    corrupted = [TokenizedPrompt(str(i), ids) for i, ids in enumerate(base.pb.corrupted.input_ids.tolist())]
    for tp, n in zip(corrupted, base.pb.corrupted.lengths.tolist()):
        tp.ids = tp.ids[:n]
    means = head_means(model, corrupted)
    keep = set(map(tuple, heads))
    outside = [(l, h) for l in range(model.n_layers) for h in range(model.n_heads) if (l, h) not in keep]
    ld_circuit = logit_diff(model, base.pb.clean, base.pb, observers=[HeadAblation(outside, "mean", means)]) if outside else base.ld_clean
    everything = [(l, h) for l in range(model.n_layers) for h in range(model.n_heads)]
    ld_none = logit_diff(model, base.pb.clean, base.pb, observers=[HeadAblation(everything, "mean", means)])
    clean = float(base.ld_clean.mean())
    return {"ld_clean": clean, "ld_circuit": float(ld_circuit.mean()), "ld_all_heads_ablated": float(ld_none.mean()),
            "faithfulness": float(ld_circuit.mean()) / clean if abs(clean) > 1e-9 else float("nan"), "n_heads": len(keep)}


def overlap(a: Sequence[Head], b: Sequence[Head]) -> dict:
    sa, sb = set(map(tuple, a)), set(map(tuple, b))
    inter = len(sa & sb)
    return {"jaccard": inter / max(1, len(sa | sb)), "recall_a_in_b": inter / max(1, len(sa)), "recall_b_in_a": inter / max(1, len(sb)),
            "shared": sorted(sa & sb), "n_a": len(sa), "n_b": len(sb)}


def label_roles(circuit: Circuit, pattern_scores: pd.DataFrame | None = None, task: str = "ioi", cutoff: float = 0.3) -> pd.DataFrame:
    """Name each node by the evidence: its direct effect on the logits, whether it writes into a
    logit head, and its induction-probe scores (prev_token / duplicate / induction > cutoff)."""
    nodes = circuit.nodes.copy()
    direct = {(int(e.sender_layer), int(e.sender_head)): e.effect for e in circuit.edges.itertuples() if e.receiver == "logits"}
    logit_heads = {f"{l}.{h}" for l, h in direct}
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
        for metric, name in (("induction", "induction"), ("duplicate", "duplicate-token"), ("prev_token", "previous-token")):
            if sc.get(metric, 0) > cutoff:
                tags.append(name)
        roles.append(", ".join(tags) or "other")
    nodes["role"] = roles
    return nodes
