"""How a probe declares what its metrics mean: :class:`MetricInfo`, read by figures, captions and
reports.

Every metric has a *kind* (one of :data:`KINDS`), which decides its colour scale and axes:

- ``bounded``: a probability or share in [0, 1]; sequential scale fixed to 0..1, so two figures of
  the same metric compare by colour.
- ``signed``: an effect that can be negative (patching effects, direct effects); diverging scale
  centred on 0, symmetric limits.
- ``positive``: >= 0 without an upper bound (entropy in nats); sequential scale from the data.
- ``log``: >= 0 and spanning orders of magnitude (output distances); log10 scale when the finite
  positive values span a factor of 100 or more, linear otherwise.

A probe declares ``metric_info = {name: MetricInfo(...)}``; :mod:`workbench.report.kinds` answers
for any metric name.
"""

from __future__ import annotations

from dataclasses import dataclass

KINDS = ("bounded", "signed", "positive", "log")


@dataclass(frozen=True)
class MetricInfo:
    """How to read and draw one metric.

    ``what``: one line saying what the metric is. ``high`` / ``low``: what a high (for signed
    metrics: positive) or low (negative) value means, for captions. ``rank``: which heads the
    summary lists first (``high``, ``low`` or ``abs`` = largest magnitude). ``module``: the
    source file (relative to the repository) whose docstring defines it, the fallback when
    ``docs/metrics.md`` has no section for it.
    """

    kind: str
    what: str
    high: str = "a higher value"
    low: str = "a lower value"
    rank: str = "high"
    unit: str = ""
    module: str = ""
    doc: str = ""  # its section's anchor in docs/metrics.md when not the metric's own name
