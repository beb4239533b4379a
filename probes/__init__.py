"""Per-head metrics, one module each. ``get_probe("entropy")`` builds one by name.

To add a metric: subclass :class:`probes.base.Probe` in a new module and add it to
:data:`PROBES`.
"""
from __future__ import annotations

from typing import Any

from probes.base import Probe
from probes.context import ContextProbe
from probes.entropy import EntropyProbe
from probes.induction import InductionProbe
from probes.retrieval import RetrievalProbe
from probes.sink import SinkProbe
from probes.streaming import StreamingProbe
from probes.vhd import VHDProbe
from workbench.errors import WorkbenchError

PROBES: dict[str, type[Probe]] = {cls.name: cls for cls in (EntropyProbe, SinkProbe, InductionProbe, StreamingProbe, RetrievalProbe, VHDProbe, ContextProbe)}


def get_probe(name: str, **params: Any) -> Probe:
    """Instantiate a probe by name; unknown names and parameters fail with the valid choices."""
    if name not in PROBES:
        raise WorkbenchError(f"unknown probe {name!r}", f"choose from: {', '.join(PROBES)} (see `workbench probes`)")
    try:
        return PROBES[name](**params)
    except TypeError as exc:
        raise WorkbenchError(f"bad parameters for probe {name!r}: {exc}", "see `workbench probes`") from None


def parse_probe_list(spec: str) -> list[str]:
    """``"entropy,sink"`` -> ``["entropy", "sink"]``, validated, duplicates removed."""
    names = [s.strip() for s in spec.split(",") if s.strip()]
    if not names:
        raise WorkbenchError("no probe given", f"name one or more of: {', '.join(PROBES)}")
    for n in names:
        if n not in PROBES:
            raise WorkbenchError(f"unknown probe {n!r}", f"choose from: {', '.join(PROBES)} (see `workbench probes`)")
    return list(dict.fromkeys(names))


__all__ = ["PROBES", "Probe", "get_probe", "parse_probe_list"]
