"""The report's head-gating section: each head's role from learned gates, the fit and the checks.

``workbench gate`` (:mod:`workbench.runs.gate`) fits a sigmoid gate on every head's output in
three stages (causal head gating: Nam et al., *Causal Head Gating*, NeurIPS 2025,
arXiv:2505.13737): ``none`` (no pressure), ``positive`` (G+, rewarded for keeping heads open) and
``negative`` (G-, rewarded for closing them). A head's role follows from where G+ and G- settle
(:mod:`circuits.gating.roles`): **facilitating** (both open), **irrelevant** (G+ open, G- closed),
**interfering** (both closed), **ambiguous** (G+ closed, G- open); across initialisations the
consensus role is the most frequent one.

The rows are recognised by ``probe == "gate"`` (:data:`MARKER`); they carry the results columns
plus ``stage, init, update, role, closed, n_closed, seed`` (:data:`GATE_COLUMNS`).
:func:`split_gate` takes them out of the report's table, so no probe section, atlas or top-heads
table treats a gate as a head score.

Pure functions (each tested against a loop over the gate rows):

- :func:`role_grid`: per (layer, head) the consensus role, the share of initialisations that
  agree, and the mean G+ and G- over initialisations;
- :func:`loss_curves`: the target NLL per update of each stage;
- :func:`closing_table`: the closing check, the NLL change with each role's heads closed, random
  heads as mean and standard deviation over seeds;
- :func:`effect_table` and :func:`agreement`: G- beside path patching's direct effect (IOI).

:func:`section` writes the section onto a report :class:`~workbench.report.page.Page`: per model
and task a role grid, the loss curves, the closing check and, with path patching, the scatter.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import plotly.graph_objects as go

from workbench.report.page import Page, anchor, esc, fmt
from workbench.report.split import plain_types, split_rows

MARKER = "gate"  # ``probe`` of a gate row
ROLES = ("facilitating", "irrelevant", "interfering", "ambiguous")  # as circuits.gating.roles.ROLES
ROLE_COLOURS = {"facilitating": "#2ca02c", "irrelevant": "#b8b8b8", "interfering": "#d62728", "ambiguous": "#ff9f1c"}
ROLE_CODES = {"facilitating": "F", "irrelevant": "I", "interfering": "X", "ambiguous": "A"}
STAGES = ("none", "positive", "negative")  # the fit's order; G+ = positive, G- = negative
CLOSED = (
    "none", "irrelevant", "random_irrelevant", "facilitating", "interfering", "random", "facilitating_top", "random_top"
)  # fmt: skip
STAGE_COLOURS = {"none": "#444444", "positive": "#1f77b4", "negative": "#d62728"}
GATE_COLUMNS = ("stage", "init", "update", "role", "closed", "n_closed", "seed")
NUMERIC = ("layer", "head", "value", "n", "init", "update", "n_closed", "seed")
TEXT = ("model", "dataset", "probe", "metric", "stage", "role", "closed")
AGREEMENT = {
    "agree_overlap": "overlap of the top-k heads by |direct effect| and by G-",
    "agree_spearman": "Spearman rank correlation of |direct effect| and G- over all heads",
    "agree_top_facilitating": "top-k heads by |direct effect| that the gates call facilitating",
    "agree_spearman_signed": "Spearman rank correlation of G- and the negated direct effect over all heads",
    "agree_supporting_facilitating": "top-k heads supporting the answer (effect < 0; of n) called facilitating",
    "agree_opposing_interfering": "top-k heads writing against the answer (effect > 0; of n) called interfering",
}


# -- the rows ----------------------------------------------------------------------------------------


def gate_mask(table: pd.DataFrame) -> pd.Series:
    """True on the rows of a gate run: ``probe == "gate"``."""
    if "probe" not in table.columns:
        return pd.Series(False, index=table.index)
    return table["probe"].astype("string").eq(MARKER).fillna(False).astype(bool)


def split_gate(table: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """``(gate rows, every other row)``; gate rows that lack a gate column are a WorkbenchError."""
    return split_rows(
        table, gate_mask(table), GATE_COLUMNS, NUMERIC, TEXT, "gate rows (probe 'gate')", "workbench gate"
    )


def tidy(frame: pd.DataFrame) -> pd.DataFrame:
    """Plain types: floats (NaN where missing) and strings ("" where missing)."""
    return plain_types(frame, NUMERIC, TEXT)


def _metric(rows: pd.DataFrame, metric: str, stage: str | None = None) -> pd.DataFrame:
    sub = rows[rows["metric"] == metric]
    return sub if stage is None else sub[sub["stage"] == stage]


def _per_head(rows: pd.DataFrame, metric: str, stage: str | None = None) -> pd.Series:
    sub = _metric(rows, metric, stage)
    return sub.groupby(["layer", "head"])["value"].mean()


# -- tables ------------------------------------------------------------------------------------------


def role_grid(rows: pd.DataFrame) -> pd.DataFrame:
    """One row per head with a consensus role (``role_agreement`` rows): ``layer``, ``head``,
    ``role``, ``agreement`` (share of initialisations with that role), ``g_pos`` and ``g_neg``
    (``gate_mean`` of stages positive and negative; NaN when missing), ``inits`` (how many)."""
    agree = _metric(rows, "role_agreement")
    cols = ["layer", "head", "role", "agreement", "g_pos", "g_neg", "inits"]
    if agree.empty:
        return pd.DataFrame(columns=cols)
    out = agree[["layer", "head", "role", "value"]].rename(columns={"value": "agreement"})
    out = out.drop_duplicates(["layer", "head"]).set_index(["layer", "head"])
    out["g_pos"] = _per_head(rows, "gate_mean", "positive")
    out["g_neg"] = _per_head(rows, "gate_mean", "negative")
    inits = _metric(rows, "gate")["init"]
    out["inits"] = int(inits[inits >= 0].nunique())
    return out.reset_index().sort_values(["layer", "head"]).reset_index(drop=True)[cols]


def loss_curves(rows: pd.DataFrame, metric: str = "nll") -> pd.DataFrame:
    """``stage``, ``update``, ``value`` of the per-update ``metric`` rows (layer = head = -1),
    stages in the fit's order, updates ascending."""
    sub = _metric(rows, metric)[["stage", "update", "value"]]
    rank = {s: i for i, s in enumerate(STAGES)}
    order = np.lexsort((sub["update"].to_numpy(), [rank.get(s, len(rank)) for s in sub["stage"]]))
    return sub.iloc[order].reset_index(drop=True)


