"""Self-contained HTML reports of one or more runs: the page a researcher reads first.

Order of the page: a one-paragraph summary of each run (models, datasets, prompt and token
counts, probes, when and how long) and a table of the top heads per metric; the head atlas (one
layer x head grid per model, every role each head's scores support, thresholds stated;
hovering a cell shows all of that head's metrics); the attention pattern of each role's strongest
head (:mod:`workbench.report.views`); with several models or runs, a comparison on
relative depth; one section per probe with figures whose scales fit the metric
(:mod:`workbench.protocol.metrics`) and captions saying how to read them; metric-vs-metric
scatters; KV-cache policy grids (:mod:`workbench.report.kv`); circuits; the definitions of
every metric shown (copied from ``docs/metrics.md``, so the page works offline); example
prompts; and the raw configuration and metadata, collapsed.

One file: plotly.js is inlined once, the figures' data is one JSON block with ``<``, ``>`` and
``&`` escaped (no user string can close a script tag), and every piece of user text in the
body goes through ``html.escape`` (the tooltip builds its text with ``textContent``).

``build_report(["runs/a", "runs/b"])`` compares runs; a run is a sweep folder, a results
``.parquet``, or a ``workbench circuit`` output folder (``*/circuit.json``; inside a run folder
as ``circuits/TASK/circuit.json`` its roles join that run's atlas).

Modules: this one writes the sections; :mod:`workbench.report.sources` reads the inputs (runs,
series, timing, token counts); :mod:`workbench.report.page` is the HTML machinery (figures
JSON, CSS, the render and tooltip script).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import pandas as pd

from workbench.errors import WorkbenchError
from workbench.files import targets
from workbench.files.atomic import make_folder
from workbench.report import definitions, gate, kinds, kv, plots, views
from workbench.report.atlas import atlas, head_scores, probe_roles, role_style, roles_with
from workbench.report.page import Page, anchor, esc, fmt, render_html, safe_json
from workbench.report.sources import Run, Series, load_run, run_labels, series_of, tokens_text, when_text

MAX_ITEM_ROWS = 40


def _metric_link(metric: str) -> str:
    return f'<a class="metric" href="#{esc(anchor("def", metric))}"><code>{esc(metric)}</code></a>'


# -- captions ----------------------------------------------------------------------------------


def _what(metric: str, values: Iterable[float] | None = None) -> str:
    return f"<b>{esc(metric)}</b>: {esc(definitions.described(kinds.info(metric, values)))}."


def _scale_sentence(metric: str, scale: str) -> str:
    mi = kinds.info(metric)
    if scale == "bounded":
        return f"Colour runs from 0 to 1 on every panel; bright = {esc(mi.high)}."
    if scale == "signed":
        return (
            f"Red = positive ({esc(mi.high)}), blue = negative ({esc(mi.low)}), white = 0; "
            "the scale is symmetric around 0."
        )
    if scale == "log":
        return f"Colour is on a log scale (each tick is 10 times the last); bright = {esc(mi.high)}; blank cells are 0."
    return f"Brighter = higher ({esc(mi.high)}); darker = {esc(mi.low)}."


def _caption(metric: str, how: str, values: Iterable[float] | None = None) -> str:
    return f'{_what(metric, values)} {how} <a href="#{esc(anchor("def", metric))}">Definition</a>.'


GRID_HOW = (
    "Each cell is one head: rows are layers (first layer at the top), columns are heads; hover for the value and n."
)
DEPTH_HOW = (
    "Solid lines: mean over a layer's heads; dotted: the layer's highest head{low}. The x axis is relative depth, "
    "layer / (n_layers - 1), so 0 is each model's first layer and 1 its last, whatever its layer count."
)


# -- summary ---------------------------------------------------------------------------------------


def _model_text(s: Series) -> str:
    """One model of a run as the summary names it: its shape, then what its metadata records."""
    i = s.info
    shape = (
        f"{i['n_layers']} layers x {i['n_heads']} heads = {i['n_layers'] * i['n_heads']} heads"
        if i.get("n_layers") and i.get("n_heads")
        else "shape not recorded"
    )
    extra = ", ".join(
        x
        for x in (
            i.get("architecture"),
            f"{i['n_kv_heads']} KV heads" if i.get("n_kv_heads") else None,
            i.get("dtype"),
            f"on {i['device']}" if i.get("device") else None,
        )
        if x
    )
    return f"<b>{esc(s.name)}</b> ({esc(shape)}{'; ' + esc(extra) if extra else ''})"


def _datasets_of(run: Run) -> dict[str, list[tuple[str, dict]]]:
    """``{dataset: [(model, its dataset metadata), ...]}``, the config's datasets first, one entry per model."""
    by_ds: dict[str, list[tuple[str, dict]]] = {d: [] for d in ((run.config or {}).get("datasets") or {})}
    for m in run.metas:
        ds, mdl = m.get("dataset") or {}, str((m.get("model") or {}).get("model"))
        if ds.get("name") and all(x != mdl for x, _ in by_ds.get(ds["name"], [])):
            by_ds.setdefault(ds["name"], []).append((mdl, ds))
    return by_ds


def _dataset_texts(run: Run, mine: list[Series]) -> list[str]:
    """Each dataset of a run with its size and token count (per model when the models' counts differ)."""
    ds_txt = []
    for name, per_model in _datasets_of(run).items():
        if not per_model:
            continue
        ds = per_model[0][1]
        n_prompts = ds.get("n_prompts")
        count = (
            f"{n_prompts} prompts"
            if n_prompts is not None
            else (f"{ds['n_pairs']} pairs" if ds.get("n_pairs") is not None else "size not recorded")
        )
        toks = [tokens_text(run, mdl, name, d) for mdl, d in per_model]
        if len(set(toks)) > 1:
            names = {s.model: s.name for s in mine}
            tok_txt = "; ".join(f"{t} with {names.get(mdl, mdl)}" for (mdl, _), t in zip(per_model, toks))
        else:
            tok_txt = toks[0]
        ds_txt.append(f"{esc(name)} ({esc(count)}, {esc(tok_txt)})")
    if not ds_txt and len(run.table):
        ds_txt = [esc(d) for d in dict.fromkeys(run.table["dataset"])]
    return ds_txt


def _show_param(v: Any) -> str:
    """A probe parameter's value as the summary prints it: strings JSON-quoted, so a "\\n" separator stays visible."""
    return json.dumps(v) if isinstance(v, str) else str(v)


def _probes_text(run: Run) -> str:
    """The probes of a run (the config's order first), each with the parameters its metadata records."""
    t = run.table
    probes = (
        list(
            dict.fromkeys(
                [p for p in (run.config or {}).get("probes") or [] if p in set(t["probe"])] + list(t["probe"])
            )
        )
        if len(t)
        else []
    )
    params = {}
    for m in run.metas:
        for p in m.get("probes") or []:
            if isinstance(p, dict) and p.get("name"):
                extra = {k: v for k, v in p.items() if k != "name"}
                params.setdefault(p["name"], extra)
    return ", ".join(
        esc(p)
        + (f" ({esc(', '.join(f'{k}={_show_param(v)}' for k, v in params[p].items()))})" if params.get(p) else "")
        for p in probes
    )


