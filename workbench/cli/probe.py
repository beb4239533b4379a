"""``workbench probe`` and the catalogue commands: ``probes``, ``models``, ``datasets``, ``dataset``."""

from __future__ import annotations

import argparse
import time

from workbench.cli.common import (
    add_batch_size,
    add_command,
    add_dataset_options,
    add_input_args,
    add_model_args,
    check_parquet_out,
    dataset_options,
    finish_probe_run,
    load_inputs,
    make_interventions,
    parse_batch_size,
    parse_params,
    whole,
)
from workbench.errors import WorkbenchError


def cmd_probe(args: argparse.Namespace) -> int:
    from workbench.models.loading import load_model
    from workbench.protocol.registry import get_probe, parse_probe_list
    from workbench.protocol.table import tidy
    from workbench.runner import run_probes

    names = parse_probe_list(args.probes)
    params = parse_params(args.param, names)
    probes = [get_probe(n, **params[n]) for n in names]
    batch_size = parse_batch_size(args.batch_size)
    check_parquet_out(args.out)
    if args.from_store:
        return probe_from_store(args, probes, batch_size)
    args.model = args.model or "smollm2-135m"
    if args.n_prompts is not None and args.n_prompts < 1:
        raise WorkbenchError(f"--n-prompts must be at least 1, got {args.n_prompts}", "ask for 1 or more prompts")
    if args.ablation not in ("zero", "mean", "first", "flat"):
        raise WorkbenchError(f"unknown ablation {args.ablation!r}", "use --ablation zero, mean, first or flat")
    prompts, dataset, root = load_inputs(args)  # files and text datasets are checked before loading
    t0 = time.perf_counter()
    model = load_model(args.model, device=args.device, dtype=args.dtype)
    if prompts is None:
        prompts, dataset, root = load_inputs(args, model)
    interventions = make_interventions(args, model)
    t_load = time.perf_counter() - t0
    result = run_probes(
        model,
        prompts,
        probes,
        batch_size=batch_size,
        prepend_bos=args.prepend_bos,
        interventions=interventions,
        order={"ablate,probe": "given,probe", "probe,ablate": "probe,given"}.get(args.order or ""),
        root=root,
        progress=None if args.progress else False,
        attention_path=args.attention_path,
    )
    table = tidy(result.table, model=args.model, dataset=dataset)
    stats = result.stats
    t_run = time.perf_counter() - t0 - t_load
    facts = (
        f"{stats.n_prompts} prompts"
        + (f", {stats.n_tokens} tokens" if stats.n_tokens else "")
        + (f", {stats.n_batches} batches" if stats.n_batches else "")
    )
    finish_probe_run(
        table,
        result,
        probes,
        args.out,
        args.model,
        args.top,
        f"{facts}; load {t_load:.1f}s, run {t_run:.1f}s -> {args.out}",
        model=model.describe(),
        dataset={
            "name": dataset,
            "n_prompts": len(prompts),
            "n_tokens": stats.n_tokens,
            "seed": args.seed,
            "options": dataset_options(args),
            "prepend_bos": bool(args.prepend_bos),
            "tokenization": "token ids as given"
            if prompts[0].tokens is not None
            else "tokenizer defaults" + (" + BOS" if args.prepend_bos else ""),
        },
        config={
            "batch_size": batch_size,
            "device": str(model.device),
            "dtype": str(model.dtype).replace("torch.", ""),
            "ablate": args.ablate,
            "ablation": args.ablation if args.ablate else None,
            "order": args.order,
            "attention_path": args.attention_path,
        },
    )
    return 0


def check_store_model(store, name: str) -> None:
    """A store read with ``--model`` must come from that model and its tokenizer."""
    from transformers import AutoTokenizer

    from workbench.models.loading import model_identity, resolve_source
    from workbench.store.layout import tokenizer_identity

    source, _ = resolve_source(name)
    try:
        tok = tokenizer_identity(AutoTokenizer.from_pretrained(source))
    except Exception as exc:
        raise WorkbenchError(
            f"cannot load the tokenizer of {name}: {type(exc).__name__}: {exc}", "check the model name"
        ) from None
    if tok["sha256"] != store.index.get("tokenizer", {}).get("sha256"):
        raise WorkbenchError(
            f"{store.path} was tokenized by a different tokenizer than {name}'s "
            f"({store.index.get('tokenizer', {}).get('class')})",
            f"cache {name} again: workbench cache --model {name} ... --out NEW_STORE",
        )
    if model_identity(name) != store.index.get("model_identity"):
        raise WorkbenchError(
            f"{store.path} was cached from {store.index['model']}, not from {name}",
            f"drop --model, or cache {name}: workbench cache --model {name} ... --out NEW_STORE",
        )


