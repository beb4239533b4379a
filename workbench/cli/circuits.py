"""Circuits on the command line: ``workbench patch``, ``workbench task`` and ``workbench circuit``."""

from __future__ import annotations

import argparse
import json
import math
import os
import sys

from workbench.cli.common import add_command, add_model_args, check_parquet_out, number, whole, write_table
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
            raise WorkbenchError(
                f"bad receiver {item!r}", "write LAYER.HEAD or LAYER.HEAD.q (q, k, v or a combination)"
            ) from None
        if not (0 <= layer < model.n_layers and 0 <= head < model.n_heads) or not set(whiches) <= set("qkv"):
            raise WorkbenchError(
                f"receiver {item!r} is not a head of this model or names other than q/k/v",
                f"layers 0-{model.n_layers - 1}, heads 0-{model.n_heads - 1}",
            )
        out += [(layer, head, w) for w in whiches]
    return out


def _top10(d) -> set:
    """The 10 heads of largest |value| as ``(layer, head)``: how far attribution agrees with exact patching."""
    return set(
        map(
            tuple,
            d.reindex(d.value.abs().sort_values(ascending=False).index)[["layer", "head"]].head(10).to_numpy().tolist(),
        )
    )


def cmd_patch(args: argparse.Namespace) -> int:
    from scipy.stats import spearmanr

    from circuits.baseline import baseline
    from circuits.patching import activation_patching, attribution_patching, path_patching
    from workbench.models.loading import load_model
    from workbench.protocol.table import COLUMNS

    check_parquet_out(args.out)
    model = load_model(args.model, device=args.device, dtype=args.dtype)
    pairs, dataset = _pairs(args, model)
    receivers = _receivers(args.receivers, model)
    base = baseline(model, pairs)
    extra = {}
    if args.kind == "activation":
        df = activation_patching(
            model,
            base,
            component=args.component,
            per_position=args.per_position,
            n_boot=args.bootstrap,
            max_rows=args.max_rows,
        )
        metric = f"activation_{args.component}"
    elif args.kind == "path":
        df = path_patching(
            model,
            base,
            receivers=receivers,
            n_boot=args.bootstrap,
            max_rows=args.max_rows,
            engine=args.engine,
            positions=args.receiver_positions,
        )
        metric = "path_" + ("logits" if not receivers else "qkv")
    else:
        df = attribution_patching(model, base)
        exact = activation_patching(model, base, max_rows=args.max_rows)
        rho = float(spearmanr(exact.value, df.value).statistic)
        extra = {"spearman_vs_exact": rho, "top10_overlap_vs_exact": len(_top10(df) & _top10(exact)) / 10}
        df = df.merge(exact[["layer", "head", "value"]].rename(columns={"value": "exact"}), on=["layer", "head"])
        metric = "attribution_z"
        print(
            f"attribution vs exact activation patching: Spearman rho = {rho:.3f}; "
            f"top-10 overlap {extra['top10_overlap_vs_exact']:.0%}"
        )
    df["model"], df["dataset"], df["probe"], df["metric"], df["n"] = (
        args.model,
        dataset,
        f"patch-{args.kind}",
        metric,
        len(pairs),
    )
    df = df[COLUMNS + [c for c in df.columns if c not in COLUMNS]]
    write_table(
        df,
        args.out,
        model=model.describe(),
        dataset={
            "name": dataset,
            "n_pairs": len(pairs),
            "seed": args.seed,
            "ld_clean": float(base.ld_clean.mean()),
            "ld_corrupted": float(base.ld_corrupted.mean()),
        },
        config={
            "kind": args.kind,
            "component": args.component,
            "receivers": args.receivers,
            "bootstrap": args.bootstrap,
            "receiver_positions": args.receiver_positions,
            "engine": args.engine,
        },
        summary=extra,
    )
    print(
        f"LD clean {float(base.ld_clean.mean()):.3f}, corrupted {float(base.ld_corrupted.mean()):.3f} "
        f"over {len(pairs)} pairs"
    )
    cols = [c for c in ("layer", "head", "position", "value", "ci_low", "ci_high") if c in df.columns]
    print(df.reindex(df.value.abs().sort_values(ascending=False).index)[cols].head(args.top).to_string(index=False))
    print(f"-> {args.out}")
    return 0


def _ci(f: dict) -> str:
    """`` [95% CI low-high]`` of a faithfulness result, or nothing when it has no interval."""
    return f" [95% CI {f['ci95'][0]:.2f}-{f['ci95'][1]:.2f}]" if f.get("ci95") else ""


