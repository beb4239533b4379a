"""Holding a probe to its declarations, and naming the plugin when it fails.

Probes come from any installed package (entry points, :mod:`workbench.protocol.registry`), so a
failure inside one is not necessarily the workbench's. :func:`check_result` refuses a result that
breaks the protocol (columns missing, a metric the probe did not declare, a layer or head the
model does not have) and :func:`plugin_at_fault` finds, from a traceback, the plugin whose code
raised. Either way the error names the probe and its distribution and version, and says the fix
is theirs; "internal error, please report it" stays for the workbench's own bugs.
"""

from __future__ import annotations

import contextlib
import traceback
from typing import Any, Iterator, Sequence

import pandas as pd

from workbench.errors import WorkbenchError, first_line
from workbench.protocol.registry import BUILTIN_DISTRIBUTION, origin

REQUIRED_COLUMNS = ("probe", "metric", "layer", "head", "value", "n")


def _blame(probe: Any) -> tuple[str, str]:
    """Who ``probe`` is (``probe 'name' (distribution version)``) and the fix line: its authors'
    for a plugin or a class defined outside an installed package, ours for a built-in."""
    dist, version = origin(probe.name)
    if dist == BUILTIN_DISTRIBUTION:
        return (
            f"probe {probe.name!r} ({dist} {version})",
            "a defect of the workbench: please report it (WORKBENCH_DEBUG=1 shows the traceback)",
        )
    if dist == "?":
        who = f"probe {probe.name!r} (defined in {type(probe).__module__}, not an installed package)"
        owner = f"whoever wrote {type(probe).__module__}"
    else:
        who, owner = f"probe {probe.name!r} ({dist} {version})", f"the authors of {dist}"
    return who, f"a defect of the probe's code: report it to {owner}; run without {probe.name!r} meanwhile"


def check_result(probe: Any, table: pd.DataFrame, n_layers: int, n_heads: int) -> None:
    """Refuse ``table`` (a probe's result rows) unless it has the protocol's columns, only the
    metrics the probe declares, and layers / heads of the model (``-1`` for per-item rows)."""
    problem = None
    missing = [c for c in REQUIRED_COLUMNS if c not in table.columns]
    if missing:
        problem = f"a table without the column(s) {', '.join(missing)}"
    elif not set(table["metric"]).issubset(probe.metrics):
        extra = sorted(set(map(str, table["metric"])) - set(probe.metrics))
        problem = f"metric(s) it does not declare: {', '.join(extra)} (it declares {', '.join(probe.metrics)})"
    else:
        layers, heads = pd.to_numeric(table["layer"]), pd.to_numeric(table["head"])
        if ((layers < -1) | (layers >= n_layers)).any() or ((heads < -1) | (heads >= n_heads)).any():
            problem = (
                f"rows for layers {int(layers.min())}-{int(layers.max())} and heads {int(heads.min())}-"
                f"{int(heads.max())}, but the model has {n_layers} layers of {n_heads} heads"
            )
    if problem:
        who, fix = _blame(probe)
        raise WorkbenchError(f"{who} returned {problem}", fix)


def plugin_at_fault(exc: BaseException, probes: Sequence[Any]) -> Any | None:
    """The plugin probe (not built in) whose own code raised ``exc``: the deepest frame of the
    traceback in the module of a plugin probe's class, or in its package. None when no plugin's
    code is on the traceback (the workbench's own failure, or a library's)."""
    plugins = [p for p in probes if origin(p.name)[0] != BUILTIN_DISTRIBUTION]
    if not plugins:
        return None
    found = None
    for frame, _ in traceback.walk_tb(exc.__traceback__):
        module = str(frame.f_globals.get("__name__", ""))
        for p in plugins:
            home = type(p).__module__
            if module == home or module.startswith(home.split(".")[0] + "."):
                found = p
    return found


def plugin_error(exc: BaseException, probe: Any) -> WorkbenchError:
    """``exc`` raised by the plugin ``probe``, as one error naming it."""
    who, fix = _blame(probe)
    return WorkbenchError(f"{who} failed: {type(exc).__name__}: {first_line(exc)}", fix)


@contextlib.contextmanager
def blaming(probes: Sequence[Any]) -> Iterator[None]:
    """Run the block; an exception raised by a plugin probe's own code (:func:`plugin_at_fault`)
    leaves it as one error naming the plugin, anything else as it was."""
    try:
        yield
    except (WorkbenchError, KeyboardInterrupt):
        raise
    except Exception as exc:
        culprit = plugin_at_fault(exc, probes)
        if culprit is None:
            raise
        raise plugin_error(exc, culprit) from exc