def _run_paragraph(run: Run, series: list[Series]) -> str:
    t = run.table
    mine = [s for s in series if s.run == run.label]
    model_txt = [_model_text(s) for s in mine]
    ds_txt = _dataset_texts(run, mine)
    probe_txt = _probes_text(run)
    heads = t[t["layer"] >= 0]
    n_metrics = heads["metric"].nunique()
    circ = f" Circuits: {esc(', '.join(str(c.get('task')) for c in run.circuits))}." if run.circuits else ""
    datasets = f"{len(ds_txt)} dataset{'s' if len(ds_txt) != 1 else ''}: {', '.join(ds_txt) or 'none'}"
    item_rows = f", {len(t) - len(heads):,} per-item rows" if len(t) > len(heads) else ""
    return (
        f'<p class="run-summary"><b>Run {esc(run.label)}</b> (<code>{esc(run.path)}</code>): '
        f"{'; '.join(model_txt) or 'no models'} on {datasets}. "
        f"Probes: {probe_txt or 'none'}; {n_metrics} per-head metric{'s' if n_metrics != 1 else ''}, "
        f"{len(heads):,} head scores{item_rows}.{circ} {esc(when_text(run.metas, run.config))}</p>"
    )


def _layers_text(layers: Sequence[int]) -> str:
    layers = sorted(set(int(x) for x in layers))
    if len(layers) == 1:
        return f"layer {layers[0]}"
    if len(layers) <= 6:
        return "layers " + ", ".join(map(str, layers))
    return f"layers {layers[0]}-{layers[-1]}"


def _role_items(at: pd.DataFrame, roles: list, n_layers: int, total: int) -> list[str]:
    """One line per role a model's heads hold: how many heads, where (median relative depth), the strongest."""
    items = []
    for role in list(dict.fromkeys([r.name for r in roles] + list(at["role"]))):
        g = at[at["role"] == role]
        if g.empty:
            continue
        valued = g.dropna(subset=["value"])
        depth = float(np.median(g["layer"])) / (n_layers - 1) if n_layers > 1 else 0.0
        share = f" ({100 * len(g) / total:.0f}% of {total})" if total else ""
        code, colour = role_style(role)
        if len(valued):
            best = valued.loc[valued["value"].abs().idxmax()]
            strongest = (
                f'strongest <span class="hd">{int(best.layer)}.{int(best["head"])}</span> '
                f"({esc(best.metric)} = {esc(fmt(best.value))} on {esc(best.dataset)})"
            )
        else:  # roles with no score of their own (circuit discovery labels)
            strongest = "labelled by circuit discovery: " + ", ".join(
                f'<span class="hd">{int(layer)}.{int(h)}</span>' for layer, h in zip(g["layer"], g["head"])
            )
        items.append(
            f'<li><span class="chip" style="background:{colour}">{esc(code)}</span> <b>{len(g)}</b> {esc(role)} '
            f"head{'s' if len(g) != 1 else ''}{esc(share)} in {esc(_layers_text(g['layer']))} "
            f"(median relative depth {depth:.2f}); {strongest}.</li>"
        )
    return items


def _overlap_items(at: pd.DataFrame) -> list[str]:
    """One line per pair of specific roles that share heads: heads doing two jobs at once."""
    # sink / streaming / echo are too common or, on repeated random tokens, the same score as
    # duplicate, to say much
    heads_of = {
        role: set(zip(g["layer"], g["head"]))
        for role, g in at.groupby("role")
        if role not in ("sink", "streaming", "echo")
    }
    order = {r.name: i for i, r in enumerate(probe_roles())}
    names = sorted(heads_of, key=lambda r: (order.get(r, len(order)), r))
    items = []
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            both = sorted(heads_of[a] & heads_of[b])
            if both:
                listed = ", ".join(f'<span class="hd">{layer}.{h}</span>' for layer, h in both[:6]) + (
                    " ..." if len(both) > 6 else ""
                )
                verb = f"is also a {esc(b)} head" if len(both) == 1 else f"are also {esc(b)} heads"
                items.append(f"<li>{len(both)} of the {len(heads_of[a])} {esc(a)} heads {verb}: {listed}.</li>")
    return items


def _retrieval_items(scores: pd.DataFrame, s: Series, run: Run) -> list[str]:
    """Per dataset, how many prompts the retrieval scores count (only those answered correctly)."""
    items = []
    ret = scores[(scores["model"] == s.name) & (scores["metric"] == "retrieval")]
    for ds, g in ret.groupby("dataset"):
        meta = (
            next(
                (
                    m.get("dataset")
                    for m in run.metas
                    if (m.get("dataset") or {}).get("name") == ds
                    and str((m.get("model") or {}).get("model")) == s.model
                ),
                None,
            )
            or {}
        )
        if meta.get("n_prompts"):
            items.append(
                f"<li>Retrieval scores count {int(g['n'].max())} of {int(meta['n_prompts'])} {esc(ds)} prompts "
                "(those the model answered correctly).</li>"
            )
    return items


def _per_item_items(view: pd.DataFrame, s: Series) -> list[str]:
    """The mean of each per-item metric of a model (metrics along generated tokens are left out)."""
    items = []
    per_item = view[(view["model"] == s.name) & (view["layer"] < 0)]
    for metric in _ordered_metrics(per_item["metric"]):
        v = per_item.loc[per_item["metric"] == metric, "value"].dropna()
        if len(v) and not (
            "step" in per_item.columns and per_item.loc[per_item["metric"] == metric, "step"].nunique() > 1
        ):
            items.append(f"<li>{_metric_link(metric)}: mean {esc(fmt(v.mean()))} over {len(v)} items.</li>")
    return items


def _findings(
    view: pd.DataFrame,
    atlas_table: pd.DataFrame,
    series: list[Series],
    thresholds: Mapping[str, float | None] | None,
    runs: Sequence[Run],
) -> str:
    """What the run found, per model: the heads of each role (how many, where, the strongest),
    the roles measured but absent, and the per-item outcomes."""
    roles = roles_with(thresholds)
    scores = view[view["layer"] >= 0].dropna(subset=["value"])
    blocks = []
    for s in series:
        at = atlas_table[atlas_table["model"] == s.name]
        n_layers = s.n_layers or (
            int(scores.loc[scores["model"] == s.name, "layer"].max()) + 1 if (scores["model"] == s.name).any() else 1
        )
        total = (s.n_layers or 0) * (s.n_heads or 0)
        items = _role_items(at, roles, n_layers, total)
        items += _overlap_items(at)
        measured = set(scores.loc[scores["model"] == s.name, "metric"])
        absent = [r.name for r in roles if r.metric in measured and not (at["role"] == r.name).any()]
        if absent:
            items.append(f"<li>No {esc(', '.join(absent))} heads at these thresholds.</li>")
        run = next(r for r in runs if r.label == s.run)
        items += _retrieval_items(scores, s, run)
        items += _per_item_items(view, s)
        if items:
            title = f"<p><b>{esc(s.name)}</b></p>" if len(series) > 1 else ""
            blocks.append(f'{title}<ul class="findings">{"".join(items)}</ul>')
    return "".join(blocks)


