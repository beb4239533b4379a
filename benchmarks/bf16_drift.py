"""How far every head metric moves when the model runs in bfloat16 instead of float32.

Runs the pattern probes (entropy, sink, induction, streaming) and the retrieval probe on the same
prompts with SmolLM2 (or ``--model``) loaded in float32 and in bfloat16 (CPU), and prints per
metric the largest and the mean absolute difference over heads, the largest difference relative
to the metric's spread over heads, and how many of the float32 top-10 heads stay in the bfloat16
top-10. Statistics are float32 in both runs (the lse path computes them in float32 whatever the
model's dtype): what moves is the model's own bf16 arithmetic (queries, keys, residual stream).

    python benchmarks/bf16_drift.py                  # prose + repeated-random + niah at 1k
    python benchmarks/bf16_drift.py --no-retrieval   # pattern metrics only
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def prompts(model, n_prose: int, seed: int):
    from workbench.datasets import make_dataset
    from workbench.inputs.prompts import tokenize_prompts

    prose = make_dataset("prose", n_prompts=n_prose, seed=seed, min_words=150, max_words=400)
    rep = make_dataset("repeated-random", n_prompts=4, seed=seed, tokenizer=model.tokenizer, period=100)
    return tokenize_prompts(prose + rep, model.tokenizer, model.n_ctx, model.vocab_size)


def niah(model, context_len: int, seed: int):
    from workbench.datasets import make_dataset
    from workbench.inputs.prompts import tokenize_prompts

    items = make_dataset("niah", tokenizer=model.tokenizer, context_len=context_len, depths=[0.1, 0.5, 0.9], seed=seed)
    return tokenize_prompts(items, model.tokenizer, model.n_ctx, model.vocab_size)


def run(name: str, dtype: str, n_prose: int, seed: int, retrieval_len: int | None):
    import pandas as pd

    from probes import get_probe
    from workbench.models.loading import load_model
    from workbench.runner import run_probes

    model = load_model(name, device="cpu", dtype=dtype)
    table = run_probes(
        model,
        prompts(model, n_prose, seed),
        [get_probe(p) for p in ("entropy", "sink", "induction", "streaming")],
        progress=False,
    ).table
    answers = {}
    if retrieval_len:
        res = run_probes(
            model,
            niah(model, retrieval_len, seed),
            [get_probe("retrieval", max_new_tokens=20, require_correct=False)],
            progress=False,
        )
        table = pd.concat([table, res.table], ignore_index=True)
        answers = res.results["retrieval"].summary["responses"]
    return table, answers


def drift(a, b) -> list[dict]:
    out = []
    for metric in sorted(set(a.metric)):
        x = a[a.metric == metric].set_index(["layer", "head"]).value
        y = b[b.metric == metric].set_index(["layer", "head"]).value.reindex(x.index)
        ok = x.notna() & y.notna()
        x, y = x[ok], y[ok]
        d = (x - y).abs()
        spread = float(x.max() - x.min()) or 1.0
        top_x, top_y = set(x.nlargest(10).index), set(y.nlargest(10).index)
        out.append(
            {
                "metric": metric,
                "heads": int(ok.sum()),
                "max_abs": float(d.max()),
                "mean_abs": float(d.mean()),
                "max_rel_spread": float(d.max()) / spread,
                "top10_kept": len(top_x & top_y),
            }
        )
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--prose", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--retrieval-len", type=int, default=1024)
    ap.add_argument("--no-retrieval", action="store_true")
    ap.add_argument("--out", default=None, help="write the table as JSON here")
    args = ap.parse_args()
    rl = None if args.no_retrieval else args.retrieval_len
    full, ans32 = run(args.model, "float32", args.prose, args.seed, rl)
    half, ans16 = run(args.model, "bfloat16", args.prose, args.seed, rl)
    rows = drift(full, half)
    print(f"{'metric':>14} {'heads':>6} {'max |d|':>9} {'mean |d|':>9} {'max/spread':>10} {'top-10 kept':>11}")
    for r in rows:
        print(
            f"{r['metric']:>14} {r['heads']:>6} {r['max_abs']:9.4f} {r['mean_abs']:9.5f} "
            f"{r['max_rel_spread']:10.3f} {r['top10_kept']:>8}/10"
        )
    if ans32:
        same = sum(ans32[k] == ans16.get(k) for k in ans32)
        print(f"retrieval answers identical in {same}/{len(ans32)} niah prompts")
    if args.out:
        Path(args.out).write_text(
            json.dumps({"model": args.model, "rows": rows, "answers": {"float32": ans32, "bfloat16": ans16}}, indent=1)
        )


if __name__ == "__main__":
    main()
