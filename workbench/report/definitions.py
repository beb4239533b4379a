"""A metric's definition for the page and for ``workbench probes``: what the probe that reports it
ships, its section of the metric definitions, or its module's docstring.

:func:`definition` looks, in this order, at

1. a metrics document given explicitly (``workbench report --docs FILE``);
2. what the probe reporting the metric ships with it, so a plugin package is whole: its
   ``definitions`` attribute (``{metric: markdown}``), else a ``metrics.md`` in the probe module's
   package (or its top-level package), read through :mod:`importlib.resources` and sectioned like
   the project's document (a heading per metric);
3. ``metrics.md`` (package data beside this module, also the docs site's metrics page; it defines
   the built-in probes' metrics), under the metric's heading, with the intro of the section around it;
4. the paragraph of the computing module's docstring that names the metric (found through the
   import system, so it works from any install).

:func:`summary` is the one line ``workbench probes`` prints per metric, :func:`described` a metric's
``what`` with its unit said once.
"""

from __future__ import annotations

import ast
import importlib
import importlib.resources
import importlib.util
import inspect
import re
import sys
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from workbench.protocol.metrics import MetricInfo
from workbench.report.kinds import info, known_metrics

METRICS_DOC = Path(__file__).with_name("metrics.md")  # package data (in the checkout, a link to docs/metrics.md)


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


def _doc_headings(lines: list[str]) -> list[tuple[int, int, str, list[str]]]:
    """The headings outside fenced code blocks as ``(line, level, title, names)``, each with every name it files."""
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
    return heads


def _section_text(lines: list[str], a: int, b: int) -> str:
    """Lines ``a`` to ``b`` of the document without their ``<a id>`` anchors, stripped."""
    return "\n".join(_ANCHOR.sub("", ln) for ln in lines[a:b]).strip()


def _doc_sections(
    lines: list[str], heads: list[tuple[int, int, str, list[str]]]
) -> tuple[list[DocSection], dict[str, int]]:
    """The section under each heading and ``{name: section index}``, the deepest section winning a name."""
    sections: list[DocSection] = []
    index: dict[str, int] = {}
    stack: list[int] = []
    for j, (start, level, title, names) in enumerate(heads):
        end = next((s for s, lv, _, _ in heads[j + 1 :] if lv <= level), len(lines))
        first_sub = heads[j + 1][0] if j + 1 < len(heads) and heads[j + 1][1] > level else end
        while stack and sections[stack[-1]].level >= level:
            stack.pop()
        sections.append(
            DocSection(
                title.replace("`", ""),
                level,
                tuple(names),
                _section_text(lines, start + 1, end),
                _section_text(lines, start + 1, first_sub),
                stack[-1] if stack else None,
            )
        )
        stack.append(j)
        for name in names:
            if name and (name not in index or sections[index[name]].level < level):
                index[name] = j
    return sections, index


def parse_doc(markdown: str) -> tuple[list[DocSection], dict[str, int]]:
    """The sections of a metrics document and ``{name: section index}``.

    A section is filed under its heading's GitHub anchor, its explicit ``{#id}`` or ``<a id="...">``
    anchor (also on the line before the heading), and every backquoted name in the heading (so
    ``### `sink_mass`, `sink_rate` `` files both). When a name occurs at several levels the
    deepest (most specific) section wins. Headings inside fenced code blocks are not headings.
    """
    lines = markdown.splitlines()
    return _doc_sections(lines, _doc_headings(lines))


def parse_sections(markdown: str) -> dict[str, str]:
    """``{name: markdown}`` for every name of every section (see :func:`parse_doc`)."""
    sections, index = parse_doc(markdown)
    return {name: sections[i].text for name, i in index.items()}


@lru_cache(maxsize=8)
def _load_doc(path: str, mtime: float) -> tuple[list[DocSection], dict[str, int]]:
    return parse_doc(Path(path).read_text(encoding="utf-8"))


@lru_cache(maxsize=16)
def _parse_text(markdown: str) -> tuple[list[DocSection], dict[str, int]]:
    return parse_doc(markdown)


def load_doc(path: str | Path | None = None) -> tuple[list[DocSection], dict[str, int]] | None:
    """The parsed ``docs/metrics.md`` (or ``path``); None when the file is missing."""
    doc = Path(path) if path is not None else METRICS_DOC
    return _load_doc(str(doc), doc.stat().st_mtime) if doc.is_file() else None


