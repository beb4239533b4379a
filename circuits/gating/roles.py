"""Head roles from where the gates settle, and the tidy table of a fit.

The paper's taxonomy (Nam et al. 2025), from the gate under pressure to keep heads (G+, stage
``positive``) and the gate under pressure to remove them (G-, stage ``negative``), with a gate
open when it is at or above ``threshold`` (0.5):

================  =========  =========  ============================================================
role              G+         G-         reading
================  =========  =========  ============================================================
``facilitating``  open       open       the task needs it: it stays open even when closing is rewarded
``irrelevant``    open       closed     it goes whichever way the pressure pushes: the task ignores it
``interfering``   closed     closed     the task is better without it: it closes even when opening is rewarded
``ambiguous``     closed     open       opposite to both pressures (rare; an optimisation artefact)
================  =========  =========  ============================================================

The reference package's ``CHGResults.head_taxonomy()`` inverts two of these (it calls G+ low /
G- high "interfering" and both low "irrelevant"); the loss's sign (``nll - lambda * mean
clamp(logit)``) and the paper agree with the table above.

A head's role is read per initialisation; across initialisations the **consensus** role is the
most frequent one (ties go to the first in the order above), reported with the share of
initialisations that agree.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import numpy as np
import pandas as pd
from jaxtyping import Float
from torch import Tensor

ROLES = ("facilitating", "irrelevant", "interfering", "ambiguous")
COLUMNS = ["model", "dataset", "probe", "layer", "head", "metric", "value", "n", "stage", "init", "update", "role"]


def head_roles(
    g_pos: Float[Tensor, "... layer head"], g_neg: Float[Tensor, "... layer head"], threshold: float = 0.5
) -> np.ndarray:
    """The role of every head (strings, the inputs' shape) from G+ and G-."""
    pos = np.asarray(g_pos) >= threshold
    neg = np.asarray(g_neg) >= threshold
    out = np.full(pos.shape, "ambiguous", dtype=object)
    out[pos & neg] = "facilitating"
    out[pos & ~neg] = "irrelevant"
    out[~pos & ~neg] = "interfering"
    return out


def consensus(roles: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per head, over the first axis (initialisations): the most frequent role (ties: the first
    in :data:`ROLES`) and the share of initialisations that have it."""
    k = roles.shape[0]
    flat = roles.reshape(k, -1)
    best, share = [], []
    for col in flat.T:
        counts = Counter(col)
        top = max(counts.values())
        role = next(r for r in ROLES if counts.get(r) == top)
        best.append(role)
        share.append(top / k)
    return np.array(best, dtype=object).reshape(roles.shape[1:]), np.array(share).reshape(roles.shape[1:])


def gate_frame(fit: Any, model_name: str, task: str) -> pd.DataFrame:
    """A fit as tidy rows (``probe = "gate"``, ``dataset`` = the task):

    - ``gate``: one row per (stage, init, layer, head), ``role`` = that initialisation's role;
    - ``gate_mean``: the mean over initialisations per (stage, layer, head), ``role`` = consensus;
    - ``role_agreement``: per (layer, head), the share of initialisations with the consensus role;
    - ``nll``, ``l1``, ``loss``: one row per (stage, update) with ``layer = head = -1`` (the loss
      per stage, as the batches went);
    - ``final_nll``: per stage, the mean of its last 10 updates' ``nll``.

    Roles need both regularised stages; without them ``role`` is empty."""
    gates = fit.gates
    k, n_layers, n_heads = next(iter(gates.values())).shape
    threshold = fit.spec.threshold
    has_roles = "positive" in gates and "negative" in gates
    per_init = head_roles(gates["positive"], gates["negative"], threshold) if has_roles else None
    agreed, share = consensus(per_init) if has_roles else (None, None)
    rows: list[tuple] = []
    layer_idx, head_idx = np.meshgrid(np.arange(n_layers), np.arange(n_heads), indexing="ij")
    for stage, g in gates.items():
        arr = g.numpy()
        for i in range(k):
            for layer, head in zip(layer_idx.ravel(), head_idx.ravel()):
                role = per_init[i, layer, head] if has_roles else ""
                rows.append((int(layer), int(head), "gate", float(arr[i, layer, head]), stage, i, -1, role))
        mean = arr.mean(0)
        for layer, head in zip(layer_idx.ravel(), head_idx.ravel()):
            role = agreed[layer, head] if has_roles else ""
            rows.append((int(layer), int(head), "gate_mean", float(mean[layer, head]), stage, -1, -1, role))
    if has_roles:
        for layer, head in zip(layer_idx.ravel(), head_idx.ravel()):
            rows.append(
                (int(layer), int(head), "role_agreement", float(share[layer, head]), "", -1, -1, agreed[layer, head])
            )
    for rec in fit.history:
        for metric in ("nll", "l1", "loss"):
            rows.append((-1, -1, metric, float(rec[metric]), rec["stage"], -1, int(rec["update"]), ""))
    for stage in gates:
        last = [r["nll"] for r in fit.history if r["stage"] == stage][-10:]
        rows.append((-1, -1, "final_nll", float(np.mean(last)), stage, -1, -1, ""))
    frame = pd.DataFrame(rows, columns=["layer", "head", "metric", "value", "stage", "init", "update", "role"])
    frame["n"] = int(getattr(fit, "n_examples", 0)) or -1
    frame.insert(0, "probe", "gate")
    frame.insert(0, "dataset", task)
    frame.insert(0, "model", model_name)
    return frame[COLUMNS]


def consensus_grid(frame: pd.DataFrame, n_layers: int, n_heads: int) -> np.ndarray:
    """The consensus roles ``[layer, head]`` of a gate table (its ``role_agreement`` rows)."""
    out = np.full((n_layers, n_heads), "", dtype=object)
    sub = frame[frame.metric == "role_agreement"]
    out[sub.layer.to_numpy(int), sub["head"].to_numpy(int)] = sub.role.to_numpy(object)
    return out
