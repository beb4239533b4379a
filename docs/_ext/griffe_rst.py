"""A griffe extension: the reStructuredText constructs of this project's docstrings, as Markdown.

The docstrings are written for plain reading and for Sphinx-like tools: ``code`` (already
Markdown), cross-reference roles (:func:`x`, :class:`~a.B`, :mod:`m`, ...), literal blocks
introduced by ``::`` and simple tables framed by ``=====  =====`` rules. mkdocstrings renders
docstrings as Markdown, where those show as raw text; this extension rewrites them once griffe
has loaded every object (nothing in the Python files changes):

- a role becomes an *optional* mkdocs-autorefs reference: a link when the target is documented on
  the site, plain code (and no warning, so ``mkdocs build --strict`` stays clean) when it is not;
  a bare name is looked up in the object's own module and class first;
- ``text::`` + an indented block becomes ``text:`` + a fenced code block;
- a simple table becomes a Markdown table (continuation lines, whose first column is blank, are
  joined to the row above).

Loaded by mkdocs.yml: ``extensions: [docs/_ext/griffe_rst.py:RstDocstrings]`` (a path relative
to the repository root, where ``mkdocs build`` runs).
"""

from __future__ import annotations

import re
from typing import Any

import griffe

_ROLE = re.compile(r":(?:py:)?(func|class|meth|mod|attr|data|exc|obj|const|type):`([^`]+)`")
_RULE = re.compile(r"^(\s*)(=+)((?: +=+)+)\s*$")


def _target(obj: griffe.Object, name: str) -> str:
    """The full path a role's target most likely means, seen from ``obj``."""
    name = name.lstrip(".")
    if "." in name:
        return name
    scopes = [obj] if obj.is_class or obj.is_module else []
    scopes += [p for p in (obj.parent, obj.module) if p is not None]
    for scope in scopes:
        try:
            if name in scope.members:
                return f"{scope.path}.{name}"
        except Exception:  # an unresolved alias: fall back to the bare name
            continue
    return name


def _roles(obj: griffe.Object, text: str) -> str:
    def repl(m: re.Match) -> str:
        body = m.group(2).strip()
        explicit = re.fullmatch(r"(.+?)\s*<([^>]+)>", body)
        if explicit:
            title, target = explicit.group(1), explicit.group(2)
        else:
            short = body.startswith("~")
            target = body.lstrip("~")
            title = target.rsplit(".", 1)[-1] if short else target.lstrip(".")
        ident = _target(obj, target.lstrip("~"))
        title = title.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
        return f'<autoref identifier="{ident}" optional><code>{title}</code></autoref>'

    return _ROLE.sub(repl, text)


def _cells(line: str, spans: list[tuple[int, int]]) -> list[str]:
    out = []
    for i, (a, b) in enumerate(spans):
        end = len(line) if i == len(spans) - 1 else spans[i + 1][0]
        out.append(line[a:end].strip())
    return out


def _table(lines: list[str], start: int) -> tuple[list[str], int] | None:
    """A simple table starting at ``lines[start]`` as Markdown lines, and the index after it."""
    m = _RULE.match(lines[start])
    if not m:
        return None
    spans = [(mm.start(), mm.end()) for mm in re.finditer(r"=+", lines[start])]
    indent = m.group(1)

    def is_rule(line: str) -> bool:
        return bool(_RULE.match(line)) and len(re.findall(r"=+", line)) == len(spans)

    sections: list[list[list[str]]] = [[]]  # rows between rules
    i = start + 1
    while i < len(lines):
        line = lines[i]
        if is_rule(line):
            i += 1
            if i >= len(lines) or not lines[i].strip() or len(sections) == 2:
                break  # the closing rule
            sections.append([])
            continue
        if not line.strip():
            return None  # a blank line inside: not a table this converter understands
        cells = _cells(line.ljust(spans[-1][1]), spans)
        rows = sections[-1]
        if rows and not cells[0]:
            rows[-1] = [f"{a} {b}".strip() for a, b in zip(rows[-1], cells)]
        else:
            rows.append(cells)
        i += 1
    else:
        return None
    if len(sections) == 2:
        header = [" ".join(c for c in col if c) for col in zip(*sections[0])]
        body = sections[1]
    else:
        header, body = [""] * len(spans), sections[0]
    esc = [[c.replace("|", "\\|") for c in r] for r in [header, *body]]
    md = [indent + "| " + " | ".join(esc[0]) + " |", indent + "|" + "---|" * len(spans)]
    md += [indent + "| " + " | ".join(r) + " |" for r in esc[1:]]
    return ["", *md, ""], i


def _blocks(text: str) -> str:
    """Tables and ``::`` literal blocks."""
    lines = text.split("\n")
    out: list[str] = []
    i = 0
    while i < len(lines):
        line = lines[i]
        table = _table(lines, i) if _RULE.match(line) else None
        if table:
            md, i = table
            out.extend(md)
            continue
        if line.rstrip().endswith("::") and not line.strip().startswith(("..", "|")):
            base = len(line) - len(line.lstrip())
            j = i + 1
            while j < len(lines) and not lines[j].strip():
                j += 1
            if j < len(lines) and len(lines[j]) - len(lines[j].lstrip()) > base:
                block_indent = len(lines[j]) - len(lines[j].lstrip())
                k, body = j, []
                while k < len(lines) and (
                    not lines[k].strip() or len(lines[k]) - len(lines[k].lstrip()) >= block_indent
                ):
                    body.append(lines[k][block_indent:] if lines[k].strip() else "")
                    k += 1
                while body and not body[-1]:
                    body.pop()
                head = line.rstrip()[:-2].rstrip()
                if head.strip():
                    out.append(head + ":")
                pad = " " * base
                out += ["", pad + "```", *[(pad + b) if b else "" for b in body], pad + "```", ""]
                i = k
                continue
        out.append(line)
        i += 1
    return "\n".join(out)


class RstDocstrings(griffe.Extension):
    """Rewrite every loaded docstring's reStructuredText constructs as Markdown."""

    def on_object(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        doc = obj.docstring
        if doc is None or not doc.value:
            return
        doc.value = _roles(obj, _blocks(doc.value))

    def on_package(self, *, pkg: griffe.Module, **kwargs: Any) -> None:
        # the top-level package of each `::: name` load is not passed to on_object
        self.on_object(obj=pkg)
