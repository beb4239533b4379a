"""Self-contained HTML reports of a run: one file, works offline.

plotly.js is inlined once (not per figure); each figure's data is embedded as JSON with ``<``,
``>`` and ``&`` escaped, so no user-provided string (prompt, token, model name) can close a
script tag; every piece of user text in the page body goes through ``html.escape``.
Sections: run config, model and dataset metadata, versions, one section per probe (a layer x
head heatmap and a layer curve per metric, a top-heads table) and example prompts with their
tokens.
"""
from __future__ import annotations

import html
import json
from pathlib import Path
from typing import Any

import pandas as pd
import plotly.io as pio
from plotly.offline import get_plotlyjs

from workbench import plots
from workbench.errors import WorkbenchError
from workbench.fileio import atomic_write_text
from workbench.results import load_results, top_heads


def _safe_json(obj: Any) -> str:
    text = obj if isinstance(obj, str) else json.dumps(obj, default=str)
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


class _Page:
    def __init__(self) -> None:
        self.parts: list[str] = []
        self.n_fig = 0

    def h(self, level: int, text: str) -> None:
        self.parts.append(f"<h{level}>{html.escape(text)}</h{level}>")

    def p(self, text: str) -> None:
        self.parts.append(f"<p>{html.escape(text)}</p>")

    def pre(self, obj: Any) -> None:
        self.parts.append(f"<pre>{html.escape(json.dumps(obj, indent=1, default=str))}</pre>")

    def table(self, df: pd.DataFrame) -> None:
        self.parts.append(df.to_html(index=False, escape=True, classes="tbl", float_format=lambda v: f"{v:.4f}"))

    def figure(self, fig) -> None:
        self.n_fig += 1
        div = f"fig{self.n_fig}"
        self.parts.append(
            f'<div id="{div}" class="figure"></div><script>(function(){{var f={_safe_json(pio.to_json(fig))};'
            f'Plotly.newPlot("{div}", f.data, f.layout, {{responsive: true}});}})();</script>'
        )


CSS = """body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
pre{background:#f6f6f6;padding:.6em;overflow:auto;max-height:20em}.tbl{border-collapse:collapse;font-size:90%}
.tbl td,.tbl th{border:1px solid #ccc;padding:2px 8px}.tok{display:inline-block;border:1px solid #ddd;margin:1px;padding:0 3px;font-family:monospace;white-space:pre}
.figure{min-height:350px}"""


def build_report(run_dir: str | Path, title: str | None = None) -> str:
    table, metas = load_results(run_dir, with_metadata=True)
    run_dir = Path(run_dir)
    page = _Page()
    page.h(1, title or f"Attention-head report: {run_dir.name}")
    page.p(f"{len(table)} rows; models: {', '.join(sorted(table.model.unique()))}; datasets: {', '.join(sorted(table.dataset.unique()))}; probes: {', '.join(sorted(table.probe.unique()))}")
    cfg = run_dir / "sweep.json"
    if cfg.is_file():
        page.h(2, "Run config")
        page.pre(json.loads(cfg.read_text()))
    page.h(2, "Models and datasets")
    seen = {}
    for m in metas:
        seen.setdefault(json.dumps([m.get("model"), m.get("dataset")], sort_keys=True, default=str), m)
    page.pre([{"model": m.get("model"), "dataset": m.get("dataset")} for m in seen.values()])
    page.h(2, "Versions")
    page.pre(metas[0].get("versions", {}))
    for probe in sorted(table.probe.unique()):
        sub = table[table.probe == probe]
        page.h(2, f"Probe: {probe}")
        for metric in sorted(sub.metric.unique()):
            msub = sub[sub.metric == metric]
            if msub.layer.min() < 0:  # not a per-head metric
                if "step" in msub.columns and msub["step"].notna().any() and msub["step"].nunique() > 1:
                    page.h(3, metric)
                    page.figure(plots.token_curve(msub, metric))
                else:
                    page.table(msub.drop(columns=["layer", "head"]).dropna(axis=1, how="all"))
                continue
            page.h(3, metric)
            msub = msub.dropna(subset=["value"])
            if msub.empty:
                page.p(f"no values for {metric} (n = 0 for every head): this metric needs other prompts "
                       "(e.g. duplicate and induction need repeated-random's period)")
                continue
            for (model, dataset), _ in msub.groupby(["model", "dataset"]):
                page.figure(plots.head_heatmap(msub, metric, model=model, dataset=dataset, title=f"{metric} per head ({model}, {dataset})"))
            curve = msub.assign(series=msub.model + " / " + msub.dataset)
            page.figure(plots.layer_curve(curve, metric, color="series"))
        page.h(3, "Top heads")
        page.table(top_heads(sub, 10)[["model", "dataset", "metric", "layer", "head", "value", "n"]])
    page.h(2, "Example prompts")
    shown = 0
    for m in metas:
        for pr in m.get("prompts", [])[:2]:
            if shown >= 6:
                break
            shown += 1
            page.parts.append(f"<h4>{html.escape(str(pr.get('id')))}</h4><p>{html.escape(str(pr.get('text', '')))}</p>")
            ids = pr.get("ids") or [""] * len(pr.get("tokens", []))
            toks = "".join(f'<span class="tok" title="id {html.escape(str(i))}">{html.escape(str(t))}</span>' for t, i in zip(pr.get("tokens", []), ids))
            page.parts.append(f"<div>tokens: {toks}</div>")
    # how long the page took to render every figure, readable by tests and benchmarks
    page.parts.append('<script>document.body.setAttribute("data-rendered-ms", String(Math.round(performance.now())));</script>')
    body = "\n".join(page.parts)
    return (
        f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title or run_dir.name)}</title>"
        f"<style>{CSS}</style><script>{get_plotlyjs()}</script></head><body>{body}</body></html>"
    )


def write_report(run_dir: str | Path, out: str | Path, title: str | None = None) -> Path:
    """Build the report and write it atomically."""
    out = Path(out)
    text = build_report(run_dir, title)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise WorkbenchError(f"cannot write to {out}: {exc.strerror or exc}", "choose a writable --out path") from None
    return atomic_write_text(out, text)
