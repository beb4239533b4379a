"""Plotly figures from the tidy results table, one function per kind of figure.

Every function takes the long table (``model, dataset, probe, metric, layer, head, value, n``)
and returns a ``plotly.graph_objects.Figure`` usable as is in a notebook or in a report.

Colour scales and axes follow the metric's kind (:mod:`workbench.protocol.metrics`): [0, 1]
metrics on a fixed 0..1 sequential scale, signed metrics on a diverging scale centred on 0
(red positive, blue negative), metrics spanning orders of magnitude on a log10 scale. Pass
``scale=`` to override. Models of different depth line up on *relative depth*,
layer / (n_layers - 1): :func:`depth_profile`, :func:`depth_difference`, and
:func:`head_grids` for per-model grids side by side.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np
import pandas as pd
import plotly.express as px
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from workbench.errors import WorkbenchError
from workbench.report import kinds
from workbench.report.notebook import offline_notebook  # noqa: F401  (workbench.plots.offline_notebook)

SEQUENTIAL = "Viridis"
DIVERGING = "RdBu_r"  # red = positive, blue = negative, white = 0


def _finite(values) -> np.ndarray:
    v = np.asarray(values, dtype=float).ravel()
    return v[np.isfinite(v)]


def _log10(z: np.ndarray) -> np.ndarray:
    z = np.asarray(z, dtype=float)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(z > 0, np.log10(np.where(z > 0, z, 1.0)), np.nan)


def color_scale(metric: str, values, scale: str | None = None) -> dict:
    """Colour arguments (``colorscale, cmin, cmax, cmid``, colour-bar ticks) for ``metric``'s
    values on its kind's scale; ``scale`` overrides (bounded / signed / positive / log). For
    ``log`` the caller plots log10 of the values (:func:`_log10`); the ticks read as values."""
    v = _finite(values)
    scale = scale or kinds.scale_for(metric, v)
    bar: dict = {"title": {"text": metric, "side": "right"}}
    if scale == "bounded":
        return {"scale": scale, "colorscale": SEQUENTIAL, "cmin": 0.0, "cmax": 1.0, "colorbar": bar}
    if scale == "signed":
        lim = float(np.abs(v).max()) if v.size and np.abs(v).max() > 0 else 1.0
        return {"scale": scale, "colorscale": DIVERGING, "cmin": -lim, "cmax": lim, "cmid": 0.0, "colorbar": bar}
    if scale == "log":
        lv = _finite(_log10(v))
        lo, hi = (float(np.floor(lv.min())), float(np.ceil(lv.max()))) if lv.size else (0.0, 1.0)
        ticks = np.arange(lo, hi + 1)
        bar.update(tickvals=ticks.tolist(), ticktext=[f"{10**t:g}" for t in ticks])
        bar["title"]["text"] = f"{metric} (log scale)"
        return {
            "scale": scale,
            "colorscale": SEQUENTIAL,
            "cmin": lo,
            "cmax": hi if hi > lo else lo + 1,
            "colorbar": bar,
        }
    return {"scale": scale, "colorscale": SEQUENTIAL, "colorbar": bar}


def _heatmap_color(c: dict) -> dict:
    """color_scale() as go.Heatmap arguments (z* instead of c*)."""
    out = {"colorscale": c["colorscale"], "colorbar": c["colorbar"]}
    for a, b in (("cmin", "zmin"), ("cmax", "zmax"), ("cmid", "zmid")):
        if a in c:
            out[b] = c[a]
    return out


def _select(table: pd.DataFrame, metric: str, **where) -> pd.DataFrame:
    sub = table[table.metric == metric]
    for col, val in where.items():
        if val is not None:
            sub = sub[sub[col] == val]
    if sub.empty:
        have = ", ".join(sorted(table.metric.unique()))
        raise WorkbenchError(
            f"no rows for metric {metric!r}" + (f" with {where}" if any(where.values()) else ""),
            f"metrics in this table: {have}",
        )
    return sub


def head_heatmap(
    table: pd.DataFrame,
    metric: str,
    model: str | None = None,
    dataset: str | None = None,
    title: str | None = None,
    scale: str | None = None,
) -> go.Figure:
    """Layer x head heatmap of one metric; hover shows value, n and the head's rank.

    The colour scale follows the metric's kind (``scale`` overrides): 0..1 for shares,
    diverging around 0 for signed effects, log10 for metrics spanning orders of magnitude."""
    sub = (
        _select(table, metric, model=model, dataset=dataset)
        .groupby(["layer", "head"], as_index=False)
        .agg(value=("value", "mean"), n=("n", "sum"))
    )
    c = color_scale(metric, sub.value, scale)
    by = sub.value.abs() if c["scale"] == "signed" else sub.value
    sub["rank"] = by.rank(ascending=kinds.info(metric).rank == "low", method="min").astype("Int64")
    grid = sub.pivot(index="layer", columns="head", values="value")
    n = sub.pivot(index="layer", columns="head", values="n")
    rank = sub.pivot(index="layer", columns="head", values="rank")
    values = grid.to_numpy(dtype=float)
    custom = np.dstack([n.to_numpy(dtype=float), rank.to_numpy(dtype=float), values])
    fig = go.Figure(
        go.Heatmap(
            z=_log10(values) if c["scale"] == "log" else values,
            x=list(grid.columns),
            y=list(grid.index),
            customdata=custom,
            hovertemplate="layer %{y}, head %{x}<br>"
            + metric
            + " = %{customdata[2]:.4g}<br>n = %{customdata[0]:.0f}<br>rank %{customdata[1]:.0f}<extra></extra>",
            **_heatmap_color(c),
        )
    )
    fig.update_layout(
        title=title or f"{metric} per head",
        xaxis_title="head",
        yaxis_title="layer",
        yaxis_autorange="reversed",
        height=max(300, 18 * len(grid) + 120),
    )
    fig.update_xaxes(dtick=1)
    return fig


def _value_axis(fig: go.Figure, metric: str, values, scale: str | None = None, axis: str = "y") -> None:
    """Value axis by the metric's kind: 0..1 for shares, log for wide ranges, a zero line for signed."""
    scale = scale or kinds.scale_for(metric, _finite(values))
    upd = {
        "bounded": {"range": [-0.02, 1.02]},
        "log": {"type": "log"},
        "signed": {"zeroline": True, "zerolinewidth": 2, "zerolinecolor": "#444"},
    }
    (fig.update_yaxes if axis == "y" else fig.update_xaxes)(**upd.get(scale, {}))


