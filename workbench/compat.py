"""Old import paths, kept as aliases for one release (0.2) after the package was laid out by layer.

Until 0.1 every module sat loose in ``workbench/``; they now live in ``protocol/``, ``files/``,
``inputs/``, ``models/``, ``engine/``, ``runs/``, ``report/`` and ``experiments/`` (the docs'
architecture page has the map). ``import workbench.results`` and ``from workbench.sweeps import
run_sweep`` keep working through this module, with a :class:`DeprecationWarning` naming the new
place:

- ``workbench.plots`` is the public name of :mod:`workbench.report.plots` and stays (no warning);
- a module that moved whole (``workbench.masking`` -> ``workbench.engine.masking``) is the new
  module itself under its old name;
- a module that was split (``workbench.results`` -> the table schema, Parquet IO, loading and
  query modules) is a stand-in whose attributes are looked up in the new modules, in order.
  Patching an attribute of a stand-in (``monkeypatch.setattr``) does not reach the new module:
  patch the new path.

The aliases are removed in 0.3. Nothing inside the package imports an old path (a test checks).
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys
import types
import warnings
from typing import Any

# Modules that moved whole: old name -> new name.
MOVED = {
    "workbench.params": "workbench.protocol.params",
    "workbench.registry": "workbench.protocol.registry",
    "workbench.context": "workbench.protocol.run_context",
    "workbench.fileio": "workbench.files.atomic",
    "workbench.runfs": "workbench.files.targets",
    "workbench.prompts": "workbench.inputs.prompts",
    "workbench.token_bounds": "workbench.inputs.token_bounds",
    "workbench.conditions": "workbench.inputs.conditions",
    "workbench.batching": "workbench.inputs.batching",
    "workbench.device": "workbench.models.device",
    "workbench.embedded": "workbench.models.embedded",
    "workbench.tiny": "workbench.models.tiny",
    "workbench.kernels": "workbench.engine.kernels",
    "workbench.masking": "workbench.engine.masking",
    "workbench.statistics": "workbench.engine.statistics",
    "workbench.scratch": "workbench.engine.scratch",
    "workbench.extraction": "workbench.engine.extraction",
    "workbench.decoding": "workbench.engine.decoding",
    "workbench.divergence": "workbench.engine.divergence",
    "workbench.executors": "workbench.runs.executors",
    "workbench.executors.local": "workbench.runs.executors.local",
    "workbench.executors.ray": "workbench.runs.executors.ray",
    "workbench.report_page": "workbench.report.page",
    "workbench.report_runs": "workbench.report.sources",
}
# Public paths that are not modules of their own any more: aliases without a warning, kept for good.
PUBLIC = {"workbench.plots": "workbench.report.plots"}
# Modules that were split: old name -> the new modules that hold its names, searched in order.
SPLIT = {
    "workbench.results": (
        "workbench.protocol.table",
        "workbench.runs.parquet",
        "workbench.runs.load",
        "workbench.runs.query",
    ),
    "workbench.sweeps": (
        "workbench.runs.config",
        "workbench.runs.folder",
        "workbench.runs.group",
        "workbench.runs.sweep",
    ),
    "workbench.metric_kinds": ("workbench.protocol.metrics", "workbench.report.kinds", "workbench.report.definitions"),
    "workbench.atlas": ("workbench.report.atlas", "workbench.protocol.roles"),
    "workbench.interventions": ("workbench.engine.interventions", "workbench.experiments.vhr"),
    "workbench.attention": ("workbench.engine.attention", "workbench.engine.call"),
    "workbench.patterns": ("workbench.engine.patterns", "workbench.protocol.views"),
}
REMOVED_IN = "0.3"


def _warn(old: str, new: str) -> None:
    warnings.warn(
        f"{old} moved to {new}; the old path is an alias until workbench {REMOVED_IN}", DeprecationWarning, stacklevel=4
    )


class SplitModule(types.ModuleType):
    """Stands in for a module that was split: each attribute comes from the first new module that
    has it."""

    def __init__(self, name: str, homes: tuple[str, ...]) -> None:
        super().__init__(name, f"Alias of {', '.join(homes)} (see workbench.compat).")
        self.__homes = homes

    def __getattr__(self, attr: str) -> Any:
        if attr.startswith("__"):
            raise AttributeError(attr)
        for home in self.__homes:
            module = importlib.import_module(home)
            if hasattr(module, attr):
                return getattr(module, attr)
        raise AttributeError(
            f"module {self.__name__!r} has no attribute {attr!r} (it moved to one of: {', '.join(self.__homes)})"
        )

    def __dir__(self) -> list[str]:
        return sorted({n for h in self.__homes for n in dir(importlib.import_module(h)) if not n.startswith("_")})


class _AtlasModule(SplitModule):
    """``workbench.atlas`` was a callable module: ``workbench.atlas(table)`` still calls the atlas."""

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return importlib.import_module("workbench.report.atlas").atlas(*args, **kwargs)


class _Loader(importlib.abc.Loader):
    def __init__(self, old: str) -> None:
        self.old = old

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> types.ModuleType:
        if self.old in PUBLIC:
            return importlib.import_module(PUBLIC[self.old])
        if self.old in MOVED:
            _warn(self.old, MOVED[self.old])
            return importlib.import_module(MOVED[self.old])
        _warn(self.old, " / ".join(SPLIT[self.old]))
        cls = _AtlasModule if self.old == "workbench.atlas" else SplitModule
        return cls(self.old, SPLIT[self.old])

    def exec_module(self, module: types.ModuleType) -> None:
        """Nothing to run: the module is the new one, or a stand-in."""


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> importlib.machinery.ModuleSpec | None:
        if fullname in MOVED or fullname in SPLIT or fullname in PUBLIC:
            return importlib.machinery.ModuleSpec(
                fullname, _Loader(fullname), is_package=fullname == "workbench.executors"
            )
        return None


def install() -> None:
    """Make the old paths importable (idempotent; :mod:`workbench` calls it on import)."""
    if not any(isinstance(f, _Finder) for f in sys.meta_path):
        sys.meta_path.insert(0, _Finder())
