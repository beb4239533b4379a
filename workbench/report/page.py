"""The page machinery of the HTML report: one self-contained file that works offline.

plotly.js is inlined once; every figure's data sits in one JSON block (``<``, ``>`` and ``&``
escaped, so no user string can close a script tag; NaN -> null) and a small script renders them
in document order, then marks ``<body data-rendered-ms>`` (and ``data-first-figure-ms``) for
tests and benchmarks. The atlas tooltip builds its text with ``textContent``: no user text ever
becomes HTML. Figures share one plotly template, stored once.
"""

from __future__ import annotations

import html
import json
import math
import re
from typing import Any

import numpy as np
from plotly.offline import get_plotlyjs


def safe_json(obj: Any) -> str:
    """JSON that is inert inside a <script> element: NaN -> null, < > & escaped."""
    text = json.dumps(_nan_to_null(obj), default=str)
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def _nan_to_null(obj: Any) -> Any:
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _nan_to_null(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_nan_to_null(v) for v in obj]
    return obj


def esc(text: Any) -> str:
    return html.escape(str(text), quote=True)


def anchor(*parts: str) -> str:
    return "-".join(re.sub(r"[^A-Za-z0-9_-]+", "-", str(p)).strip("-").lower() for p in parts if str(p))


class Page:
    def __init__(self) -> None:
        self.parts: list[str] = []
        self.figures: list[dict] = []
        self.toc: list[tuple[int, str, str]] = []
        self.template: dict | None = None

    def add(self, raw_html: str) -> None:
        self.parts.append(raw_html)

    def section(self, level: int, title: str, anchor: str, toc: bool = True) -> None:
        if toc:
            self.toc.append((level, title, anchor))
        self.parts.append(f'<h{level} id="{esc(anchor)}">{esc(title)}</h{level}>')

    def row(self, open_: bool) -> None:
        """Start / end a two-column row (a small grid next to its curve)."""
        self.parts.append('<div class="pair">' if open_ else "</div>")

    def p(self, text: str) -> None:
        self.parts.append(f"<p>{esc(text)}</p>")

    def figure(self, fig, caption: str) -> None:
        """A plotly figure and its caption (``caption`` is HTML built from escaped parts)."""
        spec = fig.to_plotly_json()
        layout = spec.get("layout", {})
        template = layout.pop("template", None)
        if self.template is None and template is not None:
            self.template = template
        layout["margin"] = {"t": 60, "b": 50, "l": 60, "r": 30, **(layout.get("margin") or {})}
        fig_id = f"fig{len(self.figures) + 1}"
        height = int(layout.get("height") or 450)
        self.figures.append({"id": fig_id, "data": round_json(spec.get("data", [])), "layout": round_json(layout)})
        self.parts.append(
            f'<figure class="fig"><div id="{fig_id}" class="figure" style="min-height:{height}px"></div>'
            f"<figcaption>{caption}</figcaption></figure>"
        )


def _typed_to_list(value: dict) -> list:
    import base64

    arr = np.frombuffer(base64.b64decode(value["bdata"]), dtype=value["dtype"])
    return arr.reshape([int(x) for x in str(value.get("shape", len(arr))).split(",")]).tolist()


