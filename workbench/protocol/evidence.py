"""A role's evidence per head, and the strongest head of each role: one rule for the atlas and the sweep.

The report's head atlas (:mod:`workbench.report.atlas`) lists every head a role holds for; the
sweep (:mod:`workbench.runs.views`) stores the attention pattern of the *strongest* head of each
role. Both read the same per-head values (:func:`head_scores`: the n-weighted mean of a head's
rows per metric and dataset) and the same evidence rule (:func:`role_evidence`: among the
datasets where the role holds, the one with the most extreme value in the role's direction), so
the head a view shows is the atlas' top head of that role. :func:`strongest_heads` ranks a role's
heads by ``value * sign`` with :func:`workbench.protocol.ranking.rank_heads` (ties to the lower
``(layer, head)``). Circuit roles are not here: they come from a discovered circuit, not scores.
"""

from __future__ import annotations

from typing import Sequence

import pandas as pd

from workbench.errors import WorkbenchError
from workbench.protocol.ranking import rank_heads
from workbench.protocol.roles import Role

STRONGEST = ["model", "role", "metric", "value", "layer", "head", "dataset"]


def probe_roles() -> tuple[Role, ...]:
    """The roles registered probes declare (``roles`` on the probe class), in registry order.

    The built-in defaults: 0.5 = "most of its attention" (sink); 0.95 streaming keeps
    DuoAttention's near-complete sink + window mass; 0.4 / 0.3 for single-position pattern scores
    (a head spreading evenly over 50 keys scores 0.02); retrieval > 0.1 as in the paper; 0.2
    logits for context / memory direct effects (SmolLM2-135M on counterfact: 8 of 270 heads
    beyond +-0.2, the strongest -1.0). A plugin probe declares its own roles the same way.
    """
    from workbench.protocol.registry import probe_classes

    try:
        classes = probe_classes().values()
    except WorkbenchError:
        return ()
    return tuple(r for cls in classes for r in (getattr(cls, "roles", ()) or ()))


def head_keys(table: pd.DataFrame) -> list[str]:
    """The columns naming one head: ``model, layer, head`` (``run`` first when present)."""
    return (["run"] if "run" in table.columns else []) + ["model", "layer", "head"]


def head_scores(table: pd.DataFrame) -> pd.DataFrame:
    """Per-head values of every (metric, dataset): long, one row per (head, metric, dataset)
    with the n-weighted mean over any repeated rows; per-item rows (layer -1) left out."""
    heads = table[(table["layer"] >= 0)].dropna(subset=["value"])
    keys = head_keys(table) + ["metric", "dataset"]
    if heads.empty:
        return pd.DataFrame(columns=keys + ["value", "n"])
    w = heads["n"].clip(lower=1).astype(float)
    agg = (
        heads.assign(_wv=heads["value"] * w, _w=w)
        .groupby(keys, as_index=False, sort=True)
        .agg(_wv=("_wv", "sum"), _w=("_w", "sum"), n=("n", "sum"))
    )
    agg["value"] = agg["_wv"] / agg["_w"]
    return agg.drop(columns=["_wv", "_w"])


def role_evidence(scores: pd.DataFrame, role: Role) -> pd.DataFrame:
    """The heads ``role`` holds for, one row each (``scores``: :func:`head_scores`): the dataset
    with the strongest value among those where the role holds. Empty when no head holds."""
    sub = scores[scores["metric"] == role.metric]
    if sub.empty:
        return sub
    hit = sub[[role.holds(float(v)) for v in sub["value"]]]
    if hit.empty:
        return hit
    # strongest dataset per head; a stable sort keeps the first dataset (by name) on a tie
    ordered = hit.sort_values("value", ascending=role.sign < 0, kind="stable")
    return ordered.drop_duplicates(head_keys(scores))


def strongest_heads(table: pd.DataFrame, roles: Sequence[Role] | None = None) -> pd.DataFrame:
    """Per model and role, the head the role holds for most strongly: its evidence ``value *
    sign`` highest over its heads (ties to the lower ``(layer, head)``), with the dataset of that
    value. Columns :data:`STRONGEST`; a role no head holds has no row. ``table``: tidy results
    (one run: no ``run`` column); ``roles``: default :func:`probe_roles`."""
    roles = probe_roles() if roles is None else roles
    scores = head_scores(table)
    rows = []
    for role in roles:
        ev = role_evidence(scores, role)
        for model, g in ev.groupby("model", sort=True):
            by_head = {(int(r.layer), int(r.head)): r for r in g.itertuples(index=False)}
            layer, head = rank_heads(by_head, lambda h: float(by_head[h].value) * role.sign)[0]
            best = by_head[(layer, head)]
            rows.append([str(model), role.name, role.metric, float(best.value), layer, head, str(best.dataset)])
    return pd.DataFrame(rows, columns=STRONGEST).astype({"layer": "int64", "head": "int64", "value": "float64"})


__all__ = ["STRONGEST", "head_keys", "head_scores", "probe_roles", "role_evidence", "strongest_heads"]
