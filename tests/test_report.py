"""Reports: every figure renders in headless Chromium, no console errors, user text is inert."""
from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from tests.browser import chromium, render
from workbench.cli import main

ARTIFACTS = Path(__file__).resolve().parents[1] / "test-artifacts"
XSS = "<script>alert(1)</script>"

needs_browser = pytest.mark.skipif(chromium() is None and not os.environ.get("CI"), reason="chromium not installed (make test installs it)")


@pytest.fixture(scope="module")
def report_run(tiny_dirs, tmp_path_factory):
    root = tmp_path_factory.mktemp("report")
    (root / "p.jsonl").write_text(
        '{"id": "xss ' + XSS.replace('"', '\\"') + '", "text": "the king said ' + XSS.replace('"', '\\"') + ' unto them"}\n'
        '{"id": "plain", "text": "and it came to pass that the people went"}\n'
    )
    (root / "s.toml").write_text(
        f'models = ["{tiny_dirs["llama"]}"]\nprobes = ["entropy", "sink", "induction", "streaming"]\n'
        '[datasets.prose]\nn_prompts = 6\n[datasets.mine]\npath = "p.jsonl"\n'
    )
    assert main(["sweep", str(root / "s.toml"), "--out", str(root / "run"), "--no-progress"]) == 0
    assert main(["report", str(root / "run"), "--out", str(root / "report.html")]) == 0
    return root


def test_report_is_self_contained_and_escaped(report_run):
    text = (report_run / "report.html").read_text()
    assert text.count("Plotly.newPlot(") == len(re.findall(r'<div id="fig\d+"', text)) > 0
    assert "cdn" not in text.lower().split("<body>")[1][:2000], "no external scripts in the body"
    assert not re.search(r"<script[^>]*\bsrc=", text), "plotly.js is inlined, not loaded"
    assert text.count("function(){") >= 1 and text.count("<script>") == text.count("</script>")
    assert XSS not in text and "&lt;script&gt;alert(1)&lt;/script&gt;" in text


@needs_browser
def test_report_renders_in_headless_chromium(report_run):
    html_file = report_run / "report.html"
    dom, log = render(html_file, screenshot=ARTIFACTS / "report.png")
    n_figs = len(re.findall(r'<div id="fig\d+"', html_file.read_text()))
    rendered = re.findall(r'<div id="fig\d+" class="figure js-plotly-plot"', dom)
    assert len(rendered) == n_figs > 0, "every figure became a plotly plot"
    assert dom.count('class="main-svg"') >= n_figs
    assert len(re.findall(r"<g class=\"(heatmaplayer|scatterlayer)", dom)) >= n_figs, "plots have data traces"
    console = [line for line in log.splitlines() if "CONSOLE" in line]
    assert not [c for c in console if re.search(r"error|uncaught|alert", c, re.I)], console
    assert XSS not in dom and "&lt;script&gt;alert(1)&lt;/script&gt;" in dom
    assert "data-rendered-ms" in dom
    assert (ARTIFACTS / "report.png").stat().st_size > 10_000
