"""The report's KV-cache section: a policy grid's accuracy and loss against the memory it keeps.

A ``workbench kv`` grid writes tidy rows (one per model, policy, selector, budget, task,
protocol, context length, needle depth, metric and seed) with the memory each point keeps:
``kv_tokens`` (keys kept, summed over layers and KV heads), ``kv_fraction`` (that over the full
cache's count, sliding-window layers counted as a fixed cost in both) and ``kv_bytes``
(``2 * d_head * dtype_bytes * kv_tokens``). The x axis of every figure here is ``kv_fraction``,
never head sparsity: a share of heads says nothing about memory when heads keep different
numbers of tokens (duo-attention#26, kvpress#228; budget accounting as in the reference's
section 6.3, after DuoAttention (mit-han-lab/duo-attention), RazorAttention (arXiv 2407.15891)
and HeadKV (FYYFU/HeadKV)).

The rows are recognised by ``probe == "kv"`` (or a ``kind`` column equal to ``"kv"``); they
carry the results columns (``model, dataset, probe, metric, layer, head, value, n`` with
``layer = head = -1``) plus the grid columns (:data:`GRID_COLUMNS`), as retrieval-ablation rows
do. :func:`split_kv` takes them out of the report's table so no probe section shows them.

Pure functions (each tested against a slow loop over the definition):

- :func:`curve_table`: per model, task, protocol, metric, selector and budget, the mean over
  lengths, depths and seeds (weighted by each row's ``n``) with the memory it costs;
- :func:`pareto_front`: the points no other point beats on both memory and quality;
- :func:`random_band`: the spread over seeds of random head choices at each budget;
- :func:`fraction_to_keep`: the smallest ``kv_fraction`` keeping a share of full-cache accuracy;
- :func:`length_depth`: accuracy by context length and needle depth at one budget.

:func:`section` writes the section onto a report :class:`~workbench.report.page.Page`.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.colors import qualitative
from plotly.subplots import make_subplots

from workbench.report.page import Page, anchor, esc, fmt
from workbench.report.split import plain_types, split_rows

MARKER = "kv"  # ``probe`` (or ``kind``) of a KV grid row
GRID_COLUMNS = (
    "model",
    "policy",
    "selector",
    "budget",
    "kv_tokens",
    "kv_fraction",
    "kv_bytes",
    "head_sparsity",
    "task",
    "protocol",
    "length",
    "depth",
    "metric",
    "value",
    "seed",
    "n",
)
NUMERIC = ("budget", "kv_tokens", "kv_fraction", "kv_bytes", "head_sparsity", "length", "depth", "value", "seed", "n")
TEXT = ("model", "policy", "selector", "task", "protocol", "metric")
FULL = "full"  # the selector (or policy) of the full-cache reference rows
LOWER_IS_BETTER = frozenset({"loss", "delta_loss", "nll"})
CURVE_METRIC = {"niah": "accuracy", "loss": "delta_loss"}  # what the curves draw per task
POINT_KEYS = ["model", "task", "protocol", "metric", "selector", "budget"]
FRONT_KEYS = ["model", "task", "protocol", "metric", "selector"]
TOL = 1e-12  # "reaches the threshold" allows this much rounding below it


# -- the rows ----------------------------------------------------------------------------------------


def kv_mask(table: pd.DataFrame) -> pd.Series:
    """True on the rows of a KV grid: ``probe == "kv"`` or ``kind == "kv"``."""
    mask = pd.Series(False, index=table.index)
    for col in ("probe", "kind"):
        if col in table.columns:
            mask |= table[col].astype("string").eq(MARKER).fillna(False).astype(bool)
    return mask


def split_kv(table: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """``(kv rows, every other row)``; kv rows that lack a grid column are a WorkbenchError."""
    return split_rows(
        table, kv_mask(table), GRID_COLUMNS, NUMERIC, TEXT, "KV grid rows (probe or kind 'kv')", "workbench kv"
    )


def tidy(frame: pd.DataFrame) -> pd.DataFrame:
    """The grid columns with plain types: floats (NaN where missing) and strings."""
    return plain_types(frame, NUMERIC, TEXT)


def human_bytes(n: Any) -> str:
    """``n`` bytes in binary units, about three significant digits: 512 B, 1.50 KiB, 12.0 MiB, 3.25 GiB."""
    try:
        v = float(n)
    except (TypeError, ValueError):
        return "n/a"
    if not math.isfinite(v) or v < 0:
        return "n/a"
    if round(v) < 1024:
        return f"{v:.0f} B"
    for unit in ("KiB", "MiB", "GiB", "TiB", "PiB"):
        v /= 1024.0
        text = f"{v:.2f}" if v < 10 else f"{v:.1f}" if v < 100 else f"{v:.0f}"
        if float(text) < 1024 or unit == "PiB":
            return f"{text} {unit}"
    return f"{v:.0f} PiB"  # pragma: no cover - the loop returns at PiB


def is_full(frame: pd.DataFrame) -> pd.Series:
    """The full-cache reference rows: selector or policy ``full``."""
    return frame["selector"].eq(FULL) | frame["policy"].eq(FULL)


def is_random(frame: pd.DataFrame) -> pd.Series:
    """Random-head rows: a selector named ``random`` (or ``random...``) with a seed >= 0."""
    return frame["selector"].str.startswith("random") & (frame["seed"] >= 0)


def higher_is_better(metric: str) -> bool:
    return metric not in LOWER_IS_BETTER


# -- aggregation -------------------------------------------------------------------------------------


def _weighted(frame: pd.DataFrame) -> pd.DataFrame:
    """Rows with a value, their weight ``w`` (``n``; 1 where n is missing) and weighted columns."""
    f = frame[frame["value"].notna()].copy()
    f["w"] = f["n"].fillna(1.0)
    f = f[f["w"] > 0]
    for c in ("value", "kv_fraction", "kv_bytes", "kv_tokens", "head_sparsity"):
        f["w_" + c] = f["w"] * f[c]
    return f


def _text_set(values: pd.Series) -> str:
    return " | ".join(dict.fromkeys(str(v) for v in values))


def curve_table(frame: pd.DataFrame, keys: Sequence[str] = tuple(POINT_KEYS)) -> pd.DataFrame:
    """One point per (model, task, protocol, metric, selector, budget): ``value``, ``kv_fraction``,
    ``kv_bytes``, ``kv_tokens`` and ``head_sparsity`` are means over the point's rows (lengths,
    depths, seeds) weighted by ``n``; ``n`` is their sum; ``*_min`` / ``*_max`` give the range of
    ``kv_fraction`` and ``kv_bytes`` over the rows (they grow with length); ``policy`` names the
    policies met, ``seeds`` counts random seeds, ``rows`` the rows. Rows without a value are left out."""
    f = _weighted(frame)
    keys = list(keys)
    if f.empty:
        return pd.DataFrame(columns=keys + ["value", "n", "kv_fraction", "kv_bytes", "policy", "seeds", "rows"])
    g = f.groupby(keys, sort=True, dropna=False)
    sums = g[["w"] + [c for c in f.columns if c.startswith("w_")]].sum()
    out = pd.DataFrame({c[2:]: sums[c] / sums["w"] for c in sums.columns if c.startswith("w_")})
    out["n"] = sums["w"]
    out["kv_fraction_min"], out["kv_fraction_max"] = g["kv_fraction"].min(), g["kv_fraction"].max()
    out["kv_bytes_min"], out["kv_bytes_max"] = g["kv_bytes"].min(), g["kv_bytes"].max()
    out["policy"] = g["policy"].agg(_text_set)
    out["seeds"] = g["seed"].agg(lambda s: s[s >= 0].nunique())
    out["rows"] = g.size()
    return out.reset_index()


def _front_mask(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Non-dominated points, ``x`` lower and ``y`` higher being better: a point is dropped when
    another has x <= and y >= with one of them strict. Equal points are all kept."""
    keep = np.zeros(len(x), dtype=bool)
    order = np.lexsort((-y, x))  # by x, the best y first among equal x
    best_before = -np.inf  # the best y at any strictly smaller x
    i = 0
    while i < len(order):
        j = i
        while j < len(order) and x[order[j]] == x[order[i]]:
            j += 1
        top = y[order[i]]
        if top > best_before:
            group = order[i:j]
            keep[group] = y[group] == top
        best_before = max(best_before, top)
        i = j
    return keep


