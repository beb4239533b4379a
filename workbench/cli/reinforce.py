"""``workbench reinforce``: VHR head reinforcement, and how the greedy answers change."""

from __future__ import annotations

import argparse

from workbench.cli.common import (
    add_command,
    add_input_args,
    add_model_args,
    check_parquet_out,
    int_ranges,
    load_inputs,
    number,
    parse_batch_size,
    whole,
    write_table,
)
from workbench.errors import WorkbenchError


def divergence_probe_for(model):
    """The registered divergence probe whose condition fits ``model`` (images for a VLM, a
    context passage for a text model): any item probe declaring ``divergence_metric``."""
    from workbench.protocol.registry import probe_classes

    fits = [cls for cls in probe_classes().values() if getattr(cls, "divergence_metric", None) and cls.accepts(model)]
    if not fits:
        raise WorkbenchError(f"no divergence probe accepts {model.name}", "give the heads to reinforce with --heads")
    return fits[0]()


def cmd_reinforce(args: argparse.Namespace) -> int:
    """VHR: scale the outputs of vision-aware (or context) heads and compare the answers."""
    from workbench.engine.interventions import parse_heads
    from workbench.experiments.vhr import default_vhr_layers, reinforce, vhr_heads
    from workbench.inputs.conditions import check_lengths
    from workbench.models.loading import load_model
    from workbench.protocol.table import tidy
    from workbench.runner import run_probes
    from workbench.runs.parquet import read_parquet

    check_parquet_out(args.out)
    if args.positions not in ("first", "all"):
        raise WorkbenchError(f"--positions must be first or all, got {args.positions!r}", "use --positions first")
    if args.max_new_tokens < 1:
        raise WorkbenchError("--max-new-tokens must be at least 1", "e.g. --max-new-tokens 16")
    batch_size = parse_batch_size(args.batch_size)
    layers = int_ranges(args.layers, "--layers") if args.layers else None
    scores = read_parquet(args.vhd)[0] if args.vhd else None
    items, dataset, root = load_inputs(args)
    if items is None:
        raise WorkbenchError(
            f"--dataset {args.dataset} has no items to reinforce",
            "use items with a context or an image (e.g. --dataset counterfact)",
        )
    model = load_model(args.model, device=args.device, dtype=args.dtype)
    if layers is not None:
        bad = [layer for layer in layers if not 0 <= layer < model.n_layers]
        if bad:
            raise WorkbenchError(
                f"layer {bad[0]} is out of range (0-{model.n_layers - 1})", "pick layers of this model"
            )
    probe = divergence_probe_for(model)
    pairs = probe.pairs(model, items, root)
    check_lengths(pairs, model.n_ctx, args.max_new_tokens)
    if args.heads:
        heads = parse_heads(args.heads, model.n_layers, model.n_heads)
        source = "--heads"
    else:
        if scores is None:
            scores = run_probes(model, items, [probe], batch_size=batch_size, root=root, progress=False).table
            source = f"{probe.name} on the same items"
        else:
            source = str(args.vhd)
        heads = vhr_heads(
            scores,
            layers if layers is not None else default_vhr_layers(model.n_layers),
            probe.divergence_metric,
            probe.attention_metric,
        )
        if not heads:
            raise WorkbenchError(
                "no head is above its layer's median divergence in the chosen layers",
                "choose other --layers or give --heads",
            )
    rows, answers = reinforce(model, pairs, heads, args.alpha, args.positions, args.max_new_tokens, batch_size)
    table = tidy(rows, model=args.model, dataset=dataset)
    write_table(
        table,
        args.out,
        model=model.describe(),
        dataset={"name": dataset, "n_items": len(items)},
        config={
            "alpha": args.alpha,
            "positions": args.positions,
            "heads": [f"{layer}.{h}" for layer, h in heads],
            "heads_from": source,
            "max_new_tokens": args.max_new_tokens,
        },
        answers=answers,
    )
    changed = sum(a["changed"] for a in answers)
    print(f"reinforced {len(heads)} heads x {args.alpha:g} ({args.positions} position) from {source}")
    for a in answers[: args.show]:
        mark = "*" if a["changed"] else " "
        print(f"{mark} {a['item']}: {a['baseline']!r} -> {a['reinforced']!r}")
    print(f"{changed}/{len(answers)} answers changed -> {args.out}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    vr = add_command(
        sub,
        "reinforce",
        "VHR: scale vision-aware (or context) heads by alpha and compare greedy answers",
        "workbench reinforce --dataset counterfact --alpha 2 --out vhr.parquet\n"
        "workbench reinforce --model ./my-llava --prompts items.jsonl --vhd vhd.parquet --out vhr.parquet",
    )
    add_model_args(vr)
    add_input_args(vr, items=True)
    vr.add_argument(
        "--vhd", help="a vhd/context probe table to pick heads from (default: run the probe on the same items)"
    )
    vr.add_argument("--heads", help="reinforce exactly these heads, LAYER.HEAD comma list")
    vr.add_argument("--layers", help="layers to pick heads in, e.g. 2,17-29 (default: VHR's layer 2 + the last 14/32)")
    vr.add_argument("--alpha", type=number(), default=2.0, help="the factor the chosen heads' outputs are scaled by")
    vr.add_argument(
        "--positions",
        default="first",
        choices=["first", "all"],
        help="first (the position of the first generated token) or all",
    )
    vr.add_argument("--max-new-tokens", type=whole(1), default=16)
    vr.add_argument("--batch-size", default="auto", help="items per forward, or auto (a token budget)")
    vr.add_argument("--show", type=whole(0), default=10, help="answers to print")
    vr.add_argument("--out", required=True, help="output .parquet (answer_changed per item; answers in the metadata)")
    vr.set_defaults(func=cmd_reinforce)
