"""Circuits on the command line: ``workbench patch``, ``workbench task`` and ``workbench circuit``."""
from __future__ import annotations

import argparse
import json
import os
import sys

from workbench.cli.common import add_command, add_model_args, check_parquet_out, number, whole
from workbench.errors import WorkbenchError


def _pairs(args, model):
    from circuits.tasks import make_task, read_pairs

    if args.pairs:
        pairs = read_pairs(args.pairs, model.tokenizer)
        return (pairs[: args.n_prompts] if args.n_prompts else pairs), os.path.basename(args.pairs)
    return make_task(args.task, model.tokenizer, n=args.n_prompts or 16, seed=args.seed), args.task


def _receivers(raw: str | None, model) -> list | None:
    if not raw:
        return None
    out = []
    for item in raw.split(","):
        parts = item.strip().split(".")
        whiches = parts[2] if len(parts) == 3 else "qkv"
        try:
            layer, head = int(parts[0]), int(parts[1])
        except (ValueError, IndexError):
            raise WorkbenchError(f"bad receiver {item!r}", "write LAYER.HEAD or LAYER.HEAD.q (q, k, v or a combination)") from None
        if not (0 <= layer < model.n_layers and 0 <= head < model.n_heads) or not set(whiches) <= set("qkv"):
            raise WorkbenchError(f"receiver {item!r} is not a head of this model or names other than q/k/v", f"layers 0-{model.n_layers - 1}, heads 0-{model.n_heads - 1}")
        out += [(layer, head, w) for w in whiches]
    return out


def cmd_patch(args: argparse.Namespace) -> int:
    from scipy.stats import spearmanr

    from circuits.patching import activation_patching, attribution_patching, baseline, path_patching
    from workbench.models import load_model
    from workbench.results import COLUMNS, run_metadata, write_parquet

    check_parquet_out(args.out)
    model = load_model(args.model, device=args.device, dtype=args.dtype)
    pairs, dataset = _pairs(args, model)
    receivers = _receivers(args.receivers, model)
    base = baseline(model, pairs)
    extra = {}
    if args.kind == "activation":
        df = activation_patching(model, base, component=args.component, per_position=args.per_position, n_boot=args.bootstrap, max_rows=args.max_rows)
        metric = f"activation_{args.component}"
    elif args.kind == "path":
        df = path_patching(model, base, receivers=receivers, n_boot=args.bootstrap, max_rows=args.max_rows)
        metric = "path_" + ("logits" if not receivers else "qkv")
    else:
        df = attribution_patching(model, base)
        exact = activation_patching(model, base, max_rows=args.max_rows)
        rho = float(spearmanr(exact.value, df.value).statistic)
        top = lambda d: set(map(tuple, d.reindex(d.value.abs().sort_values(ascending=False).index)[["layer", "head"]].head(10).to_numpy().tolist()))  # noqa: E731
        extra = {"spearman_vs_exact": rho, "top10_overlap_vs_exact": len(top(df) & top(exact)) / 10}
        df = df.merge(exact[["layer", "head", "value"]].rename(columns={"value": "exact"}), on=["layer", "head"])
        metric = "attribution_z"
        print(f"attribution vs exact activation patching: Spearman rho = {rho:.3f}; top-10 overlap {extra['top10_overlap_vs_exact']:.0%}")
    df["model"], df["dataset"], df["probe"], df["metric"], df["n"] = args.model, dataset, f"patch-{args.kind}", metric, len(pairs)
    df = df[COLUMNS + [c for c in df.columns if c not in COLUMNS]]
    meta = run_metadata(model=model.describe(), dataset={"name": dataset, "n_pairs": len(pairs), "seed": args.seed,
                        "ld_clean": float(base.ld_clean.mean()), "ld_corrupted": float(base.ld_corrupted.mean())},
                        config={"kind": args.kind, "component": args.component, "receivers": args.receivers, "bootstrap": args.bootstrap}, summary=extra, command=sys.argv)
    write_parquet(df, args.out, meta)
    print(f"LD clean {float(base.ld_clean.mean()):.3f}, corrupted {float(base.ld_corrupted.mean()):.3f} over {len(pairs)} pairs")
    cols = [c for c in ("layer", "head", "position", "value", "ci_low", "ci_high") if c in df.columns]
    print(df.reindex(df.value.abs().sort_values(ascending=False).index)[cols].head(args.top).to_string(index=False))
    print(f"-> {args.out}")
    return 0