def pareto_front(frame: pd.DataFrame, by: Sequence[str] | None = None) -> pd.DataFrame:
    """The rows of ``frame`` (points with ``kv_fraction``, ``value`` and ``metric``) that no row
    of their group dominates: less or equal memory and a better-or-equal value, one of the two
    strictly (value higher for accuracy, lower for loss and delta_loss). Groups: ``by``, by default
    the model, task, protocol, metric and selector columns present (a front per selector); rows
    with a missing x or value are never on a front. Sorted by group and ``kv_fraction``."""
    by = [c for c in FRONT_KEYS if c in frame.columns] if by is None else list(by)
    f = frame.dropna(subset=["kv_fraction", "value"])
    keep = []
    for _, g in f.groupby(by, sort=True, dropna=False) if by else [(None, f)]:
        sign = np.where([higher_is_better(m) for m in g["metric"]], 1.0, -1.0)
        mask = _front_mask(g["kv_fraction"].to_numpy(float), sign * g["value"].to_numpy(float))
        keep.append(g[mask].sort_values("kv_fraction", kind="stable"))
    return pd.concat(keep) if keep else f.iloc[:0]


def random_band(frame: pd.DataFrame) -> pd.DataFrame:
    """The random-head band: for random rows (selector ``random...``, seed >= 0), each seed's
    n-weighted mean over lengths and depths at each budget, then over seeds: ``mean``, ``std``
    (sample, ddof = 1; NaN with one seed), ``min``, ``max``, ``seeds``, and the mean
    ``kv_fraction`` of the seeds' points."""
    rand = frame[is_random(frame)] if len(frame) else frame
    per_seed = curve_table(rand, POINT_KEYS + ["seed"])
    cols = POINT_KEYS + ["mean", "std", "min", "max", "seeds", "kv_fraction"]
    if per_seed.empty:
        return pd.DataFrame(columns=cols)
    g = per_seed.groupby(POINT_KEYS, sort=True)
    out = g["value"].agg(["mean", "std", "min", "max"])
    out["seeds"] = g["seed"].nunique()
    out["kv_fraction"] = g["kv_fraction"].mean()
    return out.reset_index()[cols]