def _print_report(task: str, rep) -> None:
    info = rep.info
    hc, ec = info["head_circuit"], info["edge_circuit"]
    print(
        f"{task}: head circuit ({hc['ablation']} ablation, target F >= {info['target']}): {len(rep.heads)} heads, "
        f"F(C)/F(M) = {hc['faithfulness']:.3f}{_ci(hc)} (LD {hc['ld_circuit']:.2f} of {hc['ld_clean']:.2f}; "
        f"every head ablated {hc['ld_all_heads_ablated']:.2f})"
        + ("" if hc["reached_target"] else "  [target NOT reached: best size on the curve]")
    )
    if "heldout" in hc:
        print(
            f"{task}: on {hc['heldout']['n_pairs']} held-out pairs "
            f"F(C)/F(M) = {hc['heldout']['faithfulness']:.3f}{_ci(hc['heldout'])}"
        )
    c = hc["completeness"]
    greedy = "none (empty circuit)" if math.isnan(c["greedy_max_relative"]) else f"{c['greedy_max_relative']:.1%}"
    print(
        f"{task}: completeness max |F(C\\K) - F(M\\K)| = {c['max_score']:.3f} ({c['max_relative']:.1%} of F(M)); "
        f"random K mean {c['random_mean_relative']:.1%}; greedy max {greedy}"
    )
    if len(rep.nodes):
        print(rep.nodes.to_string(index=False))
    else:
        print(
            f"{task}: the empty circuit already reaches the target: "
            f"with every head ablated the model keeps F >= {info['target']} of its behaviour"
        )
    if ec:
        print(
            f"{task}: edge circuit: {ec['edges']} edges ({ec['heads']} heads, {ec['mlps']} MLPs), "
            f"F(C)/F(M) = {ec['faithfulness']:.3f}"
        )
    else:
        print(
            f"{task}: no edge circuit reaches the target; best F on the curve {rep.edge_curve.faithfulness.max():.3f}"
        )
    print(
        f"{task}: faithfulness vs size (heads): "
        + ", ".join(f"{int(r.k)}:{r.faithfulness:.2f}" for r in rep.head_curve.itertuples())
    )
    v = info["edge_validation"]
    print(
        f"{task}: edge scores vs exact edge patching ({v['n_edges']} edges): "
        + ", ".join(f"{k} Spearman {r:.3f}" for k, r in v["spearman"].items())
        + f"; time: EAP {v['eap_seconds']:.1f} s, EAP-IG {v['eap_ig_seconds']:.1f} s "
        f"for all {info['graph']['n_edges']} edges, exact {v['exact_seconds_per_edge']:.3f} s per edge "
        f"(all edges ~{v['exact_all_edges_seconds_extrapolated'] / 3600:.1f} h)"
    )
    print(f"{task}: discovery took {info['timing']['total']:.1f} s")


def _write_task_dir(out, task: str, files: dict) -> None:
    """Write a task's files into a temporary folder and move it into place: no partial output."""
    import shutil
    import tempfile
    from pathlib import Path

    final = Path(out) / task
    tmp = Path(tempfile.mkdtemp(prefix=f".{task}-", dir=out))
    try:
        tmp.chmod(0o755)
        for name, write in files.items():
            write(tmp / name)
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _circuit_inputs(args: argparse.Namespace, tasks: list[str], model) -> dict:
    """``{task: (pairs, reference pairs, held-out pairs)}``, built up front so a bad task fails before the slow part."""
    from circuits.tasks import make_task, read_pairs

    inputs = {}
    for t in tasks:
        if args.pairs:
            pairs = read_pairs(args.pairs, model.tokenizer)[: args.n_prompts or None]
            ref = read_pairs(args.reference_pairs, model.tokenizer) if args.reference_pairs else None
            held = read_pairs(args.heldout_pairs, model.tokenizer) if args.heldout_pairs else None
        else:
            pairs = make_task(t, model.tokenizer, n=args.n_prompts, seed=args.seed)
            ref = (
                make_task(t, model.tokenizer, n=args.reference_prompts, seed=args.seed + 1)
                if args.reference_prompts
                else None
            )
            held = make_task(t, model.tokenizer, n=args.heldout, seed=args.seed + 2) if args.heldout else None
        inputs[t] = (pairs, ref, held)
    return inputs