def _ordered_metrics(metrics: Iterable[str]) -> list[str]:
    known = list(kinds.known_metrics())
    return sorted(set(metrics), key=lambda m: (known.index(m) if m in known else len(known), m))


def _ordered_probes(probes: Iterable[str]) -> list[str]:
    """In the registry's order (built-ins first), then any other probe by name."""
    from workbench.protocol.registry import probe_classes

    try:
        order = list(probe_classes())
    except WorkbenchError:
        order = []
    return sorted(set(probes), key=lambda p: (order.index(p) if p in order else len(order), p))


def top_heads_table(view: pd.DataFrame, k: int = 3) -> pd.DataFrame:
    """Per (metric, model, dataset): the ``k`` heads that stand out (highest; lowest for
    entropy-like metrics; largest magnitude for signed ones), the median over heads and how many
    heads have a value."""
    rows = []
    heads = view[view["layer"] >= 0].dropna(subset=["value"])
    for metric in _ordered_metrics(heads["metric"]):
        msub = heads[heads["metric"] == metric]
        mi = kinds.info(metric, msub["value"])
        for (model, dataset), g in msub.groupby(["model", "dataset"], sort=False):
            g = g.groupby(["layer", "head"], as_index=False)["value"].mean()
            order = g["value"].abs() if mi.rank == "abs" else g["value"]
            top = g.loc[order.sort_values(ascending=mi.rank == "low").index[:k]]
            rows.append(
                {
                    "metric": metric,
                    "model": model,
                    "dataset": dataset,
                    "ranked by": {"abs": "largest |value|", "low": "lowest"}.get(mi.rank, "highest"),
                    "top heads": [(int(r.layer), int(r.head), float(r.value)) for r in top.itertuples()],
                    "median": float(g["value"].median()),
                    "heads": len(g),
                }
            )
    return pd.DataFrame(rows)


def _top_heads_html(top: pd.DataFrame, show_model: bool) -> str:
    if top.empty:
        return "<p>No per-head metrics in this run.</p>"
    head = (
        "<tr><th>metric</th>"
        + ("<th>model</th>" if show_model else "")
        + "<th>dataset</th><th>ranked by</th><th>top heads (layer.head: value)</th><th>median over heads</th>"
        + "<th>heads</th></tr>"
    )
    body = []
    for r in top.itertuples():
        chips = " ".join(f'<span class="hd">{layer}.{h}</span>&nbsp;{esc(fmt(v))}' for layer, h, v in r[5])
        body.append(
            f"<tr><td>{_metric_link(r.metric)}</td>"
            + (f"<td>{esc(r.model)}</td>" if show_model else "")
            + f"<td>{esc(r.dataset)}</td><td>{esc(r[4])}</td><td>{chips}</td><td>{esc(fmt(r.median))}</td>"
            + f"<td>{r.heads}</td></tr>"
        )
    return f'<table class="tbl" id="top-heads-table"><thead>{head}</thead><tbody>{"".join(body)}</tbody></table>'


# -- atlas -----------------------------------------------------------------------------------------


def _atlas_rule_rows(
    roles: list, table: pd.DataFrame, scores: pd.DataFrame, series: list[Series], measured: set
) -> list[str]:
    """Rows of the thresholds table: each measured role (rule, meaning, heads per model), then circuit labels."""
    rows = []
    for r in roles:
        if r.metric not in measured:
            continue
        code, colour = r.code, r.color
        counts = []
        for s in series:
            n = int(((table["model"] == s.name) & (table["role"] == r.name)).sum())
            has = ((scores["model"] == s.name) & (scores["metric"] == r.metric)).any()
            counts.append(str(n) if has else "not measured")
        rows.append(
            f'<tr><td><span class="chip" style="background:{colour}">{esc(code)}</span> {esc(r.name)}</td>'
            f'<td><a class="metric" href="#{esc(anchor("def", r.metric))}"><code>{esc(r.rule())}</code></a></td>'
            f"<td>{esc(r.what)}</td>" + "".join(f"<td>{esc(c)}</td>" for c in counts) + "</tr>"
        )
    for role in dict.fromkeys(table.loc[~table["role"].isin([r.name for r in probe_roles()]), "role"]):
        code, colour = role_style(role)
        counts = [str(int(((table["model"] == s.name) & (table["role"] == role)).sum())) for s in series]
        rows.append(
            f'<tr><td><span class="chip" style="background:{colour}">{esc(code)}</span> {esc(role)}</td>'
            "<td>circuit discovery label</td>"
            f"<td>from path patching (see Circuits)</td>" + "".join(f"<td>{esc(c)}</td>" for c in counts) + "</tr>"
        )
    return rows


def _atlas_rules(page: Page, roles: list, table: pd.DataFrame, scores: pd.DataFrame, series: list[Series]) -> None:
    """The thresholds table, the roles left out for lack of their metric, and how to change the thresholds."""
    measured = set(scores["metric"])
    unmeasured = [r for r in roles if r.metric not in measured]
    rows = _atlas_rule_rows(roles, table, scores, series, measured)
    off = [r.name for r in probe_roles() if r.name not in {x.name for x in roles}]
    page.add(
        '<table class="tbl" id="atlas-thresholds"><thead><tr><th>role</th><th>rule</th><th>meaning</th>'
        + "".join(f"<th>heads in {esc(s.name)}</th>" for s in series)
        + f"</tr></thead><tbody>{''.join(rows)}</tbody></table>"
    )
    if unmeasured:
        page.add(
            '<p class="note">Not measured here, so not in the atlas: '
            f"{esc(', '.join(f'{r.name} ({r.rule()})' for r in unmeasured))}.</p>"
        )
    spec = ",".join(f"{r.name}={r.threshold:g}" for r in roles)
    page.add(
        f'<p class="note">Change the thresholds with <code>workbench report RUN --roles {esc(spec)}</code> '
        f"(<code>ROLE=off</code> hides a role{'; off here: ' + esc(', '.join(off)) if off else ''}), or in Python: "
        "<code>workbench.report.atlas(table, thresholds={&quot;sink&quot;: 0.6})</code> "
        "returns this classification as a tidy table.</p>"
    )


def _atlas_values(
    sc: pd.DataFrame, n_layers: int, n_heads: int
) -> tuple[list[tuple[str, str]], list[list[list[float | None]]]]:
    """A model's (metric, dataset) columns and every head's value in each, for the atlas tooltip."""
    cols = list(dict.fromkeys(zip(sc["metric"], sc["dataset"])))
    cols.sort(key=lambda md: (_ordered_metrics(sc["metric"]).index(md[0]), md[1]))
    col_idx = {c: i for i, c in enumerate(cols)}
    vals: list[list[list[float | None]]] = [[[None] * len(cols) for _ in range(n_heads)] for _ in range(n_layers)]
    for r in sc.itertuples():
        if r.layer < n_layers and r.head < n_heads:
            vals[int(r.layer)][int(r.head)][col_idx[(r.metric, r.dataset)]] = float(f"{r.value:.4g}")
    return cols, vals


