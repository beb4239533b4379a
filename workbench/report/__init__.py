"""Results for people: self-contained HTML reports, plotly figures and the head atlas.

- :mod:`~workbench.report.build`: the report page of one or more runs (:func:`build_report`,
  :func:`write_report`); :mod:`~workbench.report.page`: the offline page machinery;
  :mod:`~workbench.report.sources`: the runs, result files and circuit folders a report reads;
- :mod:`~workbench.report.plots`: one plotly figure function per kind of figure;
- :mod:`~workbench.report.atlas`: every role a head's scores support;
- :mod:`~workbench.report.kinds` and :mod:`~workbench.report.definitions`: how each metric is
  drawn and where its definition is (``metrics.md``, shipped in this package).
"""

from __future__ import annotations

from typing import Any


def __getattr__(name: str) -> Any:
    if name in ("build_report", "write_report"):
        from workbench.report import build

        return getattr(build, name)
    raise AttributeError(f"module 'workbench.report' has no attribute {name!r}")
