"""Which probes exist: everything registered under the ``workbench.probes`` entry-point group.

The built-in probes register exactly as a third-party package would, in ``pyproject.toml``::

    [project.entry-points."workbench.probes"]
    entropy = "probes.entropy:EntropyProbe"

so a probe defined in another installed package appears in ``workbench probes``, runs in
``workbench probe``, sweeps and reports, with no edit to this repository. Nothing in
``workbench/`` imports ``probes`` by name: the core only relies on the protocol declared in
``probes/base.py`` (a probe's ``name``, ``metrics``, ``kind`` and the methods of its kind).

A plugin that fails to import does not break the others: its error is kept and raised, with
the plugin named, only when that probe is asked for.
"""

from __future__ import annotations

import importlib.metadata as md
import warnings
from functools import lru_cache
from typing import Any

from workbench.errors import WorkbenchError, WorkbenchWarning

GROUP = "workbench.probes"
BUILTIN_DISTRIBUTION = "attention-head-workbench"  # the built-in probes' package: it wins a name clash
KINDS = ("pattern", "tokens", "items")
_REQUIRED = {"pattern": ("on_pattern_chunk", "results"), "tokens": ("run",), "items": ("run",)}


class _Broken:
    """A registered probe that could not be loaded, with the reason."""

    def __init__(self, name: str, where: str, reason: str) -> None:
        self.name, self.where, self.reason = name, where, reason


def _check(name: str, cls: Any, where: str) -> str | None:
    """Why ``cls`` does not answer the probe protocol, or None."""
    if not isinstance(cls, type):
        return f"{where} is not a class"
    if getattr(cls, "name", None) != name:
        return f"{where} declares name {getattr(cls, 'name', None)!r}, but is registered as {name!r}"
    kind = getattr(cls, "kind", None)
    if kind not in KINDS:
        return (
            f"{where} has kind {kind!r}; a probe's kind is one of {', '.join(KINDS)} "
            "(subclass a class of probes/base.py)"
        )
    metrics = getattr(cls, "metrics", None)
    if not isinstance(metrics, tuple) or not metrics or not all(isinstance(m, str) for m in metrics):
        return f"{where} declares no metrics (a tuple of names)"
    missing = [m for m in _REQUIRED[kind] if not callable(getattr(cls, m, None))]
    if missing:
        return f"{where} ({kind} probe) lacks {', '.join(missing)}"
    if getattr(cls, "__abstractmethods__", None):
        return f"{where} leaves abstract methods unimplemented: {', '.join(sorted(cls.__abstractmethods__))}"
    return None


@lru_cache(maxsize=1)
def _registry() -> tuple[dict[str, Any], dict[str, tuple[str, str]]]:
    """Every registered probe by name (its class, or why it cannot be loaded), and the
    distribution (name, version) whose registration is used: one walk over the entry points."""
    found: dict[str, Any] = {}
    dists: dict[str, tuple[str, str]] = {}
    for ep in md.entry_points(group=GROUP):
        d = getattr(ep, "dist", None)
        dist = (getattr(d, "name", None) or "?", getattr(d, "version", None) or "?")
        where = f"{ep.value} (from {dist[0]})"
        if ep.name in found and not _takes_over(found, dists, ep.name, dist[0], where):
            continue
        dists[ep.name] = dist
        try:
            cls = ep.load()
        except Exception as exc:  # a broken plugin must not take the others down
            found[ep.name] = _Broken(ep.name, where, f"{type(exc).__name__}: {exc}")
            continue
        problem = _check(ep.name, cls, where)
        found[ep.name] = _Broken(ep.name, where, problem) if problem else cls
    ordered = dict(
        sorted(found.items(), key=lambda kv: (kv[0] not in _BUILTIN_ORDER, _BUILTIN_ORDER.get(kv[0], 0), kv[0]))
    )
    return ordered, dists


def _load() -> dict[str, Any]:
    return _registry()[0]


def _takes_over(found: dict[str, Any], dists: dict[str, tuple[str, str]], name: str, dist: str, where: str) -> bool:
    """A second registration of ``name`` (by ``dist``): whether it replaces the first. The same
    distribution seen twice (an editable install's metadata) changes nothing; the built-in wins a
    clash with a plugin, with a warning naming the plugin's distribution; between two plugins
    neither does, and asking for the probe is an error naming both."""
    first = dists[name][0]
    if first == dist:
        return False
    if BUILTIN_DISTRIBUTION in (first, dist):
        other = dist if first == BUILTIN_DISTRIBUTION else first
        warnings.warn(
            f"probe {name!r} is registered by the workbench and also by {other}; the built-in one is used "
            f"(rename the probe in {other})",
            WorkbenchWarning,
            stacklevel=2,
        )
        return dist == BUILTIN_DISTRIBUTION
    found[name] = _Broken(name, where, f"probe {name!r} is registered by both {first} and {dist}")
    return False


# the order `workbench probes` lists the built-ins in (pattern probes first); plugins follow by name
_BUILTIN_ORDER = {
    n: i for i, n in enumerate(["entropy", "sink", "streaming", "induction", "retrieval", "context", "vhd"])
}


def refresh() -> None:
    """Forget the loaded registry (after installing a plugin into a running interpreter)."""
    _registry.cache_clear()


def origin(name: str) -> tuple[str, str]:
    """The distribution (name, version) whose registration of probe ``name`` is used; ``("?", "?")``
    for a probe no installed package registers (a class defined in a notebook or a script)."""
    return _registry()[1].get(name, ("?", "?"))


def probe_classes() -> dict[str, type]:
    """Every loadable registered probe class by name."""
    found = _load()
    if not found:
        raise WorkbenchError(
            f"no probes are registered under the {GROUP!r} entry points",
            "install the workbench package (pip install -e . from the repository, or `make install`)",
        )
    return {n: c for n, c in found.items() if not isinstance(c, _Broken)}


def broken_probes() -> dict[str, str]:
    """Registered probes that could not be loaded, with the reason."""
    return {n: f"{c.where}: {c.reason}" for n, c in _load().items() if isinstance(c, _Broken)}


def probe_class(name: str) -> type:
    found = _load()
    entry = found.get(name)
    if isinstance(entry, _Broken):
        raise WorkbenchError(
            f"probe {name!r} is registered but cannot be loaded: {entry.where}: {entry.reason}",
            "fix or reinstall the package that provides it",
        )
    if entry is None:
        names = ", ".join(probe_classes())
        raise WorkbenchError(f"unknown probe {name!r}", f"choose from: {names} (see `workbench probes`)")
    return entry


def get_probe(name: str, **params: Any) -> Any:
    """A probe instance by name, its parameters validated by the probe's own schema."""
    return probe_class(name)(**params)


def parse_probe_list(spec: str) -> list[str]:
    """``"entropy,sink"`` -> ``["entropy", "sink"]``, validated, duplicates removed."""
    names = [s.strip() for s in str(spec).split(",") if s.strip()]
    if not names:
        raise WorkbenchError("no probe given", f"name one or more of: {', '.join(probe_classes())}")
    for n in names:
        probe_class(n)
    return list(dict.fromkeys(names))