def _atlas_cell_roles(at: pd.DataFrame) -> dict[tuple[int, int], list]:
    """``{(layer, head): [[role, metric, value, threshold, dataset, op], ...]}``: the evidence the tooltip
    shows (``op``: the role's comparison, ``>=``, ``>``, ``<=`` or ``<``; None for a circuit label)."""
    ops = {r.name: r.op for r in probe_roles()}
    cell_roles: dict[tuple[int, int], list] = {}
    for r in at.itertuples():
        cell_roles.setdefault((int(r.layer), int(r.head)), []).append(
            [
                r.role,
                r.metric,
                float(f"{r.value:.4g}"),
                float(r.threshold) if pd.notna(r.threshold) else None,
                r.dataset,
                ops.get(r.role),
            ]
        )
    return cell_roles


def _atlas_rows_html(
    cell_roles: dict[tuple[int, int], list], n_layers: int, n_heads: int, di: int, height: str
) -> list[str]:
    """The grid's rows: one per layer, a cell per head with a chip per role (``height``: the row style)."""
    body = []
    for layer in range(n_layers):
        depth = layer / (n_layers - 1) if n_layers > 1 else 0.0
        cells = []
        for h in range(n_heads):
            chips = "".join(
                f'<span class="chip" style="background:{role_style(x[0])[1]}">{esc(role_style(x[0])[0])}</span>'
                for x in cell_roles.get((layer, h), [])
            )
            has = ' class="has"' if chips else ""
            cells.append(f'<td tabindex="0" data-s="{di}" data-l="{layer}" data-h="{h}"{has}>{chips}</td>')
        body.append(f'<tr{height}><th title="relative depth {depth:.2f}">{layer}</th>{"".join(cells)}</tr>')
    return body


def _atlas_grid(
    s: Series, sc: pd.DataFrame, at: pd.DataFrame, di: int, tallest: int, stretch: bool
) -> tuple[dict, str]:
    """One model's grid: the tooltip's data and the table (``stretch``: rows stretched to the tallest grid)."""
    n_layers = s.n_layers or int(max(sc["layer"].max() if len(sc) else 0, at["layer"].max() if len(at) else 0)) + 1
    n_heads = s.n_heads or int(max(sc["head"].max() if len(sc) else 0, at["head"].max() if len(at) else 0)) + 1
    cols, vals = _atlas_values(sc, n_layers, n_heads)
    cell_roles = _atlas_cell_roles(at)
    data = {
        "name": s.name,
        "n_layers": n_layers,
        "cols": [[m, d] for m, d in cols],
        "vals": vals,
        "roles": {f"{layer}.{h}": v for (layer, h), v in cell_roles.items()},
    }
    head_row = "".join(f"<th>{h}</th>" for h in range(n_heads))
    height = f' style="height:{18 * tallest / n_layers:.1f}px"' if stretch and n_layers < tallest else ""
    body = _atlas_rows_html(cell_roles, n_layers, n_heads, di, height)
    n_roles = len({(layer, h) for (layer, h) in cell_roles})
    grid = (
        f'<div class="atlas-model"><div class="atlas-title">{esc(s.name)}</div>'
        f'<div class="atlas-sub">{n_layers} layers x {n_heads} heads; {n_roles} heads with a role</div>'
        f'<table class="atlas" data-series="{di}"><thead><tr><th>L\\H</th>{head_row}</tr></thead>'
        f"<tbody>{''.join(body)}</tbody></table></div>"
    )
    return data, grid


def _atlas_legend(roles: list, table: pd.DataFrame) -> str:
    """A chip per role that some head holds: the probe roles, then the circuit labels."""
    legend = " ".join(
        f'<span class="chip" style="background:{r.color}">{esc(r.code)}</span>&nbsp;{esc(r.name)}'
        for r in roles
        if (table["role"] == r.name).any()
    )
    extra = " ".join(
        f'<span class="chip" style="background:{role_style(x)[1]}">{esc(role_style(x)[0])}</span>&nbsp;{esc(x)}'
        for x in dict.fromkeys(table.loc[~table["role"].isin([r.name for r in probe_roles()]), "role"])
    )
    return f"{legend} {extra}"


def _atlas_section(
    page: Page,
    view: pd.DataFrame,
    series: list[Series],
    thresholds: Mapping[str, float | None] | None,
    circuits: list[dict],
) -> pd.DataFrame:
    roles = roles_with(thresholds)
    circ = [dict(c, model=_series_name(series, c.get("run"), str(c.get("model", "")))) for c in circuits]
    table = atlas(view.drop(columns=["run"]), thresholds=thresholds, circuits=circ)
    scores = head_scores(view.drop(columns=["run"]))
    page.section(2, "Head atlas", "atlas")
    page.add(
        "<p>One grid per model: each cell is a head (rows = layers, first at the top; columns = heads) and its "
        "letters are <b>every</b> role its scores support under the thresholds below; a role holds when the metric "
        "passes on any dataset it was measured on. Hover a cell (or focus it with Tab) to see all of that head's "
        "metrics."
        + (
            " Grids have the same height, so rows level with each other sit at about the same relative depth."
            if len(series) > 1
            else ""
        )
        + "</p>"
    )
    _atlas_rules(page, roles, table, scores, series)
    grids, data = [], []
    # with several models, rows are stretched so every grid has the same height: rows level with
    # each other sit at about the same relative depth
    depths = [s.n_layers or 0 for s in series]
    tallest = max(depths + [1])
    for s in series:
        sc = scores[scores["model"] == s.name]
        at = table[table["model"] == s.name]
        if sc.empty and at.empty:
            continue
        entry, grid = _atlas_grid(s, sc, at, len(data), tallest, stretch=len(series) > 1)
        data.append(entry)
        grids.append(grid)
    if grids:
        page.add(f'<p class="legend">{_atlas_legend(roles, table)}</p><div class="atlas-row">{"".join(grids)}</div>')
        page.add(f'<script id="wb-atlas" type="application/json">{safe_json(data)}</script>')
    else:
        page.p("No per-head metrics to classify.")
    return table


def _series_name(series: list[Series], run: Any, model: str) -> str:
    for s in series:
        if s.run == run and s.model == model:
            return s.name
    return model


# -- figures per metric ------------------------------------------------------------------------------


