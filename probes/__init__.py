"""Per-head metrics, one module each; the protocol they follow is in :mod:`probes.base`.

Each probe registers under the ``workbench.probes`` entry-point group in ``pyproject.toml``,
exactly as a probe from another package would; :mod:`workbench.registry` finds them. For
convenience in notebooks, ``from probes import get_probe`` works here too. Metric definitions:
``docs/metrics.md``.
"""
from __future__ import annotations

from workbench.registry import get_probe, parse_probe_list, probe_classes

__all__ = ["get_probe", "parse_probe_list", "probe_classes"]
