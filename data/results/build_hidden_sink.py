"""Findings for probes ``hidden_sink``, ``act`` and ``span`` on SmolLM2-135M, 16 prose prompts.

    .venv/bin/python data/results/build_hidden_sink.py            # all three probes
    .venv/bin/python data/results/build_hidden_sink.py --no-act    # detection and span only (fast)

Writes ``data/results/hidden_sink_smollm2-135m.parquet`` (every row of the three probes, the per-token
WAAD / FAI rows included) and ``data/results/hidden_sink_smollm2-135m.json`` (the headline numbers printed).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pandas as pd

import workbench
from probes.hidden_sink import ActProbe, HiddenSinkProbe
from probes.span import SpanProbe
from workbench.datasets import make_dataset

OUT = Path(__file__).parent


def _heads(table: pd.DataFrame, metric: str, above: float) -> list[str]:
    sub = table[(table.metric == metric) & (table.value > above)].sort_values("value", ascending=False)
    return [f"{r.layer}.{r.head} ({r.value:.2f})" for r in sub.itertuples()]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--no-act", action="store_true", help="skip the calibration scan (one forward per head)")
    ap.add_argument("--n-prompts", type=int, default=16)
    args = ap.parse_args()
    model = workbench.load_model("smollm2-135m", device="cpu")
    prompts = make_dataset("prose", args.n_prompts, seed=0)
    probes = [HiddenSinkProbe(), SpanProbe()] + ([] if args.no_act else [ActProbe()])
    run = workbench.run_probes(model, prompts, probes, batch_size=8)
    table = run.table
    hs = table[table.probe == "hidden_sink"]
    facts: dict = {
        "model": "smollm2-135m",
        "prompts": f"prose x {args.n_prompts} (seed 0)",
        "hidden_sink_rate_mean": float(hs[hs.metric == "hidden_sink_rate"].value.mean()),
        "heads_with_hidden_sinks_on_most_prompts": _heads(hs, "hidden_sink_rate", 0.5),
        "heads_by_hidden_sink_mass_top10": _heads(hs, "hidden_sink_mass", 0.0)[:10],
    }
    # the same detection counting only keys that at least 16 rows see (ACT's rule flags late tokens,
    # whose mean is over a few rows, on their own self-attention)
    robust = workbench.run_probes(model, prompts, [HiddenSinkProbe(min_rows=16)], batch_size=8).table
    facts["min_rows16_hidden_sink_rate_mean"] = float(robust[robust.metric == "hidden_sink_rate"].value.mean())
    facts["min_rows16_heads_with_hidden_sinks_on_most_prompts"] = _heads(robust, "hidden_sink_rate", 0.5)
    facts["min_rows16_heads_by_hidden_sink_mass_top10"] = _heads(robust, "hidden_sink_mass", 0.0)[:10]
    robust.assign(probe="hidden_sink_min_rows16").to_parquet(OUT / "hidden_sink_min_rows16_smollm2-135m.parquet")
    span = run.results["span"].summary
    facts["local_heads"] = span["local_heads"]
    facts["global_heads"] = span["global_heads"]
    for group in ("local_heads", "global_heads"):
        layers = [layer for layer, _ in span[group]]
        facts[f"{group}_mean_layer"] = sum(layers) / len(layers)
        facts[f"{group}_per_layer"] = {str(x): layers.count(x) for x in sorted(set(layers))}
    sp = table[(table.probe == "span") & (table.metric == "span")]
    facts["span_min_median_max"] = [float(sp.value.min()), float(sp.value.median()), float(sp.value.max())]
    if not args.no_act:
        act = table[table.probe == "act"]
        dl = act[act.metric == "act_dloss"].sort_values("value")
        facts["act_base_loss"] = run.results["act"].summary["base_loss"]
        facts["act_dloss_best5"] = [f"{r.layer}.{r.head} ({r.value:+.4f})" for r in dl.head(5).itertuples()]
        facts["act_dloss_worst5"] = [f"{r.layer}.{r.head} ({r.value:+.4f})" for r in dl.tail(5).itertuples()]
        facts["act_heads_helping"] = int((dl.value < 0).sum())
        facts["act_heads_scanned"] = len(dl)
    table.to_parquet(OUT / "hidden_sink_smollm2-135m.parquet")
    (OUT / "hidden_sink_smollm2-135m.json").write_text(json.dumps(facts, indent=1))
    print(json.dumps(facts, indent=1))


if __name__ == "__main__":
    main()
