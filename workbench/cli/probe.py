"""``workbench probe`` and the catalogue commands: ``probes``, ``models``, ``datasets``, ``dataset``."""
from __future__ import annotations

import argparse
import sys
import time

from workbench.cli.common import (
    add_batch_size,
    add_command,
    add_dataset_options,
    add_input_args,
    add_model_args,
    check_parquet_out,
    dataset_options,
    load_items,
    load_prompts,
    make_interventions,
    parse_batch_size,
    parse_params,
    print_top,
)
from workbench.errors import WorkbenchError


def cmd_probe(args: argparse.Namespace) -> int:
    from probes import get_probe, parse_probe_list
    from workbench.extraction import RunStats, run_probes
    from workbench.models import load_model
    from workbench.prompts import tokenize_prompts
    from workbench.results import run_metadata, tidy, top_heads, write_parquet

    names = parse_probe_list(args.probes)
    params = parse_params(args.param, names)
    probes = [get_probe(n, **params[n]) for n in names]
    batch_size = parse_batch_size(args.batch_size)
    check_parquet_out(args.out)
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
    print_top(top_heads(table, args.top), args.model, args.top,
              f"{stats.n_prompts} prompts, {stats.n_tokens} tokens, {stats.n_batches} batches; load {t_load:.1f}s, run {t_run:.1f}s -> {args.out}")
    for name, summ in extra.items():
        share = (table[(table.probe == name)].value > 0.1).mean()
        print(f"{name}: {summ['n_counted']}/{summ['n_prompts']} prompts counted (answered correctly: {summ['accuracy']:.0%}); "
              f"{share:.1%} of heads score above 0.1")
    return 0


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
    print_top(top_heads(table, args.top), args.model, args.top, f"load {t_load:.1f}s, run {time.perf_counter() - t0 - t_load:.1f}s -> {args.out}")
    print(f"{len(items)} items")
    for name, summ in extra.items():
        if name == "context" and summ.get("n_with_targets"):
            print(f"context: follows the context on {summ['follows_context']:.0%}, memory on {summ['follows_memory']:.0%} "
                  f"of {summ['n_with_targets']} items")
        if summ.get("skipped_same_first_token"):
            print(f"context: {len(summ['skipped_same_first_token'])} items not scored for direct effects "
                  "(their two targets start with the same token for this tokenizer)")
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


def register(sub: argparse._SubParsersAction) -> None:
    p = add_command(sub, "probe", "run probes over prompts or items and write one tidy Parquet table",
                    "workbench probe entropy,sink --model smollm2-135m --dataset prose --n-prompts 64 --out runs/prose.parquet\n"
                    "workbench probe retrieval --dataset niah --context-len 1000 --out retrieval.parquet\n"
                    "workbench probe context --dataset counterfact --out ctx.parquet")
    p.add_argument("probes", help="comma list of probes, e.g. entropy,sink (see `workbench probes`)")
    add_model_args(p)
    add_input_args(p, items=True)
    add_dataset_options(p.add_argument_group("dataset options"))
    run = p.add_argument_group("run")
    add_batch_size(run)
    run.add_argument("--prepend-bos", action="store_true", help="prepend the BOS token to text prompts")
    run.add_argument("--ablate", help="heads to ablate during the run, LAYER.HEAD comma list, e.g. 12.3,14.0")
    run.add_argument("--ablation", default="zero", help="how to ablate: zero, mean (over prose) or first (attention to the first token)")
    run.add_argument("--param", action="append", default=[], metavar="PROBE.NAME=VALUE", help="probe parameter, e.g. sink.epsilon=0.2")
    run.add_argument("--no-progress", dest="progress", action="store_false")
    p.add_argument("--top", type=int, default=5, help="heads to print per metric")
    p.add_argument("--out", required=True, help="output .parquet file")
    p.set_defaults(func=cmd_probe)

    add_command(sub, "probes", "list probes and their metrics", "workbench probes").set_defaults(func=cmd_probes)
    add_command(sub, "models", "list known models and what is installed", "workbench models").set_defaults(func=cmd_models)
    add_command(sub, "datasets", "list shipped and generated datasets", "workbench datasets").set_defaults(func=cmd_datasets)

    d = add_command(sub, "dataset", "write a shipped or generated dataset as prompts JSONL (read back with --prompts)",
                    "workbench dataset niah --context-len 2000 --depths 0,0.5,1 --n-prompts 12 --out niah.jsonl")
    d.add_argument("name", help="dataset name (see `workbench datasets`)")
    d.add_argument("--n-prompts", type=int)
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--model", default="smollm2-135m", help="token-space datasets (niah, repeated-random) use its tokenizer")
    add_dataset_options(d.add_argument_group("dataset options"))
    d.add_argument("--out", required=True)
    d.set_defaults(func=cmd_dataset)
