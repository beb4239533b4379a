"""What each metric is and how to draw it: the one table the figures, captions and report read.

:func:`info` answers for any metric name: what the probe that reports it declares
(``metric_info``, a :class:`~workbench.protocol.metrics.MetricInfo`, see :func:`known_metrics`),
patching metrics by prefix (:data:`PATTERNS`), and anything else by looking at its values
(:func:`infer_kind`). A log-kind metric is drawn on a log scale when its finite positive values
span at least :data:`LOG_SPAN`.
"""

from __future__ import annotations

import re
from dataclasses import replace
from typing import Iterable

import numpy as np

from workbench.protocol.metrics import MetricInfo

LOG_SPAN = 100.0  # a log-kind metric is drawn on a log scale when max / min(positive) >= this


# Metrics computed outside probes (interventions); probes declare their own in ``metric_info``.
CORE_METRICS: dict[str, MetricInfo] = {
    "answer_changed": MetricInfo(
        "bounded", "share of items whose answer changed under the intervention", module="workbench/interventions.py"
    ),
}


def known_metrics() -> dict[str, MetricInfo]:
    """Every metric with a declared meaning: each registered probe's ``metric_info`` (in the
    registry's order), then the core table. A plugin probe declares its own; nothing here names it."""
    from workbench.protocol.registry import probe_classes

    table: dict[str, MetricInfo] = {}
    try:
        classes = probe_classes().values()
    except Exception:  # no probes installed: captions fall back to inference
        classes = []
    for cls in classes:
        module = cls.__module__.replace(".", "/") + ".py"
        for name, mi in (getattr(cls, "metric_info", {}) or {}).items():
            table[name] = mi if mi.module else replace(mi, module=module)
    table.update(CORE_METRICS)
    return table


# Families named by prefix: patching metrics are activation_<component>, path_logits / path_qkv, attribution_z.
_PATCHING = (
    "normalised change of the logit difference when the head is patched: 0 = no effect, -1 = behaviour destroyed",
    "patching the head raises the logit difference",
    "patching the head destroys the behaviour (the head matters)",
)


PATTERNS: list[tuple[re.Pattern, MetricInfo]] = [
    (
        re.compile(f"^{family}_"),
        MetricInfo("signed", *_PATCHING, rank="abs", module="circuits/patching.py", doc=f"{family}-patching"),
    )
    for family in ("activation", "path", "attribution")
]


def scatter_pairs() -> list[tuple[str, str]]:
    """Metric pairs worth a per-head scatter when both were measured on the same model: what
    registered probes declare in ``scatter_pairs`` (e.g. retrieval with induction)."""
    from workbench.protocol.registry import probe_classes

    pairs: list[tuple[str, str]] = []
    try:
        classes = probe_classes().values()
    except Exception:
        classes = []
    for cls in classes:
        pairs += [tuple(p) for p in getattr(cls, "scatter_pairs", ()) if tuple(p) not in pairs]
    return pairs


def infer_kind(values: Iterable[float]) -> str:
    """The kind of an unknown metric from its values: negative -> signed, within [0, 1] ->
    bounded, positive spanning >= LOG_SPAN -> log, else positive."""
    v = np.asarray(list(values), dtype=float)
    v = v[np.isfinite(v)]
    if v.size == 0:
        return "positive"
    if v.min() < 0:
        return "signed"
    if v.max() <= 1:
        return "bounded"
    pos = v[v > 0]
    return "log" if pos.size and pos.max() / pos.min() >= LOG_SPAN else "positive"


def info(metric: str, values: Iterable[float] | None = None) -> MetricInfo:
    """What ``metric`` is and its kind; unknown names get a kind inferred from ``values``."""
    known = known_metrics()
    if metric in known:
        return known[metric]
    for pattern, mi in PATTERNS:
        if pattern.search(metric):
            return mi
    return MetricInfo(infer_kind(values if values is not None else []), metric)


def scale_for(metric: str, values: Iterable[float]) -> str:
    """The scale to draw: ``bounded``, ``signed``, ``positive`` or ``log`` (a ``log`` metric whose
    values span less than LOG_SPAN is drawn linear, as ``positive``)."""
    v = np.asarray(list(values), dtype=float)
    kind = info(metric, v).kind
    if kind == "bounded" and np.nanmax(np.abs(v), initial=0) > 1 + 1e-9:
        return "positive"  # e.g. a retrieval score above 1 without the newline stop: never clip
    if kind == "log":
        pos = v[np.isfinite(v) & (v > 0)]
        return "log" if pos.size and pos.max() / pos.min() >= LOG_SPAN else "positive"
    return kind
