"""The quickstart's figures render with no network (issue 34, item 4).

The quickstart runs once on tiny-llama, its outputs kept; then:

- every figure output carries plotly's JSON (what JupyterLab's plotly extension draws) and HTML
  that draws it from plotly.js inlined once in the notebook, and the square pattern view's
  weights are the eager model's own attention (an independent recomputation);
- no output loads a script, stylesheet or module from an http(s) URL (the check is shown to
  catch plotly's stock ``notebook`` renderer, which loads MathJax from a CDN in every figure);
- in headless chromium with every request off this machine refused: the notebook exported to
  HTML by nbconvert draws every figure, and JupyterLab served on 127.0.0.1 draws every figure
  with its plotly extension and asks nothing beyond loopback.

What this does not prove: a JupyterLab without the plotly extension (the HTML path is checked
in the nbconvert page, not inside Lab), a notebook reopened untrusted (Lab then runs no output
HTML; the extension still draws the JSON), other front ends (VS Code, Colab), SmolLM2 (the
figures are the same code on any model).
"""

from __future__ import annotations

import base64
import json
import os
import re
import secrets
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import nbformat
import numpy as np
import pytest

from tests.browser import FLAGS, chromium, playwright_available

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / "notebooks" / "01_quickstart.ipynb"
PLOTLY = "application/vnd.plotly.v1+json"
# a script, stylesheet or module fetched from the network: <script src=http...>, <link href=http...>,
# import "http..." / import("http..."), @import url(http...), require.config({paths: {..: "http..."}})
LOADS = re.compile(
    r"""<script\b[^>]*\bsrc\s*=\s*["']?\s*(?:https?:)?//"""
    r"""|<link\b[^>]*\bhref\s*=\s*["']?\s*(?:https?:)?//"""
    r"""|\bimport\s*\(?\s*["'](?:https?:)?//"""
    r"""|@import\s+(?:url\()?["']?(?:https?:)?//"""
    r"""|require\.config\([^)]*["'](?:https?:)?//""",
    re.IGNORECASE,
)

# how many figures (plot divs matching a selector) plotly has drawn
DRAWN = "[...document.querySelectorAll('%s')].filter(d => d._fullLayout && d.querySelector('.main-svg')).length"
# JupyterLab renders only the cells in view by default; "none" renders every cell
LAB_SETTINGS = {"@jupyterlab/notebook-extension": {"tracker": {"windowingMode": "none"}}}

needs_browser = pytest.mark.skipif(
    (chromium() is None or not playwright_available()) and not os.environ.get("CI"),
    reason="chromium or playwright not installed (make test installs both)",
)


@pytest.fixture(scope="module")
def executed(tmp_path_factory):
    """The quickstart run on tiny-llama in a kernel, outputs kept, written next to a copy of the
    data it reads (``(notebook, path)``)."""
    from nbclient import NotebookClient

    # kept in the worker's base folder: pytest-xdist can tear a module fixture down between this
    # module's tests (seen: the 10 s run twice in one `make test`); a second setup reads it back
    path = tmp_path_factory.getbasetemp() / "quickstart-executed" / "quickstart.ipynb"
    if path.exists():
        return nbformat.read(path, as_version=4), path
    nb = nbformat.read(QUICKSTART, as_version=4)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("WORKBENCH_NOTEBOOK_MODEL", "tiny-llama")
        resources = {"metadata": {"path": str(QUICKSTART.parent)}}
        NotebookClient(nb, timeout=600, kernel_name="python3", resources=resources).execute()
    path.parent.mkdir(parents=True, exist_ok=True)
    nbformat.write(nb, path)
    return nb, path


def outputs(nb) -> list[dict]:
    return [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]


def figures(nb) -> list[dict]:
    """The figures' JSON, in order."""
    return [o["data"][PLOTLY] for o in outputs(nb) if PLOTLY in o.get("data", {})]


def decode(z) -> np.ndarray:
    """A heatmap's z as plotly serializes numpy arrays (``{"dtype", "bdata", "shape"}``) or a list."""
    if isinstance(z, dict):
        shape = [int(s) for s in str(z["shape"]).split(",")]
        return np.frombuffer(base64.b64decode(z["bdata"]), dtype=np.dtype(z["dtype"])).reshape(shape)
    return np.asarray(z, dtype=float)


