"""ZeroTuning on the real models (issue 31 item 4): does scaling the first token's attention move
few-shot sentiment accuracy on SmolLM2-135M-Instruct and Gemma-3-270M, for which gamma, which heads?

    .venv/bin/python data/results/build_zerotuning.py --model smollm2-135m
    .venv/bin/python data/results/build_zerotuning.py --model gemma3-270m --n-val 32 --n-test 48
    .venv/bin/python data/results/build_zerotuning.py --merge     # both JSON parts -> one table + summary

Per model (probes/zerotuning.py, :func:`tune`): the ``sentiment`` dataset (4 shots, negation 0.35)
with a validation split (seed 101) and a disjoint test split (seed 202; no prompt text shared);
head profiling on validation at gamma = 2 in mode ``index`` (head h of every layer at once, the
code's mode 1); the dominant type's heads; one gamma for all of them from the grid by validation
accuracy (gamma = 1 always a candidate); test accuracy with and without it, and an exact McNemar
test of the paired test predictions. Prompts are tokenized with each tokenizer's defaults: Gemma's
first token is BOS, SmolLM2's is the word "Review" (it adds no BOS), so on SmolLM2 the operator
scales attention on a content token that serves as the sink.

Outputs: ``data/results/zerotuning_<model>.json`` per model (the part), then with ``--merge``
``data/results/zerotuning.parquet`` (tidy: ``kind`` = ``head`` rows of the profile per (layer, head)
with metrics ``zt_accuracy_gain`` / ``zt_logprob_gain``; ``grid`` rows: validation accuracy per
gamma; ``summary`` rows: baseline and tuned accuracies, with ``layer = head = -1``) and
``data/results/zerotuning.json`` (the summary of both models).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import pandas as pd
import torch

HERE = Path(__file__).resolve().parent
COLUMNS = ["kind", "model", "dataset", "split", "metric", "layer", "head", "gamma", "value", "n"]


def mcnemar_exact(b: int, c: int) -> float:
    """Two-sided exact McNemar p-value for b, c discordant pairs."""
    n = b + c
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(0, min(b, c) + 1)) / 2**n
    return min(1.0, 2 * tail)


def run(args: argparse.Namespace) -> dict:
    import workbench
    from probes.zerotuning import per_head, tune
    from workbench.datasets import make_dataset
    from workbench.inputs.prompts import tokenize_prompts
    from workbench.protocol.run_context import RunContext

    torch.set_num_threads(args.threads)
    model = workbench.load_model(args.model)
    opts = dict(n_shots=args.n_shots, negation=args.negation)
    val = make_dataset("sentiment", args.n_val, seed=args.seed_val, **opts)
    test = make_dataset("sentiment", args.n_test, seed=args.seed_test, **opts)
    assert not {p.text for p in val} & {p.text for p in test}, "validation and test share a prompt"
    tok = model.tokenizer
    val_t = tokenize_prompts(val, tok, 8192, model.vocab_size)
    test_t = tokenize_prompts(test, tok, 8192, model.vocab_size)
    t0 = time.time()
    out = tune(model, val_t, test_t, RunContext(batch_size=args.batch_size), args.mode, args.gamma, args.grid)
    seconds = time.time() - t0
    prof = out.profile
    base, tuned = out.test_outcomes
    b = int((base.correct & ~tuned.correct).sum())
    c = int((~base.correct & tuned.correct).sum())
    rows = []
    L, H = model.n_layers, model.n_heads
    for metric, values in (("zt_accuracy_gain", prof.accuracy_gain()), ("zt_logprob_gain", prof.logprob_gain())):
        grid = per_head(prof, values, L, H)
        for layer in range(L):
            for head in range(H):
                rows.append(
                    [
                        "head",
                        args.model,
                        "sentiment",
                        "val",
                        metric,
                        layer,
                        head,
                        args.gamma,
                        float(grid[layer, head]),
                        out.n_val,
                    ]
                )
    for g, acc in sorted(out.val_accuracy.items()):
        rows.append(["grid", args.model, "sentiment", "val", "accuracy", -1, -1, g, acc, out.n_val])
    rows += [
        ["summary", args.model, "sentiment", "val", "baseline_accuracy", -1, -1, 1.0, prof.base.accuracy, out.n_val],
        ["summary", args.model, "sentiment", "test", "baseline_accuracy", -1, -1, 1.0, out.test_baseline, out.n_test],
        ["summary", args.model, "sentiment", "test", "tuned_accuracy", -1, -1, out.gamma, out.test_tuned, out.n_test],
    ]
    first = sorted({tok.convert_ids_to_tokens(p.ids[0]) for p in val_t})
    summary = {
        "model": args.model,
        "n_layers": L,
        "n_heads": H,
        "dataset": {"name": "sentiment", **opts, "seed_val": args.seed_val, "seed_test": args.seed_test},
        "first_token": first,
        "n_val": out.n_val,
        "n_test": out.n_test,
        "mode": args.mode,
        "profile_gamma": args.gamma,
        "val_baseline_accuracy": prof.base.accuracy,
        "unit_accuracy": {lab: o.accuracy for (lab, _), o in zip(prof.units, prof.scaled)},
        "unit_logprob_gain": {lab: g for (lab, _), g in zip(prof.units, prof.logprob_gain())},
        "up_effective": [prof.units[i][0] for i in prof.effective()[0]],
        "down_effective": [prof.units[i][0] for i in prof.effective()[1]],
        "tuned_type": out.kind,
        "n_tuned_heads": len(out.heads),
        "share_tuned_heads": len(out.heads) / (L * H),
        "val_accuracy_by_gamma": {str(g): a for g, a in sorted(out.val_accuracy.items())},
        "chosen_gamma": out.gamma,
        "test_baseline_accuracy": out.test_baseline,
        "test_tuned_accuracy": out.test_tuned,
        "test_discordant": {"base_right_tuned_wrong": b, "base_wrong_tuned_right": c},
        "test_mcnemar_p": mcnemar_exact(b, c),
        "seconds": round(seconds, 1),
        "threads": args.threads,
    }
    part = HERE / f"zerotuning_{args.model}.json"
    part.write_text(json.dumps({"summary": summary, "rows": rows}, indent=1))
    print(json.dumps(summary, indent=1))
    return summary


def merge() -> None:
    parts = sorted(HERE.glob("zerotuning_*.json"))
    rows, summaries = [], {}
    for part in parts:
        data = json.loads(part.read_text())
        rows += data["rows"]
        summaries[data["summary"]["model"]] = data["summary"]
    table = pd.DataFrame(rows, columns=COLUMNS).astype(
        {"layer": "int64", "head": "int64", "gamma": "float64", "value": "float64", "n": "int64"}
    )
    table.to_parquet(HERE / "zerotuning.parquet", index=False)
    (HERE / "zerotuning.json").write_text(json.dumps(summaries, indent=1))
    print(f"{len(table)} rows from {[p.name for p in parts]}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--n-val", type=int, default=48)
    ap.add_argument("--n-test", type=int, default=64)
    ap.add_argument("--seed-val", type=int, default=101)
    ap.add_argument("--seed-test", type=int, default=202)
    ap.add_argument("--n-shots", type=int, default=4)
    ap.add_argument("--negation", type=float, default=0.35)
    ap.add_argument("--mode", default="index", choices=["index", "head", "layer"])
    ap.add_argument("--gamma", type=float, default=2.0)
    ap.add_argument(
        "--grid", type=lambda s: tuple(float(x) for x in s.split(",")), default=(0.5, 0.75, 1.5, 2.0, 3.0, 4.0)
    )
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--merge", action="store_true", help="only merge the per-model parts")
    args = ap.parse_args()
    if args.merge:
        merge()
    else:
        run(args)
        merge()


if __name__ == "__main__":
    main()
