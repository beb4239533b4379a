"""``workbench new-probe NAME``: write a working probe package (a plugin) to start from.

The package is what ``docs/plugins.md`` describes, filled in: ``pyproject.toml`` with the
``workbench.probes`` entry point, a module with a small pattern probe (mean attention to the token
``offset`` positions back: a name, a metric, typed ``Params``, ``metric_info``), the metric's
definition (``metrics.md``, shipped as package data), a README, and a test that checks the probe
against its definition on a padded batch with :mod:`workbench.testing`. It passes its own test as
written (``pytest`` in the new folder), and ``pip install`` makes ``workbench probe NAME``,
sweeps, reports and queries take it.

The files are templates shipped with the workbench (``workbench/cli/templates/new_probe``, package
data); ``{{key}}`` marks what is filled in, and ``PACKAGE`` / ``NAME`` in a file's path.
"""

from __future__ import annotations

import argparse
import importlib.metadata as md
import importlib.resources
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator

from workbench.cli.common import add_command
from workbench.errors import WorkbenchError

TEMPLATES = ("templates", "new_probe")
NAME_RE = re.compile(r"[a-z][a-z0-9_]*\Z")
MAX_NAME = 40


def _registered() -> dict[str, tuple[str, tuple[str, ...]]]:
    """Every registered probe name -> (its distribution, its metrics)."""
    from workbench.protocol import registry

    out = {name: (registry.origin(name)[0], tuple(cls.metrics)) for name, cls in registry.probe_classes().items()}
    for name in registry.broken_probes():
        out.setdefault(name, (registry.origin(name)[0], ()))
    return out


def check_name(name: str) -> None:
    """A probe name ``new-probe`` accepts: a lowercase Python identifier that no installed probe
    uses as its name and no built-in probe uses as a metric name."""
    from workbench.protocol.registry import BUILTIN_DISTRIBUTION

    example = "e.g. `workbench new-probe prev_offset`"
    if not NAME_RE.match(name) or len(name) > MAX_NAME:
        raise WorkbenchError(
            f"probe name {name!r} is not a lowercase Python identifier of at most {MAX_NAME} characters "
            "(a letter, then letters, digits or _)",
            f"it names the probe, its metric and its package workbench_probe_NAME: {example}",
        )
    taken = _registered()
    if name in taken:
        dist = taken[name][0]
        whose = "a built-in probe" if dist == BUILTIN_DISTRIBUTION else f"a probe already installed (from {dist})"
        raise WorkbenchError(
            f"{name!r} is the name of {whose}", f"choose another name (see `workbench probes`); {example}"
        )
    builtin_metrics = {m: p for p, (dist, ms) in taken.items() if dist == BUILTIN_DISTRIBUTION for m in ms}
    if name in builtin_metrics:
        raise WorkbenchError(
            f"{name!r} is a metric of the built-in probe {builtin_metrics[name]!r} "
            "(the new probe's metric takes the probe's name)",
            f"choose another name; {example}",
        )


def _fields(name: str) -> dict[str, str]:
    """What fills the templates' ``{{key}}`` marks."""
    try:
        version = md.version("attention-head-workbench")
        requirement = ">=" + ".".join(version.split(".")[:2])
    except md.PackageNotFoundError:  # run from a checkout that is not installed
        requirement = ""
    return {
        "name": name,
        "metric": name,
        "package": f"workbench_probe_{name}",
        "dist": "workbench-probe-" + name.replace("_", "-"),
        "cls": "".join(part.capitalize() for part in name.split("_") if part) + "Probe",
        "requirement": requirement,
    }


def _templates(root: Any, prefix: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...], str]]:
    """(relative path parts, text) of every ``*.tmpl`` under ``root`` (a package-data folder)."""
    for entry in sorted(root.iterdir(), key=lambda e: e.name):
        if entry.is_dir():
            yield from _templates(entry, (*prefix, entry.name))
        elif entry.name.endswith(".tmpl"):
            yield (*prefix, entry.name.removesuffix(".tmpl")), entry.read_text(encoding="utf-8")


def render(name: str) -> dict[str, str]:
    """The new package's files (relative path -> text) for probe ``name``."""
    fields = _fields(name)
    root = importlib.resources.files("workbench.cli").joinpath(*TEMPLATES)
    files = {}
    for parts, text in _templates(root):
        path = "/".join(fields["package"] if p == "PACKAGE" else p.replace("NAME", name) for p in parts)
        for key, value in fields.items():
            text = text.replace("{{" + key + "}}", value)
        left = re.search(r"\{\{\w+\}\}", text)
        assert left is None, f"template {'/'.join(parts)} has an unknown mark {left.group(0)}"
        files[path] = text
    if not files:
        raise WorkbenchError(
            "the new-probe templates are missing from the installed workbench", "reinstall attention-head-workbench"
        )
    return files


def _check_out(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise WorkbenchError(f"{out} is a file, not a folder", "give --out a new (or empty) folder")
    if out.is_dir() and any(out.iterdir()):
        raise WorkbenchError(
            f"{out} exists and is not empty; new-probe writes a whole package and overwrites nothing",
            "give --out a new (or empty) folder",
        )
    for parent in out.parents:
        if parent.exists():
            if not parent.is_dir():
                raise WorkbenchError(f"{parent} is a file, not a folder", "give --out a path under a folder")
            break


def write_package(name: str, out: str | os.PathLike | None = None) -> tuple[Path, list[str]]:
    """Write the package for probe ``name`` into ``out`` (default ``./workbench-probe-NAME``), which
    must not exist or be empty; the folder and its files. Written beside it and renamed into place,
    so a failure leaves nothing half-written."""
    check_name(name)
    files = render(name)
    target = Path(out) if out is not None else Path("workbench-probe-" + name.replace("_", "-"))
    target = target.expanduser().absolute()
    _check_out(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        for rel, text in files.items():
            path = tmp / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text, encoding="utf-8")
        os.replace(tmp, target)  # onto a missing or an empty folder
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target, sorted(files)


def cmd_new_probe(args: argparse.Namespace) -> int:
    """Write the probe package and say what to do next."""
    folder, files = write_package(args.name, args.out)
    fields = _fields(args.name)
    print(f"wrote {folder}: probe {args.name!r} (package {fields['package']}, distribution {fields['dist']})")
    for rel in files:
        print(f"  {rel}")
    print("next:")
    print(f"  cd {folder} && pytest      # the probe against its definition (needs pytest)")
    print(f"  pip install -e {folder}    # then `workbench probes` lists {args.name}")
    print(f"  workbench probe {args.name} --model tiny-llama --n-prompts 8 --out {args.name}.parquet")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = add_command(
        sub,
        "new-probe",
        "write a working probe package (plugin) to start from: probe, definition, test",
        "workbench new-probe prev_offset --out my-probe\ncd my-probe && pytest && pip install -e .",
        description=(
            "Write a probe package: pyproject.toml with the workbench.probes entry point, a pattern probe "
            "(mean attention to the token `offset` positions back), its metric's definition, a README and a "
            "test that checks the probe against its definition with workbench.testing."
        ),
    )
    p.add_argument("name", help="the probe's name: a lowercase Python identifier (also its metric's name)")
    p.add_argument("--out", help="the folder to write, new or empty (default ./workbench-probe-NAME)")
    p.set_defaults(func=cmd_new_probe)
