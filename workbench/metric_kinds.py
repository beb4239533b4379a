"""What each metric is and how to draw it: the one table the figures, captions and report read.

Every metric has a *kind*, which decides its colour scale and axes:

- ``bounded``: a probability or share in [0, 1]; sequential scale fixed to 0..1, so two figures of
  the same metric compare by colour.
- ``signed``: an effect that can be negative (patching effects, direct effects); diverging scale
  centred on 0, symmetric limits.
- ``positive``: >= 0 without an upper bound (entropy in nats); sequential scale from the data.
- ``log``: >= 0 and spanning orders of magnitude (output distances); log10 scale when the finite
  positive values span at least :data:`LOG_SPAN` (a factor of 100), linear otherwise.

:func:`info` answers for any metric name: what the probe that reports it declares
(``metric_info``, see :func:`known_metrics`), patching metrics by
prefix (:data:`PATTERNS`), and anything else by looking at its values (:func:`infer_kind`).
:func:`definition` gives the metric's definition for the page: the section of
``docs/metrics.md`` under the metric's heading (with the intro of the section around it), or
(when that file or section is missing) the paragraph of the computing module's docstring that
names it.
"""
from __future__ import annotations

import ast
import re
from dataclasses import dataclass, replace
from functools import lru_cache
from pathlib import Path
from typing import Iterable

import numpy as np

KINDS = ("bounded", "signed", "positive", "log")
LOG_SPAN = 100.0  # a log-kind metric is drawn on a log scale when max / min(positive) >= this
REPO_ROOT = Path(__file__).resolve().parents[1]
METRICS_DOC = REPO_ROOT / "docs" / "metrics.md"


@dataclass(frozen=True)
class MetricInfo:
    """How to read and draw one metric.

    ``what``: one line saying what the metric is. ``high`` / ``low``: what a high (for signed
    metrics: positive) or low (negative) value means, for captions. ``rank``: which heads the
    summary lists first (``high``, ``low`` or ``abs`` = largest magnitude). ``module``: the
    source file (relative to the repository) whose docstring defines it, the fallback when
    ``docs/metrics.md`` has no section for it.
    """

    kind: str
    what: str
    high: str = "a higher value"
    low: str = "a lower value"
    rank: str = "high"
    unit: str = ""
    module: str = ""
    doc: str = ""  # its section's anchor in docs/metrics.md when not the metric's own name


# Metrics computed outside probes (interventions); probes declare their own in ``metric_info``.
CORE_METRICS: dict[str, MetricInfo] = {
    "answer_changed": MetricInfo("bounded", "share of items whose answer changed under the intervention", module="workbench/interventions.py"),
}


def known_metrics() -> dict[str, MetricInfo]:
    """Every metric with a declared meaning: each registered probe's ``metric_info`` (in the
    registry's order), then the core table. A plugin probe declares its own; nothing here names it."""
    from workbench.registry import probe_classes

    table: dict[str, MetricInfo] = {}
    try:
        classes = probe_classes().values()
    except Exception:  # no probes installed: captions fall back to inference
        classes = []
    for cls in classes:
        module = cls.__module__.replace(".", "/") + ".py"
        for name, mi in (getattr(cls, "metric_info", {}) or {}).items():
            table[name] = mi if mi.module else replace(mi, module=module)
    table.update(CORE_METRICS)
    return table


# Families named by prefix: patching metrics are activation_<component>, path_logits / path_qkv, attribution_z.
_PATCHING = ("normalised change of the logit difference when the head is patched: 0 = no effect, -1 = behaviour destroyed",
             "patching the head raises the logit difference", "patching the head destroys the behaviour (the head matters)")
PATTERNS: list[tuple[re.Pattern, MetricInfo]] = [
    (re.compile(f"^{family}_"), MetricInfo("signed", *_PATCHING, rank="abs", module="circuits/patching.py", doc=f"{family}-patching"))
    for family in ("activation", "path", "attribution")
]

def scatter_pairs() -> list[tuple[str, str]]:
    """Metric pairs worth a per-head scatter when both were measured on the same model: what
    registered probes declare in ``scatter_pairs`` (e.g. retrieval with induction)."""
    from workbench.registry import probe_classes

    pairs: list[tuple[str, str]] = []
    try:
        classes = probe_classes().values()
    except Exception:
        classes = []
    for cls in classes:
        pairs += [tuple(p) for p in getattr(cls, "scatter_pairs", ()) if tuple(p) not in pairs]
    return pairs


