"""Report size and time to render in headless Chromium for a 270-head model with every probe.

Builds a run folder shaped like a SmolLM2-135M sweep (30 layers x 9 heads) holding every
probe's metrics with values of the right kind: entropy (nats), sink, streaming, induction
(prose and repeated-random), retrieval (niah), context (log-spread divergence, signed direct
effects, per-item follows_*), vhd (per-head and per-token t_vhd) and a path-patching part
(signed); then writes the report (``tests/test_report.py`` checks the same run stays under
10 MB) and opens it in Debian's chromium. Prints the file size, the number of figures, and the
page's own render times: first figure, and every figure (``performance.now()`` when the last
finished), against targets of 10 MB and 3 s, next to the time plotly.js alone takes to load
and draw one figure on the same machine (shared machines vary several-fold with load).

``--compare`` builds the same run twice (the second with 18 layers x 4 heads, as Gemma-3-270M)
and reports the comparison page.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# probe -> (dataset, metrics); one part per (probe, dataset) as a sweep writes them
PARTS = [
    ("entropy", "prose", ["entropy", "entropy_norm"]),
    ("sink", "prose", ["sink_mass", "sink_rate"]),
    ("streaming", "prose", ["streaming"]),
    ("induction", "prose", ["prev_token", "duplicate", "induction", "echo"]),
    ("induction", "repeated-random", ["prev_token", "duplicate", "induction", "echo"]),
    ("retrieval", "niah", ["retrieval"]),
    ("context", "counterfact", ["context_divergence", "context_attention", "context_direct_effect"]),
    ("vhd", "images", ["vhd", "image_attention"]),
    ("patch-path", "ioi", ["path_logits"]),
]


def _values(metric: str, rng: np.random.Generator, size: int) -> np.ndarray:
    if metric == "entropy":
        return rng.uniform(0, 4, size)
    if metric in ("context_divergence", "vhd"):
        return 10 ** rng.uniform(-3, 1, size)
    if metric in ("context_direct_effect", "path_logits"):
        return rng.normal(0, 0.2, size)
    return rng.random(size)


def synthetic_run(run: Path, model: str = "smollm2-135m", n_layers: int = 30, n_heads: int = 9, seed: int = 0) -> Path:
    """Write a sweep-shaped run folder with every probe's metrics for one model."""
    from workbench.runs.parquet import run_metadata, write_parquet

    rng = np.random.default_rng(seed)
    L, H = np.meshgrid(np.arange(n_layers), np.arange(n_heads), indexing="ij")
    for probe, dataset, metrics in PARTS:
        frames = [
            pd.DataFrame(
                {
                    "model": model,
                    "dataset": dataset,
                    "probe": probe,
                    "metric": m,
                    "layer": L.ravel(),
                    "head": H.ravel(),
                    "value": _values(m, rng, L.size),
                    "n": 100,
                }
            )
            for m in metrics
        ]
        if probe == "context":
            frames += [
                pd.DataFrame(
                    {
                        "model": model,
                        "dataset": dataset,
                        "probe": probe,
                        "metric": m,
                        "layer": -1,
                        "head": -1,
                        "value": rng.integers(0, 2, 41).astype(float),
                        "n": 1,
                        "item": [f"cf-{i}" for i in range(41)],
                    }
                )
                for m in ("follows_context", "follows_memory")
            ]
        if probe == "vhd":
            frames.append(
                pd.DataFrame(
                    {
                        "model": model,
                        "dataset": dataset,
                        "probe": probe,
                        "metric": "t_vhd",
                        "layer": -1,
                        "head": -1,
                        "value": rng.uniform(1, 5, 40),
                        "n": 1,
                        "item": [str(i // 8) for i in range(40)],
                        "step": [i % 8 for i in range(40)],
                        "token": [f" tok{i}" for i in range(40)],
                    }
                )
            )
        df = pd.concat(frames, ignore_index=True)
        if "item" in df.columns:
            df = df.astype({"item": "string", **({"step": "Int64", "token": "string"} if "step" in df.columns else {})})
        meta = run_metadata(
            model={"model": model, "n_layers": n_layers, "n_heads": n_heads, "architecture": "LlamaForCausalLM"},
            dataset={"name": dataset, "n_prompts": 16},
            probes=[{"name": probe}],
            prompts=[{"id": "p", "tokens": ["The", " cat"], "ids": [1, 2], "text": "The cat"}],
        )
        write_parquet(df, run / "parts" / f"{model}__{dataset}__{probe}.parquet", meta)
    return run


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--compare", action="store_true", help="also a two-model comparison (30x9 vs 18x4)")
    args = ap.parse_args()
    from tests.browser import chromium, open_page, playwright_available
    from workbench.report.build import write_report

    with tempfile.TemporaryDirectory() as tmp:
        runs = [synthetic_run(Path(tmp) / "run")]
        if args.compare:
            runs.append(synthetic_run(Path(tmp) / "run-b", model="gemma3-270m", n_layers=18, n_heads=4, seed=1))
        t0 = time.perf_counter()
        out = write_report(runs if args.compare else runs[0], Path(tmp) / "report.html")
        build = time.perf_counter() - t0
        size = out.stat().st_size / 1e6
        print(f"report: {size:.2f} MB (target < 10 MB), built in {build:.1f} s")
        if chromium() is None or not playwright_available():
            print("chromium or playwright not installed: render time not measured")
            return
        # plotly.js alone (one tiny figure): the floor under every report on this machine and load
        base = Path(tmp) / "plotly-alone.html"
        from plotly.offline import get_plotlyjs

        base.write_text(
            f"<html><body><div id='a'></div><script>{get_plotlyjs()}</script>"
            "<script>Plotly.newPlot('a', [{z: [[1, 2]], "
            "type: 'heatmap'}]).then(function(){document.body.setAttribute("
            "'data-rendered-ms', String(Math.round(performance.now())))})"
            "</script></body></html>"
        )
        with open_page(base) as s:
            floor = int(s.page.get_attribute("body", "data-rendered-ms"))
        t0 = time.perf_counter()
        with open_page(out) as s:
            wall = time.perf_counter() - t0
            ms = int(s.page.get_attribute("body", "data-rendered-ms"))
            first = s.page.get_attribute("body", "data-first-figure-ms")
            n = s.page.locator(".js-plotly-plot").count()
            errors = [c for c in s.console if c.startswith("error")] + s.errors
        print(
            f"chromium: {n} figures; first figure at {int(first) / 1000 if first else float('nan'):.2f} s, "
            f"all rendered at {ms / 1000:.2f} s "
            f"(target < 3 s); whole headless browser {wall:.1f} s; console errors: {len(errors)}; "
            f"plotly.js alone with one figure: {floor / 1000:.2f} s (os.getloadavg: {os.getloadavg()[0]:.1f})"
        )


if __name__ == "__main__":
    main()