def layer_curve(table: pd.DataFrame, metric: str, color: str = "model", title: str | None = None) -> go.Figure:
    """Mean and max of a metric over the heads of each layer (also the min for signed metrics
    and for metrics where low values stand out, like entropy)."""
    sub = _select(table, metric)
    signed = kinds.scale_for(metric, _finite(sub.value)) == "signed"
    agg = sub.groupby([color, "layer"], as_index=False).agg(
        mean=("value", "mean"), max=("value", "max"), min=("value", "min")
    )
    stats = ["mean", "max", "min"] if signed or kinds.info(metric).rank == "low" else ["mean", "max"]
    long = agg.melt(id_vars=[color, "layer"], value_vars=stats, var_name="over heads", value_name=metric)
    fig = px.line(
        long,
        x="layer",
        y=metric,
        color=color,
        line_dash="over heads",
        markers=True,
        title=title or f"{metric} by layer",
    )
    _value_axis(fig, metric, sub.value)
    return fig


def metric_scatter(
    table: pd.DataFrame,
    x: str,
    y: str,
    color: str = "layer",
    title: str | None = None,
    x_dataset: str | None = None,
    y_dataset: str | None = None,
) -> go.Figure:
    """One point per head: metric ``x`` against metric ``y`` (e.g. retrieval vs induction).

    A metric measured on several datasets is averaged over them per head (weighted by ``n``)
    unless ``x_dataset`` / ``y_dataset`` pick one. Axes follow each metric's kind;
    ``color="depth"`` colours by relative depth (layer / last layer seen in the table)."""
    keys = ["model", "layer", "head"]

    def per_head(metric: str, dataset: str | None) -> pd.DataFrame:
        sub = _select(table, metric, dataset=dataset)
        sub = sub[sub.layer >= 0].dropna(subset=["value"])
        w = sub.n.clip(lower=1).astype(float)
        g = sub.assign(_wv=sub.value * w, _w=w).groupby(keys, as_index=False)[["_wv", "_w"]].sum()
        return g.assign(**{metric: g._wv / g._w})[keys + [metric]]

    both = per_head(x, x_dataset).merge(per_head(y, y_dataset), on=keys)
    both["head_id"] = both.layer.astype(str) + "." + both["head"].astype(str)
    if color == "depth":  # relative depth, so models of different depth share one colour axis
        last = both.groupby("model").layer.transform("max")
        both["depth"] = _relative_depth(both.layer, last + 1)
    several = both.model.nunique() > 1  # one panel per model, sharing axes and colours
    fig = px.scatter(
        both,
        x=x,
        y=y,
        color=color,
        hover_name="head_id",
        hover_data=["model"],
        title=title or f"{y} vs {x} per head",
        facet_col="model" if several else None,
        facet_col_wrap=3 if several else 0,
    )
    if several:
        fig.for_each_annotation(lambda a: a.update(text=a.text.split("=", 1)[-1]))
    for axis, metric in (("x", x), ("y", y)):
        _value_axis(fig, metric, both[metric], axis=axis)
    return fig


