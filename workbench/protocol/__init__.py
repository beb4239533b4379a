"""What probes, interventions and the runner agree on, and nothing else.

- :mod:`~workbench.protocol.probes`: the kinds of probe (pattern, token, item, divergence) and
  the methods each answers;
- :mod:`~workbench.protocol.views`: what a pattern probe is handed (the batch, a view of one
  layer's attention);
- :mod:`~workbench.protocol.metrics` and :mod:`~workbench.protocol.roles`: how a probe declares
  what its metrics mean and which head roles they support;
- :mod:`~workbench.protocol.table`: the tidy result table every probe returns;
- :mod:`~workbench.protocol.params`: typed parameters; :mod:`~workbench.protocol.registry`: which
  probes are installed (entry points); :mod:`~workbench.protocol.run_context`: how a run is asked
  to go.

This package imports nothing of the engine, the run folders or the report (a test checks it).
Its names load lazily: ``workbench probes`` and option validation do not pay for torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_WHERE = {
    "Probe": "probes",
    "PatternProbe": "probes",
    "TokenProbe": "probes",
    "ItemProbe": "probes",
    "DivergenceProbe": "probes",
    "NoParams": "probes",
    "Need": "probes",
    "BatchInfo": "views",
    "PatternView": "views",
    "MetricInfo": "metrics",
    "KINDS": "metrics",
    "Role": "roles",
    "ProbeResult": "table",
    "COLUMNS": "table",
    "ITEM_COLUMNS": "table",
    "head_rows": "table",
    "tidy": "table",
    "Options": "params",
    "RunContext": "run_context",
}
__all__ = sorted(_WHERE)


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        return getattr(importlib.import_module(f"workbench.protocol.{_WHERE[name]}"), name)
    raise AttributeError(f"module 'workbench.protocol' has no attribute {name!r}")