def module_file(module: str) -> Path | None:
    """The source file of ``module``, named as a path (``probes/sink.py``) or dotted
    (``probes.sink``), found through the import system: it works from any install, for plugins too."""
    name = module.removesuffix(".py").replace("/", ".").strip(".")
    if not name:
        return None
    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError):
        return None
    origin = Path(spec.origin) if spec is not None and spec.origin else None
    return origin if origin is not None and origin.is_file() else None


def _module_docstring(module: str) -> str | None:
    """``module``'s docstring: read from its source without running it, else (a module installed
    without its source) from the imported module, as :func:`inspect.getdoc` gives it."""
    file = module_file(module)
    if file is not None:
        try:
            return ast.get_docstring(ast.parse(file.read_text(encoding="utf-8")))
        except (SyntaxError, UnicodeDecodeError):
            return None
    name = module.removesuffix(".py").replace("/", ".").strip(".")
    try:
        loaded = sys.modules.get(name) or importlib.import_module(name)
    except Exception:  # not importable: there is no docstring to read
        return None
    return inspect.getdoc(loaded)


def _docstring_paragraph(module: str, metric: str) -> str | None:
    """The paragraph or bullet of ``module``'s docstring that names ``metric`` (else its first paragraph)."""
    doc = _module_docstring(module)
    if not doc:
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
    notation), when the definition comes from a metrics document or a probe's ``definitions``;
    ``shipped_by``: ``"distribution version"`` when the probe's own package shipped it."""

    text: str
    source: str
    group: str | None = None
    group_intro: str | None = None
    shipped_by: str | None = None


def doc_keys(metric: str) -> list[str]:
    """Names under which the metrics document may file ``metric``: itself, its hyphenated
    anchor, and the family anchor of the metric table (e.g. ``path-patching`` for ``path_logits``)."""
    keys = [metric, metric.replace("_", "-")]
    mi = info(metric)
    if mi.doc:
        keys.append(mi.doc)
    return keys


def _from_doc(parsed: tuple[list[DocSection], dict[str, int]], metric: str, name: str) -> Definition | None:
    """``metric``'s section of a parsed metrics document named ``name`` (for the source line)."""
    sections, index = parsed
    for key in doc_keys(metric):
        if key in index and sections[index[key]].text:
            sec = sections[index[key]]
            parent = sections[sec.parent] if sec.parent is not None else None
            return Definition(
                sec.text,
                f"{name}#{_slug(sec.title)}",
                parent.title if parent else None,
                parent.intro if parent else None,
            )
    return None


def metric_owner(metric: str) -> type | None:
    """The registered probe class that reports ``metric`` (it lists it in ``metrics``,
    ``metric_info`` or ``definitions``); None for metrics no probe reports (interventions, patching)."""
    from workbench.protocol.registry import probe_classes

    try:
        classes = probe_classes().values()
    except Exception:  # no probes installed
        return None
    for cls in classes:
        declared = (
            tuple(getattr(cls, "metrics", ()) or ())
            + tuple(getattr(cls, "metric_info", {}) or {})
            + tuple(getattr(cls, "definitions", {}) or {})
        )
        if metric in declared:
            return cls
    return None


def _origin_text(cls: type) -> str:
    """``distribution version`` of the package whose registration of ``cls`` is used ('' if none)."""
    from workbench.protocol.registry import origin

    dist, version = origin(getattr(cls, "name", ""))
    return "" if dist == "?" else f"{dist} {version}"


def _packages(module: str) -> list[str]:
    """The package ``module`` sits in, then its top-level package (a top-level module has none)."""
    mod = sys.modules.get(module)
    package = getattr(mod, "__package__", None) or module.rpartition(".")[0]
    if mod is not None and hasattr(mod, "__path__"):
        package = module  # a package's __init__ ships beside itself
    if not package:
        return []
    return list(dict.fromkeys([package, package.split(".")[0]]))


def probe_doc(cls: type) -> tuple[tuple[list[DocSection], dict[str, int]], str] | None:
    """The ``metrics.md`` a probe's package ships (beside the probe's module, else at the top of its
    package), parsed, with its name for source lines (``my_package/metrics.md``); None if there is none."""
    for package in _packages(getattr(cls, "__module__", "") or ""):
        try:
            file = importlib.resources.files(package).joinpath("metrics.md")
            if not file.is_file():
                continue
            text = file.read_text(encoding="utf-8")
        except (ImportError, OSError, TypeError, ValueError, UnicodeDecodeError):
            continue
        return _parse_text(text), f"{package.replace('.', '/')}/metrics.md"
    return None