def closing_table(rows: pd.DataFrame, metric: str = "check_delta_nll") -> pd.DataFrame:
    """Per ``closed`` (none, irrelevant, facilitating, interfering, random, in that order; then
    the graded check, ``facilitating_top`` and ``random_top`` for each k):
    ``value`` (random: the mean over seeds), ``std`` (random: sample std over seeds, ddof = 1,
    NaN with one seed; 0 elsewhere), ``seeds`` (random draws; 0 elsewhere) and ``n_closed``."""
    sub = _metric(rows, metric)
    cols = ["closed", "value", "std", "seeds", "n_closed"]
    out = []
    order = [c for c in CLOSED if c in set(sub["closed"])] + sorted(set(sub["closed"]) - set(CLOSED))
    if {"facilitating_top", "random_top"} <= set(order):  # the graded check: each k's pair side by side
        order = [c for c in order if c not in ("facilitating_top", "random_top")] + ["facilitating_top", "random_top"]
    keys = [(c, k) for k in sorted(set(sub["n_closed"])) for c in order if c.endswith("_top")]
    keys = [(c, None) for c in order if not c.endswith("_top")] + keys
    for closed, k in keys:
        g = sub[(sub["closed"] == closed) & ((sub["n_closed"] == k) if k is not None else True)]
        if g.empty:
            continue
        seeds = int(g.loc[g["seed"] >= 0, "seed"].nunique())
        std = float(g["value"].std(ddof=1)) if seeds else 0.0
        out.append((closed, float(g["value"].mean()), std, seeds, float(g["n_closed"].max())))
    return pd.DataFrame(out, columns=cols)


def effect_table(rows: pd.DataFrame) -> pd.DataFrame:
    """Per head with a ``direct_effect`` row: ``layer``, ``head``, ``direct_effect``, its absolute
    value ``abs_effect``, ``g_neg`` (G- mean) and the consensus ``role`` ("" when unknown)."""
    direct = _per_head(rows, "direct_effect")
    cols = ["layer", "head", "direct_effect", "abs_effect", "g_neg", "role"]
    if direct.empty:
        return pd.DataFrame(columns=cols)
    out = pd.DataFrame({"direct_effect": direct})
    out["abs_effect"] = out["direct_effect"].abs()
    out["g_neg"] = _per_head(rows, "gate_mean", "negative")
    roles = _metric(rows, "role_agreement").drop_duplicates(["layer", "head"]).set_index(["layer", "head"])["role"]
    out["role"] = roles.reindex(out.index).fillna("")
    return out.reset_index()[cols]


def agreement(rows: pd.DataFrame) -> pd.DataFrame:
    """The agreement rows with path patching: ``metric``, ``value``, ``top_k`` (``n_closed``)."""
    sub = rows[rows["metric"].isin(list(AGREEMENT))]
    order = [m for m in AGREEMENT if m in set(sub["metric"])]
    sub = sub.drop_duplicates("metric").set_index("metric").loc[order]
    return pd.DataFrame({"metric": order, "value": sub["value"].to_numpy(), "top_k": sub["n_closed"].to_numpy()})