def probe_from_store(args: argparse.Namespace, probes: list, batch_size) -> int:
    """``workbench probe ... --from-store STORE``: pattern probes on stored queries and keys, no model weights."""
    from workbench.models.device import resolve_device, resolve_dtype
    from workbench.protocol.table import tidy
    from workbench.store import open_store
    from workbench.store.replay import check_replayable, run_probes_from_store

    given = [
        flag
        for flag, v in (
            ("--prompts", args.prompts),
            ("--dataset", args.dataset),
            ("--images", args.images),
            ("--ablate", args.ablate),
        )
        if v
    ]
    if given:
        raise WorkbenchError(
            f"--from-store runs on the store's own prompts and activations; {', '.join(given)} cannot apply",
            "drop " + ", ".join(given) + " (or run live with --model)",
        )
    device = resolve_device(args.device)
    store = open_store(args.from_store)
    if args.dtype is not None and str(resolve_dtype(args.dtype, device)).removeprefix("torch.") != store.index["dtype"]:
        raise WorkbenchError(  # the activations are read as stored: a --dtype that differs would be ignored
            f"--dtype {args.dtype}: the store {store.path} holds {store.index['dtype']} activations, read as stored",
            f"drop --dtype, or write a {args.dtype} store: workbench cache --dtype {args.dtype} ...",
        )
    check_replayable(store, probes)
    if args.model:
        check_store_model(store, args.model)
    t0 = time.perf_counter()
    result = run_probes_from_store(
        store,
        probes,
        batch_size=batch_size,
        device=device,
        n_prompts=args.n_prompts,
        progress=None if args.progress else False,
    )
    dataset = str(store.index.get("source", {}).get("dataset") or "store")
    table = tidy(result.table, model=store.index["model"], dataset=dataset)
    stats = result.stats
    facts = (
        f"{stats.n_prompts} prompts, {stats.n_tokens} tokens from {store.path} ({store.index['dtype']}); "
        f"run {time.perf_counter() - t0:.1f}s"
    )
    finish_probe_run(
        table,
        result,
        probes,
        args.out,
        store.index["model"],
        args.top,
        f"{facts} -> {args.out}",
        model={**store.index.get("model_info", {}), "from_store": str(store.path)},
        dataset={
            **store.index.get("source", {}),
            "name": dataset,
            "n_prompts": stats.n_prompts,
            "n_tokens": stats.n_tokens,
        },
        config={
            "batch_size": batch_size,
            "device": str(device),
            "store": str(store.path),
            "store_dtype": store.index["dtype"],
            "layers": store.layers,
        },
    )
    return 0


