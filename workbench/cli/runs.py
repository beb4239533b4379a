"""Run folders: ``workbench sweep`` (resumable grids), ``workbench query`` (SQL) and ``workbench report`` (HTML).

A run folder may be a path or an fsspec URL (``s3://bucket/runs/a``, ``file:///shared/runs/a``)
in all three; so may the report's ``--out``."""

from __future__ import annotations

import argparse
import sys

from workbench.cli.common import add_command, check_out, number, whole
from workbench.errors import WorkbenchError


def cmd_sweep(args: argparse.Namespace) -> int:
    from workbench.protocol.table import top_heads
    from workbench.runs.load import load_results
    from workbench.runs.sweep import run_sweep

    summary = run_sweep(
        args.config,
        args.out,
        progress=args.progress,
        log=lambda line: print(line, file=sys.stderr),
        executor=args.executor,
        address=args.address,
    )
    table = load_results(args.out)
    print(
        f"{summary['units']} units: {summary['ran']} run now, {summary['skipped']} already done -> {summary['parts']}"
    )
    top = top_heads(table, args.top)
    print(top[["model", "dataset", "probe", "metric", "layer", "head", "value", "n"]].to_string(index=False))
    return 0


def cmd_query(args: argparse.Namespace) -> int:
    import pandas as pd

    from workbench.runs.query import query

    runs = args.runs
    if not runs:
        from pathlib import Path

        root = Path("runs")
        runs = sorted(str(d) for d in root.iterdir() if (d / "parts").is_dir()) if root.is_dir() else []
        if not runs:
            raise WorkbenchError("no run folders given and none under ./runs", "pass --runs runs/NAME ...")
    df = query(args.sql, runs, read_only=args.read_only, timeout=args.timeout, memory_limit=args.memory_limit)
    with pd.option_context("display.max_rows", args.max_rows, "display.width", 200):
        print(df.to_string(index=False) if len(df) <= args.max_rows else df)
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from workbench.files import targets
    from workbench.report.atlas import parse_thresholds, roles_with
    from workbench.report.build import write_report
    from workbench.report.config import load_report_config

    cfg = (
        load_report_config(args.config)
        if args.config
        else {"runs": [], "labels": None, "title": None, "out": None, "thresholds": {}}
    )
    runs = list(args.runs) or cfg["runs"]
    if not runs:
        raise WorkbenchError(
            "no run given",
            "name one or more run folders (workbench report runs/a runs/b --out r.html) or --config report.toml",
        )
    out = args.out or cfg["out"]
    if not out:
        raise WorkbenchError("no output file given", "pass --out report.html (or out = ... in the --config file)")
    thresholds = {**cfg["thresholds"], **parse_thresholds(args.roles)}
    roles_with(thresholds)
    labels = [x.strip() for x in args.labels.split(",")] if args.labels else cfg["labels"]
    if out != args.out:
        check_out("report", out)  # --out was checked before the command ran; out = ... in the config is checked here
    path = write_report(runs, out, title=args.title or cfg["title"], thresholds=thresholds, labels=labels)
    print(f"report -> {path} ({targets.size(path) / 1e6:.1f} MB)")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    sw = add_command(
        sub,
        "sweep",
        "run a models x datasets x probes grid from a TOML file (resumable)",
        "workbench sweep data/sweeps/demo.toml --out runs/demo\n"
        "workbench sweep big.toml --out /shared/runs/big --executor ray --address 10.0.0.1:6379\n"
        "workbench sweep big.toml --out s3://bucket/runs/big --executor ray   # pip install s3fs",
    )
    sw.add_argument("config", help="TOML file: models = [...], probes = [...], [datasets.NAME] tables")
    sw.add_argument(
        "--out",
        required=True,
        help="run folder (parts/*.parquet, views.parquet): a path or an fsspec URL (s3://, gs://, file://); "
        "re-running resumes",
    )
    sw.add_argument(
        "--executor",
        default="local",
        help="who runs the (model, dataset) groups: local (this process) "
        "or ray (tasks with the config's [executor] resources; pip install 'attention-head-workbench[ray]')",
    )
    sw.add_argument(
        "--address",
        help="with --executor ray: the cluster's address, host:port (default RAY_ADDRESS, else a local Ray instance)",
    )
    sw.add_argument("--top", type=whole(0), default=3)
    sw.add_argument("--no-progress", dest="progress", action="store_false")
    sw.set_defaults(func=cmd_sweep)

    q = add_command(
        sub,
        "query",
        "SQL over run results with DuckDB (table `results`; runs with your file rights unless --read-only)",
        'workbench query "select probe, metric, layer, head, value from results order by value desc limit 10" '
        "--runs runs/demo",
    )
    q.add_argument("sql")
    q.add_argument(
        "--runs",
        action="extend",
        nargs="+",
        help="run folders (paths or fsspec URLs), repeatable (default: every sweep folder under ./runs)",
    )
    q.add_argument(
        "--read-only",
        action="store_true",
        help="for SQL you did not write: rows are loaded into memory, "
        "then file, network and extension access are disabled and the configuration locked",
    )
    q.add_argument(
        "--timeout",
        type=number(above=0),
        help="stop the query after SECONDS (default: 60 with --read-only, none otherwise)",
    )
    q.add_argument(
        "--memory-limit",
        help="DuckDB's memory limit for the query, e.g. 4GB (default: 1GB with --read-only, DuckDB's own otherwise)",
    )
    q.add_argument("--max-rows", type=whole(1), default=50)
    q.set_defaults(func=cmd_query)

    rp = add_command(
        sub,
        "report",
        "self-contained HTML report of one run, or a side-by-side comparison of several",
        "workbench report runs/demo --out runs/demo/report.html\n"
        "workbench report runs/smollm2 runs/gemma --out compare.html --roles sink=0.6,induction=0.4,echo=off",
    )
    rp.add_argument(
        "runs",
        nargs="*",
        metavar="RUN",
        help="run folders (or results .parquet, or `workbench circuit` folders; paths or fsspec URLs); "
        "several = a comparison",
    )
    rp.add_argument("--out", help="the HTML file to write (a path or an fsspec URL)")
    rp.add_argument("--title")
    rp.add_argument(
        "--roles",
        help="head-atlas thresholds, ROLE=VALUE or METRIC=VALUE pairs (ROLE=off hides a role), "
        "e.g. sink=0.6,retrieval=0.2",
    )
    rp.add_argument("--labels", help="one name per run, comma-separated (default: the folder names)")
    rp.add_argument(
        "--config", help="TOML: runs = [...], optional labels = [...], title, out, and a [roles] table of thresholds"
    )
    rp.set_defaults(func=cmd_report)