def test_figures_carry_plotly_json_and_self_contained_html(executed):
    from plotly.offline import get_plotlyjs

    nb, _ = executed
    out = outputs(nb)
    shown = [o for o in out if PLOTLY in o.get("data", {})]
    # heatmap, the square and the strip of the strongest heads
    assert len(shown) >= 3
    assert all("text/html" in o["data"] and "Plotly.newPlot" in o["data"]["text/html"] for o in shown)
    bundle = get_plotlyjs()
    inlined = [i for i, o in enumerate(out) if bundle in o.get("data", {}).get("text/html", "")]
    assert len(inlined) == 1, "plotly.js is inlined once"
    assert inlined[0] < out.index(shown[0]), "before the first figure"
    square, strip = figures(nb)[-2:]
    assert [t["type"] for t in square["data"]] == ["heatmap", "heatmap"]  # one panel per head
    (rows,) = strip["data"]  # 2 heads x 3 query rows over every key of the prose prompt
    assert len(rows["y"]) == 6 and all(" q=" in y for y in rows["y"]) and len(rows["x"]) == decode(rows["z"]).shape[1]


def test_the_square_is_the_models_own_attention(executed):
    """The square view's weights equal the eager model's attention for the heads it names, on the
    prompt the notebook built (rebuilt here from the same dataset and seed)."""
    from workbench.datasets import make_dataset
    from workbench.inputs.prompts import tokenize_prompts
    from workbench.models import load_model
    from workbench.testing import eager_model, eager_patterns

    nb, _ = executed
    square = next(f for f in figures(nb) if len(f["data"]) == 2)
    model = load_model("tiny-llama")
    rep = make_dataset("repeated-random", n_prompts=4, seed=0, period=12, tokenizer=model.tokenizer)
    ids = tokenize_prompts(rep, model.tokenizer, model.n_ctx, model.vocab_size)[0].ids
    ref = eager_patterns(eager_model(model.source), ids)
    # a cell's printed text may arrive as several stream outputs (the kernel flushes on a timer)
    printed = next(
        "".join(o.get("text", "") for o in c.outputs)
        for c in nb.cells
        if c.cell_type == "code" and any("strongest induction head" in o.get("text", "") for o in c.outputs)
    )
    heads = [(int(a), int(b)) for a, b in re.findall(r"\((\d+), (\d+)\)", printed)]
    assert [t["name"] for t in square["data"]] == [f"L{layer}.H{head}" for layer, head in heads]
    for (layer, head), trace in zip(heads, square["data"]):
        got = decode(trace["z"])
        assert got.shape == (len(ids), len(ids))
        assert np.abs(got - ref[layer][head].numpy()).max() < 1e-4, (layer, head)


def test_no_output_loads_anything_from_the_network(executed):
    nb, _ = executed
    for o in outputs(nb):
        for mime, text in o.get("data", {}).items():
            if isinstance(text, str):
                assert not LOADS.search(text), (mime, LOADS.search(text).group(0))


def test_the_check_catches_a_figure_that_loads_from_a_cdn():
    """Plotly's own notebook renderers: MathJax from cdnjs in every figure (``notebook``),
    plotly.js from cdn.plot.ly (``notebook_connected``); ours: neither."""
    import plotly.graph_objects as go
    import plotly.io as pio

    from workbench.report.notebook import OfflineHtmlRenderer

    fig = go.Figure(go.Heatmap(z=[[0.5, 0.5]])).to_plotly_json()
    assert LOADS.search(pio.renderers["notebook"].to_mimebundle(fig)["text/html"])
    assert LOADS.search(pio.renderers["notebook_connected"].to_mimebundle(fig)["text/html"])
    assert not LOADS.search(OfflineHtmlRenderer().to_mimebundle(fig)["text/html"])


def _launch(p):
    flags = [f for f in FLAGS if f != "--headless"]
    return p.chromium.launch(executable_path=chromium(), headless=True, args=flags)


def _offline(page, allowed: str) -> tuple[list[str], list[str]]:
    """Refuse every request whose URL does not start with ``allowed`` (or is data: / blob:);
    returns (refused URLs, page errors), filled as the page loads."""
    refused, errors = [], []

    def route(r):
        url = r.request.url
        if url.startswith((allowed, "data:", "blob:")):
            r.continue_()
        else:
            refused.append(url)
            r.abort()

    page.route("**/*", route)
    page.on("pageerror", lambda e: errors.append(str(e)))
    return refused, errors