def cmd_probes(args: argparse.Namespace) -> int:
    """Every registered probe: its kind and description, each metric with the first sentence of
    its definition (as the probe's package ships it), each parameter with its default and
    description, and the distribution a plugin's probe comes from."""
    from workbench.protocol.registry import BUILTIN_DISTRIBUTION, broken_probes, origin, probe_classes
    from workbench.report.definitions import summary

    for name, cls in probe_classes().items():
        dist, version = origin(name)
        by = "" if dist in (BUILTIN_DISTRIBUTION, "?") else f" from {dist} {version}"
        print(f"{name} ({cls.kind}){by}: {cls.description}")
        width = max(len(m) for m in cls.metrics)
        print("  metrics:")
        for metric in cls.metrics:
            print(f"    {metric:{width}s}  {summary(metric)[0]}")
        fields = cls.Params.model_fields
        if fields:
            shown = {k: f"{k}={f.get_default(call_default_factory=True)!r}" for k, f in fields.items()}
            pad = max(len(v) for v in shown.values())
            print("  params:")
            for k, f in fields.items():
                print(f"    {shown[k]:{pad}s}  {f.description or ''}".rstrip())
    for name, why in broken_probes().items():
        print(f"{name} (cannot be loaded) {why}")
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    from workbench.models.loading import list_models

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
    from workbench.inputs.prompts import write_prompts
    from workbench.runs.parquet import check_writable

    args.prompts, args.dataset = None, args.name
    check_writable(args.out)
    prompts, _, _ = load_inputs(args)
    if prompts is None:
        from workbench.models.loading import load_model

        prompts, _, _ = load_inputs(args, load_model(args.model))
    write_prompts(prompts, args.out)
    print(f"{len(prompts)} prompts -> {args.out}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = add_command(
        sub,
        "probe",
        "run probes over prompts or items and write one tidy Parquet table",
        "workbench probe entropy,sink --model smollm2-135m --dataset prose --n-prompts 64 --out runs/prose.parquet\n"
        "workbench probe retrieval --dataset niah --context-len 1000 --out retrieval.parquet\n"
        "workbench probe context --dataset counterfact --out ctx.parquet\n"
        "workbench probe entropy,sink --from-store store/ --out entropy.parquet",
    )
    p.add_argument("probes", help="comma list of probes, e.g. entropy,sink (see `workbench probes`)")
    add_model_args(p)
    add_input_args(p, items=True)
    add_dataset_options(p.add_argument_group("dataset options"))
    run = p.add_argument_group("run")
    add_batch_size(run)
    run.add_argument("--prepend-bos", action="store_true", help="prepend the BOS token to text prompts")
    run.add_argument("--ablate", help="heads to ablate during the run, LAYER.HEAD comma list, e.g. 12.3,14.0")
    run.add_argument(
        "--order",
        choices=["ablate,probe", "probe,ablate"],
        help="when --ablate and an intervening probe (zerotuning, ...) edit the same point of the same heads: "
        "which edit applies first (without it such a run is refused)",
    )
    run.add_argument(
        "--ablation",
        default="zero",
        help="how to ablate: zero, mean (over prose), first (attention to the first token) "
        "or flat (uniform attention over the visible prefix, AttentionInfluence)",
    )
    run.add_argument(
        "--param",
        action="append",
        default=[],
        metavar="PROBE.NAME=VALUE",
        help="probe parameter, e.g. sink.epsilon=0.2",
    )
    run.add_argument(
        "--attention-path",
        choices=("auto", "chunks"),
        default="auto",
        help="pattern probes: auto (statistics from the attention kernel's log-sum-exp where they suffice; "
        "the default) or chunks (full pattern rows for every probe: the exact reference, slower at long T)",
    )
    run.add_argument("--no-progress", dest="progress", action="store_false")
    p.add_argument("--top", type=whole(0), default=5, help="heads to print per metric")
    p.add_argument(
        "--from-store",
        metavar="STORE",
        help="run pattern probes on an activation store (`workbench cache`) instead of the model",
    )
    p.add_argument("--out", required=True, help="output .parquet file (a path or an fsspec URL: s3://, gs://, file://)")
    p.set_defaults(
        func=cmd_probe, model=None
    )  # None: smollm2-135m live; with --from-store, the store's model is checked

    add_command(sub, "probes", "list probes and their metrics", "workbench probes").set_defaults(func=cmd_probes)
    add_command(sub, "models", "list known models and what is installed", "workbench models").set_defaults(
        func=cmd_models
    )
    add_command(sub, "datasets", "list shipped and generated datasets", "workbench datasets").set_defaults(
        func=cmd_datasets
    )

    d = add_command(
        sub,
        "dataset",
        "write a shipped or generated dataset as prompts JSONL (read back with --prompts)",
        "workbench dataset niah --context-len 2000 --depths 0,0.5,1 --n-prompts 12 --out niah.jsonl",
    )
    d.add_argument("name", help="dataset name (see `workbench datasets`)")
    d.add_argument("--n-prompts", type=whole(1))
    d.add_argument("--seed", type=whole(0), default=0)
    d.add_argument(
        "--model", default="smollm2-135m", help="token-space datasets (niah, repeated-random) use its tokenizer"
    )
    add_dataset_options(d.add_argument_group("dataset options"))
    d.add_argument("--out", required=True)
    d.set_defaults(func=cmd_dataset)
