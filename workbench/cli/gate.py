"""``workbench gate``: learned head gates (causal head gating) on a next-token task, roles and checks."""

from __future__ import annotations

import argparse

from workbench.cli.common import add_command, add_model_args, comma_list


def spec_from_args(args: argparse.Namespace):
    from workbench.protocol.params import validate_options
    from workbench.runs.gate import GateRunSpec

    fields = {
        "task": args.task,
        "n": args.n,
        "task_seed": args.task_seed,
        "context_len": args.context_len,
        "stages": comma_list(args.stages),
        "updates": args.updates,
        "reg_updates": args.reg_updates,
        "n_inits": args.inits,
        "batch_size": args.batch_size,
        "l1_weight": args.l1_weight,
        "l1_clamp": args.l1_clamp,
        "lr": args.lr,
        "lr_reg": args.lr_reg,
        "seed": args.seed,
        "padding_side": args.padding,
        "threshold": args.threshold,
        "check": not args.no_check,
        "n_random": args.random,
        "patching": not args.no_patching,
        "top_k": args.top_k,
        "check_ks": [int(x) for x in comma_list(args.check_ks)]
        if args.check_ks.replace(",", "").isdigit()
        else args.check_ks,
    }
    return validate_options(GateRunSpec, fields, "gate", "see `workbench gate --help`")


def cmd_gate(args: argparse.Namespace) -> int:
    from workbench.runs.gate import plan_gate, run_gate
    from workbench.runs.load import load_results

    spec = spec_from_args(args)
    plan = plan_gate(args.model, spec, device=args.device, dtype=args.dtype)
    summary = run_gate(plan, args.out)
    table = load_results(args.out)
    roles = table[table.metric == "role_agreement"]
    if len(roles):
        print("roles (consensus over initialisations):", roles.role.value_counts().to_dict())
    final = table[table.metric == "final_nll"]
    for r in final.itertuples():
        print(f"final nll, stage {r.stage}: {r.value:.4f}")
    checks = table[table.metric == "check_delta_nll"]
    if len(checks):
        print(checks.groupby(["closed", "n_closed"]).value.agg(["mean", "std", "count"]).to_string())
    print(f"-> {summary['out']} ({summary['ran']} of {summary['units']} units computed)")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    r = add_command(
        sub,
        "gate",
        "learned head gates (causal head gating): facilitating, irrelevant and interfering heads on a task",
        "workbench gate --task ioi --n 64 --inits 4 --out runs/gate-ioi\n"
        "workbench gate --task my_task.jsonl --updates 200 --reg-updates 200 --out runs/gate-mine",
    )
    add_model_args(r)
    r.add_argument("--task", default="ioi", help='ioi, niah, aba, or a JSONL file of {"text", "target"}')
    r.add_argument("--n", type=int, default=64, help="examples of a built-in task")
    r.add_argument("--task-seed", type=int, default=0)
    r.add_argument("--context-len", type=int, default=256, help="niah context length (tokens)")
    r.add_argument("--stages", default="none,positive,negative", help="none, positive (G+), negative (G-)")
    r.add_argument("--updates", type=int, default=500, help="updates of stage none (paper: 500)")
    r.add_argument("--reg-updates", type=int, default=500, help="updates of each regularised stage (paper: 500)")
    r.add_argument("--inits", type=int, default=4, help="random initialisations fit together")
    r.add_argument("--batch-size", type=int, default=32)
    r.add_argument("--l1-weight", type=float, default=0.1, help="lambda (paper: 0.1)")
    r.add_argument("--l1-clamp", type=float, default=4.0, help="logit clamp in the L1 term (paper: 4)")
    r.add_argument("--lr", type=float, default=1.0, help="Adam learning rate, stage none (paper: 1.0)")
    r.add_argument("--lr-reg", type=float, default=1.0, help="Adam learning rate, regularised stages (paper: 1.0)")
    r.add_argument("--seed", type=int, default=0, help="initial gates and data order")
    r.add_argument("--padding", default="right", help="right or left (the gates do not depend on it)")
    r.add_argument("--threshold", type=float, default=0.5, help="a gate at or above it is open")
    r.add_argument("--random", type=int, default=5, help="random-head draws of the closing check")
    r.add_argument("--top-k", type=int, default=10, help="heads compared with path patching (IOI)")
    r.add_argument("--check-ks", default="5,10,20", help="graded check: the k strongest facilitating heads vs k random")
    r.add_argument("--no-check", action="store_true", help="skip closing heads by role")
    r.add_argument("--no-patching", action="store_true", help="IOI: skip the path-patching comparison")
    r.add_argument("--out", required=True, help="run folder (resumable)")
    r.set_defaults(func=cmd_gate)
