"""The probe protocol, for probe authors: every name of :mod:`workbench.protocol`.

The protocol is declared in :mod:`workbench.protocol` (probe kinds in
:mod:`workbench.protocol.probes`, what a pattern probe is handed in :mod:`workbench.protocol.views`,
metric and role declarations, the result table); this module re-exports it under the name plugin
packages have always imported::

    from probes.base import PatternProbe, MetricInfo, Role
"""

from __future__ import annotations

from workbench.protocol import *  # noqa: F403
from workbench.protocol import __all__  # noqa: F401
