"""Head atlas: every role a head's scores support, as a tidy table.

``atlas(table)`` returns one row per (model, layer, head, role) whose evidence passes the role's
threshold, with the evidence: ``model, layer, head, role, metric, value, threshold, dataset``
(plus ``run`` when the table has one). A head gets *every* role it qualifies for (a head can be
a sink and a streaming head at once); a head with none is simply absent.

A role holds when the metric passes its threshold on *any* dataset it was measured on, and the
row reports the dataset with the strongest evidence: a previous-token head on repeated random
tokens is one, whatever it does on prose.

Roles from probe scores (declared by each probe,
:func:`workbench.protocol.evidence.probe_roles`; thresholds editable): sink
(``sink_mass``), streaming, previous-token, duplicate, induction, echo, retrieval (0.1, Wu et
al.'s cut), and context / memory heads from the sign of ``context_direct_effect`` (PH3's context
and memory heads).
Roles from a discovered circuit (``circuits=``, the ``circuit.json`` of ``workbench circuit``):
name mover, negative name mover, S-inhibition, ... as labelled by
:func:`circuits.discovery.label_roles`; those are not thresholded here.

Thresholds: ``atlas(table, thresholds={"sink": 0.6, "induction": None})`` (``None`` switches a
role off); keys are role names or metric names (a metric name sets every role it drives, e.g.
``context_direct_effect=0.5`` sets context and memory). ``parse_thresholds("sink=0.6,echo=off")``
reads the command-line form.
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Any, Mapping, Sequence

import pandas as pd

from workbench.errors import WorkbenchError
from workbench.protocol.evidence import head_keys, head_scores, probe_roles, role_evidence
from workbench.protocol.roles import Role

COLUMNS = ["model", "layer", "head", "role", "metric", "value", "threshold", "dataset"]


# Circuit roles (from circuits.discovery.label_roles): code and colour for the grid.
CIRCUIT_STYLE = {
    "name mover": ("NM", "#d62728"),
    "negative name mover": ("NN", "#17becf"),
    "S-inhibition": ("SI", "#8c564b"),
    "feeds a logit head": ("F", "#7f7f7f"),
}
# label_roles also tags pattern roles; the atlas takes those from the probe scores instead.
_PATTERN_TAGS = {"induction", "duplicate-token", "previous-token", "other"}


def roles_with(thresholds: Mapping[str, float | None] | None = None) -> list[Role]:
    """The roles with ``thresholds`` applied (keys: role or metric names; None = role off)."""
    thresholds = dict(thresholds or {})
    all_roles = probe_roles()
    role_names = tuple(r.name for r in all_roles)
    known = set(role_names) | {r.metric for r in all_roles}
    unknown = sorted(k for k in thresholds if _norm(k) not in known)
    if unknown:
        raise WorkbenchError(
            f"unknown role or metric {unknown[0]!r} in role thresholds",
            f"roles: {', '.join(role_names)}; or a metric: {', '.join(dict.fromkeys(r.metric for r in all_roles))}",
        )
    norm = {_norm(k): v for k, v in thresholds.items()}
    out = []
    for r in all_roles:
        key = r.name if r.name in norm else r.metric if r.metric in norm else None
        if key is None:
            out.append(r)
            continue
        t = norm[key]
        if t is None:
            continue
        if not isinstance(t, (int, float)) or isinstance(t, bool) or not math.isfinite(t) or t < 0:
            raise WorkbenchError(
                f"threshold for {key!r} must be a number >= 0, not {t!r}", f"e.g. {key}=0.5, or {key}=off"
            )
        out.append(replace(r, threshold=float(t)))
    return out


def _norm(key: str) -> str:
    key = key.strip()
    return key.replace("_", "-") if key.replace("_", "-") in {r.name for r in probe_roles()} else key


def parse_thresholds(spec: str | None) -> dict[str, float | None]:
    """``"sink=0.6,induction=0.4,echo=off"`` -> ``{"sink": 0.6, "induction": 0.4, "echo": None}``, validated."""
    out: dict[str, float | None] = {}
    for item in (spec or "").split(","):
        if not item.strip():
            continue
        key, sep, raw = item.partition("=")
        if not sep or not key.strip() or not raw.strip():
            raise WorkbenchError(
                f"bad role threshold {item.strip()!r}",
                "write ROLE=VALUE pairs, e.g. --roles sink=0.6,induction=0.4,echo=off",
            )
        raw = raw.strip().lower()
        if raw in ("off", "none"):
            out[key.strip()] = None
            continue
        try:
            out[key.strip()] = float(raw)
        except ValueError:
            raise WorkbenchError(
                f"threshold {raw!r} for {key.strip()!r} is not a number", "e.g. sink=0.6, or sink=off to hide the role"
            ) from None
    roles_with(out)  # validates names and values
    return out


def atlas(
    table: pd.DataFrame,
    thresholds: Mapping[str, float | None] | None = None,
    circuits: Sequence[Mapping[str, Any]] | None = None,
) -> pd.DataFrame:
    """Every role each head's scores support, one row per (model, layer, head, role).

    ``table``: the tidy results table (several runs: with a ``run`` column). ``circuits``: dicts
    as written to ``circuit.json`` (``model``, ``task``, ``nodes`` with ``layer, head, effect,
    role``) whose labelled roles join the atlas. Columns: ``model, layer, head, role, metric,
    value, threshold, dataset`` (``run`` first when present); ``value`` is the strongest
    evidence over datasets and ``dataset`` where it was measured.
    """
    roles = roles_with(thresholds)
    scores = head_scores(table)
    keys = head_keys(table)
    frames = []
    for role in roles:
        best = role_evidence(scores, role)  # strongest dataset per head, as the sweep's pattern views pick
        if len(best):
            frames.append(best.assign(role=role.name, threshold=role.bound))
    for circ in circuits or []:
        frames.append(_circuit_rows(circ, "run" in keys))
    cols = (["run"] if "run" in keys else []) + COLUMNS
    frames = [f for f in frames if len(f)]
    if not frames:
        return pd.DataFrame(
            {
                c: pd.Series(
                    dtype="int64" if c in ("layer", "head") else "float64" if c in ("value", "threshold") else "object"
                )
                for c in cols
            }
        )
    out = pd.concat(frames, ignore_index=True)
    order = {r.name: i for i, r in enumerate(probe_roles())}
    out = out.assign(_o=out["role"].map(order).fillna(len(order))).sort_values(keys + ["_o", "role"]).drop(columns="_o")
    return out[cols].reset_index(drop=True).astype({"layer": "int64", "head": "int64"})


def _circuit_rows(circ: Mapping[str, Any], with_run: bool) -> pd.DataFrame:
    """Atlas rows of one discovered circuit: each node's labelled roles (pattern tags left out)."""
    task = str(circ.get("task", "circuit"))
    rows = []
    for node in circ.get("nodes", []):
        tags = [t.strip() for t in str(node.get("role") or "").split(",") if t.strip()]
        tags = [t for t in tags if t not in _PATTERN_TAGS] or [f"{task} circuit"]
        for tag in tags:
            rows.append(
                {
                    "model": str(circ.get("model", "")),
                    "layer": int(node["layer"]),
                    "head": int(node["head"]),
                    "role": tag,
                    "metric": f"path patching effect ({task})",
                    "value": float(node.get("effect", float("nan"))),
                    "threshold": float(circ.get("threshold", float("nan"))),
                    "dataset": task,
                }
            )
    df = pd.DataFrame(rows, columns=COLUMNS)
    if with_run:
        df.insert(0, "run", circ.get("run", ""))
    return df


def role_style(role: str) -> tuple[str, str]:
    """(short code, colour) of a role for grids and legends."""
    for r in probe_roles():
        if r.name == role:
            return r.code, r.color
    if role in CIRCUIT_STYLE:
        return CIRCUIT_STYLE[role]
    return ("".join(w[0] for w in role.split()[:2]).upper() or "?"), "#7f7f7f"