def compare_runs(
    table_a: pd.DataFrame, table_b: pd.DataFrame, metric: str, labels: Sequence[str] = ("A", "B")
) -> go.Figure:
    """Per-head difference B - A of one metric between two runs or models of the same shape."""
    a = _select(table_a, metric).groupby(["layer", "head"], as_index=False).value.mean()
    b = _select(table_b, metric).groupby(["layer", "head"], as_index=False).value.mean()
    diff = a.merge(b, on=["layer", "head"], suffixes=("_a", "_b"))
    if diff.empty:
        raise WorkbenchError("the two tables share no (layer, head)", "compare runs of models with the same shape")
    diff["value"] = diff.value_b - diff.value_a
    diff["metric"], diff["n"] = f"{metric} ({labels[1]} - {labels[0]})", 1
    return head_heatmap(diff, diff.metric.iloc[0], title=f"{metric}: {labels[1]} minus {labels[0]}", scale="signed")


def _relative_depth(layer, n_layers) -> np.ndarray:
    n = np.asarray(n_layers, dtype=float)
    return np.where(n > 1, np.asarray(layer, dtype=float) / np.maximum(n - 1, 1), 0.0)


def depth_table(
    table: pd.DataFrame, metric: str, color: str = "model", n_layers: Mapping[str, int] | int | None = None
) -> pd.DataFrame:
    """Per (series, layer): mean, max and min of ``metric`` over the layer's heads, with the
    layer's relative depth ``layer / (n_layers - 1)`` (0 = first layer, 1 = last).

    ``n_layers``: per series (``{model: 30}``) or one number; by default each series' largest
    layer + 1 in the table."""
    sub = _select(table, metric)
    sub = sub[sub.layer >= 0].dropna(subset=["value"])
    agg = sub.groupby([color, "layer"], as_index=False).agg(
        mean=("value", "mean"), max=("value", "max"), min=("value", "min"), heads=("value", "size")
    )
    inferred = agg.groupby(color).layer.max() + 1
    if n_layers is None:
        agg["n_layers"] = agg[color].map(inferred)
    elif isinstance(n_layers, Mapping):
        agg["n_layers"] = [int(n_layers.get(s, inferred[s])) for s in agg[color]]
    else:
        agg["n_layers"] = int(n_layers)
    if (agg.layer >= agg.n_layers).any():
        bad = agg[agg.layer >= agg.n_layers].iloc[0]
        raise WorkbenchError(
            f"{bad[color]!r} has a layer {int(bad.layer)} but n_layers = {int(bad.n_layers)}",
            "pass each series' true layer count",
        )
    agg["depth"] = _relative_depth(agg.layer, agg.n_layers)
    first_seen = {v: i for i, v in enumerate(dict.fromkeys(sub[color]))}  # series in table order, not alphabetical
    return (
        agg.assign(_o=agg[color].map(first_seen)).sort_values(["_o", "layer"]).drop(columns="_o").reset_index(drop=True)
    )


