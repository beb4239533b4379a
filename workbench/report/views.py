"""The report's "Looking at the heads" section: the attention pattern of each role's strongest head.

A score says a head is an induction head; its pattern shows it. A sweep stores, for the strongest
head of each role (the atlas' top head of the role), its attention on item 0 of the dataset the
role was measured on: ``OUT/views.parquet`` (:mod:`workbench.runs.views`; the rows each dataset
declares, :mod:`workbench.datasets.view`). This section only draws those stored rows: per model,
one figure per role, the query x key square (:func:`workbench.report.patterns.pattern_figure`) or,
for a long prompt's decoding rows, the token strip
(:func:`workbench.report.patterns.token_strip_figure`), the span the dataset marks outlined (a
needle, a passage), titled with the role,
the head, its value and dataset, and captioned with what to look for.

A run folder written before views existed, or with ``views = false``, has no file: the section
says how to get one (re-run the sweep: only the views are computed). A role the report's
thresholds switch off, or whose head no longer passes them, is left out, so every view is of a
head the atlas above lists.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd
import plotly.graph_objects as go

from workbench.errors import WorkbenchError
from workbench.protocol.roles import Role
from workbench.report.page import Page, anchor, esc, fmt
from workbench.report.patterns import head_name, pattern_figure, position_labels, token_strip_figure

SQUARE_PX = 560  # a square view's plot side at most: small figures, a page a reader scrolls through
INTRO = (
    "The attention pattern of the strongest head of each role in the atlas (its top head: the most extreme "
    "value of the role's metric, on the dataset of that value), on item 0 of that dataset as the probes saw it. "
    "Repeated random tokens show induction, previous-token and duplicate heads; prose shows sinks; a needle-in-"
    "a-haystack item shows the decoding rows that write the answer, over every key. Buttons switch the colour "
    "scale between linear and log (weights span orders of magnitude)."
)


def _labels(frame: pd.DataFrame) -> list[str]:
    """``"position token"`` labels of a view's keys (stored for keys 0, 1, ...), in key order."""
    return position_labels(frame.drop_duplicates("key").sort_values("key")["key_token"])


def view_figure(frame: pd.DataFrame, model: str) -> go.Figure:
    """One stored view (the rows of one model and role) as its figure."""
    first = frame.iloc[0]
    head = (int(first["layer"]), int(first["head"]))
    queries = sorted(int(q) for q in frame["query"].unique())
    n_k = int(frame["key"].max()) + 1
    w = np.zeros((len(queries), n_k), dtype=np.float32)
    qi = {q: i for i, q in enumerate(queries)}
    w[[qi[int(q)] for q in frame["query"]], frame["key"].to_numpy(dtype=int)] = frame["weight"].to_numpy()
    labels = _labels(frame)
    title = (
        f"{first['role']}: {model} {head_name(head)}<br>{first['metric']} = {fmt(first['value'])} on {first['dataset']}"
    )
    if first["view"] == "strip":
        fig = token_strip_figure({head: w}, labels, queries, title=title)
    else:
        fig = pattern_figure({head: w}, labels, queries, title=title)
        side = min(SQUARE_PX, max(260, 9 * n_k))
        fig.update_layout(width=max(side + 220, 700), height=side + 200)  # wide enough for the title and buttons
    _mark(fig, frame)
    return fig


def _mark(fig: go.Figure, frame: pd.DataFrame) -> None:
    """Outline the keys the dataset marks (a niah needle, a counterfact passage), with its label."""
    marked = frame.loc[frame["mark"].astype(str) != "", ["key", "mark"]].drop_duplicates("key")
    if marked.empty:
        return
    lo, hi = int(marked["key"].min()), int(marked["key"].max())
    fig.add_shape(
        type="rect", xref="x", yref="paper", x0=lo - 0.5, x1=hi + 0.5, y0=0, y1=1, line={"color": "#d62728", "width": 2}
    )
    fig.add_annotation(
        x=(lo + hi) / 2, xref="x", y=1.0, yref="paper", yanchor="bottom", text=str(marked["mark"].iloc[0]),
        showarrow=False, font={"color": "#d62728"},
    )  # fmt: skip


def caption(frame: pd.DataFrame, role: Role | None) -> str:
    """What the figure shows and what to look for (HTML from escaped parts)."""
    first = frame.iloc[0]
    look = (role.look_for or role.what) if role is not None else ""
    rows = frame["query"].nunique()
    where = (
        f"{rows} decoding row(s) over all {frame['key'].nunique()} keys"
        if first["view"] == "strip"
        else f"query rows {frame['query'].min()}..{frame['query'].max()} over keys 0..{frame['key'].max()}"
    )
    return (
        f"<b>{esc(first['role'])}</b>: head {esc(head_name((int(first['layer']), int(first['head']))))}, "
        f"{esc(first['metric'])} = {esc(fmt(first['value']))} on {esc(first['dataset'])} "
        f"(item {esc(first['item'])}, {esc(where)}). Look for {esc(look)}."
    )


def collect(runs: Sequence[Any], rename: Mapping[tuple[str, str], str]) -> tuple[pd.DataFrame, list[str]]:
    """Every run's stored views (models renamed as the report's series) and notes on the runs
    without any: a sweep folder with no ``views.parquet``, one whose roles no head holds, an
    unreadable file. ``runs``: :class:`workbench.report.sources.Run`."""
    from workbench.runs.views import read_views

    frames, notes, missing = [], [], []
    for run in runs:
        try:
            found = read_views(run.path)
        except WorkbenchError as exc:
            notes.append(f"{run.label}: {exc.message} ({exc.fix})")
            continue
        if found is None:
            if run.config is not None:  # a sweep folder: it could have views
                missing.append(run.label)
            continue
        if found.empty:
            notes.append(f"{run.label}: no head passes a role's threshold, so there is no head to look at.")
            continue
        models = found["model"].astype(str)
        frames.append(found.assign(model=[rename.get((run.label, m), m) for m in models]))
    if missing:
        notes.append(
            f"No pattern views stored in {', '.join(missing)} (a run folder from before views, or a sweep with "
            "views = false): re-run its sweep with the same config and --out (views on, the default) to compute "
            "them; the saved units are not computed again."
        )
    return (pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()), notes


def section(page: Page, runs: Sequence[Any], rename: Mapping[tuple[str, str], str], roles: Sequence[Role]) -> None:
    """The section (nothing when no input is a sweep folder): per model, one figure per role
    with a stored view that the report's ``roles`` (thresholds applied) still hold."""
    table, notes = collect(runs, rename)
    if table.empty and not notes:
        return
    page.section(2, "Looking at the heads", "views")
    page.p(INTRO)
    for note in notes:
        page.p(note)
    if table.empty:
        return
    by_name = {r.name: r for r in roles}
    order = {r.name: i for i, r in enumerate(roles)}
    for model in dict.fromkeys(table["model"]):
        mine = table[table["model"] == model]
        kept = [r for r in dict.fromkeys(mine["role"]) if r in by_name]
        kept = [r for r in kept if by_name[r].holds(float(mine.loc[mine["role"] == r, "value"].iloc[0]))]
        page.section(3, f"Looking at the heads: {model}", anchor("views", model))
        if not kept:
            page.p("No role in this report's atlas has a stored view for this model.")
            continue
        for role in sorted(kept, key=lambda r: order[r]):
            frame = mine[mine["role"] == role]
            page.figure(view_figure(frame, model), caption(frame, by_name[role]))


__all__ = ["caption", "collect", "section", "view_figure"]
