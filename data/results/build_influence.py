"""AttentionInfluence's causal check on the real models -> data/results/influence.parquet + influence.json.

    .venv/bin/python data/results/build_influence.py                       # both models, ~15 min each on 2 cores
    .venv/bin/python data/results/build_influence.py --models gemma3-270m --draws 3
    # more random draws, arithmetic only (the first 5 draws are the main run's):
    .venv/bin/python data/results/build_influence.py --draws 15 --n-niah 0 --n-prose 0 \
        --out data/results/influence_arithmetic_draws.parquet

The paper's check (Hua et al. 2025, arXiv 2505.07293, Table 6): masking the top-5% retrieval heads of their
1.3B model drops GSM8K from 0.182 to 0.007; masking as many random heads, only to 0.127. Here, per model:

- heads ranked by Wu et al.'s retrieval score from data/results/cross_model.parquet (probe retrieval, metric
  retrieval, per-head rows, averaged over its niah lengths weighted by the prompts counted:
  :func:`probes.influence.head_scores`); top = ceil(5% of the heads);
- mask = :class:`workbench.engine.interventions.HeadFlattening` (``--ablation flat``: the heads' attention
  uniform over each row's visible prefix), run by :func:`workbench.experiments.retrieval_heads.retrieval_ablation`
  with the precomputed scores: conditions none / top / random (``--draws`` draws of as many heads from those
  scoring <= 0.1, drawn in turn from one generator seeded 0);
- tasks: needle accuracy on niah (greedy, ROUGE-1 recall > 0.5; prompts of another seed than the scores'),
  and few-shot addition (dataset ``arithmetic``: greedy exact match, teacher-forced);
- AttentionInfluence itself (probe ``influence``) on prose passages with the top heads and with the first
  random draw's heads: mean AI per document.

Rows: ``model, dataset, probe, metric, condition, k, draw, heads, value, n`` (+ ``item`` for the per-document
AI rows). influence.json: per model and task the accuracy with nothing masked, the top heads masked, and the
random draws (mean, min, max, sd), with prompt counts.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from pathlib import Path

import pandas as pd
import torch

from probes.influence import AttentionInfluenceProbe, head_scores, top_heads
from workbench import load_model
from workbench.datasets import make_dataset
from workbench.experiments.retrieval_heads import retrieval_ablation
from workbench.inputs.prompts import tokenize_prompts
from workbench.protocol.run_context import RunContext

HERE = Path(__file__).resolve().parent


def tokenized(model, name, n, seed, **options):
    tok = {"tokenizer": model.tokenizer, "n_ctx": model.n_ctx} if name == "niah" else {}
    return tokenize_prompts(
        make_dataset(name, n_prompts=n, seed=seed, **tok, **options), model.tokenizer, model.n_ctx, model.vocab_size
    )


def influence_rows(model, docs, heads, condition, draw):
    probe = AttentionInfluenceProbe(heads=",".join(f"{layer}.{head}" for layer, head in heads))
    result = probe.run(model, docs, RunContext(batch_size=8))
    table = result.table.assign(condition=condition, k=len(heads), draw=draw, heads=result.summary["heads"])
    return table, result.summary


def run_model(name: str, args: argparse.Namespace, scores_table: pd.DataFrame) -> tuple[pd.DataFrame, dict]:
    t0 = time.time()
    model = load_model(name)
    series = head_scores(scores_table, "retrieval", name)
    scores = series.reset_index().rename(columns={"retrieval": "value"})
    k = len(top_heads(series, args.top, model.n_layers, model.n_heads))
    niah = (  # other haystacks and answers than the detection's seed 0; --n-niah 0: arithmetic only
        tokenized(model, "niah", args.n_niah, 1000, context_len=args.context_len, shared_haystack=True)
        if args.n_niah
        else []
    )
    arithmetic = tokenized(model, "arithmetic", args.n_arithmetic, 0, digits=args.digits, n_shots=args.shots)
    _, table = retrieval_ablation(
        model,
        [],
        niah,
        ks=[k],
        draws=args.draws,
        mode="flat",
        seed=0,
        batch_size=8,
        max_new_tokens=8,
        log=lambda line: print(f"[{name} {time.time() - t0:5.0f}s] {line}", flush=True),
        scores=scores,
        tasks={"arithmetic": arithmetic},
    )
    table["dataset"] = table.metric.map({"needle_accuracy": "niah", "arithmetic_accuracy": "arithmetic"})
    docs = tokenized(model, "prose", args.n_prose, 0) if args.n_prose else []
    frames = [table]
    ai = {}
    for condition, draw in (("top", 0), ("random", 0)) if args.n_prose else ():
        heads = table[(table.condition == condition) & (table.draw == draw)].heads.iloc[0]
        pairs = [tuple(int(x) for x in h.split(".")) for h in heads.split(",")]
        rows, summary = influence_rows(model, docs, pairs, condition, draw)
        frames.append(rows.assign(dataset="prose"))
        ai[condition] = {"mean_ai": summary["mean"], "n_documents": summary["n_documents"], "heads": heads}
        print(f"[{name} {time.time() - t0:5.0f}s] influence ({condition}): mean AI {summary['mean']:+.4f}", flush=True)
    out = pd.concat(frames, ignore_index=True).assign(model=name)
    return out, {"summary": summarize(table), "influence_on_prose": ai, "k": k, "seconds": round(time.time() - t0)}


def summarize(table: pd.DataFrame) -> dict:
    out = {}
    for metric, g in table.groupby("metric"):
        rand = g[g.condition == "random"].value.tolist()
        out[metric] = {
            "n_prompts": int(g.n.iloc[0]),
            "none": float(g[g.condition == "none"].value.iloc[0]),
            "top": float(g[g.condition == "top"].value.iloc[0]),
            "top_heads": g[g.condition == "top"].heads.iloc[0],
            "random": {
                "draws": rand,
                "mean": statistics.fmean(rand),
                "min": min(rand),
                "max": max(rand),
                "sd": statistics.stdev(rand) if len(rand) > 1 else math.nan,
            },
        }
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="smollm2-135m,gemma3-270m")
    ap.add_argument("--scores", default=str(HERE / "cross_model.parquet"))
    ap.add_argument("--top", type=float, default=0.05, help="share of heads masked (the paper: 5%%)")
    ap.add_argument("--draws", type=int, default=5, help="random head sets per model")
    ap.add_argument("--n-niah", type=int, default=10, help="niah prompts (0: no needle task)")
    ap.add_argument("--context-len", type=int, default=400)
    ap.add_argument("--n-arithmetic", type=int, default=40)
    ap.add_argument("--digits", type=int, default=1)
    ap.add_argument("--shots", type=int, default=8)
    ap.add_argument("--n-prose", type=int, default=12, help="prose documents for AI (0: none)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (the machine is shared)")
    ap.add_argument("--out", default=str(HERE / "influence.parquet"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    scores_table = pd.read_parquet(args.scores)
    if "kind" in scores_table.columns:
        scores_table = scores_table[scores_table.kind == "head"]
    out_path = Path(args.out)
    json_path = out_path.with_suffix(".json")
    frames, report = [], {"config": {k: v for k, v in vars(args).items() if k != "out"}, "models": {}}
    for name in args.models.split(","):
        table, summary = run_model(name, args, scores_table)
        frames.append(table)
        report["models"][name] = summary
        # written after each model, so a finished model is kept if a later one is stopped
        pd.concat(frames, ignore_index=True).to_parquet(out_path, index=False)
        json_path.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps({m: r["summary"] for m, r in report["models"].items()}, indent=2))


if __name__ == "__main__":
    main()