def infer_kind(values: Iterable[float]) -> str:
    """The kind of an unknown metric from its values: negative -> signed, within [0, 1] ->
    bounded, positive spanning >= LOG_SPAN -> log, else positive."""
    v = np.asarray(list(values), dtype=float)
    v = v[np.isfinite(v)]
    if v.size == 0:
        return "positive"
    if v.min() < 0:
        return "signed"
    if v.max() <= 1:
        return "bounded"
    pos = v[v > 0]
    return "log" if pos.size and pos.max() / pos.min() >= LOG_SPAN else "positive"


def info(metric: str, values: Iterable[float] | None = None) -> MetricInfo:
    """What ``metric`` is and its kind; unknown names get a kind inferred from ``values``."""
    known = known_metrics()
    if metric in known:
        return known[metric]
    for pattern, mi in PATTERNS:
        if pattern.search(metric):
            return mi
    return MetricInfo(infer_kind(values if values is not None else []), metric)


def scale_for(metric: str, values: Iterable[float]) -> str:
    """The scale to draw: ``bounded``, ``signed``, ``positive`` or ``log`` (a ``log`` metric whose
    values span less than LOG_SPAN is drawn linear, as ``positive``)."""
    v = np.asarray(list(values), dtype=float)
    kind = info(metric, v).kind
    if kind == "bounded" and np.nanmax(np.abs(v), initial=0) > 1 + 1e-9:
        return "positive"  # e.g. a retrieval score above 1 without the newline stop: never clip
    if kind == "log":
        pos = v[np.isfinite(v) & (v > 0)]
        return "log" if pos.size and pos.max() / pos.min() >= LOG_SPAN else "positive"
    return kind


def with_kind(metric: str, kind: str) -> MetricInfo:
    """``info(metric)`` with another kind (e.g. a difference of two bounded metrics is signed)."""
    if kind not in KINDS:
        raise ValueError(f"unknown kind {kind!r}; choose from {KINDS}")
    return replace(info(metric), kind=kind)


# -- definitions --------------------------------------------------------------------------------

_HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")
_ANCHOR = re.compile(r"""<a\s+(?:id|name)\s*=\s*["']([^"']+)["']\s*>\s*</a>""", re.I)
_EXPLICIT_ID = re.compile(r"\{#([A-Za-z0-9_.-]+)\}\s*$")


def _slug(text: str) -> str:
    """GitHub's heading anchor: lower case, punctuation other than - and _ removed, spaces -> -."""
    text = _ANCHOR.sub("", text).strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


@dataclass(frozen=True)
class DocSection:
    """One heading of a metrics document: ``text`` runs to the next heading of the same or a
    higher level (subsections included); ``intro`` is its own text before its first subheading;
    ``parent`` is the index of the enclosing section (None at the top)."""

    title: str
    level: int
    names: tuple[str, ...]
    text: str
    intro: str
    parent: int | None


def parse_doc(markdown: str) -> tuple[list[DocSection], dict[str, int]]:
    """The sections of a metrics document and ``{name: section index}``.

    A section is filed under its heading's GitHub anchor, its explicit ``{#id}`` or ``<a id="...">``
    anchor (also on the line before the heading), and every backquoted name in the heading (so
    ``### `sink_mass`, `sink_rate` `` files both). When a name occurs at several levels the
    deepest (most specific) section wins. Headings inside fenced code blocks are not headings.
    """
    lines = markdown.splitlines()
    heads: list[tuple[int, int, str, list[str]]] = []  # (line, level, title, names)
    pending: list[str] = []
    fenced = False
    for i, line in enumerate(lines):
        if line.lstrip().startswith(("```", "~~~")):
            fenced = not fenced
        if fenced:
            continue
        anchors = _ANCHOR.findall(line)
        m = _HEADING.match(_ANCHOR.sub("", line).strip()) if line.lstrip().startswith(("#", "<a")) else None
        if m and m.group(2):
            level, title = len(m.group(1)), m.group(2)
            names = list(pending) + anchors
            pending = []
            explicit = _EXPLICIT_ID.search(title)
            if explicit:
                names.append(explicit.group(1))
                title = _EXPLICIT_ID.sub("", title).strip()
            names += re.findall(r"`([^`]+)`", title)
            names.append(_slug(title.replace("`", "")))
            heads.append((i, level, title, names))
        elif anchors and not _ANCHOR.sub("", line).strip():
            pending += anchors  # an anchor on its own line names the next heading
    clean = lambda a, b: "\n".join(_ANCHOR.sub("", ln) for ln in lines[a:b]).strip()  # noqa: E731
    sections: list[DocSection] = []
    index: dict[str, int] = {}
    stack: list[int] = []
    for j, (start, level, title, names) in enumerate(heads):
        end = next((s for s, lv, _, _ in heads[j + 1:] if lv <= level), len(lines))
        first_sub = heads[j + 1][0] if j + 1 < len(heads) and heads[j + 1][1] > level else end
        while stack and sections[stack[-1]].level >= level:
            stack.pop()
        sections.append(DocSection(title.replace("`", ""), level, tuple(names), clean(start + 1, end), clean(start + 1, first_sub),
                                   stack[-1] if stack else None))
        stack.append(j)
        for name in names:
            if name and (name not in index or sections[index[name]].level < level):
                index[name] = j
    return sections, index