def own_definition(cls: type, metric: str) -> Definition | None:
    """What probe class ``cls`` ships as ``metric``'s definition: its ``definitions`` entry, else
    its package's ``metrics.md`` section; the source names the distribution and its version."""
    where = _origin_text(cls)
    prefix = f"{where}: " if where else ""
    declared = (getattr(cls, "definitions", None) or {}).get(metric)
    if isinstance(declared, str) and declared.strip():
        intro = (getattr(cls, "description", "") or "").strip()
        if where:
            intro = f"{intro} (from {where})." if intro else f"From {where}."
        return Definition(
            inspect.cleandoc(declared),
            f"{prefix}{cls.__module__}.{cls.__qualname__}.definitions",
            f"Probe {cls.name}",
            intro or None,
            where or None,
        )
    shipped = probe_doc(cls)
    if shipped is not None:
        found = _from_doc(shipped[0], metric, shipped[1])
        if found is not None:
            return Definition(found.text, prefix + found.source, found.group, found.group_intro, where or None)
    return None


def definition(metric: str, path: str | Path | None = None) -> Definition | None:
    """``metric``'s definition: from ``path`` when given, else what its probe ships (``definitions``,
    its package's ``metrics.md``), else its section of ``docs/metrics.md`` with its enclosing
    section's intro; else the paragraph of its module's docstring that names it. None when none exists."""
    if path is not None:
        parsed = load_doc(path)
        found = _from_doc(parsed, metric, Path(path).name) if parsed is not None else None
        if found is not None:
            return found
    owner = metric_owner(metric)
    found = own_definition(owner, metric) if owner is not None else None
    if found is not None:
        return found
    if path is None:
        parsed = load_doc()
        found = _from_doc(parsed, metric, "docs/metrics.md") if parsed is not None else None
        if found is not None:
            return found
    module = info(metric).module
    text = _docstring_paragraph(module, metric)
    if text:
        return Definition(text.replace("``", "`"), f"{module} (docstring)")
    return None


def described(mi: MetricInfo) -> str:
    """A metric's ``what`` with its unit said once: ``"entropy divided by ln(keys) (nats)"``, but not
    ``"mean entropy, in nats (nats)"`` when the line already names the unit."""
    what = mi.what.strip()
    unit = (mi.unit or "").strip()
    if not unit or re.search(rf"(?<!\w){re.escape(unit)}(?!\w)", what):
        return what
    return f"{what} ({unit})"


_NOT_PROSE = ("```", "~~~", "$$", "|", "#", "<", "\\[")


def summary_line(markdown: str, limit: int = 160) -> str:
    """The first sentence of a definition's first prose paragraph (code, formulas, tables and
    headings skipped), as plain text of at most ``limit`` characters."""
    for para in re.split(r"\n\s*\n", markdown):
        para = para.strip()
        if not para or para.startswith(_NOT_PROSE):
            continue
        text = re.sub(r"^[-*+]\s+", "", para)
        text = " ".join(text.replace("`", "").replace("**", "").split())
        m = re.search(r"(?<=[.!?])\s+(?=[A-Z(])", text)
        if m:
            text = text[: m.start()]
        return text if len(text) <= limit else text[: limit - 3].rstrip() + "..."
    return ""


def summary(metric: str) -> tuple[str, str | None]:
    """The line ``workbench probes`` prints for ``metric`` and where its full definition is: the
    first sentence of the definition its probe ships (``definitions`` or its ``metrics.md``), else
    the probe's declared ``metric_info`` line (its unit once), else the definition's first sentence.
    ``("no definition found", None)`` when there is none."""
    owner = metric_owner(metric)
    own = own_definition(owner, metric) if owner is not None else None
    found = own or definition(metric)
    line = summary_line(own.text) if own is not None else ""
    mi = known_metrics().get(metric)
    if not line and mi is not None and mi.what and mi.what != metric:
        line = described(mi)
    if not line and found is not None:
        line = summary_line(found.text)
    return line or "no definition found", found.source if found is not None else None
