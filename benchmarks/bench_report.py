"""Report size and time to render in headless Chromium for a 270-head model with 5 probes.

Builds a run folder shaped like a SmolLM2-135M sweep (30 layers x 9 heads; entropy, sink,
induction, streaming, retrieval: 10 metrics) with synthetic values, writes the report and
opens it in Debian's chromium; prints the file size and the page's own render time
(``performance.now()`` after the last figure), against targets of 10 MB and 3 s.
"""
from __future__ import annotations

import re
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

METRICS = {"entropy": ["entropy", "entropy_norm"], "sink": ["sink_mass", "sink_rate"], "induction": ["prev_token", "duplicate", "induction", "echo"],
           "streaming": ["streaming"], "retrieval": ["retrieval"]}


def main() -> None:
    from tests.browser import chromium, render
    from workbench.report import write_report
    from workbench.results import run_metadata, write_parquet

    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        run = Path(tmp) / "run"
        for probe, metrics in METRICS.items():
            rows = [{"model": "smollm2-135m", "dataset": "prose", "probe": probe, "metric": m, "layer": l, "head": h,
                     "value": float(rng.random()), "n": 100} for m in metrics for l in range(30) for h in range(9)]
            write_parquet(pd.DataFrame(rows), run / "parts" / f"{probe}.parquet",
                          run_metadata(model={"model": "smollm2-135m"}, prompts=[{"id": "p", "tokens": ["The", " cat"], "ids": [1, 2], "text": "The cat"}]))
        t0 = time.perf_counter()
        out = write_report(run, Path(tmp) / "report.html")
        build = time.perf_counter() - t0
        size = out.stat().st_size / 1e6
        print(f"report: {size:.2f} MB (target < 10 MB), built in {build:.1f} s")
        if chromium() is None:
            print("chromium not installed: render time not measured")
            return
        t0 = time.perf_counter()
        dom, _ = render(out)
        wall = time.perf_counter() - t0
        ms = re.search(r'data-rendered-ms="(\d+)"', dom)
        n = len(re.findall(r'class="figure js-plotly-plot"', dom))
        print(f"chromium: {n} figures rendered; page render {int(ms.group(1)) / 1000 if ms else float('nan'):.2f} s (target < 3 s); "
              f"whole headless browser process {wall:.1f} s")


if __name__ == "__main__":
    main()
