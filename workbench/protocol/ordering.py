"""A declared order for interventions whose overlap is intended.

Two interventions that edit the same point of the same head are refused when a run starts
(:func:`workbench.engine.edits.check_conflicts`) unless one :class:`Ordered` group holds both.
It lives in the protocol layer because the run context composes a probe's own edits with the
run's interventions (:meth:`workbench.protocol.run_context.RunContext.with_edits`).
"""

from __future__ import annotations

from typing import Any, Sequence


class Ordered:
    """Interventions whose overlap the user intends, applied in the order given
    (:func:`ordered`). Registered like any observer; the engine runs its members in place."""

    def __init__(self, members: Sequence[Any]) -> None:
        self.members = list(members)


def ordered(*interventions: Any) -> Ordered:
    """Declare that ``interventions`` may edit the same point of the same heads, in this order."""
    return Ordered(interventions)