# -- figures -----------------------------------------------------------------------------------------


def role_colorscale() -> list[list]:
    """A stepped colour scale: role index ``i`` (z in [-0.5, 3.5]) gets ``ROLE_COLOURS[ROLES[i]]``."""
    k = len(ROLES)
    scale = []
    for i, role in enumerate(ROLES):
        scale += [[i / k, ROLE_COLOURS[role]], [(i + 1) / k, ROLE_COLOURS[role]]]
    return scale


def _hover(r: pd.Series) -> str:
    return (
        f"layer {int(r.layer)}, head {int(r['head'])}<br>role: {esc(r.role)}"
        f"<br>agreement: {fmt(r.agreement)} of {int(r.inits)} init(s)"
        f"<br>G+ mean: {fmt(r.g_pos)}<br>G- mean: {fmt(r.g_neg)}"
    )


def role_grid_figure(grid: pd.DataFrame, title: str) -> go.Figure:
    """Layer x head, coloured by consensus role (z = index in :data:`ROLES`; NaN where a head has
    no role), the role's letter in the cell; hover: role, agreement, G+ and G- means."""
    layers = list(range(int(grid["layer"].max()) + 1))
    heads = list(range(int(grid["head"].max()) + 1))
    z = np.full((len(layers), len(heads)), np.nan)
    text = np.full(z.shape, "", dtype=object)
    hover = np.full(z.shape, "", dtype=object)
    for _, r in grid.iterrows():
        i, j = int(r.layer), int(r["head"])
        z[i, j] = ROLES.index(r.role) if r.role in ROLES else np.nan
        text[i, j] = ROLE_CODES.get(r.role, "?")
        hover[i, j] = _hover(r)
    fig = go.Figure(
        go.Heatmap(
            z=z,
            x=heads,
            y=layers,
            zmin=-0.5,
            zmax=len(ROLES) - 0.5,
            colorscale=role_colorscale(),
            colorbar={"tickvals": list(range(len(ROLES))), "ticktext": list(ROLES), "title": {"text": "role"}},
            text=text.tolist(),
            texttemplate="%{text}",
            hovertext=hover.tolist(),
            hoverinfo="text",
            xgap=1,
            ygap=1,
        )
    )
    fig.update_layout(
        title=title,
        xaxis_title="head",
        yaxis_title="layer",
        yaxis_autorange="reversed",
        height=max(300, 18 * len(layers) + 120),
    )
    fig.update_xaxes(dtick=1)
    return fig


def loss_figure(curves: pd.DataFrame, title: str) -> go.Figure:
    """The target NLL against the update, a line per stage."""
    fig = go.Figure()
    for stage in dict.fromkeys(curves["stage"]):
        g = curves[curves["stage"] == stage]
        fig.add_trace(
            go.Scatter(
                x=g["update"],
                y=g["value"],
                mode="lines+markers" if len(g) <= 30 else "lines",
                name=stage or "(no stage)",
                line={"color": STAGE_COLOURS.get(stage, "#888888")},
            )
        )
    fig.update_layout(title=title, xaxis_title="update", yaxis_title="target NLL (nats)", height=360)
    fig.update_xaxes(tickformat="d")
    return fig


def closing_figure(table: pd.DataFrame, title: str) -> go.Figure:
    """The NLL change per closed set; random heads with their std over seeds as an error bar."""
    colours = [ROLE_COLOURS.get(c, "#888888") for c in table["closed"]]
    labels = [f"{c} ({int(n)})" if np.isfinite(n) else c for c, n in zip(table["closed"], table["n_closed"])]
    fig = go.Figure(
        go.Bar(
            x=labels,
            y=table["value"],
            marker={"color": colours},
            error_y={"type": "data", "array": table["std"].fillna(0.0).tolist(), "visible": True},
            hovertext=[
                f"{esc(r.closed)}: {fmt(r.value)}" + (f" ± {fmt(r.std)} over {r.seeds} seeds" if r.seeds else "")
                for r in table.itertuples()
            ],
            hoverinfo="text",
        )
    )
    fig.update_layout(
        title=title, xaxis_title="heads closed (how many)", yaxis_title="target NLL change (nats)", height=360
    )
    return fig


