"""Run folders: ``workbench sweep`` (resumable grids), ``workbench query`` (SQL) and ``workbench report`` (HTML)."""
from __future__ import annotations

import argparse

from workbench.cli.common import add_command
from workbench.errors import WorkbenchError


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
    df = query(args.sql, runs, read_only=args.read_only)
    with pd.option_context("display.max_rows", args.max_rows, "display.width", 200):
        print(df.to_string(index=False) if len(df) <= args.max_rows else df)
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from workbench.report import write_report

    out = write_report(args.run, args.out, title=args.title)
    print(f"report -> {out} ({out.stat().st_size / 1e6:.1f} MB)")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    sw = add_command(sub, "sweep", "run a models x datasets x probes grid from a TOML file (resumable)",
                     "workbench sweep data/sweeps/demo.toml --out runs/demo")
    sw.add_argument("config", help="TOML file: models = [...], probes = [...], [datasets.NAME] tables")
    sw.add_argument("--out", required=True, help="run folder (parts/*.parquet); re-running resumes")
    sw.add_argument("--top", type=int, default=3)
    sw.add_argument("--no-progress", dest="progress", action="store_false")
    sw.set_defaults(func=cmd_sweep)

    q = add_command(sub, "query", "SQL over run results with DuckDB (table `results`; runs with your file rights unless --read-only)",
                    'workbench query "select probe, metric, layer, head, value from results order by value desc limit 10" --runs runs/demo')
    q.add_argument("sql")
    q.add_argument("--runs", action="extend", nargs="+", help="run folders, repeatable (default: every sweep folder under ./runs)")
    q.add_argument("--read-only", action="store_true",
                   help="for SQL you did not write: rows are loaded into memory, then file, network and extension access are disabled and the configuration locked")
    q.add_argument("--max-rows", type=int, default=50)
    q.set_defaults(func=cmd_query)

    rp = add_command(sub, "report", "self-contained interactive HTML report of a run",
                     "workbench report runs/demo --out runs/demo/report.html")
    rp.add_argument("run", help="run folder (or a results .parquet)")
    rp.add_argument("--out", required=True)
    rp.add_argument("--title")
    rp.set_defaults(func=cmd_report)
