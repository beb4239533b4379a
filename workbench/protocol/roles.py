"""How a probe declares the head roles its metrics support: :class:`Role`, read by the atlas.

A probe lists ``roles = (Role(...), ...)``; :func:`workbench.report.atlas.atlas` gives a head every
role whose rule its scores pass.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class Role:
    """A head role read off one metric: ``value >= threshold`` (``sign = -1``: ``value <= -threshold``)."""

    name: str
    code: str  # short label in the atlas grid
    metric: str
    threshold: float
    color: str
    what: str
    sign: int = 1
    strict: bool = False  # ">" instead of ">=" (retrieval: the paper's "score > 0.1")

    def rule(self) -> str:
        op = (">" if self.strict else ">=") if self.sign > 0 else ("<" if self.strict else "<=")
        return f"{self.metric} {op} {'-' if self.sign < 0 else ''}{self.threshold:g}"

    def holds(self, value: float) -> bool:
        """Whether ``value`` supports the role (NaN never does)."""
        if math.isnan(value):
            return False
        v, t = value * self.sign, self.threshold
        return v > t if self.strict else v >= t
