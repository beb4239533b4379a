"""The ``workbench`` command line, one module per command group.

==========================  ==================================================================
module                      commands
==========================  ==================================================================
``cli.probe``               ``probe``, ``probes``, ``models``, ``datasets``, ``dataset``
``cli.circuits``            ``patch``, ``task``, ``circuit``
``cli.runs``                ``sweep``, ``query``, ``report``
``cli.store``               ``cache``
``cli.reinforce``           ``reinforce``
``cli.retrieval_ablation``  ``retrieval-ablation``
``cli.kv``                  ``kv``
``cli.gate``                ``gate``
``cli.show``                ``show``
``cli.scaffold``            ``new-probe``
==========================  ==================================================================

Each module registers its own subcommands and flags next to its handlers (``register(sub)``);
shared argument groups live in :mod:`workbench.cli.common`. Bad input never produces a
traceback: every :class:`~workbench.errors.WorkbenchError` becomes one ``error:`` line (plus a
``fix:`` line) on stderr and exit status 2. Inputs are validated before the model is loaded
where possible, and results are written atomically, so a failed run leaves no file.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import warnings
from typing import Sequence

from workbench.cli import circuits, gate, kv, probe, reinforce, retrieval_ablation, runs, scaffold, show, store
from workbench.cli.common import Parser, UsageError, check_out
from workbench.errors import Interrupted, WorkbenchError, WorkbenchWarning

COMMAND_GROUPS = (probe, circuits, runs, store, reinforce, retrieval_ablation, kv, gate, show, scaffold)
COMMANDS: dict[str, argparse.ArgumentParser] = {}


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="workbench",
        description="What does each attention head do? Per-head metrics in one tidy table.",
        epilog="`workbench COMMAND --help` shows each command's flags and an example.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=Parser)
    for group in COMMAND_GROUPS:
        group.register(sub)
    COMMANDS.update(sub.choices)
    return parser


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """Workbench warnings as one ``warning:`` line; library warnings stay out of the user's way
    unless asked for (``WORKBENCH_DEBUG=1``)."""
    if issubclass(category, WorkbenchWarning):
        print(f"warning: {message}", file=sys.stderr)
    elif os.environ.get("WORKBENCH_DEBUG"):
        print(f"warning ({category.__name__}, {os.path.basename(filename)}:{lineno}): {message}", file=sys.stderr)


def _print_error(message: str, fix: str | None) -> None:
    """One ``error:`` line and its ``fix:`` line on stderr."""
    print(f"error: {message}", file=sys.stderr)
    if fix:
        print(f"  fix: {fix}", file=sys.stderr)


NEGATIVE_LIST = re.compile(r"^-\d+(,\s*-?\d+)*$")


def join_negative_values(argv: Sequence[str]) -> list[str]:
    """``--queries -1,40`` -> ``--queries=-1,40``: argparse takes a value starting with ``-``
    for an option unless it is one plain negative number, so a list of rows counted from the end
    would fail with "expected one argument". No option of ours looks like ``-1,40``."""
    out: list[str] = []
    for arg in argv:
        prev = out[-1] if out else ""
        if NEGATIVE_LIST.match(arg) and prev.startswith("--") and "=" not in prev:
            out[-1] = f"{prev}={arg}"
        else:
            out.append(arg)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(join_negative_values(list(argv if argv is not None else sys.argv[1:])))
    except UsageError as exc:
        command = next((a for a in (argv if argv is not None else sys.argv[1:]) if not a.startswith("-")), "")
        print(f"error: {exc}", file=sys.stderr)
        print(f"  fix: see `workbench {command + ' ' if command in COMMANDS else ''}--help`", file=sys.stderr)
        return 2
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("default")
            warnings.showwarning = _show_warning
            if getattr(args, "out", None):
                check_out(args.command, args.out)
            return int(args.func(args) or 0)
    except (WorkbenchError, Interrupted) as exc:  # bad input; or Ctrl-C in work that keeps what it finished
        _print_error(exc.message, exc.fix)
        return 130 if isinstance(exc, Interrupted) else 2
    except KeyboardInterrupt:
        print("interrupted; no results written", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader went away (`workbench probes | head`): not an error of ours
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 0
    except Exception as exc:  # a bug, not bad input: still one line unless asked for more
        if os.environ.get("WORKBENCH_DEBUG"):
            raise
        print(f"error: internal error: {type(exc).__name__}: {exc}", file=sys.stderr)
        print("  fix: please report it; set WORKBENCH_DEBUG=1 for the traceback", file=sys.stderr)
        return 1


__all__ = ["build_parser", "main"]