def cmd_circuit(args: argparse.Namespace) -> int:
    from pathlib import Path

    from circuits.discovery import discover_circuit, faithfulness, label_roles, overlap
    from circuits.patching import baseline
    from circuits.tasks import make_task
    from workbench.datasets import make_dataset
    from workbench.models import load_model
    from workbench.prompts import tokenize_prompts
    from workbench.registry import get_probe
    from workbench.results import run_metadata, write_parquet
    from workbench.runner import run_probes

    out = Path(args.out)
    tasks = [t.strip() for t in args.task.split(",") if t.strip()]
    model = load_model(args.model, device=args.device, dtype=args.dtype)
    for t in tasks:  # validate every task before the slow part
        make_task(t, model.tokenizer, n=1)
    out.mkdir(parents=True, exist_ok=True)
    rep = tokenize_prompts(make_dataset("repeated-random", n_prompts=8, tokenizer=model.tokenizer, period=min(50, model.n_ctx // 2 - 1)),
                           model.tokenizer, model.n_ctx, model.vocab_size)
    patterns = run_probes(model, rep, [get_probe("induction")], progress=False).table
    heads_by_task = {}
    for t in tasks:
        pairs = make_task(t, model.tokenizer, n=args.n_prompts, seed=args.seed)
        base = baseline(model, pairs)
        print(f"{t}: LD clean {float(base.ld_clean.mean()):.3f}, corrupted {float(base.ld_corrupted.mean()):.3f} ({len(pairs)} pairs)")
        circ = discover_circuit(model, base, threshold=args.threshold, max_rounds=args.rounds, max_receivers=args.max_receivers, log=print,
                                inner_threshold=args.inner_threshold)
        circ.nodes = label_roles(circ, patterns, task=t)
        circ.info["faithfulness"] = faithfulness(model, base, circ.heads)
        heads_by_task[t] = circ.heads
        tdir = out / t
        tdir.mkdir(exist_ok=True)
        (tdir / "circuit.json").write_text(json.dumps({"task": t, "model": args.model, **circ.to_json()}, indent=1, default=str))
        meta = run_metadata(model=model.describe(), dataset={"name": t, "n_pairs": len(pairs), "seed": args.seed})
        write_parquet(circ.nodes.assign(model=args.model, dataset=t), tdir / "nodes.parquet", meta)
        write_parquet(circ.edges.assign(model=args.model, dataset=t), tdir / "edges.parquet", meta)
        f = circ.info["faithfulness"]
        print(f"{t}: {len(circ.heads)} heads; faithfulness {f['faithfulness']:.2f} (LD {f['ld_circuit']:.2f} of {f['ld_clean']:.2f}; all heads ablated {f['ld_all_heads_ablated']:.2f})")
        print(circ.nodes.to_string(index=False))
    if len(tasks) == 2:
        ov = overlap(heads_by_task[tasks[0]], heads_by_task[tasks[1]])
        (out / "overlap.json").write_text(json.dumps({"a": tasks[0], "b": tasks[1], **ov}, indent=1, default=str))
        print(f"overlap {tasks[0]} / {tasks[1]}: Jaccard {ov['jaccard']:.2f}; {ov['recall_a_in_b']:.0%} of {tasks[0]}'s heads are in {tasks[1]}'s circuit")
    print(f"-> {out}")
    return 0


def cmd_task(args: argparse.Namespace) -> int:
    from circuits.tasks import make_task, write_pairs
    from workbench.models import load_model
    from workbench.results import check_writable

    check_writable(args.out)
    pairs = make_task(args.name, load_model(args.model).tokenizer, n=args.n_prompts, seed=args.seed)
    write_pairs(pairs, args.out)
    print(f"{len(pairs)} pairs -> {args.out} (use with --pairs)")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    pa = add_command(sub, "patch", "activation, path or attribution patching per head on a clean/corrupted task",
                     "workbench patch path --task ioi --n-prompts 16 --out path.parquet\n"
                     "workbench patch activation --component resid_pre --per-position --out resid.parquet")
    pa.add_argument("kind", choices=["activation", "path", "attribution"])
    add_model_args(pa)
    pa.add_argument("--task", default="ioi", help="ioi or colored-objects")
    pa.add_argument("--pairs", help="your own pairs: JSONL with clean, corrupted, correct, incorrect")
    pa.add_argument("--n-prompts", type=whole(1), help="pairs to use (default 16)")
    pa.add_argument("--seed", type=whole(0), default=0)
    pa.add_argument("--receivers", help="path patching receivers: LAYER.HEAD[.q|k|v], comma list (default: the logits)")
    pa.add_argument("--component", default="z", choices=["z", "resid_pre", "attn_out", "mlp_out"], help="activation patching: z (per head), resid_pre, attn_out or mlp_out")
    pa.add_argument("--per-position", action="store_true")
    pa.add_argument("--bootstrap", type=whole(0), default=0, help="bootstrap resamples over prompts for 95%% CIs")
    pa.add_argument("--max-rows", type=whole(1), default=512, help="rows per stacked forward (memory budget)")
    pa.add_argument("--top", type=whole(0), default=10)
    pa.add_argument("--out", required=True)
    pa.set_defaults(func=cmd_patch)

    tk = add_command(sub, "task", "write a patching task's clean/corrupted pairs as JSONL (read back with --pairs)",
                     "workbench task ioi --n-prompts 64 --out ioi.jsonl")
    tk.add_argument("name", help="ioi or colored-objects")
    tk.add_argument("--model", default="smollm2-135m", help="its tokenizer decides which names/colours are single tokens")
    tk.add_argument("--n-prompts", type=whole(1), default=16)
    tk.add_argument("--seed", type=whole(0), default=0)
    tk.add_argument("--out", required=True)
    tk.set_defaults(func=cmd_task)

    ci = add_command(sub, "circuit", "discover a circuit by iterative path patching; faithfulness; overlap of two tasks",
                     "workbench circuit --task ioi,colored-objects --n-prompts 8 --out runs/circuits")
    add_model_args(ci)
    ci.add_argument("--task", default="ioi", help="one task, or two (comma) to also get their overlap")
    ci.add_argument("--n-prompts", type=whole(1), default=16)
    ci.add_argument("--seed", type=whole(0), default=0)
    ci.add_argument("--threshold", type=number(0), default=0.05, help="|normalised effect| for a head to join")
    ci.add_argument("--inner-threshold", type=number(0), help="|effect| for paths into a receiver's q/k/v (default threshold / 2)")
    ci.add_argument("--rounds", type=whole(1), default=3)
    ci.add_argument("--max-receivers", type=whole(1), default=6)
    ci.add_argument("--out", required=True, help="folder: TASK/circuit.json, nodes.parquet, edges.parquet")
    ci.set_defaults(func=cmd_circuit)
