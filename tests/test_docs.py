"""docs/metrics.md documents every metric a probe reports.

Probe docstrings, the README and HTML reports link to ``docs/metrics.md#METRIC``; a metric without
a heading of its own name would be a dead link and an undocumented number.
"""

from __future__ import annotations

import re
from pathlib import Path

DOC = (
    Path(__file__).resolve().parents[1] / "docs" / "metrics.md"
)  # also package data: workbench/report/metrics.md links to it
_HEADING = re.compile(r"^#{1,6}\s+(.+?)\s*#*\s*$")


def probe_metrics() -> dict[str, tuple[str, ...]]:
    """Each registered probe's name -> the metrics it reports."""
    from workbench.protocol.registry import probe_classes

    return {name: tuple(cls.metrics) for name, cls in probe_classes().items()}


def headings(markdown: str) -> list[str]:
    """ATX heading texts (backticks stripped), skipping fenced code blocks."""
    out, fenced = [], False
    for line in markdown.splitlines():
        if line.lstrip().startswith(("```", "~~~")):
            fenced = not fenced
            continue
        m = None if fenced else _HEADING.match(line)
        if m:
            out.append(m.group(1).replace("`", "").strip())
    return out


def missing_sections(markdown: str, metrics: dict[str, tuple[str, ...]]) -> list[str]:
    """``probe.metric`` for every metric with no heading of exactly its name."""
    have = set(headings(markdown))
    return [f"{probe}.{m}" for probe, ms in metrics.items() for m in ms if m not in have]


def test_every_probe_metric_has_a_section():
    metrics = probe_metrics()
    assert sum(len(ms) for ms in metrics.values()) >= 15, metrics  # the lookup really found the probes
    missing = missing_sections(DOC.read_text(encoding="utf-8"), metrics)
    assert not missing, f"docs/metrics.md has no '### METRIC' heading for: {', '.join(missing)}"


def test_metric_headings_are_unique():
    """A repeated heading would get GitHub anchor ``name-1`` and break ``#name`` links."""
    names = {m for ms in probe_metrics().values() for m in ms}
    found = [h for h in headings(DOC.read_text(encoding="utf-8")) if h in names]
    assert sorted(found) == sorted(set(found)), [h for h in set(found) if found.count(h) > 1]


def anchors(markdown: str) -> set[str]:
    """GitHub's heading anchors (lower case, punctuation but ``-`` and ``_`` dropped, spaces to
    ``-``) plus explicit ``<a id="...">`` aliases."""
    slugs = {re.sub(r"[^\w\- ]", "", h.lower()).replace(" ", "-") for h in headings(markdown)}
    return slugs | set(re.findall(r'<a id="([^"]+)"></a>', markdown))


def test_in_page_links_resolve():
    text = DOC.read_text(encoding="utf-8")
    have = anchors(text)
    assert {"entropy_norm", "entropy-norm", "sink_mass", "retrieval"} <= have
    dead = sorted({a for a in re.findall(r"\]\(#([^)\s]+)\)", text) if a not in have})
    assert not dead, f"links to missing anchors: {dead}"


def test_the_check_catches_a_missing_section():
    doc = "# Metrics\n\n## Probe x\n\n### alpha\n\n```\n### beta\n```\n\n### `gamma`\n"
    assert missing_sections(doc, {"x": ("alpha", "beta", "gamma", "delta")}) == ["x.beta", "x.delta"]


def test_the_api_reference_covers_every_module():
    """Each module of the package has its docstrings on the docs site (docs/reference/*.md), but
    the command line (documented by its --help) and the dataset generators (by `workbench datasets`)."""
    import importlib
    import pkgutil

    root = Path(__file__).resolve().parents[1]
    documented = {
        m for f in (root / "docs" / "reference").glob("*.md") for m in re.findall(r"^::: ([\w.]+)", f.read_text(), re.M)
    }
    modules = []
    for pkg in ("workbench", "probes", "circuits"):
        modules += [pkg, *(i.name for i in pkgutil.walk_packages(importlib.import_module(pkg).__path__, pkg + "."))]
    exempt = ("workbench.cli", "workbench.__main__", "workbench.datasets.", "probes.base")
    packages_only = {
        "workbench.engine",
        "workbench.experiments",
        "workbench.files",
        "workbench.inputs",
        "workbench.report",
        "workbench.runs",
    }
    missing = [m for m in modules if not m.startswith(exempt) and m not in packages_only and m not in documented]
    assert not missing, f"add to docs/reference/*.md: {', '.join(missing)}"
    stale = [m for m in documented if m not in modules]
    assert not stale, f"docs/reference names modules that do not exist: {stale}"
