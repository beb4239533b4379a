"""``workbench retrieval-ablation``: Wu et al.'s causal test of retrieval heads."""

from __future__ import annotations

import argparse

from workbench.cli.common import add_command, add_model_args, dataset_options, parse_batch_size, whole, write_table
from workbench.errors import WorkbenchError


def cmd_retrieval_ablation(args: argparse.Namespace) -> int:
    from workbench.datasets import make_dataset
    from workbench.experiments.retrieval_heads import retrieval_ablation
    from workbench.inputs.prompts import tokenize_prompts
    from workbench.models.loading import load_model
    from workbench.protocol.table import COLUMNS
    from workbench.runs.parquet import check_writable

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
        raise WorkbenchError(
            f"--k {max(ks)} exceeds the model's {model.n_layers * model.n_heads} heads", "use smaller k"
        )

    def niah(seed):
        ps = make_dataset(
            "niah", n_prompts=args.n_prompts, seed=seed, tokenizer=model.tokenizer, n_ctx=model.n_ctx, **opts
        )
        return tokenize_prompts(ps, model.tokenizer, model.n_ctx, model.vocab_size)

    scores, table = retrieval_ablation(
        model,
        niah(args.seed),
        niah(args.seed + 1000),
        ks=ks,
        draws=args.draws,
        mode=args.ablation,
        seed=args.seed,
        batch_size=int(parse_batch_size(args.batch_size)) if args.batch_size != "auto" else 4,
    )
    table["model"], table["dataset"] = args.model, "niah"
    table = table[COLUMNS + ["condition", "k", "draw", "heads"]]
    meta = {
        "model": model.describe(),
        "dataset": {"name": "niah", "n_prompts": args.n_prompts, "seed": args.seed, "options": opts},
        "config": {"k": ks, "draws": args.draws, "ablation": args.ablation},
    }
    write_table(table, args.out, **meta)
    scores_out = str(args.out).removesuffix(".parquet") + ".scores.parquet"
    write_table(scores.assign(model=args.model, dataset="niah")[COLUMNS], scores_out, **meta)
    summary = table.groupby(["condition", "k"]).value.mean().reset_index()
    print(summary.to_string(index=False))
    print(f"-> {args.out} (retrieval scores per head: {scores_out})")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    r = add_command(
        sub,
        "retrieval-ablation",
        "needle accuracy with the top-k retrieval heads vs k random heads ablated",
        "workbench retrieval-ablation --n-prompts 20 --context-len 1000,2000 --k 5,10,20 --draws 3 "
        "--out ablation.parquet",
    )
    add_model_args(r)
    r.add_argument(
        "--n-prompts",
        type=whole(1),
        default=20,
        help="niah prompts for detection, and as many (other seed) for evaluation",
    )
    r.add_argument("--context-len", default="1000,2000")
    r.add_argument("--depths")
    r.add_argument("--k", default="5,10,20", help="numbers of heads to ablate")
    r.add_argument("--draws", type=whole(1), default=3, help="random draws per k")
    r.add_argument("--ablation", default="zero", choices=["zero", "first", "flat"])
    r.add_argument("--seed", type=whole(0), default=0)
    r.add_argument("--batch-size", default="4")
    r.add_argument("--out", required=True)
    r.set_defaults(func=cmd_retrieval_ablation)
