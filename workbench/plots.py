"""Plotly figures from the tidy results table, one function per kind of figure.

Every function takes the long table (``model, dataset, probe, metric, layer, head, value, n``)
and returns a ``plotly.graph_objects.Figure`` usable as is in a notebook or in a report.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import pandas as pd
import plotly.express as px
import plotly.graph_objects as go

from workbench.errors import WorkbenchError


def _select(table: pd.DataFrame, metric: str, **where) -> pd.DataFrame:
    sub = table[table.metric == metric]
    for col, val in where.items():
        if val is not None:
            sub = sub[sub[col] == val]
    if sub.empty:
        have = ", ".join(sorted(table.metric.unique()))
        raise WorkbenchError(f"no rows for metric {metric!r}" + (f" with {where}" if any(where.values()) else ""), f"metrics in this table: {have}")
    return sub


def head_heatmap(table: pd.DataFrame, metric: str, model: str | None = None, dataset: str | None = None, title: str | None = None) -> go.Figure:
    """Layer x head heatmap of one metric; hover shows value, n and the head's rank."""
    sub = _select(table, metric, model=model, dataset=dataset).groupby(["layer", "head"], as_index=False).agg(value=("value", "mean"), n=("n", "sum"))
    sub["rank"] = sub.value.rank(ascending=False, method="min").astype("Int64")
    grid = sub.pivot(index="layer", columns="head", values="value")
    n = sub.pivot(index="layer", columns="head", values="n")
    rank = sub.pivot(index="layer", columns="head", values="rank")
    custom = np.dstack([n.to_numpy(dtype=float), rank.to_numpy(dtype=float)])
    fig = go.Figure(
        go.Heatmap(
            z=grid.to_numpy(dtype=float), x=list(grid.columns), y=list(grid.index), customdata=custom, colorscale="Viridis",
            colorbar={"title": metric},
            hovertemplate="layer %{y}, head %{x}<br>" + metric + " = %{z:.4f}<br>n = %{customdata[0]:.0f}<br>rank %{customdata[1]:.0f}<extra></extra>",
        )
    )
    fig.update_layout(title=title or f"{metric} per head", xaxis_title="head", yaxis_title="layer", yaxis_autorange="reversed", height=max(300, 18 * len(grid) + 120))
    fig.update_xaxes(dtick=1)
    return fig


def layer_curve(table: pd.DataFrame, metric: str, color: str = "model", title: str | None = None) -> go.Figure:
    """Mean (and max) of a metric over the heads of each layer."""
    sub = _select(table, metric)
    agg = sub.groupby([color, "layer"], as_index=False).agg(mean=("value", "mean"), max=("value", "max"))
    long = agg.melt(id_vars=[color, "layer"], value_vars=["mean", "max"], var_name="over heads", value_name=metric)
    fig = px.line(long, x="layer", y=metric, color=color, line_dash="over heads", markers=True, title=title or f"{metric} by layer")
    return fig


def metric_scatter(table: pd.DataFrame, x: str, y: str, color: str = "layer", title: str | None = None) -> go.Figure:
    """One point per head: metric ``x`` against metric ``y`` (e.g. retrieval vs sink_mass)."""
    keys = ["model", "dataset", "layer", "head"]
    a = _select(table, x)[keys + ["value"]].rename(columns={"value": x})
    b = _select(table, y)[keys + ["value"]].rename(columns={"value": y})
    both = a.drop(columns="dataset").merge(b.drop(columns="dataset"), on=["model", "layer", "head"])
    both["head_id"] = both.layer.astype(str) + "." + both["head"].astype(str)
    return px.scatter(both, x=x, y=y, color=color, hover_name="head_id", hover_data=["model"], title=title or f"{y} vs {x} per head")


def compare_runs(table_a: pd.DataFrame, table_b: pd.DataFrame, metric: str, labels: Sequence[str] = ("A", "B")) -> go.Figure:
    """Per-head difference B - A of one metric between two runs or models of the same shape."""
    a = _select(table_a, metric).groupby(["layer", "head"], as_index=False).value.mean()
    b = _select(table_b, metric).groupby(["layer", "head"], as_index=False).value.mean()
    diff = a.merge(b, on=["layer", "head"], suffixes=("_a", "_b"))
    if diff.empty:
        raise WorkbenchError("the two tables share no (layer, head)", "compare runs of models with the same shape")
    diff["value"] = diff.value_b - diff.value_a
    diff["metric"], diff["n"] = f"{metric} ({labels[1]} - {labels[0]})", 1
    return head_heatmap(diff, diff.metric.iloc[0], title=f"{metric}: {labels[1]} minus {labels[0]}")


def patching_heatmap(table: pd.DataFrame, metric: str = "patching", title: str | None = None) -> go.Figure:
    """Layer x head heatmap of a patching effect, on a diverging scale centred on 0."""
    fig = head_heatmap(table, metric, title=title or f"{metric} effect per head")
    z = np.nan_to_num(fig.data[0].z.astype(float))
    lim = float(np.abs(z).max()) or 1.0
    fig.update_traces(colorscale="RdBu", zmid=0, zmin=-lim, zmax=lim)
    return fig


def circuit_graph(nodes: pd.DataFrame, edges: pd.DataFrame, title: str = "circuit") -> go.Figure:
    """Heads as nodes placed by (head, layer), edges sender -> receiver coloured by effect.

    ``nodes``: columns ``layer, head`` and optional ``role``; ``edges``: ``sender_layer,
    sender_head, receiver_layer, receiver_head, effect`` (receiver_layer = n_layers for logits).
    """
    fig = go.Figure()
    for e in edges.itertuples():
        fig.add_trace(go.Scatter(x=[e.sender_head, e.receiver_head], y=[e.sender_layer, e.receiver_layer], mode="lines",
                                 line={"width": 1 + 4 * min(1.0, abs(e.effect)), "color": "crimson" if e.effect < 0 else "royalblue"},
                                 hoverinfo="text", text=f"{e.sender_layer}.{e.sender_head} -> {e.receiver_layer}.{e.receiver_head}: {e.effect:.3f}", showlegend=False))
    roles = nodes["role"] if "role" in nodes else pd.Series(["head"] * len(nodes))
    for role in roles.unique():
        sel = nodes[roles.to_numpy() == role]
        fig.add_trace(go.Scatter(x=sel["head"], y=sel.layer, mode="markers+text", name=str(role), marker={"size": 14},
                                 text=[f"{l}.{h}" for l, h in zip(sel.layer, sel["head"])], textposition="top center"))
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
    fig = px.line(df.sort_values(["item", "step"]), x="step", y="value", color="item", markers=True,
                  hover_data={"token": True, "item": True, "step": True, "value": ":.4f"},
                  title=title or f"{metric} per generated token", labels={"value": metric, "step": "generated token"})
    return fig


def faithfulness_curve(curves: dict[str, pd.DataFrame], target: float | None = None, size: str = "k",
                       title: str = "faithfulness vs circuit size") -> go.Figure:
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
    fig.update_layout(title=title, xaxis_title="circuit size (heads or edges, log)", yaxis_title="F(C) / F(M)", xaxis_type="log")
    return fig