def fraction_to_keep(frame: pd.DataFrame, share: float = 0.95) -> pd.DataFrame:
    """Per model, protocol and selector: the smallest ``kv_fraction`` whose mean niah accuracy
    (over lengths, depths and seeds, weighted by n) is at least ``share`` x the full cache's on the
    same model and protocol (within 1e-12). ``reached`` is False (and ``kv_fraction`` NaN) when no
    budget gets there; ``full_accuracy`` is NaN when the grid has no full-cache rows. Accuracy
    need not stay above the threshold at larger budgets."""
    niah = frame[(frame["task"] == "niah") & (frame["metric"] == "accuracy")]
    points = curve_table(niah)
    full = curve_table(niah[is_full(niah)], ["model", "protocol"])
    ref = dict(zip(zip(full["model"], full["protocol"]), full["value"])) if len(full) else {}
    rows = []
    for (model, protocol, selector), g in points.groupby(["model", "protocol", "selector"], sort=True):
        if selector == FULL or (g["policy"] == FULL).all():
            continue
        acc = ref.get((model, protocol), float("nan"))
        threshold = share * acc
        ok = g[g["value"] >= threshold - TOL].sort_values(["kv_fraction", "budget"]) if np.isfinite(acc) else g.iloc[:0]
        best = ok.iloc[0] if len(ok) else None
        rows.append(
            {
                "model": model,
                "protocol": protocol,
                "selector": selector,
                "full_accuracy": acc,
                "threshold": threshold,
                "reached": best is not None,
                "kv_fraction": best["kv_fraction"] if best is not None else float("nan"),
                "budget": best["budget"] if best is not None else float("nan"),
                "value": best["value"] if best is not None else float("nan"),
            }
        )
    cols = ["model", "protocol", "selector", "full_accuracy", "threshold", "reached", "kv_fraction", "budget", "value"]
    return pd.DataFrame(rows, columns=cols)


