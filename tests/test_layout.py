"""The house: the package's folders are its layers, and imports only point down.

The import graph is read from the source (every ``import`` statement, those inside functions and
under ``TYPE_CHECKING`` included), so a cycle closed by a function-level import fails here as
surely as a top-level one. Layers, bottom to top (a module may import its own layer and the ones
below it, never above)::

    errors, compat < files < inputs < models < protocol < datasets, engine
      < runner, probes, circuits < store, experiments < runs < report < cli

``protocol`` (what probes, interventions and the runner agree on) sits below the engine, the run
folders and the report; a plugin author reads it without the rest of the house.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("workbench", "probes", "circuits")

# Rank of each layer: an import may go to the same or a lower rank only.
LAYERS = {
    "errors": 0,
    "compat": 0,
    "files": 1,
    "inputs": 2,
    "models": 3,
    "protocol": 4,
    "datasets": 5,
    "engine": 5,
    "runner": 6,
    "probes": 6,
    "circuits": 6,
    "kv": 6,
    "testing": 6,
    "store": 7,
    "experiments": 7,
    "runs": 8,
    "report": 9,
    "cli": 10,
    "__main__": 10,
}


def modules() -> dict[str, Path]:
    out = {}
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            out[name] = path
    return out


def layer(module: str) -> str:
    parts = module.split(".")
    if parts[0] != "workbench":
        return parts[0]
    return parts[1] if len(parts) > 1 else "workbench"


def _resolve(name: str, known: dict[str, Path]) -> str | None:
    """The longest known module prefix of ``name`` (``workbench.engine.call.AttentionCall`` ->
    ``workbench.engine.call``)."""
    while name and name not in known:
        name = name.rpartition(".")[0]
    return name or None


def imports(known: dict[str, Path]) -> dict[str, dict[str, int]]:
    """module -> {imported module: line} for every import of a project module, anywhere in it."""
    graph: dict[str, dict[str, int]] = defaultdict(dict)
    for name, path in known.items():
        is_pkg = path.name == "__init__.py"
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    here = name.split(".") if is_pkg else name.split(".")[:-1]
                    here = here[: len(here) - (node.level - 1)]
                    base = ".".join(here + ([base] if base else []))
                targets = [f"{base}.{a.name}" for a in node.names]
            for t in targets:
                mod = _resolve(t, known)
                if mod and mod != name:
                    graph[name].setdefault(mod, node.lineno)
    return graph


def _pop_component(root: str, stack: list[str], on: set[str]) -> list[str]:
    """Tarjan's step at a component's root: pop the stack down to ``root``, the component's modules."""
    comp = []
    while True:
        w = stack.pop()
        on.discard(w)
        comp.append(w)
        if w == root:
            break
    return comp


def cycles(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph.get(v, {}):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = _pop_component(v, stack, on)
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in list(graph):
        if v not in index:
            visit(v)
    return found


def test_the_graph_sees_function_level_imports():
    """The reader finds an import inside a function and under TYPE_CHECKING (else the checks below
    could not fail on the cycles they are for)."""
    graph = imports(modules())
    assert "workbench.engine.extraction" in graph["workbench.runner"]
    assert "workbench.protocol.run_context" in graph["workbench.protocol.probes"]  # under TYPE_CHECKING
    assert cycles({"a": {"b": 1}, "b": {"c": 1}, "c": {"a": 1}, "d": {"a": 1}}) == [["a", "b", "c"]]


def test_no_import_cycles():
    found = cycles(imports(modules()))
    assert not found, "import cycles (function-level imports included): " + "; ".join(" <-> ".join(c) for c in found)


def test_layers_only_import_downwards():
    known = modules()
    bad = []
    for src, targets in imports(known).items():
        a = layer(src)
        if a == "workbench":  # the package's own __init__ loads its public names lazily (importlib)
            continue
        for dst, line in targets.items():
            b = layer(dst)
            assert a in LAYERS and b in LAYERS, f"{src} or {dst} is in no layer: add its folder to LAYERS"
            if LAYERS[b] > LAYERS[a]:
                bad.append(f"{known[src].relative_to(ROOT)}:{line} imports {dst} ({a} -> {b}, upwards)")
    assert not bad, "\n".join(bad)


def test_protocol_imports_nothing_of_engine_runs_or_report():
    graph = imports(modules())
    up = {"engine", "runner", "runs", "report", "store", "cli", "experiments", "datasets"}
    bad = [(s, d) for s, ts in graph.items() if layer(s) == "protocol" for d in ts if layer(d) in up]
    assert not bad, bad


def test_no_private_name_is_imported_across_modules():
    known = modules()
    bad = []
    for name, path in known.items():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.module and _resolve(node.module, known):
                for a in node.names:
                    if a.name.startswith("_") and not a.name.startswith("__"):
                        bad.append(f"{path.relative_to(ROOT)}:{node.lineno} imports {node.module}.{a.name}")
    assert not bad, "\n".join(bad)


def test_no_old_import_path_is_used_inside_the_project():
    """Old paths are aliases for users (workbench.compat); the project itself uses the new ones."""
    from workbench.compat import MOVED, SPLIT

    old = set(MOVED) | set(SPLIT)
    bad = []
    for folder in (*PACKAGES, "tests", "benchmarks"):
        for path in (ROOT / folder).rglob("*.py"):
            if path.name in ("compat.py", "test_public_api.py"):
                continue
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                names = (
                    [a.name for a in node.names]
                    if isinstance(node, ast.Import)
                    else [node.module or ""]
                    if isinstance(node, ast.ImportFrom) and not node.level
                    else []
                )
                bad += [f"{path.relative_to(ROOT)}:{node.lineno} imports {n}" for n in names if n in old]
    assert not bad, "\n".join(bad)


_IMPORT_EACH = r"""
import importlib, os, sys
# Heavy third-party packages once, in the parent; each project module then imports in a fresh
# child (fork) where no other project module has been imported.
import torch, pandas, pyarrow, numpy, pydantic, plotly.graph_objects, jaxtyping  # noqa: F401
failed = []
for name in sys.argv[1:]:
    pid = os.fork()
    if pid == 0:
        try:
            importlib.import_module(name)
        except BaseException as exc:
            sys.stderr.write(f"{name}: {type(exc).__name__}: {exc}\n")
            os._exit(1)
        os._exit(0)
    _, status = os.waitpid(pid, 0)
    if status:
        failed.append(name)
print("FAILED " + " ".join(failed) if failed else "OK")
"""


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_every_module_imports_on_its_own():
    names = [m for m in modules() if not m.endswith("__main__")]
    assert len(names) > 80
    run = subprocess.run(
        [sys.executable, "-c", _IMPORT_EACH, *names], capture_output=True, text=True, cwd=ROOT, timeout=600
    )
    assert run.stdout.strip() == "OK", run.stdout + run.stderr[-3000:]
