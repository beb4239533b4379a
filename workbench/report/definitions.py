"""A metric's definition for the page: its section of the metric definitions, or its module's
docstring.

:func:`definition` gives the section of ``metrics.md`` (package data beside this module, also the
docs site's metrics page) under the metric's heading, with the intro of the section around it, or
(when that section is missing) the paragraph of the computing module's docstring that names it.
"""

from __future__ import annotations

import ast
import importlib.util
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from workbench.report.kinds import info

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


def _docstring_paragraph(module: str, metric: str) -> str | None:
    """The paragraph or bullet of ``module``'s docstring that names ``metric`` (else its first paragraph)."""
    file = module_file(module)
    if file is None:
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
                return Definition(
                    sec.text,
                    f"{name}#{_slug(sec.title)}",
                    parent.title if parent else None,
                    parent.intro if parent else None,
                )
    module = info(metric).module
    text = _docstring_paragraph(module, metric)
    if text:
        return Definition(text.replace("``", "`"), f"{module} (docstring)")
    return None