def length_depth(
    frame: pd.DataFrame, selector: str, budget: float | None = None, protocol: str | None = None
) -> pd.DataFrame:
    """Mean niah accuracy of one selector (at one budget, any budget for the full cache; one
    protocol, or all) by context length (rows) and needle depth (columns), over seeds and
    repeats weighted by n."""
    f = frame[(frame["task"] == "niah") & (frame["metric"] == "accuracy") & (frame["selector"] == selector)]
    if protocol is not None:
        f = f[f["protocol"] == protocol]
    if budget is not None and selector != FULL:
        f = f[np.isclose(f["budget"], budget)]
    f = _weighted(f)
    if f.empty:
        return pd.DataFrame()
    sums = f.groupby(["length", "depth"])[["w", "w_value"]].sum()
    return (sums["w_value"] / sums["w"]).unstack("depth").sort_index().sort_index(axis=1)


# -- figures -----------------------------------------------------------------------------------------


def _colours(selectors: Sequence[str]) -> dict[str, str]:
    palette = qualitative.Plotly + qualitative.D3
    return {s: palette[i % len(palette)] for i, s in enumerate(selectors)}


def _selectors(points: pd.DataFrame) -> list[str]:
    """Selectors in a fixed order: scored ones by name, then random ones, full last."""
    names = sorted(set(points["selector"]))
    return sorted(names, key=lambda s: (s == FULL, s.startswith("random"), s))


def _range(lo: float, hi: float, text) -> str:
    return f" ({text(lo)} to {text(hi)} over lengths)" if np.isfinite(lo) and not np.isclose(lo, hi) else ""


def _hover(p: Any, metric: str) -> str:
    """The hover text of one point (user strings escaped; plotly reads hover text as markup)."""
    seeds = f"<br>seeds: {int(p.seeds)}" if p.seeds else ""
    return (
        f"<b>{esc(p.selector)}</b> ({esc(p.protocol)})<br>policy: {esc(p.policy)}<br>budget: {fmt(p.budget)}"
        f"<br>kv_fraction: {p.kv_fraction:.3f}{_range(p.kv_fraction_min, p.kv_fraction_max, lambda v: f'{v:.3f}')}"
        f"<br>kv_bytes: {human_bytes(p.kv_bytes)}{_range(p.kv_bytes_min, p.kv_bytes_max, human_bytes)}"
        f"<br>head_sparsity: {fmt(p.head_sparsity)}<br>{esc(metric)}: {fmt(p.value, 4)}<br>n = {fmt(p.n, 6)}{seeds}"
    )


def _axes(fig: go.Figure, metric: str, title: str) -> None:
    fig.update_layout(title=title, legend={"title": None}, height=460)
    fig.update_xaxes(title="kv_fraction (kept KV tokens / full cache)", range=[-0.02, 1.04])
    if metric == "accuracy":
        fig.update_yaxes(title="niah accuracy", range=[-0.03, 1.03])
    else:
        fig.update_yaxes(title=f"{metric} (vs full cache; lower is better)", zeroline=True, zerolinecolor="#444")


def _band_traces(fig: go.Figure, band: pd.DataFrame, colour: str, name: str) -> None:
    """min-max (light) and mean +- std (darker) as filled polygons behind the lines."""
    b = band.sort_values("kv_fraction")
    x = b["kv_fraction"].tolist()
    std = b["std"].fillna(0.0)
    for lo, hi, alpha, label in (
        (b["min"], b["max"], 0.10, "min-max"),
        (b["mean"] - std, b["mean"] + std, 0.22, "mean ± std"),
    ):
        fig.add_trace(
            go.Scatter(
                x=x + x[::-1],
                y=list(hi) + list(lo)[::-1],
                fill="toself",
                mode="lines",
                line={"width": 0},
                fillcolor=_rgba(colour, alpha),
                name=f"{name}: {label} over {int(b['seeds'].max())} seeds",
                legendgroup=name,
                hoverinfo="skip",
            )
        )