def _metric_figures(page: Page, view: pd.DataFrame, metric: str, series: list[Series]) -> None:
    """Head grids (a panel per model x dataset), the layer / depth curve and, with several
    models or runs, the difference view."""
    msub = view[(view["metric"] == metric) & (view["layer"] >= 0)]
    with_values = msub.groupby(["model", "dataset"]).value.apply(lambda v: v.notna().any())
    empty = [f"{m} / {d}" if msub["model"].nunique() > 1 else d for (m, d), ok in with_values.items() if not ok]
    msub = msub[msub.set_index(["model", "dataset"]).index.isin(with_values[with_values].index)]
    page.section(3, metric, anchor("metric", metric), toc=True)
    if empty:
        page.p(
            f"No values for {metric} on {', '.join(empty)} (n = 0 for every head): this metric needs other prompts"
            + (
                " (duplicate and induction need repeated-random's period)."
                if metric in ("duplicate", "induction")
                else "."
            )
        )
    if msub.empty:
        return
    scale = kinds.scale_for(metric, msub["value"].dropna())
    models = list(dict.fromkeys(msub["model"]))
    datasets = list(dict.fromkeys(msub["dataset"]))
    n_layers = {s.name: s.n_layers for s in series if s.n_layers}
    facets = [c for c, vals in (("model", models), ("dataset", datasets)) if len(vals) > 1] or ["model"]
    panel = {
        ("model",): "one panel per model",
        ("dataset",): "one panel per dataset",
        ("model", "dataset"): "one panel per model and dataset",
    }[tuple(facets)]
    ordered = msub.sort_values(
        ["dataset", "model"],
        key=lambda c: c.map({v: i for i, v in enumerate(datasets if c.name == "dataset" else models)}),
    )
    facet_depths = {
        " / ".join([m] + ([d] if "dataset" in facets else [])) if "model" in facets else d: n_layers.get(m)
        for m in models
        for d in datasets
    }
    single = len(models) == 1 and len(datasets) == 1
    title = f"{metric} per head" + (f" ({models[0]}, {datasets[0]})" if single else "")
    shared = f"Panels share one colour scale ({panel}). " if len(facets) > 1 or len(models) * len(datasets) > 1 else ""
    level = (
        "Each panel spans the same height, so rows level with each other sit at about the same relative depth. "
        if len(models) > 1
        else ""
    )
    if single:
        page.row(True)
    page.figure(
        plots.head_grids(
            ordered,
            metric,
            facet=facets,
            title=title,
            scale=scale,
            n_layers={k: v for k, v in facet_depths.items() if v},
        ),
        _caption(
            metric,
            f"{GRID_HOW} {shared}{level}{_scale_sentence(metric, scale)}",
            msub["value"],
        ),
    )
    series_col = msub["model"] + (" / " + msub["dataset"] if len(datasets) > 1 else "")
    curve = msub.assign(model=series_col)
    if len(models) > 1:
        depth_n = {m + (f" / {d}" if len(datasets) > 1 else ""): n_layers.get(m) for m in models for d in datasets}
        page.figure(
            plots.depth_profile(curve, metric, n_layers={k: v for k, v in depth_n.items() if v}, scale=scale),
            _caption(
                metric,
                DEPTH_HOW.format(
                    low="; dashed: its lowest" if scale == "signed" or kinds.info(metric).rank == "low" else ""
                ),
                msub["value"],
            ),
        )
        for d in datasets:
            dsub = msub[msub["dataset"] == d]
            present = list(dict.fromkeys(dsub["model"]))
            if len(present) < 2:
                continue
            shapes = {(n_layers.get(m), int(dsub[dsub["model"] == m]["head"].max()) + 1) for m in present}
            where = f" on {d}" if len(datasets) > 1 else ""
            if len(present) == 2 and len(shapes) == 1:
                a, b = present
                page.figure(
                    plots.compare_runs(dsub[dsub["model"] == a], dsub[dsub["model"] == b], metric, labels=(a, b)),
                    _caption(
                        metric,
                        f"Difference per head{esc(where)}, {esc(b)} minus {esc(a)} (same shape): "
                        f"red = higher in {esc(b)}, blue = higher in {esc(a)}, white = equal.",
                        msub["value"],
                    ),
                )
            else:
                page.figure(
                    plots.depth_difference(
                        dsub, metric, reference=present[0], n_layers={m: n_layers[m] for m in present if m in n_layers}
                    ),
                    _caption(
                        metric,
                        f"Difference view{esc(where)}: each model's layer mean minus {esc(present[0])}'s "
                        "at the same relative depth "
                        "(linear interpolation between layers, since the layer counts differ); above 0 = higher than "
                        f"{esc(present[0])}.",
                        msub["value"],
                    ),
                )
    else:
        fig = plots.layer_curve(
            curve.assign(model=curve["model"] if len(datasets) > 1 else msub["dataset"]),
            metric,
            title=f"{metric} by layer",
        )
        if single:  # next to its grid: same height, legend underneath
            fig.update_layout(
                height=page.figures[-1]["layout"].get("height"), legend={"orientation": "h", "y": -0.15, "title": None}
            )
        low = scale == "signed" or kinds.info(metric).rank == "low"
        page.figure(
            fig,
            _caption(
                metric,
                "Solid: mean over the layer's heads; dotted: the layer's highest head"
                + ("; dashed: its lowest" if low else "")
                + (". One colour per dataset." if len(datasets) > 1 else "."),
                msub["value"],
            ),
        )
    if single:
        page.row(False)


def _item_metrics(page: Page, sub: pd.DataFrame) -> None:
    """Per-item rows (layer = head = -1): a mean per metric, token curves where there are steps."""
    items = sub[sub["layer"] < 0]
    if items.empty:
        return
    for metric in _ordered_metrics(items["metric"]):
        msub = items[items["metric"] == metric]
        has_steps = "step" in msub.columns and msub["step"].notna().any() and msub["step"].nunique() > 1
        page.section(3, metric, anchor("metric", metric))
        if has_steps:
            page.figure(
                plots.token_curve(msub, metric),
                _caption(
                    metric,
                    "One line per item along its generated answer; hover shows the token. "
                    f"Low = {esc(kinds.info(metric).low)}.",
                    msub["value"],
                ),
            )
        summary = msub.groupby(["model", "dataset"], as_index=False).agg(
            mean=("value", "mean"), items=("value", "size")
        )
        rows = "".join(
            f"<tr><td>{esc(r.model)}</td><td>{esc(r.dataset)}</td><td>{esc(fmt(r.mean))}</td><td>{r.items}</td></tr>"
            for r in summary.itertuples()
        )
        page.add(
            f"<p>{_what(metric, msub['value'])} Mean over items:</p>"
            '<table class="tbl"><thead><tr><th>model</th><th>dataset</th><th>mean</th>'
            f"<th>rows</th></tr></thead><tbody>{rows}</tbody></table>"
        )
        cols = [
            c
            for c in ("model", "dataset", "item", "step", "token", "value")
            if c in msub.columns and msub[c].notna().any()
        ]
        shown = msub[cols].head(MAX_ITEM_ROWS)
        page.add(
            f"<details><summary>{len(msub)} rows"
            f"{f' (first {MAX_ITEM_ROWS} shown)' if len(msub) > MAX_ITEM_ROWS else ''}</summary>"
            + shown.to_html(index=False, escape=True, classes="tbl", na_rep="", float_format=lambda v: f"{v:.4g}")
            + "</details>"
        )


