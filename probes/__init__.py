"""Per-head metrics, one module each; the protocol they follow is :mod:`workbench.protocol`
(re-exported for plugin authors as :mod:`probes.base`).

Each probe registers under the ``workbench.probes`` entry-point group in ``pyproject.toml``,
exactly as a probe from another package would; :mod:`workbench.protocol.registry` finds them and
``workbench.get_probe(name, **params)`` builds one. Metric definitions: ``docs/metrics.md``.
"""

from __future__ import annotations

import warnings
from typing import Any

_MOVED = ("get_probe", "parse_probe_list", "probe_classes")


def __getattr__(name: str) -> Any:
    # ``from probes import get_probe`` was a second way to get a probe; one release of grace.
    if name in _MOVED:
        warnings.warn(
            f"probes.{name} moved: use workbench.protocol.registry.{name} (or workbench.get_probe); "
            "this alias goes in workbench 0.3",
            DeprecationWarning,
            stacklevel=2,
        )
        from workbench.protocol import registry

        return getattr(registry, name)
    raise AttributeError(f"module 'probes' has no attribute {name!r}")