def _rgba(colour: str, alpha: float) -> str:
    c = colour.lstrip("#")
    r, g, b = (int(c[i : i + 2], 16) for i in (0, 2, 4))
    return f"rgba({r},{g},{b},{alpha})"


def curves_figure(points: pd.DataFrame, band: pd.DataFrame, full: pd.DataFrame, title: str) -> go.Figure:
    """One model and task: ``value`` against ``kv_fraction``, a line per selector (dashed per
    protocol when there are several), a marker per budget, the random band shaded behind and the
    full cache as a dotted line. ``points`` / ``band`` / ``full``: rows of :func:`curve_table`,
    :func:`random_band` and the full-cache points of the same model and task."""
    fig = go.Figure()
    metric = str(points["metric"].iloc[0]) if len(points) else "value"
    protocols = sorted(set(points["protocol"]))
    colours = _colours(_selectors(points))
    for (sel, proto), b in band.groupby(["selector", "protocol"], sort=True):
        _band_traces(fig, b, colours.get(sel, "#888888"), sel + (f" ({proto})" if len(protocols) > 1 else ""))
    for sel in _selectors(points):
        for k, proto in enumerate(protocols):
            g = points[(points["selector"] == sel) & (points["protocol"] == proto)].sort_values("kv_fraction")
            if g.empty or sel == FULL:
                continue
            name = sel + (f" ({proto})" if len(protocols) > 1 else "")
            fig.add_trace(
                go.Scatter(
                    x=g["kv_fraction"],
                    y=g["value"],
                    mode="lines+markers",
                    name=name,
                    legendgroup=sel,
                    line={"color": colours[sel], "dash": ("solid", "dash", "dot")[k % 3]},
                    hovertext=[_hover(p, metric) for p in g.itertuples()],
                    hoverinfo="text",
                )
            )
    for k, p in enumerate(full.itertuples()):
        fig.add_hline(
            y=p.value,
            line_dash="dot",
            line_color="#333",
            annotation_text=f"full cache ({esc(p.protocol)}): {fmt(p.value)}",
            annotation_position=("bottom left", "top left", "bottom right", "top right")[k % 4],
        )
    _axes(fig, metric, title)
    return fig


def _front_traces(fig: go.Figure, g: pd.DataFrame, front: pd.DataFrame, colour: str, name: str, dash: str) -> None:
    """One selector's points (faint) and its front (a step line through big markers)."""
    metric = str(g["metric"].iloc[0])
    fig.add_trace(
        go.Scatter(
            x=g["kv_fraction"],
            y=g["value"],
            mode="markers",
            marker={"color": colour, "size": 6, "opacity": 0.35},
            legendgroup=name,
            showlegend=False,
            hovertext=[_hover(p, metric) for p in g.itertuples()],
            hoverinfo="text",
        )
    )
    fig.add_trace(
        go.Scatter(
            x=front["kv_fraction"],
            y=front["value"],
            mode="lines+markers",
            name=f"{name} front",
            legendgroup=name,
            line={"color": colour, "shape": "hv", "dash": dash},
            marker={"size": 10, "line": {"width": 1, "color": "#222"}},
            hovertext=[_hover(p, metric) for p in front.itertuples()],
            hoverinfo="text",
        )
    )


