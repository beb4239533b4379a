"""Causal checks of gate roles: close heads by role and read the task loss; compare with patching.

Closing a head is its zero ablation (:class:`workbench.engine.interventions.HeadAblation`,
``zero``), which is exactly a gate at 0 on the same edit point. :func:`closing_check` reads the
task's target NLL with nothing closed, with every ``irrelevant`` head closed, with every
``facilitating`` (and ``interfering``) head closed, and with as many random heads as there are
facilitating ones, over ``n_random`` seeds (uniform over all heads): if the roles are causal,
closing the irrelevant heads leaves the loss near the baseline and closing the facilitating ones
raises it far more than the random draws. When facilitating heads are many, a graded version
closes the ``k`` strongest (highest G-) against ``k`` random heads.

:func:`patching_agreement` sets the roles beside path patching's direct effects (each head's
effect on the logit difference through paths that avoid every other head,
:func:`circuits.patching.path_patching` to the logits) on the same IOI prompts: the overlap of the
``top_k`` heads by |direct effect| with the ``top_k`` heads by G- (the gate that stays open under
removal pressure), their Spearman rank correlation over all heads, and how many of the top heads
by |direct effect| the gates call facilitating. Signed: path patching's effect is normalised so that
a head supporting the answer has a negative effect (patching it in from the corrupted prompt lowers
the logit difference) and a head writing against it a positive one; the gates should keep the first
(facilitating) and close the second (interfering): the Spearman correlation of G- with the negated
effect, and among the top heads, how many supporting ones are facilitating and how many opposing
ones interfering.
"""

from __future__ import annotations

import random
from typing import Any, Sequence

import numpy as np
import pandas as pd
import torch
from scipy.stats import spearmanr

from circuits.gating.objective import target_logp
from circuits.gating.tasks import GateExample
from workbench.engine.interventions import HeadAblation
from workbench.protocol.ranking import rank_heads

CHECK_COLUMNS = ["closed", "n_closed", "seed", "metric", "value"]


def task_nll(
    model: Any, examples: Sequence[GateExample], closed: Sequence[tuple[int, int]] = (), batch_size: int = 16
) -> float:
    """Mean target NLL over ``examples`` (each example's mean over its target tokens) with the
    heads ``closed`` zero-ablated."""
    edits = [HeadAblation(list(closed), "zero")] if closed else []
    total = 0.0
    for i in range(0, len(examples), batch_size):
        chunk = examples[i : i + batch_size]
        total += float(-target_logp(model, chunk, edits=edits).sum())
    return total / len(examples)


def heads_with(roles: np.ndarray, role: str) -> list[tuple[int, int]]:
    """The ``(layer, head)`` pairs whose role (``[layer, head]`` array) is ``role``."""
    return [(int(layer), int(head)) for layer, head in zip(*np.nonzero(roles == role))]


def top_facilitating(roles: np.ndarray, strength: np.ndarray, k: int) -> list[tuple[int, int]]:
    """The ``k`` facilitating heads with the highest ``strength`` (G-: the gate that stays open
    under removal pressure), ties broken by (layer, head)."""
    return rank_heads(heads_with(roles, "facilitating"), lambda lh: float(strength[lh]))[:k]