def _script_sources(html: str) -> set[str]:
    return set(re.findall(r"""<script\b[^>]*\bsrc=["']([^"']+)""", html))


@needs_browser
def test_exported_html_draws_every_figure_offline(executed, tmp_path):
    """nbconvert's HTML of the run notebook, opened from disk with every non-file request
    refused: each figure is drawn (an SVG per figure) from the inlined plotly.js. The only
    refused requests are the template's own (require.js, MathJax: an export of an empty
    notebook asks for the same), none from an output."""
    from nbconvert import HTMLExporter
    from playwright.sync_api import sync_playwright

    nb, _ = executed
    html, _ = HTMLExporter().from_notebook_node(nb)
    template, _ = HTMLExporter().from_notebook_node(nbformat.v4.new_notebook())
    page_file = tmp_path / "quickstart.html"
    page_file.write_text(html, encoding="utf-8")
    n = len(figures(nb))
    with sync_playwright() as p:
        browser = _launch(p)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 1000})
            refused, errors = _offline(page, "file:")
            page.goto(page_file.as_uri())
            page.wait_for_function(f"{DRAWN % '.plotly-graph-div'} >= {n}", timeout=60000)
            drawn = page.evaluate("() => [...document.querySelectorAll('.plotly-graph-div')].map(d => d.data.length)")
        finally:
            browser.close()
    assert drawn == [len(f["data"]) for f in figures(nb)]
    assert not errors, errors
    assert set(refused) <= _script_sources(template), set(refused) - _script_sources(template)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_up(url: str, proc: subprocess.Popen, seconds: float = 60) -> None:
    end = time.monotonic() + seconds
    while time.monotonic() < end and proc.poll() is None:
        try:
            urllib.request.urlopen(url, timeout=1)
            return
        except OSError:
            time.sleep(0.2)
    pytest.fail(f"jupyter lab did not start (exit {proc.poll()})")


@needs_browser
def test_jupyterlab_draws_every_figure_offline(executed, tmp_path):
    """JupyterLab on 127.0.0.1 (its own config, data and runtime folders), the run notebook opened
    in chromium with every request beyond loopback refused: the plotly extension draws every
    figure (the JSON path), and nothing beyond loopback was even asked for."""
    from playwright.sync_api import sync_playwright

    nb, path = executed
    port, token = _free_port(), secrets.token_hex(16)
    env = dict(os.environ, **{k: str(tmp_path / k.lower()) for k in ("JUPYTER_CONFIG_DIR", "JUPYTER_DATA_DIR")})
    env.update(JUPYTER_RUNTIME_DIR=str(tmp_path / "runtime"), JUPYTERLAB_WORKSPACES_DIR=str(tmp_path / "ws"))
    argv = [sys.executable, "-m", "jupyterlab", "--no-browser", "--ip=127.0.0.1", f"--port={port}"]
    argv += ["--ServerApp.port_retries=0", f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={path.parent}"]
    argv += ["--allow-root"] if os.geteuid() == 0 else []
    env["JUPYTERLAB_SETTINGS_DIR"] = str(tmp_path / "settings")
    for plugin, settings in LAB_SETTINGS.items():
        for name, values in settings.items():
            (tmp_path / "settings" / plugin).mkdir(parents=True, exist_ok=True)
            (tmp_path / "settings" / plugin / f"{name}.jupyterlab-settings").write_text(json.dumps(values))
    base = f"http://127.0.0.1:{port}/"
    with open(tmp_path / "lab.log", "wb") as log:
        proc = subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        _wait_up(f"{base}api/status?token={token}", proc)
        n = len(figures(nb))
        with sync_playwright() as p:
            browser = _launch(p)
            try:
                page = browser.new_page(viewport={"width": 1400, "height": 1000})
                refused, errors = _offline(page, base)
                page.goto(f"{base}lab/tree/{path.name}?token={token}")
                page.wait_for_function(f"{DRAWN % '.jp-RenderedPlotly'} >= {n}", timeout=90000)
                drawn = page.evaluate(
                    "() => [...document.querySelectorAll('.jp-RenderedPlotly')].map(d => d.data.length)"
                )
            finally:
                browser.close()
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
    assert drawn == [len(f["data"]) for f in figures(nb)]
    assert refused == [] and not errors, (refused, errors)