def _scatters(page: Page, view: pd.DataFrame) -> None:
    heads = view[view["layer"] >= 0].dropna(subset=["value"])
    done = False
    done_pairs: list[bool] = []
    for x, y in kinds.scatter_pairs():
        both = [m for m in dict.fromkeys(heads["model"]) if {x, y} <= set(heads.loc[heads["model"] == m, "metric"])]
        if not both:
            continue
        if not done:
            page.section(2, "Metric vs metric", "scatter")
            page.p(
                "Where two probes ran on the same model, one point per head places the two scores against each other: "
                "heads that do both jobs sit in the top-right corner."
            )
            done = True
        sub = heads[heads["model"].isin(both) & heads["metric"].isin([x, y])]
        color = "depth" if len(both) > 1 else "layer"
        if not done_pairs and len(both) == 1:
            page.row(True)  # one model: scatters two by two
            done_pairs.append(True)
        page.figure(
            plots.metric_scatter(sub, x, y, color=color),
            f"{_what(x)} {_what(y)} One point per head (colour: {'relative depth' if color == 'depth' else 'layer'}"
            f"{'; one panel per model' if len(both) > 1 else ''}); "
            "a metric measured on several datasets is averaged per head. "
            f'Definitions: <a href="#{esc(anchor("def", x))}">{esc(x)}</a>, '
            f'<a href="#{esc(anchor("def", y))}">{esc(y)}</a>.',
        )
    if done_pairs:
        page.row(False)


def _circuits(page: Page, circuits: list[dict], series: list[Series]) -> None:
    if not circuits:
        return
    page.section(2, "Circuits", "circuits")
    for c in circuits:
        task = str(c.get("task", "circuit"))
        name = _series_name(series, c.get("run"), str(c.get("model", "")))
        page.section(3, f"{task} circuit ({name})", anchor("circuit", c.get("run", ""), task))
        nodes = pd.DataFrame(c.get("nodes", []))
        if isinstance(c.get("head_circuit"), dict):  # found by a faithfulness target (edge scores, named ablation)
            _measured_circuit(page, c, task, name, nodes)
            continue
        edges = pd.DataFrame(c.get("edges", []))
        f = c.get("faithfulness") or {}
        if f:
            page.p(
                f"{len(nodes)} heads; faithfulness {fmt(f.get('faithfulness'))} "
                f"(logit difference {fmt(f.get('ld_circuit'))} with only the circuit "
                f"of {fmt(f.get('ld_clean'))} clean; every head ablated: {fmt(f.get('ld_all_heads_ablated'))})."
            )
        if len(nodes) and {"layer", "head"} <= set(nodes.columns):
            if edges.empty or not {"sender_layer", "sender_head", "receiver_layer", "receiver_head", "effect"} <= set(
                edges.columns
            ):
                edges = pd.DataFrame(
                    columns=["sender_layer", "sender_head", "receiver_layer", "receiver_head", "effect"]
                )
            edges = edges.assign(
                receiver_head=edges["receiver_head"].where(
                    edges["receiver_head"] >= 0, (nodes["head"].max() if len(nodes) else 0) / 2
                )
            )
            page.figure(
                plots.circuit_graph(nodes, edges, title=f"{task} circuit ({name})"),
                f"<b>{esc(task)} circuit</b>: heads found by iterative path patching, placed by layer (top = first) "
                "and head; lines are paths sender -> receiver (the bottom row is the logits), red = patching the path "
                "lowers the logit difference (the path carries the behaviour), blue = raises it; width = |effect|. "
                '<a href="#atlas">Roles also appear in the atlas</a>.',
            )
            cols = [x for x in ("layer", "head", "role", "effect", "round") if x in nodes.columns]
            page.add(nodes[cols].to_html(index=False, escape=True, classes="tbl", float_format=lambda v: f"{v:.4g}"))


def _measured_circuit(page: Page, c: dict, task: str, name: str, nodes: pd.DataFrame) -> None:
    """A circuit from ``workbench circuit`` (the default, target-driven discovery): what it
    explains under which ablation, its completeness and minimality, the faithfulness-vs-size
    curves, how its edge scores compare with exact edge patching, and its heads."""
    hc, ec = c["head_circuit"], c.get("edge_circuit") or {}
    ci = hc.get("ci95") or []
    ci_text = f" [95% CI {fmt(ci[0])} to {fmt(ci[1])}]" if len(ci) == 2 else ""
    comp = hc.get("completeness") or {}
    held = hc.get("heldout") or {}
    text = (
        f"{len(hc.get('heads', []))} heads reach F(C)/F(M) = {fmt(hc.get('faithfulness'))}{ci_text} "
        "against a target of "
        f"{fmt(c.get('target'))} under {hc.get('ablation', '')} ablation ({hc.get('ablation_detail', '')}) "
        f"(logit difference {fmt(hc.get('ld_circuit'))} of {fmt(hc.get('ld_clean'))}; "
        f"every head ablated: {fmt(hc.get('ld_all_heads_ablated'))}"
        f"; {fmt(c.get('n_pairs'))} pairs, "
        f"correct answer preferred in {fmt(100 * float(c.get('share_correct', float('nan'))))}%)."
    )
    if not hc.get("reached_target", True):
        text += " The target was NOT reached: the circuit is the best size on the curve."
    if held:
        text += f" On {fmt(held.get('n_pairs'))} held-out pairs: {fmt(held.get('faithfulness'))}."
    if comp:
        text += (
            f" Completeness (Wang et al.): max |F(C\\K) - F(M\\K)| = {fmt(comp.get('max_score'))}, "
            f"{fmt(100 * float(comp.get('max_relative', float('nan'))))}% of F(M)."
        )
    if ec:
        text += (
            f" Edge circuit: {fmt(ec.get('edges'))} edges ({fmt(ec.get('heads'))} heads, {fmt(ec.get('mlps'))} MLPs), "
            f"F = {fmt(ec.get('faithfulness'))}."
        )
    page.p(text)  # p() escapes: plain text only
    curves = {f"{task} {kind}": pd.DataFrame(rows) for kind, rows in (c.get("curves") or {}).items() if rows}
    if curves:
        page.figure(
            plots.faithfulness_curve(
                curves, target=c.get("target"), title=f"{task}: faithfulness vs circuit size ({name})"
            ),
            "<b>Faithfulness against size</b>: the top-k heads (or edges) by edge-attribution score kept, "
            f"every other one ablated ({esc(str(hc.get('ablation_detail', '')))}); "
            "F(C)/F(M) = 1 (dotted) is the whole model, the dashed line the target. "
            "A curve that dips as k grows means the ranking brought in heads that work against the answer.",
        )
    v = c.get("edge_validation") or {}
    if v.get("spearman"):
        page.p(
            f"Edge scores against exact edge patching on {fmt(v.get('n_edges'))} edges: "
            + ", ".join(f"{k} Spearman {fmt(r)}" for k, r in v["spearman"].items())
            + "."
        )
    if len(nodes) and {"layer", "head"} <= set(nodes.columns):
        cols = [
            x
            for x in ("layer", "head", "role", "score", "direct", "minimality", "minimality_relative")
            if x in nodes.columns
        ]
        page.add(nodes[cols].to_html(index=False, escape=True, classes="tbl", float_format=lambda x: f"{x:.4g}"))


# -- definitions ---------------------------------------------------------------------------------------