def effect_figure(effects: pd.DataFrame, title: str) -> go.Figure:
    """G- mean against |direct effect| per head, a colour per consensus role."""
    fig = go.Figure()
    for role in [*ROLES, ""]:
        g = effects[effects["role"] == role]
        if g.empty:
            continue
        fig.add_trace(
            go.Scatter(
                x=g["g_neg"],
                y=g["abs_effect"],
                mode="markers",
                name=role or "(no role)",
                marker={"color": ROLE_COLOURS.get(role, "#888888"), "size": 8, "line": {"width": 0.5, "color": "#222"}},
                hovertext=[
                    f"layer {int(r.layer)}, head {int(r.head)}<br>G- mean {fmt(r.g_neg)}"
                    f"<br>direct effect {fmt(r.direct_effect)}"
                    for r in g.itertuples()
                ],
                hoverinfo="text",
            )
        )
    fig.update_layout(title=title, xaxis_title="G- mean", yaxis_title="|direct effect|", height=380)
    return fig


# -- the section -------------------------------------------------------------------------------------


INTRO = (
    "Causal head gating (Nam et al., NeurIPS 2025, arXiv:2505.13737): a sigmoid gate on every head's output "
    "(its z before W_O; a gate of 0 is the head's zero ablation) is fit to the task's target tokens in three "
    "stages: none (no pressure), positive (G+, rewarded for keeping heads open) and negative (G-, rewarded for "
    "closing them). A gate is open at 0.5 or above. Roles: facilitating (G+ and G- open: the task needs it), "
    "irrelevant (G+ open, G- closed), interfering (both closed: the task is better without it), ambiguous (G+ "
    "closed, G- open). Each head shows the consensus role over initialisations (the most frequent; ties go to "
    "the first in that order)."
)


def _role_counts(grid: pd.DataFrame) -> str:
    counts = grid["role"].value_counts()
    return ", ".join(f"{int(counts.get(r, 0))} {r}" for r in ROLES)


def _agreement_table(agree: pd.DataFrame) -> str:
    rows = "".join(
        f"<tr><td><code>{esc(r.metric)}</code></td><td>{esc(AGREEMENT[r.metric])}</td>"
        f"<td>{esc(fmt(r.value))}</td><td>{esc(fmt(r.top_k))}</td></tr>"
        for r in agree.itertuples()
    )
    return (
        '<table class="tbl gate-agree"><thead><tr><th>metric</th><th>what</th><th>value</th><th>k / of</th></tr>'
        f"</thead><tbody>{rows}</tbody></table>"
    )


def _task_figures(page: Page, rows: pd.DataFrame, model: str, task: str) -> None:
    grid = role_grid(rows)
    if len(grid):
        page.p(f"{model} on {task}: {_role_counts(grid)} (of {len(grid)} heads, {int(grid['inits'].max())} inits).")
        page.figure(
            role_grid_figure(grid, f"{model}: head roles from gates ({task})"),
            "<b>Head roles</b>: each cell a head, coloured by its consensus role (F facilitating, I irrelevant, "
            "X interfering, A ambiguous); hover for the G+ and G- means over initialisations and the share of "
            "initialisations that agree.",
        )
    else:
        page.p(f"{model} on {task}: no roles (the fit lacks the positive or negative stage).")
    curves = loss_curves(rows)
    if len(curves):
        page.figure(
            loss_figure(curves, f"{model}: target NLL per update ({task})"),
            "<b>The fit</b>: the target NLL of each update's batch, a line per stage (updates count from 1 in "
            "each stage).",
        )
    closing = closing_table(rows)
    if len(closing):
        page.figure(
            closing_figure(closing, f"{model}: closing heads by role ({task})"),
            "<b>Closing check</b>: the change of the task's target NLL when every head of a role is zero-ablated "
            "(the number closed in brackets), against as many random heads (mean ± std over seeds). Causal roles: "
            "closing the irrelevant heads costs little, the facilitating ones more than random heads.",
        )
    effects = effect_table(rows)
    if len(effects):
        page.figure(
            effect_figure(effects, f"{model}: G- against path patching ({task})"),
            "<b>Gates against path patching</b>: each head's G- mean against the absolute value of its direct "
            "effect on the logit difference (path patching to the logits), coloured by consensus role.",
        )
    agree = agreement(rows)
    if len(agree):
        page.add(_agreement_table(agree))


def section(page: Page, rows: pd.DataFrame) -> None:
    """The head-gating section of a report (nothing when ``rows`` is empty): per model and task,
    the role grid, the loss per update per stage, the closing check and, with path patching, G-
    against the direct effect with the agreement numbers."""
    if rows.empty:
        return
    page.section(2, "Head gates", "gate")
    page.p(INTRO)
    for (model, task), g in rows.groupby(["model", "dataset"], sort=False):
        page.section(3, f"Head gates: {model} / {task}", anchor("gate", model, task))
        _task_figures(page, g, model, task)
