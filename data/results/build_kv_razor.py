"""RazorAttention echo / induction scores (probe ``razor``) on SmolLM2-135M and Gemma-3-270M.

    .venv/bin/python data/results/build_kv_razor.py                       # both models, SEG 1000, 2 prompts
    .venv/bin/python data/results/build_kv_razor.py --model smollm2-135m --seg 1000 --n-prompts 2

Input as RazorAttention's scoring (golden-stick) but scaled to our contexts: BOS + SEG random
tokens repeated 4 times (``repeated-random``, ``period=SEG, repeats=4, prepend_bos=true``), SEG=1000
(4001 tokens; golden-stick's 2500 x 4 + BOS = 10 001 tokens exceeds SmolLM2's 8192-token context; the
reference, section 6.6, says to shrink SEG). Gemma-3-270M gets the same SEG so the two compare; its
sliding layers (window 512) cannot see a copy 1000 tokens back and score 0. The probe's defaults: true earlier
occurrences only, golden-stick's normalisation (sum over the S x S matrix / S^2, averaged over
prompts). The ``induction`` probe runs in the same forward, as a check that the two agree on
which heads are induction heads.

Writes ``data/results/kv_razor_<model>.parquet`` (tidy rows: model, probe, metric, layer, head,
value, n; razor's rows only) and ``data/results/kv_razor_<model>.json`` (what was run, its time,
top heads, the KV-head maxima and the rank correlation with ``induction``).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import pandas as pd

import workbench
from probes.induction import InductionProbe
from probes.razor import RazorProbe, kv_head_table
from workbench.datasets import make_dataset

OUT = Path(__file__).parent
MODELS = ("smollm2-135m", "gemma3-270m")


def _top(table: pd.DataFrame, metric: str, k: int = 10, head: str = "head") -> list[str]:
    sub = table[table.metric == metric].sort_values("value", ascending=False).head(k)
    return [f"{r.layer}.{getattr(r, head)} ({r.value:.3g})" for r in sub.itertuples()]


def build(name: str, seg: int, n_prompts: int, seed: int) -> dict:
    model = workbench.load_model(name, device="cpu")
    prompts = make_dataset(
        "repeated-random", n_prompts, seed=seed, tokenizer=model.tokenizer, period=seg, repeats=4, prepend_bos=True
    )
    start = time.perf_counter()
    run = workbench.run_probes(model, prompts, [RazorProbe(), InductionProbe()], batch_size=1)
    seconds = time.perf_counter() - start
    table = run.table
    razor = table[table.probe == "razor"][["probe", "metric", "layer", "head", "value", "n"]].copy()
    razor.insert(0, "model", name)
    razor.to_parquet(OUT / f"kv_razor_{name}.parquet", index=False)

    wide = table.pivot_table(index=["layer", "head"], columns="metric", values="value")
    kv = kv_head_table(razor, model.n_kv_heads, "max")
    s = len(prompts[0].tokens)
    facts = {
        "model": name,
        "command": f"data/results/build_kv_razor.py --model {name} --seg {seg} --n-prompts {n_prompts} --seed {seed}",
        "input": f"repeated-random: BOS + {seg} random tokens x 4 = {s} tokens, {n_prompts} prompt(s), seed {seed}",
        "probe": "razor (defaults: mask=occurrences, normalise=matrix)",
        "seconds_forward_and_probes": round(seconds, 1),
        "rows_scale": f"value x S^2 / (3 SEG) = value x {s * s / (3 * seg):.1f} gives the per-row mean in [0, 1]",
        "top_query_heads_induction": _top(razor, "razor_induction"),
        "top_query_heads_echo": _top(razor, "razor_echo"),
        "top_kv_heads_induction_max": _top(kv, "razor_induction", head="kv_head"),
        "top_kv_heads_echo_max": _top(kv, "razor_echo", head="kv_head"),
        "spearman_razor_induction_vs_induction_probe": float(
            wide["razor_induction"].corr(wide["induction"], method="spearman")
        ),
        "spearman_razor_echo_vs_duplicate_probe": float(wide["razor_echo"].corr(wide["duplicate"], method="spearman")),
    }
    (OUT / f"kv_razor_{name}.json").write_text(json.dumps(facts, indent=1))
    return facts


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", choices=MODELS, action="append", help="default: both")
    ap.add_argument("--seg", type=int, default=1000, help="random block length SEG (golden-stick: 2500)")
    ap.add_argument("--n-prompts", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    for name in args.model or MODELS:
        print(json.dumps(build(name, args.seg, args.n_prompts, args.seed), indent=1), flush=True)


if __name__ == "__main__":
    main()