def _path_circuit(args: argparse.Namespace, model, t: str, pairs, ref, patterns, meta: dict, out) -> list:
    """``--method path``: one task's circuit by thresholded path patching, printed and written; returns its heads."""
    from circuits.baseline import baseline
    from circuits.discovery import discover_circuit, faithfulness, label_roles
    from workbench.runs.parquet import write_parquet

    base = baseline(model, pairs)
    circ = discover_circuit(
        model,
        base,
        threshold=args.threshold,
        max_rounds=args.rounds,
        max_receivers=args.max_receivers,
        log=print,
        inner_threshold=args.inner_threshold,
    )
    circ.nodes = label_roles(circ, patterns, task=t)
    circ.info["faithfulness"] = faithfulness(model, base, circ.heads, args.ablation, ref)
    f = circ.info["faithfulness"]
    print(
        f"{t}: {len(circ.heads)} heads; faithfulness {f['faithfulness']:.3f} under {f['ablation_detail']} "
        f"(LD {f['ld_circuit']:.2f} of {f['ld_clean']:.2f}; all heads ablated {f['ld_all_heads_ablated']:.2f})"
    )
    print(circ.nodes.to_string(index=False))
    doc = {"task": t, "model": args.model, "method": "path", **circ.to_json()}
    _write_task_dir(
        out,
        t,
        {
            "circuit.json": lambda p, doc=doc: p.write_text(json.dumps(doc, indent=1, default=str)),
            "nodes.parquet": lambda p, circ=circ: write_parquet(
                circ.nodes.assign(model=args.model, dataset=t), p, meta
            ),
            "edges.parquet": lambda p, circ=circ: write_parquet(
                circ.edges.assign(model=args.model, dataset=t), p, meta
            ),
        },
    )
    return circ.heads


def _target_circuit(args: argparse.Namespace, model, t: str, pairs, ref, held, patterns, meta: dict, out) -> list:
    """One task's smallest circuit reaching ``--target`` (the default), printed and written; returns its heads."""
    from circuits.discovery import faithfulness, find_circuit, roles_for
    from workbench.runs.parquet import write_parquet

    rep = find_circuit(
        model,
        pairs,
        ref,
        ablation=args.ablation,
        method=args.method,
        steps=args.ig_steps,
        target=args.target,
        n_validate=args.validate_edges,
        completeness_random=args.completeness_random,
        greedy_steps=args.greedy_steps,
        minimality_random=args.minimality_random,
        prune=not args.no_prune,
        max_rows=args.max_rows,
        seed=args.seed,
        log=print,
    )
    rep.nodes["role"] = roles_for(rep.nodes, patterns, t, rep.info["ld_clean"])
    if held:
        rep.info["head_circuit"]["heldout"] = {
            "n_pairs": len(held),
            **faithfulness(model, held, rep.heads, args.ablation, ref),
        }
    _print_report(t, rep)
    doc = {"task": t, "model": args.model, **rep.info, "nodes": rep.nodes.to_dict("records")}
    _write_task_dir(
        out,
        t,
        {
            "circuit.json": lambda p, doc=doc: p.write_text(json.dumps(doc, indent=1, default=str)),
            "nodes.parquet": lambda p, rep=rep: write_parquet(rep.nodes.assign(model=args.model, dataset=t), p, meta),
            "edges.parquet": lambda p, rep=rep: write_parquet(rep.edges.assign(model=args.model, dataset=t), p, meta),
            "edge_scores.parquet": lambda p, rep=rep: write_parquet(
                rep.scores.frame().assign(model=args.model, dataset=t), p, meta
            ),
        },
    )
    return rep.heads


def _write_overlap(out, tasks: list[str], heads_by_task: dict) -> None:
    """Two tasks: how much their circuits share, written to ``overlap.json`` and printed."""
    from circuits.discovery import overlap
    from workbench.files.atomic import atomic_write_text

    ov = overlap(heads_by_task[tasks[0]], heads_by_task[tasks[1]])
    atomic_write_text(out / "overlap.json", json.dumps({"a": tasks[0], "b": tasks[1], **ov}, indent=1, default=str))
    print(
        f"overlap {tasks[0]} / {tasks[1]}: Jaccard {ov['jaccard']:.2f}; "
        f"{ov['recall_a_in_b']:.0%} of {tasks[0]}'s heads are in "
        f"{tasks[1]}'s circuit; shared: {', '.join(f'{layer}.{h}' for layer, h in ov['shared'])}"
    )