_LINK = re.compile(r"\[([^\]]*)\]\(#([A-Za-z0-9_.-]+)\)")


def _render_markdown(text: str, target: Mapping[str, str], shift: int = 3) -> str:
    """Markdown -> HTML with raw HTML escaped (markdown-it, html off). In-document links
    ``[x](#name)`` point at ``target[name]`` (an id on this page) or lose their link when the
    page has no such section; headings move ``shift`` levels down to sit under the page's own."""
    text = re.sub(r"^(#{1,6})(\s)", lambda m: "#" * min(6, len(m.group(1)) + shift) + m.group(2), text, flags=re.M)
    text = _LINK.sub(lambda m: f"[{m.group(1)}](#{target[m.group(2)]})" if m.group(2) in target else m.group(1), text)
    try:
        from markdown_it import MarkdownIt
    except ImportError:  # pragma: no cover - markdown-it comes with rich, a dependency
        return '<pre class="def">' + esc(text) + "</pre>"
    return MarkdownIt("commonmark", {"html": False}).enable("table").render(text)


def _definitions_intro(page: Page, docs: str | Path | None, found: Mapping[str, Any]) -> None:
    """Where the definitions below come from: the metrics document, and the packages of plugin probes."""
    src = Path(docs) if docs is not None else definitions.METRICS_DOC
    if src.is_file():
        page.p(f"Copied from {'docs/metrics.md' if docs is None else src.name} so this page works offline.")
    else:
        page.p(
            f"{'docs/metrics.md' if docs is None else src.name} was not found when this page was built, "
            "so each definition is the paragraph of the computing module's docstring that states it."
        )
    shipped = sorted({d.shipped_by for d in found.values() if d is not None and d.shipped_by})
    if shipped:
        page.p(f"Metrics of probes from other packages are defined as those packages ship them: {', '.join(shipped)}.")


def _definitions(page: Page, metrics: list[str], docs: str | Path | None) -> None:
    """Every metric shown, defined as docs/metrics.md defines it, or as the package of the probe
    that reports it ships it (a plugin's ``definitions`` or ``metrics.md``), grouped under its
    probe's section with that section's sources, plus the document's sections those definitions
    link to (conventions, known discrepancies), so every link works offline."""
    page.section(2, "Metric definitions", "definitions")
    found = {m: definitions.definition(m, docs) for m in metrics}
    _definitions_intro(page, docs, found)
    target = {k: anchor("def", m) for m in metrics for k in definitions.doc_keys(m)}
    parsed = definitions.load_doc(docs)
    extra: dict[int, str] = {}  # linked document sections that are not metrics on this page
    if parsed is not None:
        sections, index = parsed
        texts = [t for d in found.values() if d for t in (d.text, d.group_intro or "")]
        for _, name in (m.groups() for t in texts for m in _LINK.finditer(t)):
            if name not in target and name in index and sections[index[name]].text:
                extra.setdefault(index[name], anchor("doc", name))
        for i, a in extra.items():
            target.update({n: a for n in sections[i].names})
    group = None
    for metric in metrics:
        d = found[metric]
        mi = kinds.info(metric)
        if d and d.group and d.group != group:
            group = d.group
            page.add(
                f'<h3 class="def-group">{esc(d.group)}</h3>'
                + (f'<div class="def-intro">{_render_markdown(d.group_intro, target)}</div>' if d.group_intro else "")
            )
        body = _render_markdown(d.text, target) if d else f"<p>{esc(mi.what)} (no definition found).</p>"
        source = f'<p class="src">Source: {esc(d.source)}. Drawn as: {esc(mi.kind)}.</p>' if d else ""
        page.add(
            f'<section class="def" id="{esc(anchor("def", metric))}"><h4><code>{esc(metric)}</code></h4>'
            f"{body}{source}</section>"
        )
    if extra:
        page.add('<h3 class="def-group">Referenced from the definitions</h3>')
        for i, a in extra.items():
            sec = parsed[0][i]
            page.add(
                f'<section class="def" id="{esc(a)}"><h4>{esc(sec.title)}</h4>'
                f"{_render_markdown(sec.text, target, shift=3)}</section>"
            )


def _prompts(page: Page, runs: Sequence[Run]) -> None:
    shown, blocks = 0, []
    for run in runs:
        seen = set()
        for m in run.metas:
            ds = (m.get("dataset") or {}).get("name")
            if ds in seen:
                continue
            seen.add(ds)
            for pr in (m.get("prompts") or [])[:1]:
                if shown >= 6:
                    break
                shown += 1
                ids = pr.get("ids") or [""] * len(pr.get("tokens", []))
                toks = "".join(
                    f'<span class="tok" title="id {esc(i)}">{esc(t)}</span>' for t, i in zip(pr.get("tokens", []), ids)
                )
                blocks.append(
                    f"<h4>{esc(run.label)} / {esc(ds)} / {esc(pr.get('id'))}</h4>"
                    f'<p class="prompt">{esc(pr.get("text", ""))}</p><div>tokens: {toks}</div>'
                )
    if blocks:
        page.section(2, "Example prompts", "prompts")
        page.p("The first prompt of each dataset as the model saw it (first 64 tokens), split into its tokens.")
        page.add("".join(blocks))


def _raw(page: Page, runs: Sequence[Run]) -> None:
    page.section(2, "Raw configuration and metadata", "raw")
    for run in runs:
        metas = [{k: v for k, v in m.items() if k != "prompts"} for m in run.metas]
        blob = {
            "config": run.config,
            "parts": metas,
            "circuits": [{k: v for k, v in c.items() if k not in ("nodes", "edges")} for c in run.circuits],
        }
        page.add(
            f'<details class="raw"><summary>Run {esc(run.label)}: '
            f"sweep config and the metadata of its {len(run.metas)} part(s)</summary>"
            f"<pre>{esc(json.dumps(blob, indent=1, default=str))}</pre></details>"
        )


# -- assembly --------------------------------------------------------------------------------------------