def closing_check(
    model: Any,
    examples: Sequence[GateExample],
    roles: np.ndarray,
    n_random: int = 5,
    seed: int = 0,
    batch_size: int = 16,
    strength: np.ndarray | None = None,
    ks: Sequence[int] = (),
) -> pd.DataFrame:
    """Rows ``closed, n_closed, seed, metric, value``: ``metric`` ``nll`` (the task's mean target
    NLL) and ``delta_nll`` (minus the baseline with nothing closed); ``closed`` in ``none``,
    ``irrelevant``, ``facilitating``, ``interfering``, ``random`` (``seed`` 0..n_random-1, as
    many heads as facilitating ones; -1 elsewhere), ``random_irrelevant`` (as many random heads as
    irrelevant ones: what closing that many heads costs when they are not chosen by the gates).
    ``roles``: consensus roles ``[layer, head]``.

    When most heads are facilitating, closing all of them breaks the model as surely as closing as
    many random heads; the graded check separates them: for each ``k`` in ``ks``, the ``k``
    facilitating heads with the highest ``strength`` (G- mean, ``[layer, head]``) closed
    (``closed = "facilitating_top"``) against ``k`` random heads (``"random_top"``, same seeds)."""
    n_layers, n_heads = roles.shape
    base = task_nll(model, examples, (), batch_size)
    rows = [("none", 0, -1, base)]
    for role in ("irrelevant", "facilitating", "interfering"):
        heads = heads_with(roles, role)
        if heads:
            rows.append((role, len(heads), -1, task_nll(model, examples, heads, batch_size)))
    everything = [(layer, head) for layer in range(n_layers) for head in range(n_heads)]
    n_fac, n_irr = len(heads_with(roles, "facilitating")), len(heads_with(roles, "irrelevant"))
    sizes = [("random", n_fac)] if n_fac else []
    sizes += [("random_irrelevant", n_irr)] if n_irr else []
    if strength is not None:
        for k in sorted({min(int(k), n_fac) for k in ks if k > 0 and n_fac}):
            top = top_facilitating(roles, strength, k)
            rows.append(("facilitating_top", k, -1, task_nll(model, examples, top, batch_size)))
            sizes.append(("random_top", k))
    for name, k in sizes:
        for s in range(n_random):
            pick = random.Random(f"gate-random-{seed}-{s}" if name == "random" else f"gate-{name}-{seed}-{s}-{k}")
            rows.append((name, k, s, task_nll(model, examples, pick.sample(everything, k), batch_size)))
    out = []
    for closed, n, s, nll in rows:
        out.append((closed, n, s, "nll", nll))
        out.append((closed, n, s, "delta_nll", nll - base))
    return pd.DataFrame(out, columns=CHECK_COLUMNS)


def patching_agreement(direct: pd.DataFrame, g_neg: np.ndarray, roles: np.ndarray, top_k: int = 10) -> dict[str, Any]:
    """Agreement of gates with path patching's direct effects. ``direct``: path patching to the
    logits (``layer``, ``head``, ``value``); ``g_neg``: G- per head ``[layer, head]`` (mean over
    initialisations); ``roles``: consensus roles ``[layer, head]``."""
    effect = np.zeros_like(g_neg, dtype=float)
    for row in direct.itertuples():
        effect[int(row.layer), int(row.head)] = float(row.value)
    mag = np.abs(effect).ravel()
    gate = np.asarray(g_neg, dtype=float).ravel()
    top_patch = set(np.argsort(-mag, kind="stable")[:top_k].tolist())
    top_gate = set(np.argsort(-gate, kind="stable")[:top_k].tolist())
    rho, p = spearmanr(gate, mag)
    signed, _ = spearmanr(gate, -effect.ravel())
    n_heads = g_neg.shape[1]
    flat_roles = roles.ravel()
    fac = flat_roles == "facilitating"
    supporting = [i for i in top_patch if effect.ravel()[i] < 0]  # patching them lowers the logit difference
    opposing = [i for i in top_patch if effect.ravel()[i] > 0]  # they write against the answer
    return {
        "top_k": top_k,
        "overlap": len(top_patch & top_gate),
        "spearman": float(rho),
        "spearman_p": float(p),
        "spearman_signed": float(signed),
        "top_supporting": len(supporting),
        "top_supporting_facilitating": int(sum(fac[i] for i in supporting)),
        "top_opposing": len(opposing),
        "top_opposing_interfering": int(sum(flat_roles[i] == "interfering" for i in opposing)),
        "top_patch_facilitating": int(sum(fac[i] for i in top_patch)),
        "n_facilitating": int(fac.sum()),
        "top_patch_heads": [f"{i // n_heads}.{i % n_heads}" for i in sorted(top_patch, key=lambda i: -mag[i])],
        "top_gate_heads": [f"{i // n_heads}.{i % n_heads}" for i in sorted(top_gate, key=lambda i: -gate[i])],
    }


def direct_effects(model: Any, pairs: Sequence[Any]) -> pd.DataFrame:
    """Path patching from every head to the logits on ``pairs`` (IOI): ``layer, head, value``."""
    from circuits.patching import path_patching

    frame = path_patching(model, pairs)
    return frame[["layer", "head", "value"]]


def as_tensor(frame: pd.DataFrame, metric: str, stage: str, n_layers: int, n_heads: int) -> torch.Tensor:
    """A gate table's ``metric`` (``gate_mean``) of ``stage`` as ``[layer, head]``."""
    sub = frame[(frame.metric == metric) & (frame.stage == stage)]
    out = torch.full((n_layers, n_heads), float("nan"))
    out[torch.tensor(sub.layer.values), torch.tensor(sub["head"].values)] = torch.tensor(sub.value.values).float()
    return out
