"""Plotly figures in notebooks that render with no network: one call, :func:`offline_notebook`.

In a Jupyter kernel plotly's default renderer is ``plotly_mimetype``: the figure's JSON only,
drawn by the ``jupyterlab-plotly`` extension (which bundles plotly.js, so JupyterLab needs no
network) and by nothing else: an nbconvert HTML export or a JupyterLab without that extension
shows an empty output. Plotly's ``notebook`` renderer adds a ``text/html`` copy, but every figure's
HTML carries ``<script src="https://cdnjs.cloudflare.com/.../tex-svg.min.js">`` (MathJax from a
CDN), and ``notebook_connected`` loads plotly.js itself from cdn.plot.ly.

:func:`offline_notebook` sets the default renderer to ``plotly_mimetype`` plus an HTML renderer
that inlines plotly.js once (in the output of the first figure shown, about 4.7 MB) and draws each
figure from it with no MathJax and no URL to load. Every figure then carries both mimetypes:
JupyterLab draws the JSON with its extension, an exported HTML page or a front end without the
extension runs the HTML. Figures with LaTeX in their labels show the TeX source (no MathJax).
"""

from __future__ import annotations

from typing import Any

import plotly.io as pio
from plotly.io import to_html
from plotly.io.base_renderers import NotebookRenderer

RENDERER = "workbench_offline"
DEFAULT = f"plotly_mimetype+{RENDERER}"


class OfflineHtmlRenderer(NotebookRenderer):
    """Plotly's ``notebook`` renderer (plotly.js inlined once, when it is first used) without its
    per-figure MathJax script from a CDN."""

    def to_mimebundle(self, fig_dict: dict) -> dict[str, Any]:
        html = to_html(
            fig_dict,
            config=self.config,
            auto_play=self.auto_play,
            include_plotlyjs=False,  # the activation output inlined it once
            include_mathjax=False,
            post_script=self.post_script,
            full_html=False,
            animation_opts=self.animation_opts,
            default_width="100%",
            default_height=525,
            validate=False,
        )
        return {"text/html": html}


def offline_notebook() -> str:
    """Make every plotly figure shown from now on render with no network: its JSON for
    JupyterLab's plotly extension and self-contained HTML for everything else (see the module's
    docstring). Call it once, before the first figure; returns the default renderer's name."""
    if RENDERER not in pio.renderers:
        pio.renderers[RENDERER] = OfflineHtmlRenderer()
    pio.renderers.default = DEFAULT
    return DEFAULT


__all__ = ["OfflineHtmlRenderer", "offline_notebook"]