def build_report(
    runs: str | Path | Sequence[str | Path],
    title: str | None = None,
    thresholds: Mapping[str, float | None] | None = None,
    labels: Sequence[str] | None = None,
    docs: str | Path | None = None,
) -> str:
    """The report page of one run (a path) or a comparison of several (a list of paths).

    ``thresholds``: atlas role thresholds (see :func:`workbench.report.atlas.atlas`); ``labels``: one
    name per run; ``docs``: a metrics document other than the repository's ``docs/metrics.md``.
    """
    paths = [targets.as_target(runs)] if isinstance(runs, (str, Path)) else [targets.as_target(r) for r in runs]
    if not paths:
        raise WorkbenchError(
            "no run given", "name one or more run folders: workbench report runs/a [runs/b ...] --out report.html"
        )
    roles_with(thresholds)  # fail on bad thresholds before reading anything
    names = run_labels(paths, labels)
    loaded = [load_run(p, n) for p, n in zip(paths, names)]
    series = series_of(loaded)
    table = pd.concat([r.table for r in loaded], ignore_index=True)
    rename = {(s.run, s.model): s.name for s in series}
    view = table.assign(
        model=[rename.get((r, str(m)), str(m)) for r, m in zip(table["run"], table["model"].astype(str))]
    )
    rank = {s.name: i for i, s in enumerate(series)}
    view = view.iloc[np.argsort([rank.get(m, len(rank)) for m in view["model"]], kind="stable")].reset_index(drop=True)
    # datasets in the order the sweep configs list them, then as they come
    order = list(
        dict.fromkeys(
            [d for r in loaded for d in ((r.config or {}).get("datasets") or {})] + list(view["dataset"].astype(str))
        )
    )
    view = view.iloc[np.argsort([order.index(str(d)) for d in view["dataset"]], kind="stable")].reset_index(drop=True)
    kv_rows, view = kv.split_kv(view)  # KV-cache grid rows get their own section, not a probe's
    gate_rows, view = gate.split_gate(view)  # head-gate rows get their own section, not a probe's
    circuits = [c for r in loaded for c in r.circuits]

    page = Page()
    heading = title or ("Attention-head report: " + (names[0] if len(names) == 1 else " vs ".join(names)))
    page.add(f'<h1 id="top">{esc(heading)}</h1>')

    page.section(2, "Summary", "summary")
    for run in loaded:
        page.add(_run_paragraph(run, series))
    if len(series) > 1:
        page.p(
            f"{len(series)} models side by side: {', '.join(s.name for s in series)}. "
            "Figures put them on relative depth (layer / (n_layers - 1)) where their layer counts differ, "
            "and show differences against the first."
        )
    findings_at = len(page.parts)
    page.section(3, "Top heads per metric", "top-heads")
    page.add(_top_heads_html(top_heads_table(view), show_model=len(series) > 1))

    atlas_table = _atlas_section(page, view, series, thresholds, circuits)
    findings = _findings(view, atlas_table, series, thresholds, loaded)
    if findings:
        page.parts.insert(
            findings_at,
            f'<h3 id="findings">Findings at a glance</h3><p class="note">From the <a href="#atlas">head atlas</a> '
            f"below (thresholds stated there).</p>{findings}",
        )
        page.toc.insert(
            next(i for i, t in enumerate(page.toc) if t[2] == "top-heads"), (3, "Findings at a glance", "findings")
        )
    gate.section(page, gate_rows)  # beside the head atlas: the roles the gates give each head
    views.section(page, loaded, rename, roles_with(thresholds))  # the atlas' strongest head of each role, drawn

    heads = view[view["layer"] >= 0]
    if len(series) > 1 and len(heads):
        _comparison(page, view, series, atlas_table)

    for probe in _ordered_probes(view["probe"]):
        sub = view[view["probe"] == probe]
        page.section(2, f"Probe: {probe}", anchor("probe", probe))
        params = sorted(
            {
                json.dumps({k: v for k, v in p.items() if k != "name"}, default=str)
                for r in loaded
                for m in r.metas
                for p in (m.get("probes") or [])
                if isinstance(p, dict) and p.get("name") == probe
            }
        )
        ds = ", ".join(dict.fromkeys(sub["dataset"]))
        page.p(f"Datasets: {ds}." + (f" Parameters: {'; '.join(params)}." if params and params != ["{}"] else ""))
        for metric in _ordered_metrics(sub.loc[sub["layer"] >= 0, "metric"]):
            _metric_figures(page, view, metric, series)
        _item_metrics(page, sub)
    _scatters(page, view)
    kv.section(page, kv_rows)
    _circuits(page, circuits, series)
    role_metrics = {r.metric for r in roles_with(thresholds)} & set(view["metric"])
    _definitions(page, _ordered_metrics(set(view["metric"]) | role_metrics), docs)
    _prompts(page, loaded)
    _raw(page, loaded)
    return render_html(page, heading)


def _comparison(page: Page, view: pd.DataFrame, series: list[Series], atlas_table: pd.DataFrame) -> None:
    page.section(2, "Comparison", "comparison")
    shapes = ", ".join(f"{s.name}: {s.n_layers} layers x {s.n_heads} heads" for s in series)
    page.p(
        f"{shapes}. Relative depth = layer / (n_layers - 1): 0 is each model's first layer, 1 its last. "
        "Each probe's section below shows the per-model head grids side by side, "
        "the depth profiles and a difference view."
    )
    heads = view[view["layer"] >= 0].dropna(subset=["value"])
    metrics = [m for m in _ordered_metrics(heads["metric"]) if heads.loc[heads["metric"] == m, "model"].nunique() > 1]
    if not metrics:
        page.p("No metric was measured on more than one model.")
        return
    n_layers = {s.name: s.n_layers for s in series if s.n_layers}
    page.figure(
        plots.depth_overview(heads[heads["metric"].isin(metrics)], metrics, n_layers=n_layers),
        "<b>Depth profiles of every shared metric</b>: one panel per metric, one line per model: "
        "the mean over each layer's heads against relative depth, so models with different layer counts line up. "
        "Details and per-head grids are in each probe's section.",
    )
    rows = []
    for metric in metrics:
        mi = kinds.info(metric)
        cells = []
        for s in series:
            g = heads[(heads["metric"] == metric) & (heads["model"] == s.name)]
            if g.empty:
                cells.append("<td>-</td>")
                continue
            per = g.groupby(["layer", "head"], as_index=False)["value"].mean()
            key = per["value"].abs() if mi.rank == "abs" else per["value"]
            best = per.loc[key.idxmin() if mi.rank == "low" else key.idxmax()]
            n = s.n_layers or int(per["layer"].max()) + 1
            depth = best.layer / (n - 1) if n > 1 else 0
            cells.append(
                f'<td><span class="hd">{int(best.layer)}.{int(best["head"])}</span> {esc(fmt(best.value))} '
                f'<span class="muted">(depth {depth:.2f})</span></td>'
            )
        rows.append(
            f"<tr><td>{_metric_link(metric)}</td>"
            f"<td>{esc({'abs': 'largest |value|', 'low': 'lowest'}.get(mi.rank, 'highest'))}</td>{''.join(cells)}</tr>"
        )
    page.add(
        '<table class="tbl" id="comparison-table"><thead><tr><th>metric</th><th>head shown</th>'
        + "".join(f"<th>{esc(s.name)}</th>" for s in series)
        + f"</tr></thead><tbody>{''.join(rows)}</tbody></table>"
    )


def write_report(
    runs: str | Path | Sequence[str | Path], out: str | Path, title: str | None = None, **options: Any
) -> targets.Target:
    """Build the report (see :func:`build_report`) and write it atomically; ``runs`` and ``out``
    may be fsspec URLs (:mod:`workbench.files.targets`)."""
    out = targets.as_target(out)
    if targets.is_url(str(out)):
        targets.check_writable(str(out))
        return targets.write_text(out, build_report(runs, title, **options))
    if out.exists() and out.is_dir():
        raise WorkbenchError(f"--out {out} is a directory", "give a file name ending in .html")
    text = build_report(runs, title, **options)
    make_folder(out.parent, "--out path", file=out)
    return targets.write_text(out, text)