def depth_profile(
    table: pd.DataFrame,
    metric: str,
    color: str = "model",
    n_layers: Mapping[str, int] | int | None = None,
    title: str | None = None,
    scale: str | None = None,
) -> go.Figure:
    """Models (or runs) as lines over relative depth layer / (n_layers - 1): the layer mean over
    heads (solid) and the layer's highest head (dotted; for signed metrics and metrics where low
    values stand out, like entropy, also the lowest, dashed), so models with different layer
    counts compare at the same depth."""
    d = depth_table(table, metric, color=color, n_layers=n_layers)
    scale = scale or kinds.scale_for(metric, _finite(_select(table, metric).value))
    fig = go.Figure()
    palette = px.colors.qualitative.Plotly
    low = scale == "signed" or kinds.info(metric).rank == "low"  # where low values stand out, show the min too
    stats = [("mean", "solid", "mean over heads"), ("max", "dot", "max over heads")] + (
        [("min", "dash", "min over heads")] if low else []
    )
    for i, (series, g) in enumerate(d.groupby(color, sort=False)):
        colour = palette[i % len(palette)]
        for stat, dash, label in stats:
            fig.add_trace(
                go.Scatter(
                    x=g.depth,
                    y=g[stat],
                    mode="lines+markers",
                    name=f"{series}: {label}",
                    legendgroup=str(series),
                    line={"color": colour, "dash": dash, "width": 2.5 if stat == "mean" else 1.2},
                    marker={"size": 6 if stat == "mean" else 4},
                    customdata=np.stack([g.layer, g.n_layers], axis=1),
                    hovertemplate=f"{series}<br>layer %{{customdata[0]}} of %{{customdata[1]}} (depth %{{x:.2f}})"
                    f"<br>{label}: %{{y:.4g}}<extra></extra>",
                )
            )
    fig.update_layout(
        title=title or f"{metric} by relative depth",
        xaxis_title="relative depth: layer / (n_layers - 1)",
        yaxis_title=metric,
        legend={"groupclick": "togglegroup"},
    )
    fig.update_xaxes(range=[-0.03, 1.03])
    _value_axis(fig, metric, d[["mean", "max", "min"]].to_numpy(), scale=scale)
    return fig


def depth_difference(
    table: pd.DataFrame,
    metric: str,
    reference: str | None = None,
    color: str = "model",
    n_layers: Mapping[str, int] | int | None = None,
    stat: str = "mean",
    title: str | None = None,
) -> go.Figure:
    """Each series minus ``reference`` (default: the first) along relative depth: the layer
    ``stat`` (mean or max over heads) of both, linearly interpolated onto the union of their
    depths, so models with different layer counts can be subtracted."""
    d = depth_table(table, metric, color=color, n_layers=n_layers)
    series = list(dict.fromkeys(d[color]))
    if len(series) < 2:
        raise WorkbenchError(f"{metric}: only one {color} in the table", f"a difference needs two {color}s")
    reference = series[0] if reference is None else reference
    if reference not in series:
        raise WorkbenchError(
            f"reference {reference!r} is not a {color} of this table", f"choose from: {', '.join(map(str, series))}"
        )
    ref = d[d[color] == reference]
    fig = go.Figure()
    for s in series:
        if s == reference:
            continue
        g = d[d[color] == s]
        x = np.union1d(ref.depth.to_numpy(), g.depth.to_numpy())
        y = np.interp(x, g.depth, g[stat]) - np.interp(x, ref.depth, ref[stat])
        fig.add_trace(
            go.Scatter(
                x=x,
                y=y,
                mode="lines+markers",
                name=f"{s} - {reference}",
                hovertemplate=f"depth %{{x:.2f}}<br>{s} - {reference}: %{{y:.4g}}<extra></extra>",
            )
        )
    fig.update_layout(
        title=title or f"{metric}: difference of layer {stat}s by relative depth (minus {reference})",
        xaxis_title="relative depth: layer / (n_layers - 1)",
        yaxis_title=f"{metric} difference ({stat} over heads)",
    )
    fig.update_xaxes(range=[-0.03, 1.03])
    fig.update_yaxes(zeroline=True, zerolinewidth=2, zerolinecolor="#444")
    return fig


