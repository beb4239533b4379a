"""Command line: ``workbench probe``, ``workbench probes``, ``workbench models``, ``workbench dataset``.

Bad input never produces a traceback: every :class:`WorkbenchError` becomes one ``error:``
line (plus a ``fix:`` line) on stderr and exit status 2. Inputs are validated before the model
is loaded where possible, and results are written atomically, so a failed run leaves no file.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any, Sequence

from workbench.errors import WorkbenchError


def _parse_params(items: Sequence[str], probe_names: Sequence[str]) -> dict[str, dict[str, Any]]:
    params: dict[str, dict[str, Any]] = {n: {} for n in probe_names}
    for item in items or []:
        key, sep, raw = item.partition("=")
        probe, dot, pname = key.partition(".")
        if not sep or not dot or not pname:
            raise WorkbenchError(f"bad --param {item!r}", "write --param PROBE.NAME=VALUE, e.g. sink.epsilon=0.2")
        if probe not in params:
            raise WorkbenchError(f"--param {item!r} names probe {probe!r}, which is not in this run", f"probes in this run: {', '.join(probe_names)}")
        try:
            value: Any = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        params[probe][pname] = value
    return params


def _batch_size(raw: str) -> int | str:
    if raw == "auto":
        return raw
    try:
        value = int(raw)
    except ValueError:
        raise WorkbenchError(f"--batch-size must be a whole number or auto, got {raw!r}", "e.g. --batch-size 8") from None
    if value < 1:
        raise WorkbenchError(f"--batch-size must be at least 1, got {value}", "e.g. --batch-size 8")
    return value


def _float_list(raw: str | None, flag: str) -> list[float] | None:
    if raw is None:
        return None
    try:
        return [float(x) for x in raw.split(",") if x.strip()]
    except ValueError:
        raise WorkbenchError(f"{flag} takes comma-separated numbers, got {raw!r}", f"e.g. {flag} 0,0.5,1") from None


def dataset_options(args: argparse.Namespace) -> dict[str, Any]:
    """Dataset options given on the command line, validated before any model loads."""
    opts: dict[str, Any] = {}
    lengths = _float_list(getattr(args, "context_len", None), "--context-len")
    if lengths is not None:
        opts["context_len"] = [int(x) for x in lengths]
    depths = _float_list(getattr(args, "depths", None), "--depths")
    if depths is not None:
        bad = [d for d in depths if not 0.0 <= d <= 1.0]
        if bad:
            raise WorkbenchError(f"depth {bad[0]:g} is outside [0, 1]", "give depths as fractions of the context, e.g. --depths 0,0.5,1")
        opts["depths"] = depths
    if getattr(args, "period", None) is not None:
        opts["period"] = args.period
    if getattr(args, "shared_haystack", False):
        opts["shared_haystack"] = True
    return opts


def load_prompts(args: argparse.Namespace, model=None):
    """Prompts from --prompts or --dataset (token-space datasets need the loaded model)."""
    from workbench.datasets import NEEDS_TOKENIZER, make_dataset
    from workbench.prompts import read_prompts

    if args.prompts:
        prompts = read_prompts(args.prompts)
        return (prompts[: args.n_prompts] if args.n_prompts else prompts), os.path.basename(args.prompts)
    name = args.dataset or "prose"
    opts = dataset_options(args)
    if name in NEEDS_TOKENIZER:
        if model is None:
            return None, name
        opts["tokenizer"] = model.tokenizer
        if name == "niah":
            opts["n_ctx"] = model.n_ctx
    return make_dataset(name, n_prompts=args.n_prompts, seed=args.seed, **opts), name


def make_interventions(args: argparse.Namespace, model) -> list:
    from workbench.interventions import HeadAblation, head_means, parse_heads

    if not getattr(args, "ablate", None):
        return []
    heads = parse_heads(args.ablate, model.n_layers, model.n_heads)
    means = None
    if args.ablation == "mean":
        from workbench.datasets import make_dataset
        from workbench.prompts import tokenize_prompts

        ref = tokenize_prompts(make_dataset("prose", n_prompts=16, seed=12345), model.tokenizer, model.n_ctx, model.vocab_size)
        means = head_means(model, ref)
    return [HeadAblation(heads, args.ablation, means)]


def cmd_probe(args: argparse.Namespace) -> int:
    from probes import get_probe, parse_probe_list
    from workbench.extraction import RunStats, run_probes
    from workbench.models import load_model
    from workbench.prompts import tokenize_prompts
    from workbench.results import check_writable, run_metadata, tidy, top_heads, write_parquet

    names = parse_probe_list(args.probes)
    params = _parse_params(args.param, names)
    probes = [get_probe(n, **params[n]) for n in names]
    batch_size = _batch_size(args.batch_size)
    if not str(args.out).endswith(".parquet"):
        raise WorkbenchError(f"--out {args.out} should end in .parquet", "e.g. --out results.parquet")
    check_writable(args.out)
    if args.n_prompts is not None and args.n_prompts < 1:
        raise WorkbenchError(f"--n-prompts must be at least 1, got {args.n_prompts}", "ask for 1 or more prompts")
    if args.prompts and args.dataset:
        raise WorkbenchError("give --prompts or --dataset, not both", "drop one of them")
    if args.ablation not in ("zero", "mean", "first"):
        raise WorkbenchError(f"unknown ablation {args.ablation!r}", "use --ablation zero, mean or first")
    if any(getattr(p, "takes_items", False) for p in probes):
        return _probe_items(args, probes, batch_size)
    if args.images:
        raise WorkbenchError("--images is for the vhd probe", "run `workbench probe vhd --images ...` on a vision-language model")
    prompts, dataset = load_prompts(args)  # files and text datasets are checked before loading
    t0 = time.perf_counter()
    model = load_model(args.model, device=args.device, dtype=args.dtype)
    if prompts is None:
        prompts, dataset = load_prompts(args, model)
    tokenized = tokenize_prompts(prompts, model.tokenizer, model.n_ctx, model.vocab_size, prepend_bos=args.prepend_bos)
    interventions = make_interventions(args, model)
    t_load = time.perf_counter() - t0
    forward_probes = [p for p in probes if not p.generates]
    frames, stats, extra = [], RunStats(n_prompts=len(tokenized), n_tokens=sum(len(p) for p in tokenized)), {}
    if forward_probes:
        table, stats = run_probes(model, tokenized, forward_probes, batch_size=batch_size, progress=None if args.progress else False, interventions=interventions)
        frames.append(table)
    for p in probes:
        if p.generates:
            df = p.run(model, tokenized, batch_size=batch_size, interventions=interventions)
            df.insert(0, "probe", p.name)
            frames.append(df)
            extra[p.name] = p.summary()
    import pandas as pd

    table = tidy(pd.concat(frames, ignore_index=True), model=args.model, dataset=dataset)
    meta = run_metadata(
        model=model.describe(),
        dataset={"name": dataset, "n_prompts": len(tokenized), "n_tokens": stats.n_tokens, "seed": args.seed,
                 "options": {k: v for k, v in dataset_options(args).items()},
                 "prepend_bos": bool(args.prepend_bos), "tokenization": "token ids as given" if prompts[0].tokens is not None else "tokenizer defaults" + (" + BOS" if args.prepend_bos else "")},
        probes=[p.config() for p in probes],
        config={"batch_size": batch_size, "device": str(model.device), "dtype": str(model.dtype).replace("torch.", ""),
                "ablate": args.ablate, "ablation": args.ablation if args.ablate else None},
        summaries=extra,
        command=sys.argv,
    )
    write_parquet(table, args.out, meta)
    t_run = time.perf_counter() - t0 - t_load
    _print_top(top_heads(table, args.top), args, stats, t_load, t_run)
    for name, summ in extra.items():
        share = (table[(table.probe == name)].value > 0.1).mean()
        print(f"{name}: {summ['n_counted']}/{summ['n_prompts']} prompts counted (answered correctly: {summ['accuracy']:.0%}); "
              f"{share:.1%} of heads score above 0.1")
    return 0


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")


def load_items(args: argparse.Namespace):
    """Items for the item probes (vhd, context): --images [--text], --prompts or --dataset.

    Returns ``(items, dataset name, root folder for relative image paths)``.
    """
    from pathlib import Path

    from workbench.datasets import make_dataset
    from workbench.prompts import Prompt

    if args.images:
        path = Path(args.images)
        if not path.exists():
            raise WorkbenchError(f"--images {path} does not exist", "give an image file or a folder of images")
        files = sorted(f for f in path.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES) if path.is_dir() else [path]
        if not files:
            raise WorkbenchError(f"no image files in {path}", f"put {', '.join(IMAGE_SUFFIXES)} files there")
        if not args.text:
            raise WorkbenchError("--images needs --text", "e.g. --text 'USER: <image>\nDescribe the image. ASSISTANT:'")
        items = [Prompt(f.stem, text=args.text, meta={"image": str(f.resolve())}) for f in files]
        return items[: args.n_prompts] if args.n_prompts else items, path.name, None
    if args.prompts:
        prompts, name = load_prompts(args)
        return prompts, name, Path(args.prompts).resolve().parent
    if not args.dataset:
        raise WorkbenchError("the vhd and context probes need items", "give --images DIR --text ..., --prompts items.jsonl, or --dataset shapes|counterfact")
    return make_dataset(args.dataset, n_prompts=args.n_prompts, seed=args.seed), args.dataset, None


def _probe_items(args: argparse.Namespace, probes: list, batch_size) -> int:
    """``workbench probe vhd|context``: probes that read (image | context, text) items."""
    import pandas as pd

    from workbench.models import load_model
    from workbench.results import run_metadata, tidy, top_heads, write_parquet

    if any(not getattr(p, "takes_items", False) for p in probes):
        raise WorkbenchError("vhd and context read items, not prompts: they cannot share a run with other probes", "run them on their own")
    if args.ablate:
        raise WorkbenchError("--ablate is not supported with vhd / context", "use `workbench reinforce` for head interventions")
    items, dataset, root = load_items(args)
    t0 = time.perf_counter()
    model = load_model(args.model, device=args.device, dtype=args.dtype)
    t_load = time.perf_counter() - t0
    bs = 8 if batch_size == "auto" else int(batch_size)
    frames, extra = [], {}
    for p in probes:
        df = p.run_items(model, items, root=root, batch_size=bs)
        df.insert(0, "probe", p.name)
        frames.append(df)
        extra[p.name] = p.summary()
    table = tidy(pd.concat(frames, ignore_index=True), model=args.model, dataset=dataset)
    meta = run_metadata(
        model=model.describe(), dataset={"name": dataset, "n_items": len(items), "seed": args.seed},
        probes=[p.config() for p in probes], config={"batch_size": bs, "device": str(model.device)},
        summaries=extra, command=sys.argv,
    )
    write_parquet(table, args.out, meta)
    _print_top(top_heads(table, args.top), args, None, t_load, time.perf_counter() - t0 - t_load)
    print(f"{len(items)} items")
    for name, summ in extra.items():
        if name == "context" and summ.get("n_with_targets"):
            print(f"context: follows the context on {summ['follows_context']:.0%}, memory on {summ['follows_memory']:.0%} "
                  f"of {summ['n_with_targets']} items")
        if summ.get("skipped_same_first_token"):
            print(f"context: {len(summ['skipped_same_first_token'])} items not scored for direct effects "
                  "(their two targets start with the same token for this tokenizer)")
    return 0


def _print_top(top, args, stats, t_load: float, t_run: float) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    table = Table(title=f"top {args.top} heads per metric ({args.model})")
    for col in ("probe", "metric", "layer.head", "value", "n"):
        table.add_column(col, justify="right" if col in ("value", "n") else "left")
    for row in top.itertuples():
        table.add_row(row.probe, row.metric, f"{row.layer}.{row.head}", f"{row.value:.4f}", str(row.n))
    console.print(table)
    if stats is None:
        console.print(f"load {t_load:.1f}s, run {t_run:.1f}s -> {args.out}")
        return
    console.print(
        f"{stats.n_prompts} prompts, {stats.n_tokens} tokens, {stats.n_batches} batches; "
        f"load {t_load:.1f}s, run {t_run:.1f}s -> {args.out}"
    )


def cmd_retrieval_ablation(args: argparse.Namespace) -> int:
    from workbench.datasets import make_dataset
    from workbench.experiments import retrieval_ablation
    from workbench.models import load_model
    from workbench.prompts import tokenize_prompts
    from workbench.results import COLUMNS, check_writable, run_metadata, write_parquet

    check_writable(args.out)
    try:
        ks = [int(k) for k in args.k.split(",") if k.strip()]
    except ValueError:
        raise WorkbenchError(f"--k takes comma-separated whole numbers, got {args.k!r}", "e.g. --k 5,10,20") from None
    if not ks or min(ks) < 1 or args.draws < 1:
        raise WorkbenchError("--k values and --draws must be at least 1", "e.g. --k 5,10 --draws 3")
    opts = dataset_options(args)
    model = load_model(args.model, device=args.device, dtype=args.dtype)
    if max(ks) > model.n_layers * model.n_heads:
        raise WorkbenchError(f"--k {max(ks)} exceeds the model's {model.n_layers * model.n_heads} heads", "use smaller k")

    def niah(seed):
        ps = make_dataset("niah", n_prompts=args.n_prompts, seed=seed, tokenizer=model.tokenizer, n_ctx=model.n_ctx, **opts)
        return tokenize_prompts(ps, model.tokenizer, model.n_ctx, model.vocab_size)

    scores, table = retrieval_ablation(model, niah(args.seed), niah(args.seed + 1000), ks=ks, draws=args.draws, mode=args.ablation,
                                       seed=args.seed, batch_size=int(_batch_size(args.batch_size)) if args.batch_size != "auto" else 4)
    table["model"], table["dataset"] = args.model, "niah"
    table = table[COLUMNS + ["condition", "k", "draw", "heads"]]
    meta = run_metadata(model=model.describe(), dataset={"name": "niah", "n_prompts": args.n_prompts, "seed": args.seed, "options": opts},
                        config={"k": ks, "draws": args.draws, "ablation": args.ablation}, command=sys.argv)
    write_parquet(table, args.out, meta)
    scores_out = str(args.out).removesuffix(".parquet") + ".scores.parquet"
    write_parquet(scores.assign(model=args.model, dataset="niah")[COLUMNS], scores_out, meta)
    summary = table.groupby(["condition", "k"]).value.mean().reset_index()
    print(summary.to_string(index=False))
    print(f"-> {args.out} (retrieval scores per head: {scores_out})")
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    from workbench.results import load_results, top_heads
    from workbench.sweeps import run_sweep

    summary = run_sweep(args.config, args.out, progress=args.progress)
    table = load_results(args.out)
    print(f"{summary['units']} units: {summary['ran']} run now, {summary['skipped']} already done -> {summary['parts']}")
    top = top_heads(table, args.top)
    print(top[["model", "dataset", "probe", "metric", "layer", "head", "value", "n"]].to_string(index=False))
    return 0


def cmd_query(args: argparse.Namespace) -> int:
    import pandas as pd

    from workbench.results import query

    runs = args.runs
    if not runs:
        from pathlib import Path

        root = Path("runs")
        runs = sorted(str(d) for d in root.iterdir() if (d / "parts").is_dir()) if root.is_dir() else []
        if not runs:
            raise WorkbenchError("no run folders given and none under ./runs", "pass --runs runs/NAME ...")
    df = query(args.sql, runs)
    with pd.option_context("display.max_rows", args.max_rows, "display.width", 200):
        print(df.to_string(index=False) if len(df) <= args.max_rows else df)
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from workbench.report import write_report

    out = write_report(args.run, args.out, title=args.title)
    print(f"report -> {out} ({out.stat().st_size / 1e6:.1f} MB)")
    return 0


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
    from workbench.results import COLUMNS, check_writable, run_metadata, write_parquet

    check_writable(args.out)
    if not str(args.out).endswith(".parquet"):
        raise WorkbenchError(f"--out {args.out} should end in .parquet", "e.g. --out patch.parquet")
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
    from probes import get_probe
    from workbench.datasets import make_dataset
    from workbench.extraction import run_probes
    from workbench.models import load_model
    from workbench.prompts import tokenize_prompts
    from workbench.results import run_metadata, write_parquet

    out = Path(args.out)
    tasks = [t.strip() for t in args.task.split(",") if t.strip()]
    model = load_model(args.model, device=args.device, dtype=args.dtype)
    for t in tasks:  # validate every task before the slow part
        make_task(t, model.tokenizer, n=1)
    out.mkdir(parents=True, exist_ok=True)
    rep = tokenize_prompts(make_dataset("repeated-random", n_prompts=8, tokenizer=model.tokenizer, period=min(50, model.n_ctx // 2 - 1)),
                           model.tokenizer, model.n_ctx, model.vocab_size)
    patterns, _ = run_probes(model, rep, [get_probe("induction")], progress=False)
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


def _int_ranges(raw: str, flag: str) -> list[int]:
    out: list[int] = []
    try:
        for part in (x.strip() for x in raw.split(",") if x.strip()):
            lo, dash, hi = part.partition("-")
            out.extend(range(int(lo), int(hi) + 1) if dash else [int(lo)])
    except ValueError:
        raise WorkbenchError(f"{flag} takes layer numbers and ranges, got {raw!r}", f"e.g. {flag} 2,17-29") from None
    return out


def cmd_reinforce(args: argparse.Namespace) -> int:
    """VHR: scale the outputs of vision-aware (or context) heads and compare the answers."""

    from probes import get_probe
    from workbench.conditions import check_lengths, context_pair, image_pair
    from workbench.experiments import reinforce
    from workbench.interventions import default_vhr_layers, parse_heads, vhr_heads
    from workbench.models import load_model
    from workbench.results import check_writable, read_parquet, run_metadata, tidy, write_parquet

    if not str(args.out).endswith(".parquet"):
        raise WorkbenchError(f"--out {args.out} should end in .parquet", "e.g. --out vhr.parquet")
    check_writable(args.out)
    if args.positions not in ("first", "all"):
        raise WorkbenchError(f"--positions must be first or all, got {args.positions!r}", "use --positions first")
    if args.max_new_tokens < 1:
        raise WorkbenchError("--max-new-tokens must be at least 1", "e.g. --max-new-tokens 16")
    layers = _int_ranges(args.layers, "--layers") if args.layers else None
    scores = read_parquet(args.vhd)[0] if args.vhd else None
    items, dataset, root = load_items(args)
    model = load_model(args.model, device=args.device, dtype=args.dtype)
    if layers is not None:
        bad = [layer for layer in layers if not 0 <= layer < model.n_layers]
        if bad:
            raise WorkbenchError(f"layer {bad[0]} is out of range (0-{model.n_layers - 1})", "pick layers of this model")
    probe_name = "vhd" if model.is_multimodal else "context"
    pairs = [image_pair(model, it, root) if model.is_multimodal else context_pair(model, it) for it in items]
    check_lengths(pairs, model.n_ctx, args.max_new_tokens)
    if args.heads:
        heads = parse_heads(args.heads, model.n_layers, model.n_heads)
        source = "--heads"
    else:
        if scores is None:
            scores = get_probe(probe_name).run_items(model, items, root=root, batch_size=args.batch_size)
            source = f"{probe_name} on the same items"
        else:
            source = str(args.vhd)
        metric, att = ("vhd", "image_attention") if probe_name == "vhd" else ("context_divergence", "context_attention")
        heads = vhr_heads(scores, layers if layers is not None else default_vhr_layers(model.n_layers), metric, att)
        if not heads:
            raise WorkbenchError("no head is above its layer's median divergence in the chosen layers", "choose other --layers or give --heads")
    rows, answers = reinforce(model, pairs, heads, args.alpha, args.positions, args.max_new_tokens, args.batch_size)
    table = tidy(rows, model=args.model, dataset=dataset)
    meta = run_metadata(model=model.describe(), dataset={"name": dataset, "n_items": len(items)},
                        config={"alpha": args.alpha, "positions": args.positions, "heads": [f"{l}.{h}" for l, h in heads],
                                "heads_from": source, "max_new_tokens": args.max_new_tokens},
                        answers=answers, command=sys.argv)
    write_parquet(table, args.out, meta)
    changed = sum(a["changed"] for a in answers)
    print(f"reinforced {len(heads)} heads x {args.alpha:g} ({args.positions} position) from {source}")
    for a in answers[: args.show]:
        mark = "*" if a["changed"] else " "
        print(f"{mark} {a['item']}: {a['baseline']!r} -> {a['reinforced']!r}")
    print(f"{changed}/{len(answers)} answers changed -> {args.out}")
    return 0


def cmd_probes(args: argparse.Namespace) -> int:
    from probes import PROBES

    for name, cls in PROBES.items():
        print(f"{name:12s} metrics: {', '.join(cls.metrics)}")
        print(f"{'':12s} {cls.description}")
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    from workbench.models import list_models

    for row in list_models():
        print(f"{row['name']:40s} {row['status']}")
        print(f"{'':40s} {row['description']}")
    return 0


def cmd_datasets(args: argparse.Namespace) -> int:
    from workbench.datasets import DATASETS

    for name, (_, desc) in DATASETS.items():
        print(f"{name:16s} {desc}")
    return 0


def cmd_dataset(args: argparse.Namespace) -> int:
    from workbench.prompts import write_prompts
    from workbench.results import check_writable

    args.prompts, args.dataset = None, args.name
    check_writable(args.out)
    prompts, _ = load_prompts(args)
    if prompts is None:
        from workbench.models import load_model

        prompts, _ = load_prompts(args, load_model(args.model))
    write_prompts(prompts, args.out)
    print(f"{len(prompts)} prompts -> {args.out}")
    return 0


MODEL_HELP = "known name (see `workbench models`), local HF folder or hub id (default smollm2-135m)"


def _model_args(parser: argparse.ArgumentParser) -> None:
    """--model, --device and --dtype, the same for every command that runs a model."""
    parser.add_argument("--model", default="smollm2-135m", help=MODEL_HELP)
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (CUDA when present)")
    parser.add_argument("--dtype", default="float32", help="float32, bfloat16 or float16")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="workbench", description="What does each attention head do? Per-head metrics in one tidy table.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("probe", help="run probes over a prompt set and write a Parquet table")
    p.add_argument("probes", help="comma list of probes, e.g. entropy,sink (see `workbench probes`)")
    _model_args(p)
    p.add_argument("--prompts", help="JSONL file: one {id, text|tokens} object per line")
    p.add_argument("--dataset", help="shipped dataset name (default prose)")
    p.add_argument("--n-prompts", type=int, help="how many prompts (dataset size, or the first N of --prompts)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", default="auto", help="prompts per forward pass, or auto (a token budget)")
    p.add_argument("--prepend-bos", action="store_true", help="prepend the BOS token to text prompts")
    p.add_argument("--images", help="vhd: an image file or a folder of images, each run with --text")
    p.add_argument("--text", help="vhd with --images: the prompt, with the model's image placeholder (e.g. <image>)")
    p.add_argument("--context-len", help="niah: context lengths in tokens, comma list (default 1024)")
    p.add_argument("--depths", help="niah: needle depths in [0, 1], comma list (default 0,0.25,0.5,0.75,1)")
    p.add_argument("--period", type=int, help="repeated-random: length of the repeated block (default 50)")
    p.add_argument("--shared-haystack", action="store_true", help="niah: one haystack for every prompt (the paper's grid)")
    p.add_argument("--ablate", help="heads to ablate during the run, LAYER.HEAD comma list, e.g. 12.3,14.0")
    p.add_argument("--ablation", default="zero", help="how to ablate: zero, mean (over prose) or first (attention to the first token)")
    p.add_argument("--param", action="append", default=[], metavar="PROBE.NAME=VALUE", help="probe parameter, e.g. sink.epsilon=0.2")
    p.add_argument("--top", type=int, default=5, help="heads to print per metric")
    p.add_argument("--no-progress", dest="progress", action="store_false")
    p.add_argument("--out", required=True, help="output .parquet file")
    p.set_defaults(func=cmd_probe)

    sub.add_parser("probes", help="list probes and their metrics").set_defaults(func=cmd_probes)

    vr = sub.add_parser("reinforce", help="VHR: scale vision-aware (or context) heads by alpha and compare greedy answers")
    _model_args(vr)
    vr.add_argument("--images", help="an image file or a folder of images, each run with --text")
    vr.add_argument("--text", help="with --images: the prompt, with the model's image placeholder")
    vr.add_argument("--prompts", help="items JSONL: {id, text, image} (VLM) or {id, text, context} (text model)")
    vr.add_argument("--dataset", help="shapes (VLM) or counterfact (text model)")
    vr.add_argument("--n-prompts", type=int)
    vr.add_argument("--seed", type=int, default=0)
    vr.add_argument("--vhd", help="a vhd/context probe table to pick heads from (default: run the probe on the same items)")
    vr.add_argument("--heads", help="reinforce exactly these heads, LAYER.HEAD comma list")
    vr.add_argument("--layers", help="layers to pick heads in, e.g. 2,17-29 (default: VHR's layer 2 + the last 14/32)")
    vr.add_argument("--alpha", type=float, default=2.0)
    vr.add_argument("--positions", default="first", help="first (the position of the first generated token) or all")
    vr.add_argument("--max-new-tokens", type=int, default=16)
    vr.add_argument("--batch-size", type=int, default=8)
    vr.add_argument("--show", type=int, default=10, help="answers to print")
    vr.add_argument("--out", required=True, help="output .parquet (answer_changed per item; answers in the metadata)")
    vr.set_defaults(func=cmd_reinforce)

    pa = sub.add_parser("patch", help="activation, path or attribution patching per head on a clean/corrupted task")
    pa.add_argument("kind", choices=["activation", "path", "attribution"])
    _model_args(pa)
    pa.add_argument("--task", default="ioi", help="ioi or colored-objects")
    pa.add_argument("--pairs", help="your own pairs: JSONL with clean, corrupted, correct, incorrect")
    pa.add_argument("--n-prompts", type=int, help="pairs to use (default 16)")
    pa.add_argument("--seed", type=int, default=0)
    pa.add_argument("--receivers", help="path patching receivers: LAYER.HEAD[.q|k|v], comma list (default: the logits)")
    pa.add_argument("--component", default="z", help="activation patching: z (per head), resid_pre, attn_out or mlp_out")
    pa.add_argument("--per-position", action="store_true")
    pa.add_argument("--bootstrap", type=int, default=0, help="bootstrap resamples over prompts for 95%% CIs")
    pa.add_argument("--max-rows", type=int, default=512, help="rows per stacked forward (memory budget)")
    pa.add_argument("--top", type=int, default=10)
    pa.add_argument("--out", required=True)
    pa.set_defaults(func=cmd_patch)

    tk = sub.add_parser("task", help="write a patching task's clean/corrupted pairs as JSONL (read back with --pairs)")
    tk.add_argument("name", help="ioi or colored-objects")
    tk.add_argument("--model", default="smollm2-135m", help="its tokenizer decides which names/colours are single tokens")
    tk.add_argument("--n-prompts", type=int, default=16)
    tk.add_argument("--seed", type=int, default=0)
    tk.add_argument("--out", required=True)
    tk.set_defaults(func=cmd_task)

    ci = sub.add_parser("circuit", help="discover a circuit by iterative path patching; faithfulness; overlap of two tasks")
    _model_args(ci)
    ci.add_argument("--task", default="ioi", help="one task, or two (comma) to also get their overlap")
    ci.add_argument("--n-prompts", type=int, default=16)
    ci.add_argument("--seed", type=int, default=0)
    ci.add_argument("--threshold", type=float, default=0.05, help="|normalised effect| for a head to join")
    ci.add_argument("--inner-threshold", type=float, help="|effect| for paths into a receiver's q/k/v (default threshold / 2)")
    ci.add_argument("--rounds", type=int, default=3)
    ci.add_argument("--max-receivers", type=int, default=6)
    ci.add_argument("--out", required=True, help="folder: TASK/circuit.json, nodes.parquet, edges.parquet")
    ci.set_defaults(func=cmd_circuit)

    sw = sub.add_parser("sweep", help="run a models x datasets x probes grid from a TOML file (resumable)")
    sw.add_argument("config", help="TOML file: models = [...], probes = [...], [datasets.NAME] tables")
    sw.add_argument("--out", required=True, help="run folder (parts/*.parquet); re-running resumes")
    sw.add_argument("--top", type=int, default=3)
    sw.add_argument("--no-progress", dest="progress", action="store_false")
    sw.set_defaults(func=cmd_sweep)

    q = sub.add_parser("query", help="SQL over run results with DuckDB (view `results`)")
    q.add_argument("sql")
    q.add_argument("--runs", nargs="*", help="run folders (default: every sweep folder under ./runs)")
    q.add_argument("--max-rows", type=int, default=50)
    q.set_defaults(func=cmd_query)

    rp = sub.add_parser("report", help="self-contained interactive HTML report of a run")
    rp.add_argument("run", help="run folder (or a results .parquet)")
    rp.add_argument("--out", required=True)
    rp.add_argument("--title")
    rp.set_defaults(func=cmd_report)

    r = sub.add_parser("retrieval-ablation", help="needle accuracy with top-k retrieval heads vs k random heads ablated")
    _model_args(r)
    r.add_argument("--n-prompts", type=int, default=20, help="niah prompts for detection, and as many (other seed) for evaluation")
    r.add_argument("--context-len", default="1000,2000")
    r.add_argument("--depths")
    r.add_argument("--k", default="5,10,20", help="numbers of heads to ablate")
    r.add_argument("--draws", type=int, default=3, help="random draws per k")
    r.add_argument("--ablation", default="zero", choices=["zero", "first"])
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--batch-size", default="4")
    r.add_argument("--out", required=True)
    r.set_defaults(func=cmd_retrieval_ablation)
    sub.add_parser("models", help="list known models and what is installed").set_defaults(func=cmd_models)
    sub.add_parser("datasets", help="list shipped and generated datasets").set_defaults(func=cmd_datasets)

    d = sub.add_parser("dataset", help="write a shipped or generated dataset as prompts JSONL")
    d.add_argument("name")
    d.add_argument("--n-prompts", type=int)
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--model", default="smollm2-135m", help="token-space datasets (niah, repeated-random) use its tokenizer")
    d.add_argument("--context-len")
    d.add_argument("--depths")
    d.add_argument("--period", type=int)
    d.add_argument("--shared-haystack", action="store_true", help="niah: one haystack for every prompt")
    d.add_argument("--out", required=True)
    d.set_defaults(func=cmd_dataset)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except WorkbenchError as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        if exc.fix:
            print(f"  fix: {exc.fix}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; no results written", file=sys.stderr)
        return 130
    except Exception as exc:  # a bug, not bad input: still one line unless asked for more
        if os.environ.get("WORKBENCH_DEBUG"):
            raise
        print(f"error: internal error: {type(exc).__name__}: {exc}", file=sys.stderr)
        print("  fix: please report it; set WORKBENCH_DEBUG=1 for the traceback", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