def round_json(obj: Any, digits: int = 5, key: str = "") -> Any:
    """Plotly JSON with floats rounded to ``digits`` significant digits (a third of the bytes).

    Arrays stay in plotly's compact typed form (base64), except colour arrays: plotly.js reads
    a typed ``marker.color`` as a colour name for the legend symbol and warns."""
    if key == "color" and isinstance(obj, dict) and "bdata" in obj:
        return round_json(_typed_to_list(obj), digits)
    if isinstance(obj, float):
        return float(f"{obj:.{digits}g}") if math.isfinite(obj) else None
    if isinstance(obj, np.ndarray):
        return round_json(obj.tolist(), digits)
    if isinstance(obj, (np.floating, np.integer)):
        return round_json(obj.item(), digits)
    if isinstance(obj, dict):
        return {k: round_json(v, digits, k) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [round_json(v, digits) for v in obj]
    return obj


def fmt(v: Any, digits: int = 3) -> str:
    try:
        v = float(v)
    except (TypeError, ValueError):
        return str(v)
    if not math.isfinite(v):
        return "n/a"
    return f"{v:.{digits}g}" if abs(v) >= 1e-3 or v == 0 else f"{v:.2e}"


CSS = """
:root{--fg:#1d1d1f;--muted:#666;--line:#d8d8d8;--bg2:#f6f7f9}
body{font-family:system-ui,-apple-system,"Segoe UI",sans-serif;max-width:1180px;margin:1.5em auto;padding:0 1.2em;
 color:var(--fg);line-height:1.45}
h1{font-size:1.7em;margin-bottom:.2em}h2{margin-top:2em;border-bottom:1px solid var(--line);padding-bottom:.2em}
h3{margin-top:1.6em}
a{color:#1f5fbf}code{font-size:90%;background:var(--bg2);padding:0 .25em;border-radius:3px}
nav.toc{background:var(--bg2);border:1px solid var(--line);border-radius:6px;padding:.5em 1em;font-size:92%}
nav.toc ol{margin:.2em 0;padding-left:1.6em;columns:2;column-gap:2em}nav.toc li{break-inside:avoid;margin:.1em 0}
nav.toc .sub{font-size:90%;color:var(--muted)}
.tbl{border-collapse:collapse;font-size:88%;margin:.5em 0}
.tbl td,.tbl th{border:1px solid var(--line);padding:3px 8px;text-align:left;vertical-align:top}
.tbl th{background:var(--bg2)}.hd{font-family:ui-monospace,monospace;background:#eef3fb;border-radius:3px;padding:0 3px}
.muted,.note,.src{color:var(--muted)}.note,.src{font-size:88%}
figure.fig{margin:1em 0 1.6em}figcaption{font-size:90%;color:#333;max-width:60em;margin-top:.3em}
.figure{width:100%}.pair{display:grid;grid-template-columns:minmax(0,1fr) minmax(0,1fr);gap:1.2em;align-items:start}
.chip{display:inline-block;min-width:1.1em;padding:0 2px;margin:1px;border-radius:3px;color:#fff;
 font:bold 10px/14px ui-monospace,monospace;text-align:center;text-shadow:0 0 2px rgba(0,0,0,.5)}
.legend .chip{font-size:11px}
.atlas-row{display:flex;flex-wrap:wrap;gap:1.5em;align-items:flex-start;overflow-x:auto}
.atlas-title{font-weight:bold}.atlas-sub{font-size:85%;color:var(--muted);margin-bottom:.3em}
table.atlas{border-collapse:collapse;font-size:10px}table.atlas th{font-weight:normal;color:var(--muted);padding:0 3px}
table.atlas td{border:1px solid #e4e4e4;min-width:34px;height:17px;padding:0 1px;background:#fbfbfb;cursor:default;
 white-space:nowrap}
table.atlas td.has{background:#fff}table.atlas td:hover,table.atlas td:focus{outline:2px solid #222;outline-offset:-1px}
#atlas-tip{position:absolute;z-index:10;display:none;background:#fff;border:1px solid #999;border-radius:6px;
 box-shadow:0 4px 14px rgba(0,0,0,.2);padding:.5em .7em;font-size:12px;max-width:420px;pointer-events:none}
#atlas-tip table{border-collapse:collapse}#atlas-tip td{padding:0 .5em 0 0}
#atlas-tip .t{font-weight:bold;margin-bottom:.2em}
#atlas-tip .r{margin:.1em 0}
.tok{display:inline-block;border:1px solid #ddd;margin:1px;padding:0 3px;font-family:monospace;white-space:pre}
.prompt{font-size:92%;color:#333}
details.raw pre{background:var(--bg2);padding:.6em;overflow:auto;max-height:30em;font-size:80%}
ul.findings{margin:.3em 0 1em;padding-left:1.2em}ul.findings li{margin:.15em 0}
section.def{border-left:3px solid var(--line);padding-left:.8em;margin:1em 0}section.def h4{margin:.2em 0}
.def pre,.def-intro pre{background:var(--bg2);padding:.4em .6em;overflow-x:auto;font-size:85%}.def-intro{font-size:95%}
"""

JS = r"""
(function(){
  var figs = JSON.parse(document.getElementById("wb-figures").textContent);
  var tmplNode = document.getElementById("wb-template");
  var tmpl = tmplNode ? JSON.parse(tmplNode.textContent) : null;
  var i = 0;
  function next(){
    if (i >= figs.length){
      document.body.setAttribute("data-rendered-ms", String(Math.round(performance.now())));
      return;
    }
    var f = figs[i++];
    if (tmpl) f.layout.template = tmpl;
    Plotly.newPlot(f.id, f.data, f.layout, {responsive: true, displaylogo: false}).then(function(){
      if (i === 1) document.body.setAttribute("data-first-figure-ms", String(Math.round(performance.now())));
      setTimeout(next, 0);
    });
  }
  next();
  // atlas tooltip: every metric of the hovered head, built with textContent (no user text as HTML)
  var node = document.getElementById("wb-atlas");
  if (!node) return;
  var atlas = JSON.parse(node.textContent);
  var tip = document.createElement("div"); tip.id = "atlas-tip"; tip.setAttribute("role", "tooltip");
  document.body.appendChild(tip);
  function el(tag, cls, text){
    var e = document.createElement(tag); if (cls) e.className = cls; if (text !== undefined) e.textContent = text;
    return e;
  }
  function fmt(v){
    if (v === null || v === undefined) return "n/a";
    var a = Math.abs(v); return (a !== 0 && a < 1e-3) ? v.toExponential(2) : String(+v.toPrecision(4));
  }
  function show(td){
    var s = atlas[+td.dataset.s], l = +td.dataset.l, h = +td.dataset.h;
    tip.textContent = "";
    var depth = s.n_layers > 1 ? l / (s.n_layers - 1) : 0;
    tip.appendChild(el("div", "t", s.name + ": layer " + l + ", head " + h
                                   + " (relative depth " + depth.toFixed(2) + ")"));
    var roles = s.roles[l + "." + h] || [];
    if (!roles.length) tip.appendChild(el("div", "r", "no role at these thresholds"));
    roles.forEach(function(r){
      var rule = r[3] === null ? "" : " " + (r[5] || (r[3] < 0 ? "<=" : ">=")) + " " + fmt(r[3]);
      tip.appendChild(el("div", "r", "role " + r[0] + ": " + r[1] + " = " + fmt(r[2]) + rule + " (" + r[4] + ")"));
    });
    var tbl = el("table"), vals = s.vals[l] ? s.vals[l][h] : [];
    s.cols.forEach(function(c, k){
      var tr = el("tr"); tr.appendChild(el("td", "", c[0])); tr.appendChild(el("td", "muted", c[1]));
      tr.appendChild(el("td", "", fmt(vals[k]))); tbl.appendChild(tr);
    });
    tip.appendChild(tbl);
    var r = td.getBoundingClientRect();
    tip.style.display = "block";
    var x = r.right + window.scrollX + 8, w = tip.offsetWidth;
    if (x + w > window.scrollX + document.documentElement.clientWidth)
      x = Math.max(window.scrollX, r.left + window.scrollX - w - 8);
    tip.style.left = x + "px"; tip.style.top = (r.top + window.scrollY) + "px";
  }
  function hide(){ tip.style.display = "none"; }
  document.querySelectorAll("table.atlas td[data-s]").forEach(function(td){
    td.addEventListener("mouseenter", function(){ show(td); }); td.addEventListener("focus", function(){ show(td); });
    td.addEventListener("mouseleave", hide); td.addEventListener("blur", hide);
  });
})();
"""


def _toc(page: Page) -> str:
    """Sections as a numbered list; their subsections (a probe's metrics) inline on one line."""
    groups: list[tuple[str, str, list[tuple[str, str]]]] = []
    for level, text, target in page.toc:
        if level <= 2 or not groups:
            groups.append((text, target, []))
        else:
            groups[-1][2].append((text, target))
    items = []
    for text, target, subs in groups:
        sub = " · ".join(f'<a href="#{esc(t)}">{esc(x)}</a>' for x, t in subs)
        items.append(
            f'<li><a href="#{esc(target)}">{esc(text)}</a>{f"<span class=sub>: {sub}</span>" if sub else ""}</li>'
        )
    return f'<nav class="toc" id="toc"><b>Contents</b><ol>{"".join(items)}</ol></nav>'


def render_html(page: Page, title: str) -> str:
    """The whole page. plotly.js (4.6 MB) comes after the text, so the summary, tables and
    atlas paint before the browser has parsed it."""
    body = page.parts[0] + _toc(page) + "\n".join(page.parts[1:])
    template = (
        f'<script id="wb-template" type="application/json">{safe_json(round_json(page.template))}</script>'
        if page.template
        else ""
    )
    return (
        f"<!DOCTYPE html><html lang=\"en\"><head><meta charset='utf-8'>"
        "<meta name='viewport' content='width=device-width, initial-scale=1'>"
        f"<title>{esc(title)}</title><style>{CSS}</style></head><body>{body}"
        f'<script id="wb-figures" type="application/json">{safe_json(page.figures)}</script>{template}'
        f"<script>{get_plotlyjs()}</script><script>{JS}</script></body></html>"
    )
