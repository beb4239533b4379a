"""How a probe declares the head roles its metrics support: :class:`Role`, read by the atlas.

A probe lists ``roles = (Role(...), ...)``; :func:`workbench.report.atlas.atlas` gives a head every
role whose rule its scores pass.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class Role:
    """A head role read off one metric: ``value >= threshold`` ("the value is high"), or with
    ``sign = -1`` ("the value is low") ``value <= -threshold``.

    For a low role ``threshold`` is the distance below 0, so ``threshold=0.05`` and
    ``threshold=-0.05`` both declare ``value <= -0.05`` (the threshold is kept as its magnitude,
    the number a user overrides it with: ``--roles memory=0.05``). :attr:`bound` is the signed
    number the value is compared with, :attr:`op` the comparison and :meth:`rule` both as text.
    ``look_for`` says what the role looks like in the head's attention pattern on the role's
    natural prompt (the report's "Looking at the heads" captions)."""

    name: str
    code: str  # short label in the atlas grid
    metric: str
    threshold: float
    color: str
    what: str
    sign: int = 1
    strict: bool = False  # ">" instead of ">=" (retrieval: the paper's "score > 0.1")
    look_for: str = ""  # what the role looks like in a pattern view (the report's caption; default: ``what``)

    def __post_init__(self) -> None:
        if self.sign not in (1, -1):
            raise ValueError(
                f"role {self.name!r}: sign must be 1 (the value is high) or -1 (the value is low), not {self.sign!r}"
            )
        if self.sign < 0 and self.threshold < 0:
            object.__setattr__(self, "threshold", -self.threshold)

    @property
    def bound(self) -> float:
        """The signed number the metric's value is compared with (``-threshold`` for a low role)."""
        return (self.threshold * self.sign) or 0.0  # never -0

    @property
    def op(self) -> str:
        """The comparison: ``>=`` / ``>`` for a high role, ``<=`` / ``<`` for a low one."""
        return (">" if self.strict else ">=") if self.sign > 0 else ("<" if self.strict else "<=")

    def rule(self) -> str:
        """The rule as text, e.g. ``context_direct_effect <= -0.2``."""
        return f"{self.metric} {self.op} {self.bound:g}"

    def holds(self, value: float) -> bool:
        """Whether ``value`` supports the role (NaN never does)."""
        if math.isnan(value):
            return False
        v, t = value * self.sign, self.threshold
        return v > t if self.strict else v >= t