def parse_sections(markdown: str) -> dict[str, str]:
    """``{name: markdown}`` for every name of every section (see :func:`parse_doc`)."""
    sections, index = parse_doc(markdown)
    return {name: sections[i].text for name, i in index.items()}


@lru_cache(maxsize=8)
def _load_doc(path: str, mtime: float) -> tuple[list[DocSection], dict[str, int]]:
    return parse_doc(Path(path).read_text(encoding="utf-8"))


def load_doc(path: str | Path | None = None) -> tuple[list[DocSection], dict[str, int]] | None:
    """The parsed ``docs/metrics.md`` (or ``path``); None when the file is missing."""
    doc = Path(path) if path is not None else METRICS_DOC
    return _load_doc(str(doc), doc.stat().st_mtime) if doc.is_file() else None


def _docstring_paragraph(module: str, metric: str) -> str | None:
    """The paragraph or bullet of ``module``'s docstring that names ``metric`` (else its first paragraph)."""
    file = REPO_ROOT / module
    if not module or not file.is_file():
        return None
    try:
        doc = ast.get_docstring(ast.parse(file.read_text(encoding="utf-8"))) or ""
    except (SyntaxError, UnicodeDecodeError):
        return None
    paras = [p.strip("\n") for p in re.split(r"\n\s*\n", doc) if p.strip()]
    for para in paras:
        # a bullet that names the metric is its definition: "- ``x``: ..." up to the next bullet
        for b in re.split(r"\n(?=- )", para):
            if b.lstrip().startswith("- ") and (f"``{metric}``" in b or f"`{metric}`" in b):
                return b.strip()
    # else the module's opening: paragraphs up to the one naming the metric (at most ~1500 chars)
    out: list[str] = []
    for para in paras:
        if out and sum(map(len, out)) + len(para) > 1500:
            break
        out.append(para)
        if f"``{metric}``" in para or f"`{metric}`" in para:
            break
    return "\n\n".join(out) or None


@dataclass(frozen=True)
class Definition:
    """A metric's definition for the page: ``text`` (markdown) and where it came from; ``group`` /
    ``group_intro``: the enclosing section's title and its own text (a probe's sources and shared
    notation), when the definition comes from the metrics document."""

    text: str
    source: str
    group: str | None = None
    group_intro: str | None = None


def doc_keys(metric: str) -> list[str]:
    """Names under which the metrics document may file ``metric``: itself, its hyphenated
    anchor, and the family anchor of the metric table (e.g. ``path-patching`` for ``path_logits``)."""
    keys = [metric, metric.replace("_", "-")]
    mi = info(metric)
    if mi.doc:
        keys.append(mi.doc)
    return keys


def definition(metric: str, path: str | Path | None = None) -> Definition | None:
    """``metric``'s section of ``docs/metrics.md`` (or ``path``) with its enclosing section's
    intro, else the paragraph of its module's docstring that names it; None when neither exists."""
    parsed = load_doc(path)
    if parsed is not None:
        sections, index = parsed
        for key in doc_keys(metric):
            if key in index and sections[index[key]].text:
                sec = sections[index[key]]
                parent = sections[sec.parent] if sec.parent is not None else None
                name = "docs/metrics.md" if path is None else Path(path).name
                return Definition(sec.text, f"{name}#{_slug(sec.title)}", parent.title if parent else None, parent.intro if parent else None)
    module = info(metric).module
    text = _docstring_paragraph(module, metric)
    if text:
        return Definition(text.replace("``", "`"), f"{module} (docstring)")
    return None
