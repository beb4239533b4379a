"""``workbench kv``: head-aware KV-cache policies on a grid of budgets and tasks."""

from __future__ import annotations

import argparse

from workbench.cli.common import add_command, add_model_args, comma_list, float_list, int_list, whole

SCORE_FLAGS = {  # selector -> the flag giving its scores table
    "headkv": "scores",
    "retrieval": "scores",
    "streaming-heads": "scores",
    "razor": "razor_scores",
    "duo": "duo_gates",
}


def _table(path: str | None, model: str, flag: str):
    """The rows of ``model`` in a tidy results table (a Parquet file or a run folder)."""
    if path is None:
        return None
    from pathlib import Path

    from workbench.runs.load import load_results
    from workbench.runs.parquet import read_parquet

    frame = load_results(path) if Path(path).is_dir() else read_parquet(path)[0]
    if "model" in frame.columns and (frame["model"] == model).any():
        frame = frame[frame["model"] == model]
    if "kv_head" in frame.columns:  # a gates table: one row per (layer, KV head)
        frame = frame.rename(columns={"kv_head": "head", "gate": "value"}).assign(metric="gate")
    return frame


def _scores(selector: str, args: argparse.Namespace):
    """The rows a scored selector reads: its flag's table, for this model and the selector's probe."""
    from workbench.kv.grid import SCORED

    flag = SCORE_FLAGS[selector]
    frame = _table(getattr(args, flag), args.model, f"--{flag.replace('_', '-')}")
    probe = SCORED[selector][0]
    if frame is not None and "probe" in frame.columns and probe != "duo":
        frame = frame[frame["probe"] == probe]
    return frame


def spec_from_args(args: argparse.Namespace):
    from workbench.kv.grid import GridSpec
    from workbench.protocol.params import validate_options

    fields = {
        "selectors": comma_list(args.selectors),
        "budgets": float_list(args.budgets, "--budgets"),
        "seeds": args.seeds,
        "tasks": comma_list(args.tasks),
        "protocols": comma_list(args.protocols),
        "lengths": int_list(args.lengths, "--lengths", "1024,2048"),
        "depths": float_list(args.depths, "--depths"),
        "loss_length": args.loss_length,
        "loss_segments": args.loss_segments,
        "loss_tail": args.loss_tail,
        "sink": args.sink,
        "recent": args.recent,
        "razor_capacity": args.razor_capacity,
        "max_new_tokens": args.max_new_tokens,
        "seed": args.seed,
    }
    return validate_options(GridSpec, fields, "kv", "see `workbench kv --help`")


def cmd_kv(args: argparse.Namespace) -> int:
    from workbench.runs.kv import plan_kv, run_kv

    spec = spec_from_args(args)
    scores = {s: _scores(s, args) for s in spec.selectors if s in SCORE_FLAGS}
    plan = plan_kv(args.model, spec, scores, device=args.device, dtype=args.dtype)
    summary = run_kv(plan, args.out)
    from workbench.runs.load import load_results

    table = load_results(args.out)
    acc = table[table.metric.isin(["accuracy", "delta_loss"])]
    print(
        acc.groupby(["metric", "selector", "budget"])
        .agg(value=("value", "mean"), kv_fraction=("kv_fraction", "mean"))
        .to_string()
    )
    print(f"-> {summary['out']} ({summary['ran']} of {summary['units']} units computed)")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    r = add_command(
        sub,
        "kv",
        "KV-cache policies from head scores: niah accuracy and loss vs kv_fraction, resumable run folder",
        "workbench kv --selectors full,streaming,snapkv,retrieval,random --budgets 0.1,0.25 "
        "--scores data/results/cross_model.parquet --lengths 1024,2048 --out runs/kv",
    )
    add_model_args(r)
    r.add_argument(
        "--selectors",
        default="full,streaming,snapkv,random",
        help="full, streaming, snapkv, headkv, retrieval, streaming-heads, razor, duo, random",
    )
    r.add_argument("--budgets", default="0.05,0.1,0.25,0.5", help="cache shares in (0, 1]")
    r.add_argument("--seeds", type=whole(1), default=5, help="random-head draws per budget")
    r.add_argument("--tasks", default="niah,loss")
    r.add_argument("--protocols", default="question-agnostic", help="question-agnostic, question-aware")
    r.add_argument("--lengths", default="1024,2048", help="niah context lengths (tokens)")
    r.add_argument("--depths", default="0,0.25,0.5,0.75,1", help="needle depths in [0, 1]")
    r.add_argument("--loss-length", type=whole(64), default=2048)
    r.add_argument("--loss-tail", type=whole(2), default=256)
    r.add_argument("--loss-segments", type=whole(1), default=4)
    r.add_argument("--sink", type=whole(0), default=4)
    r.add_argument("--recent", type=whole(1), default=256, help="recent tokens of streaming heads")
    r.add_argument("--razor-capacity", type=whole(6), default=256)
    r.add_argument("--max-new-tokens", type=whole(1), default=8)
    r.add_argument("--seed", type=whole(0), default=0)
    r.add_argument("--scores", help="tidy table (Parquet or run folder) with retrieval / streaming head scores")
    r.add_argument("--razor-scores", help="razor probe table (razor_induction, razor_echo)")
    r.add_argument("--duo-gates", help="DuoAttention gates (columns layer, kv_head, gate)")
    r.add_argument("--out", required=True, help="run folder (resumable)")
    r.set_defaults(func=cmd_kv)