def pareto_figure(points: pd.DataFrame, title: str) -> go.Figure:
    """Every point faint, each selector's Pareto front as a step line (one per protocol, dashed
    for the second), and the front over all selectors in black."""
    fig = go.Figure()
    metric = str(points["metric"].iloc[0]) if len(points) else "value"
    scored = points[points["selector"] != FULL]
    colours = _colours(_selectors(points))
    protocols = sorted(set(scored["protocol"]))
    front = pareto_front(scored)
    overall = pareto_front(scored, by=[c for c in FRONT_KEYS if c != "selector"])
    for k, proto in enumerate(protocols):
        dash = ("solid", "dash", "dot")[k % 3]
        where = f" ({proto})" if len(protocols) > 1 else ""
        for sel in _selectors(scored):
            g = scored[(scored["selector"] == sel) & (scored["protocol"] == proto)]
            if len(g):
                fr = front[(front["selector"] == sel) & (front["protocol"] == proto)]
                _front_traces(fig, g, fr, colours[sel], sel + where, dash)
        ov = overall[overall["protocol"] == proto]
        fig.add_trace(
            go.Scatter(
                x=ov["kv_fraction"],
                y=ov["value"],
                mode="lines",
                name="front over all selectors" + where,
                line={"color": "#111", "dash": dash, "width": 1, "shape": "hv"},
                hoverinfo="skip",
            )
        )
    _axes(fig, metric, title)
    return fig


def heatmap_figure(
    frame: pd.DataFrame, selectors: Sequence[str], budget: float, title: str, protocol: str | None = None
) -> go.Figure:
    """niah accuracy by length x depth, a panel per selector (the full cache at any budget)."""
    grids = [(s, length_depth(frame, s, budget, protocol)) for s in selectors]
    grids = [(s, g) for s, g in grids if not g.empty]
    fig = make_subplots(rows=1, cols=max(1, len(grids)), subplot_titles=[esc(s) for s, _ in grids], shared_yaxes=True)
    for i, (sel, g) in enumerate(grids):
        fig.add_trace(
            go.Heatmap(
                z=g.to_numpy(float),
                x=[fmt(d) for d in g.columns],
                y=[f"{int(v)}" for v in g.index],
                zmin=0.0,
                zmax=1.0,
                colorscale="Viridis",
                showscale=i == 0,
                colorbar={"title": {"text": "accuracy", "side": "right"}},
                hovertemplate=f"{esc(sel)}<br>length %{{y}}<br>depth %{{x}}<br>accuracy %{{z:.3f}}<extra></extra>",
            ),
            row=1,
            col=i + 1,
        )
        fig.update_xaxes(title="depth", type="category", row=1, col=i + 1)
    fig.update_yaxes(title="context length", type="category", row=1, col=1)
    fig.update_layout(title=title, height=360)
    return fig


# -- the section -------------------------------------------------------------------------------------


INTRO = (
    "Each point is one cache policy at one budget, evaluated causally: the cache is compressed once, and "
    "the keys a KV head does not keep are gone for every later query. The x axis is always kv_fraction, the "
    "kept key/value tokens summed over layers and KV heads over the full cache's count (sliding-window layers "
    "count as a fixed cost in both); kv_bytes = 2 x d_head x dtype bytes x kv_tokens is in the hover. Head "
    "sparsity (the share of KV heads without the long context) is in the hover too, never on an axis: heads "
    "keep different numbers of tokens, so it is not a memory measure. Values are means over context lengths "
    "and needle depths (and seeds for random heads) weighted by their item counts n."
)


def _protocols_text(kv: pd.DataFrame) -> str:
    protos = sorted(set(kv["protocol"]))
    what = {
        "question-agnostic": "the context compressed alone, the question decoded against the compressed cache",
        "question-aware": "the context and question compressed together",
    }
    return "Protocols: " + "; ".join(f"{p} ({what.get(p, 'as recorded')})" for p in protos) + "."