def depth_overview(
    table: pd.DataFrame,
    metrics: Sequence[str],
    color: str = "model",
    n_layers: Mapping[str, int] | int | None = None,
    max_cols: int = 3,
    title: str | None = None,
) -> go.Figure:
    """Small multiples: one panel per metric, one line per model (or run): the layer mean over
    heads against relative depth. The cross-model picture of a whole run in one figure."""
    metrics = list(metrics)
    if not metrics:
        raise WorkbenchError("no metrics to plot", "pass one or more metric names")
    cols = min(max_cols, len(metrics))
    rows = -(-len(metrics) // cols)
    height = 230 * rows + 130
    fig = make_subplots(
        rows=rows, cols=cols, subplot_titles=metrics, horizontal_spacing=0.07, vertical_spacing=min(0.3, 75 / height)
    )
    palette = px.colors.qualitative.Plotly
    colours: dict[str, str] = {}
    for i, metric in enumerate(metrics):
        d = depth_table(table, metric, color=color, n_layers=n_layers)
        scale = kinds.scale_for(metric, _finite(d["mean"]))
        for series, g in d.groupby(color, sort=False):
            first = series not in colours
            colours.setdefault(series, palette[len(colours) % len(palette)])
            fig.add_trace(
                go.Scatter(
                    x=g.depth,
                    y=g["mean"],
                    mode="lines+markers",
                    name=str(series),
                    legendgroup=str(series),
                    showlegend=first,
                    line={"color": colours[series], "width": 2},
                    marker={"size": 4},
                    customdata=np.stack([g.layer, g.n_layers], axis=1),
                    hovertemplate=f"{series}<br>{metric}: layer %{{customdata[0]}} of %{{customdata[1]}} "
                    "(depth %{x:.2f})<br>mean %{y:.4g}<extra></extra>",
                ),
                row=i // cols + 1,
                col=i % cols + 1,
            )
        upd = {
            "bounded": {"range": [-0.02, 1.02]},
            "log": {"type": "log"},
            "signed": {"zeroline": True, "zerolinecolor": "#444"},
        }.get(scale, {})
        fig.update_yaxes(row=i // cols + 1, col=i % cols + 1, **upd)
    fig.update_xaxes(range=[-0.03, 1.03])
    fig.update_xaxes(title_text="relative depth", row=rows)
    fig.update_layout(
        title=title or "layer means by relative depth",
        height=height,
        margin={"t": 110},
        legend={"orientation": "h", "yanchor": "bottom", "y": 1 + 45 / height, "xanchor": "right", "x": 1},
    )
    return fig


def head_grids(
    table: pd.DataFrame,
    metric: str,
    facet: str | Sequence[str] = "model",
    title: str | None = None,
    scale: str | None = None,
    max_cols: int = 3,
    n_layers: Mapping[str, int] | None = None,
) -> go.Figure:
    """Layer x head heatmaps of one metric side by side, one per ``facet`` value (models, runs,
    datasets), on one shared colour scale; each keeps its own layer and head axes. ``n_layers``
    adds each facet's relative depth to the hover."""
    facets = [facet] if isinstance(facet, str) else list(facet)
    sub = _select(table, metric)
    sub = sub[sub.layer >= 0]
    label = sub[facets].astype(str).agg(" / ".join, axis=1)
    sub = sub.assign(_facet=label)
    names = [n for n in dict.fromkeys(label) if sub[sub._facet == n].value.notna().any()]
    if not names:
        raise WorkbenchError(f"no values for {metric!r}", "every head's value is missing (n = 0)")
    c = color_scale(metric, sub.value, scale)
    cols = min(max_cols, len(names))
    rows = -(-len(names) // cols)
    fig = make_subplots(
        rows=rows,
        cols=cols,
        subplot_titles=names if len(names) > 1 else None,
        horizontal_spacing=0.06 if cols > 1 else 0.1,
        vertical_spacing=0.08,
    )
    max_layers = 1
    for i, name in enumerate(names):
        g = (
            sub[sub._facet == name]
            .groupby(["layer", "head"], as_index=False)
            .agg(value=("value", "mean"), n=("n", "sum"))
        )
        grid = g.pivot(index="layer", columns="head", values="value")
        nn = g.pivot(index="layer", columns="head", values="n")
        max_layers = max(max_layers, len(grid))
        values = grid.to_numpy(dtype=float)
        total = (n_layers or {}).get(name, int(grid.index.max()) + 1)
        depth = np.repeat(_relative_depth(np.asarray(grid.index), total)[:, None], grid.shape[1], axis=1)
        fig.add_trace(
            go.Heatmap(
                z=_log10(values) if c["scale"] == "log" else values,
                x=list(grid.columns),
                y=list(grid.index),
                coloraxis="coloraxis",
                customdata=np.dstack([values, nn.to_numpy(dtype=float), depth]),
                hovertemplate=f"{name}<br>layer %{{y}}, head %{{x}} (depth %{{customdata[2]:.2f}})"
                f"<br>{metric} = %{{customdata[0]:.4g}}<br>n = %{{customdata[1]:.0f}}<extra></extra>",
            ),
            row=i // cols + 1,
            col=i % cols + 1,
        )
    fig.update_yaxes(autorange="reversed", title_text="layer")
    fig.update_xaxes(title_text="head", dtick=1 if sub["head"].max() < 20 else None)
    fig.update_layout(
        coloraxis={k: v for k, v in c.items() if k != "scale"},
        title=title or f"{metric} per head",
        height=max(320, rows * (16 * max_layers + 90) + 60),
    )
    return fig


def patching_heatmap(table: pd.DataFrame, metric: str = "patching", title: str | None = None) -> go.Figure:
    """Layer x head heatmap of a patching effect, on a diverging scale centred on 0."""
    return head_heatmap(table, metric, title=title or f"{metric} effect per head", scale="signed")


def circuit_graph(nodes: pd.DataFrame, edges: pd.DataFrame, title: str = "circuit") -> go.Figure:
    """Heads as nodes placed by (head, layer), edges sender -> receiver coloured by effect.

    ``nodes``: columns ``layer, head`` and optional ``role``; ``edges``: ``sender_layer,
    sender_head, receiver_layer, receiver_head, effect`` (receiver_layer = n_layers for logits).
    """
    fig = go.Figure()
    for e in edges.itertuples():
        fig.add_trace(
            go.Scatter(
                x=[e.sender_head, e.receiver_head],
                y=[e.sender_layer, e.receiver_layer],
                mode="lines",
                line={"width": 1 + 4 * min(1.0, abs(e.effect)), "color": "crimson" if e.effect < 0 else "royalblue"},
                hoverinfo="text",
                text=f"{e.sender_layer}.{e.sender_head} -> {e.receiver_layer}.{e.receiver_head}: {e.effect:.3f}",
                showlegend=False,
            )
        )
    roles = nodes["role"] if "role" in nodes else pd.Series(["head"] * len(nodes))
    for role in roles.unique():
        sel = nodes[roles.to_numpy() == role]
        fig.add_trace(
            go.Scatter(
                x=sel["head"],
                y=sel.layer,
                mode="markers+text",
                name=str(role),
                marker={"size": 14},
                text=[f"{layer}.{h}" for layer, h in zip(sel.layer, sel["head"])],
                textposition="top center",
            )
        )
    fig.update_layout(title=title, xaxis_title="head", yaxis_title="layer", yaxis_autorange="reversed")
    return fig


def token_curve(table: pd.DataFrame, metric: str = "t_vhd", title: str | None = None) -> go.Figure:
    """A per-token metric (e.g. T-VHD) along each item's generated answer; hover shows the token.

    Low T-VHD marks tokens produced with little regard to the image (the paper's hallucination
    signal).
    """
    df = table[(table["metric"] == metric)].dropna(subset=["value"])
    if df.empty or "step" not in df.columns:
        raise WorkbenchError(f"no per-token rows for {metric!r}", "run the vhd probe (steps=all) to get t_vhd rows")
    df = df.assign(step=df["step"].astype(int), item=df["item"].astype(str), token=df["token"].fillna("").astype(str))
    fig = px.line(
        df.sort_values(["item", "step"]),
        x="step",
        y="value",
        color="item",
        markers=True,
        hover_data={"token": True, "item": True, "step": True, "value": ":.4f"},
        title=title or f"{metric} per generated token",
        labels={"value": metric, "step": "generated token"},
    )
    return fig


def faithfulness_curve(
    curves: dict[str, pd.DataFrame],
    target: float | None = None,
    size: str = "k",
    title: str = "faithfulness vs circuit size",
) -> go.Figure:
    """Faithfulness F(C)/F(M) of the top-k circuits against k, one line per curve (e.g. ``{"ioi
    heads": ..., "ioi edges": ...}``, each with columns ``k`` and ``faithfulness``, as in a
    circuit's ``circuit.json`` ``curves``), on a log size axis, with the target as a dashed line."""
    fig = go.Figure()
    for name, df in curves.items():
        df = pd.DataFrame(df).sort_values(size)
        x = df[size].clip(lower=0.8)  # k = 0 (everything ablated) sits at the left edge of the log axis
        hover = [f"{name}: {int(k)} -> F = {f:.3f}" for k, f in zip(df[size], df.faithfulness)]
        fig.add_trace(go.Scatter(x=x, y=df.faithfulness, mode="lines+markers", name=name, text=hover, hoverinfo="text"))
    if target is not None:
        fig.add_hline(y=target, line_dash="dash", annotation_text=f"target {target}")
    fig.add_hline(y=1.0, line_dash="dot", line_color="grey")
    fig.update_layout(
        title=title, xaxis_title="circuit size (heads or edges, log)", yaxis_title="F(C) / F(M)", xaxis_type="log"
    )
    return fig


# attention-pattern views of a few heads on one prompt (issue 34); imported last: that module draws
# from the rows the engine keeps and does not import this one
from workbench.report.patterns import attention_pattern, pattern_figure, token_strip_figure  # noqa: E402, F401
