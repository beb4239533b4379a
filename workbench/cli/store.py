"""``workbench cache``: write an activation store (see :mod:`workbench.store`)."""

from __future__ import annotations

import argparse
import shlex

from workbench.cli.common import (
    add_batch_size,
    add_command,
    add_dataset_options,
    add_input_args,
    dataset_options,
    int_ranges,
    load_inputs,
    number,
)
from workbench.errors import WorkbenchError


def _command(args: argparse.Namespace) -> str:
    """The command line that resumes this store (recorded in its index)."""
    parts = ["workbench", "cache", "--model", args.model]
    for flag, value in (
        ("--prompts", args.prompts),
        ("--dataset", args.dataset),
        ("--n-prompts", args.n_prompts),
        ("--context-len", args.context_len),
        ("--depths", args.depths),
        ("--period", args.period),
    ):
        if value is not None:
            parts += [flag, str(value)]
    if args.seed:
        parts += ["--seed", str(args.seed)]
    if args.shared_haystack:
        parts.append("--shared-haystack")
    if args.prepend_bos:
        parts.append("--prepend-bos")
    parts += ["--hooks", args.hooks]
    if args.layers:
        parts += ["--layers", args.layers]
    parts += ["--dtype", args.dtype, "--model-dtype", args.model_dtype, "--shard-mb", f"{args.shard_mb:g}"]
    if args.device != "auto":
        parts += ["--device", args.device]
    if args.batch_size != "auto":
        parts += ["--batch-size", str(args.batch_size)]
    return " ".join(shlex.quote(p) for p in parts + ["--out", args.out])


def cmd_cache(args: argparse.Namespace) -> int:
    from workbench.files.atomic import check_folder
    from workbench.inputs.batching import parse_batch_size
    from workbench.inputs.prompts import tokenize_prompts
    from workbench.models.device import resolve_device, resolve_dtype
    from workbench.models.loading import load_model
    from workbench.store.capture import cache_activations
    from workbench.store.layout import HOOKS, STORE_DTYPES

    hooks = [h.strip() for h in args.hooks.split(",") if h.strip()]
    bad = [h for h in hooks if h not in HOOKS]
    if not hooks or bad:
        raise WorkbenchError(
            f"--hooks: unknown hook(s) {', '.join(bad) or '(none)'}", f"choose from {','.join(HOOKS)}, e.g. --hooks q,k"
        )
    if args.dtype not in STORE_DTYPES:
        raise WorkbenchError(f"--dtype: unknown store dtype {args.dtype!r}", f"use {', '.join(STORE_DTYPES)}")
    layers = int_ranges(args.layers, "--layers") if args.layers else None
    batch_size = parse_batch_size(args.batch_size)
    resolve_dtype(args.model_dtype, resolve_device(args.device))
    check_folder(args.out, "--out folder")  # before the model loads, not after
    prompts, dataset, _ = load_inputs(args)
    model = load_model(args.model, device=args.device, dtype=args.model_dtype)
    if prompts is None:
        prompts, dataset, _ = load_inputs(args, model)
    if any("image" in p.meta for p in prompts):
        raise WorkbenchError(
            "the store caches text prompts; these items carry images",
            "give text prompts (--prompts or a text --dataset)",
        )
    tokenized = tokenize_prompts(prompts, model.tokenizer, model.n_ctx, model.vocab_size, prepend_bos=args.prepend_bos)
    source = {
        "dataset": dataset,
        "n_prompts": len(prompts),
        "seed": args.seed,
        "options": dataset_options(args),
        "prompts_file": args.prompts,
        "prepend_bos": bool(args.prepend_bos),
    }
    manifest = cache_activations(
        model,
        tokenized,
        args.out,
        hooks=hooks,
        layers=layers,
        dtype=args.dtype,
        batch_size=batch_size,
        shard_bytes=args.shard_mb * 1e6,
        source=source,
        command=_command(args),
        progress=args.progress,
    )
    run = manifest.get("last_run", {})
    rate = f", {run['tokens'] / run['seconds']:.0f} tokens/s" if run.get("seconds") and run.get("tokens") else ""
    print(f"{len(manifest['shards'])} shards, {manifest['total_bytes'] / 1e6:.1f} MB{rate} -> {args.out}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    c = add_command(
        sub,
        "cache",
        "write activations (q, k, v, z, residual stream) of every real token to an activation store",
        "workbench cache --model smollm2-135m --dataset prose --n-prompts 256 --hooks q,k,v,z,resid_pre,resid_post "
        "--layers 0-29 --dtype float16 --out store/\n"
        "workbench probe entropy,sink --from-store store/ --out entropy.parquet",
        description="Run the model once and write the chosen activations of every real (unpadded) token to "
        "safetensors shards (resumable: re-run the same command after an interruption). "
        "Read them with workbench.store.open(path); pattern probes run from the store with "
        "`workbench probe ... --from-store`.",
    )
    model = c.add_argument_group("model")
    model.add_argument(
        "--model", default="smollm2-135m", help="known name (see `workbench models`), local HF folder or hub id"
    )
    model.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto")
    model.add_argument("--model-dtype", default="float32", help="dtype the model runs in: float32, bfloat16 or float16")
    add_input_args(c)
    add_dataset_options(c.add_argument_group("dataset options"))
    store = c.add_argument_group("store")
    store.add_argument(
        "--hooks",
        default="q,k",
        help="comma list of q,k,v,z,resid_pre,resid_post (q/k/v post-rotary, as the kernel saw them)",
    )
    store.add_argument("--layers", help="layers to store, e.g. 0-29 or 2,17-20 (default all)")
    store.add_argument("--dtype", default="float32", help="dtype on disk: float32 (exact replay), float16 or bfloat16")
    store.add_argument(
        "--shard-mb", type=number(above=0), default=256.0, help="megabytes per shard (whole prompts; default 256)"
    )
    add_batch_size(store)
    store.add_argument("--prepend-bos", action="store_true", help="prepend the BOS token to text prompts")
    store.add_argument("--no-progress", dest="progress", action="store_false")
    c.add_argument("--out", required=True, help="the store's folder (re-running the same command resumes it)")
    c.set_defaults(func=cmd_cache)