def _keep_table(keep: pd.DataFrame, share: float) -> str:
    if keep.empty:
        return ""
    rows = []
    for r in keep.itertuples():
        if not np.isfinite(r.full_accuracy):
            cell = "no full-cache rows"
        elif r.reached:
            cell = f"{r.kv_fraction:.3f} (budget {fmt(r.budget)}, accuracy {fmt(r.value)})"
        else:
            cell = "not reached"
        rows.append(
            f"<tr><td>{esc(r.model)}</td><td>{esc(r.protocol)}</td><td>{esc(r.selector)}</td>"
            f"<td>{esc(fmt(r.full_accuracy))}</td><td>{esc(cell)}</td></tr>"
        )
    return (
        f"<p>Smallest kv_fraction keeping at least {share:.0%} of full-cache niah accuracy (mean over lengths "
        "and depths; accuracy may dip again at larger budgets):</p>"
        '<table class="tbl" id="kv-keep"><thead><tr><th>model</th><th>protocol</th><th>selector</th>'
        f"<th>full-cache accuracy</th><th>smallest kv_fraction</th></tr></thead><tbody>{''.join(rows)}</tbody></table>"
    )


def _middle_budget(points: pd.DataFrame) -> float | None:
    budgets = sorted(set(points.loc[points["selector"] != FULL, "budget"].dropna()))
    return budgets[(len(budgets) - 1) // 2] if budgets else None


def _model_figures(page: Page, kv: pd.DataFrame, points: pd.DataFrame, band: pd.DataFrame, model: str) -> None:
    for task, metric in CURVE_METRIC.items():
        pts = points[(points["model"] == model) & (points["task"] == task) & (points["metric"] == metric)]
        if pts.empty:
            continue
        what = "niah accuracy" if task == "niah" else "next-token loss minus the full cache's (delta_loss)"
        b = band[(band["model"] == model) & (band["task"] == task) & (band["metric"] == metric)]
        full = pts[pts["selector"] == FULL]
        page.figure(
            curves_figure(pts, b, full, f"{model}: {what} vs kv_fraction"),
            f"<b>{esc(what)}</b> against kv_fraction: a line per selector, a marker per budget (hover for the "
            "policy, budget, kv_fraction, kv_bytes, head sparsity, value and n)"
            + ("; shaded: random heads over seeds, min-max (light) and mean ± std (darker)" if len(b) else "")
            + ("; dotted: the full cache" if len(full) else "")
            + ".",
        )
        page.figure(
            pareto_figure(pts, f"{model}: Pareto fronts ({task})"),
            f"<b>Pareto fronts</b> ({esc(task)}): big markers are the budgets no other budget of the same selector "
            f"(and protocol) beats on both memory and {'accuracy' if task == 'niah' else 'loss'}; faint markers the "
            "rest; black: the front over all selectors together.",
        )
    pts = points[(points["model"] == model) & (points["task"] == "niah")]
    budget = _middle_budget(pts)
    if budget is not None:
        sels = [s for s in _selectors(pts) if s != FULL][:5] + ([FULL] if (pts["selector"] == FULL).any() else [])
        sub = kv[kv["model"] == model]
        proto = sorted(set(pts["protocol"]))[0]
        page.figure(
            heatmap_figure(
                sub, sels, budget, f"{model}: niah accuracy by length and depth, budget {fmt(budget)}, {proto}", proto
            ),
            f"<b>niah accuracy by context length and needle depth</b> at budget {esc(fmt(budget))} (the middle "
            f"budget of the grid), protocol {esc(proto)}, a panel per selector (random heads averaged over seeds; "
            "the full cache for reference).",
        )


def section(page: Page, kv: pd.DataFrame, share: float = 0.95) -> None:
    """The KV-cache section of a report (nothing when ``kv`` has no rows): per model, the curves,
    the Pareto fronts and a length x depth heatmap, then the kv_fraction-to-keep table."""
    if kv.empty:
        return
    points = curve_table(kv)
    band = random_band(kv)
    page.section(2, "KV-cache policies", "kv")
    seeds = int(band["seeds"].max()) if len(band) else 0
    page.p(
        INTRO
        + f" {_protocols_text(kv)} Selectors: {', '.join(_selectors(points))}."
        + (f" Random heads: up to {seeds} seeds per budget." if seeds else "")
    )
    for model in dict.fromkeys(points["model"]):
        page.section(3, f"KV cache: {model}", anchor("kv", model))
        _model_figures(page, kv, points, band, model)
    page.add(_keep_table(fraction_to_keep(kv, share), share))