def cmd_circuit(args: argparse.Namespace) -> int:
    from pathlib import Path

    from circuits.ablation import ABLATIONS
    from circuits.graph import ModelGraph
    from workbench.datasets import make_dataset
    from workbench.files.atomic import check_folder, make_folder
    from workbench.inputs.prompts import tokenize_prompts
    from workbench.models.loading import load_model
    from workbench.protocol.registry import get_probe
    from workbench.runner import run_probes
    from workbench.runs.parquet import run_metadata

    if args.ablation not in ABLATIONS:
        raise WorkbenchError(f"unknown ablation {args.ablation!r}", f"choose from: {', '.join(ABLATIONS)}")
    if not 0 < args.target <= 2:
        raise WorkbenchError(f"--target {args.target} is not a faithfulness", "e.g. --target 0.8")
    out = Path(args.out)
    check_folder(out, "--out folder")  # the folder itself or a parent: before the model loads
    tasks = [os.path.basename(args.pairs)] if args.pairs else [t.strip() for t in args.task.split(",") if t.strip()]
    model = load_model(args.model, device=args.device, dtype=args.dtype)
    if args.method != "path":
        ModelGraph(model)  # edge-level discovery needs a supported architecture: fail before the slow part
    inputs = _circuit_inputs(args, tasks, model)  # validate every task before the slow part
    make_folder(out)
    rep = tokenize_prompts(
        make_dataset("repeated-random", n_prompts=8, tokenizer=model.tokenizer, period=min(50, model.n_ctx // 2 - 1)),
        model.tokenizer,
        model.n_ctx,
        model.vocab_size,
    )
    patterns = run_probes(model, rep, [get_probe("induction")], progress=False).table
    heads_by_task = {}
    for t, (pairs, ref, held) in inputs.items():
        meta = run_metadata(
            model=model.describe(), dataset={"name": t, "n_pairs": len(pairs), "seed": args.seed}, command=sys.argv
        )
        if args.method == "path":
            heads_by_task[t] = _path_circuit(args, model, t, pairs, ref, patterns, meta, out)
        else:
            heads_by_task[t] = _target_circuit(args, model, t, pairs, ref, held, patterns, meta, out)
    if len(tasks) == 2:
        _write_overlap(out, tasks, heads_by_task)
    print(f"-> {out}")
    return 0


def cmd_task(args: argparse.Namespace) -> int:
    from circuits.tasks import make_task, write_pairs
    from workbench.models.loading import load_model
    from workbench.runs.parquet import check_writable

    check_writable(args.out)
    pairs = make_task(args.name, load_model(args.model).tokenizer, n=args.n_prompts, seed=args.seed)
    write_pairs(pairs, args.out)
    print(f"{len(pairs)} pairs -> {args.out} (use with --pairs)")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    pa = add_command(
        sub,
        "patch",
        "activation, path or attribution patching per head on a clean/corrupted task",
        "workbench patch path --task ioi --n-prompts 16 --out path.parquet\n"
        "workbench patch activation --component resid_pre --per-position --out resid.parquet",
    )
    pa.add_argument("kind", choices=["activation", "path", "attribution"])
    add_model_args(pa)
    pa.add_argument("--task", default="ioi", help="ioi or colored-objects")
    pa.add_argument("--pairs", help="your own pairs: JSONL with clean, corrupted, correct, incorrect")
    pa.add_argument("--n-prompts", type=whole(1), help="pairs to use (default 16)")
    pa.add_argument("--seed", type=whole(0), default=0)
    pa.add_argument("--receivers", help="path patching receivers: LAYER.HEAD[.q|k|v], comma list (default: the logits)")
    pa.add_argument(
        "--receiver-positions",
        default="all",
        choices=["all", "last"],
        help="path patching: patch the receivers' q/k/v at every position, "
        "or at the read-out position only (Wang et al.'s END)",
    )
    pa.add_argument(
        "--engine",
        default="auto",
        choices=["auto", "graph", "hooks"],
        help="path patching: graph = read-out positions only on the explicit graph (Llama family), "
        "hooks = full forwards (any model)",
    )
    pa.add_argument(
        "--component",
        default="z",
        choices=["z", "resid_pre", "attn_out", "mlp_out"],
        help="activation patching: z (per head), resid_pre, attn_out or mlp_out",
    )
    pa.add_argument("--per-position", action="store_true")
    pa.add_argument("--bootstrap", type=whole(0), default=0, help="bootstrap resamples over prompts for 95%% CIs")
    pa.add_argument("--max-rows", type=whole(1), default=512, help="rows per stacked forward (memory budget)")
    pa.add_argument("--top", type=whole(0), default=10)
    pa.add_argument("--out", required=True)
    pa.set_defaults(func=cmd_patch)

    tk = add_command(
        sub,
        "task",
        "write a patching task's clean/corrupted pairs as JSONL (read back with --pairs)",
        "workbench task ioi --n-prompts 64 --out ioi.jsonl",
    )
    tk.add_argument("name", help="ioi or colored-objects")
    tk.add_argument(
        "--model", default="smollm2-135m", help="its tokenizer decides which names/colours are single tokens"
    )
    tk.add_argument("--n-prompts", type=whole(1), default=16)
    tk.add_argument("--seed", type=whole(0), default=0)
    tk.add_argument("--out", required=True)
    tk.set_defaults(func=cmd_task)

    ci = add_command(
        sub,
        "circuit",
        "the smallest circuit reaching a faithfulness target, with completeness and minimality",
        "workbench circuit --task ioi,colored-objects --n-prompts 16 --reference-prompts 64 --target 0.8 "
        "--out runs/circuits\n"
        "workbench circuit --task ioi --ablation resample --method eap --validate-edges 100 --out runs/circuits-eap",
    )
    add_model_args(ci)
    ci.add_argument("--task", default="ioi", help="one task, or two (comma) to also get their overlap")
    ci.add_argument(
        "--pairs", help='your own pairs (JSONL) instead of a task; templates from an optional "template" field'
    )
    ci.add_argument(
        "--reference-pairs",
        help="with --pairs: JSONL whose corrupted prompts define the ablation (default: the pairs')",
    )
    ci.add_argument(
        "--heldout-pairs", help="with --pairs: JSONL of fresh pairs the found circuit's faithfulness is re-measured on"
    )
    ci.add_argument("--n-prompts", type=whole(1), default=16, help="pairs the circuit is found on")
    ci.add_argument(
        "--reference-prompts",
        type=whole(0),
        default=64,
        help="extra pairs (another seed) whose corrupted prompts define mean / resample ablation, "
        "as Wang et al.'s ABC set; 0 = the pairs' own",
    )
    ci.add_argument(
        "--heldout",
        type=whole(0),
        default=16,
        help="fresh pairs the found circuit's faithfulness is re-measured on (0 = skip)",
    )
    ci.add_argument("--seed", type=whole(0), default=0)
    ci.add_argument(
        "--ablation", default="mean", help="mean (per template position, Wang et al.), resample, zero or corrupted"
    )
    ci.add_argument(
        "--method",
        default="eap-ig",
        choices=["eap-ig", "eap", "path"],
        help="edge scores that rank heads and edges (path: the older iterative path patching with thresholds)",
    )
    ci.add_argument(
        "--ig-steps", type=whole(1), default=5, help="EAP-IG: points between the ablated and the clean input"
    )
    ci.add_argument("--target", type=number(0), default=0.8, help="faithfulness F(C)/F(M) the circuit must reach")
    ci.add_argument(
        "--validate-edges",
        type=whole(0),
        default=200,
        help="edges checked against exact edge patching (half the top, half random)",
    )
    ci.add_argument("--completeness-random", type=whole(0), default=20, help="random subsets K for completeness")
    ci.add_argument("--greedy-steps", type=whole(0), default=10, help="greedy completeness: heads added to K")
    ci.add_argument("--minimality-random", type=whole(0), default=10, help="random subsets K per head for minimality")
    ci.add_argument(
        "--no-prune",
        action="store_true",
        help="keep the smallest top-k prefix, without dropping heads it does not need",
    )
    ci.add_argument("--max-rows", type=whole(1), default=512, help="rows per stacked forward (memory budget)")
    ci.add_argument(
        "--threshold", type=number(0), default=0.05, help="--method path: |normalised effect| for a head to join"
    )
    ci.add_argument(
        "--inner-threshold",
        type=number(0),
        help="--method path: |effect| into a receiver's q/k/v (default threshold / 2)",
    )
    ci.add_argument("--rounds", type=whole(1), default=3, help="--method path: rounds")
    ci.add_argument("--max-receivers", type=whole(1), default=6, help="--method path: receivers per round")
    ci.add_argument(
        "--out",
        required=True,
        help="folder: TASK/circuit.json (curves, completeness, minimality), nodes / edges / edge_scores.parquet",
    )
    ci.set_defaults(func=cmd_circuit)
