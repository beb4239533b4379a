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


def cmd_probe(args: argparse.Namespace) -> int:
    from probes import get_probe, parse_probe_list
    from workbench.datasets import make_dataset
    from workbench.extraction import run_probes
    from workbench.models import load_model
    from workbench.prompts import read_prompts, tokenize_prompts
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
    if args.prompts:
        prompts = read_prompts(args.prompts)
        if args.n_prompts is not None:
            prompts = prompts[: args.n_prompts]
        dataset = os.path.basename(args.prompts)
    else:
        dataset = args.dataset or "prose"
        prompts = make_dataset(dataset, n_prompts=args.n_prompts, seed=args.seed)
    t0 = time.perf_counter()
    model = load_model(args.model, device=args.device, dtype=args.dtype)
    tokenized = tokenize_prompts(prompts, model.tokenizer, model.n_ctx, model.vocab_size, prepend_bos=args.prepend_bos)
    t_load = time.perf_counter() - t0
    table, stats = run_probes(model, tokenized, probes, batch_size=batch_size, progress=None if args.progress else False)
    table = tidy(table, model=args.model, dataset=dataset)
    meta = run_metadata(
        model=model.describe(),
        dataset={"name": dataset, "n_prompts": len(tokenized), "n_tokens": stats.n_tokens, "seed": args.seed,
                 "prepend_bos": bool(args.prepend_bos), "tokenization": "token ids as given" if args.prompts and prompts[0].tokens is not None else "tokenizer defaults" + (" + BOS" if args.prepend_bos else "")},
        probes=[p.config() for p in probes],
        config={"batch_size": batch_size, "device": str(model.device), "dtype": str(model.dtype).replace("torch.", "")},
        command=sys.argv,
    )
    write_parquet(table, args.out, meta)
    t_run = time.perf_counter() - t0 - t_load
    _print_top(top_heads(table, args.top), args, stats, t_load, t_run)
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
    console.print(
        f"{stats.n_prompts} prompts, {stats.n_tokens} tokens, {stats.n_batches} batches; "
        f"load {t_load:.1f}s, run {t_run:.1f}s -> {args.out}"
    )


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


def cmd_dataset(args: argparse.Namespace) -> int:
    from workbench.datasets import make_dataset
    from workbench.prompts import write_prompts

    prompts = make_dataset(args.name, n_prompts=args.n_prompts, seed=args.seed)
    from workbench.results import check_writable

    check_writable(args.out)
    write_prompts(prompts, args.out)
    print(f"{len(prompts)} prompts -> {args.out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="workbench", description="What does each attention head do? Per-head metrics in one tidy table.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("probe", help="run probes over a prompt set and write a Parquet table")
    p.add_argument("probes", help="comma list of probes, e.g. entropy,sink (see `workbench probes`)")
    p.add_argument("--model", default="smollm2-135m", help="known name, local HF folder or hub id (default smollm2-135m)")
    p.add_argument("--prompts", help="JSONL file: one {id, text|tokens} object per line")
    p.add_argument("--dataset", help="shipped dataset name (default prose)")
    p.add_argument("--n-prompts", type=int, help="how many prompts (dataset size, or the first N of --prompts)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", default="auto", help="prompts per forward pass, or auto (a token budget)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto")
    p.add_argument("--dtype", default="float32", help="float32, bfloat16 or float16")
    p.add_argument("--prepend-bos", action="store_true", help="prepend the BOS token to text prompts")
    p.add_argument("--param", action="append", default=[], metavar="PROBE.NAME=VALUE", help="probe parameter, e.g. sink.epsilon=0.2")
    p.add_argument("--top", type=int, default=5, help="heads to print per metric")
    p.add_argument("--no-progress", dest="progress", action="store_false")
    p.add_argument("--out", required=True, help="output .parquet file")
    p.set_defaults(func=cmd_probe)

    sub.add_parser("probes", help="list probes and their metrics").set_defaults(func=cmd_probes)
    sub.add_parser("models", help="list known models and what is installed").set_defaults(func=cmd_models)

    d = sub.add_parser("dataset", help="write a shipped or generated dataset as prompts JSONL")
    d.add_argument("name")
    d.add_argument("--n-prompts", type=int)
    d.add_argument("--seed", type=int, default=0)
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
