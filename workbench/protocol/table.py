"""The one tidy results table: its columns and the rows every probe returns.

Every probe's output is long format: one row per (model, dataset, probe, metric, layer, head)
with the value and ``n``, the number of items averaged. :class:`ProbeResult` is what every probe
kind returns; :func:`head_rows` turns a ``[layer, head]`` tensor into rows and :func:`tidy` adds
the run's identity columns. Writing and reading the table on disk is :mod:`workbench.runs.parquet`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pandas as pd

COLUMNS = ["model", "dataset", "probe", "metric", "layer", "head", "value", "n"]


# Optional keys of per-item rows (e.g. T-VHD per generated token: layer = head = -1, one row per
# (item, step), the step's token text in ``token``); absent (NA) on per-head rows.
ITEM_COLUMNS = ["item", "step", "token"]


@dataclass
class ProbeResult:
    """What every probe returns, whatever its kind.

    ``table``: the probe's rows (``probe, metric, layer, head, value, n`` and, for per-item rows,
    ``item, step, token``); ``summary``: JSON-able facts recorded in the result file's metadata
    (accuracy, answers, skipped items, ...); ``lines``: what the CLI prints about the run, one
    sentence each, formatted by the probe itself.
    """

    probe: str
    table: pd.DataFrame
    summary: dict[str, Any] = field(default_factory=dict)
    lines: list[str] = field(default_factory=list)


def head_rows(metric: str, value: Any, n: Any) -> pd.DataFrame:
    """Tidy rows ``metric, layer, head, value, n`` for one ``[layer, head]`` tensor of values
    (``n``: a tensor of the same shape or one count for every head)."""
    import torch

    value = torch.as_tensor(value).detach().double().cpu()
    n_t = torch.as_tensor(n).expand_as(value).cpu()
    layer, head = torch.meshgrid(torch.arange(value.shape[0]), torch.arange(value.shape[1]), indexing="ij")
    return pd.DataFrame(
        {
            "metric": metric,
            "layer": layer.flatten().numpy(),
            "head": head.flatten().numpy(),
            "value": value.flatten().numpy(),
            "n": n_t.flatten().numpy().astype("int64"),
        }
    )


def tidy(df: pd.DataFrame, model: str, dataset: str) -> pd.DataFrame:
    """Add run identity columns and fix column order and dtypes."""
    out = df.copy()
    out["model"] = model
    out["dataset"] = dataset
    extra = [c for c in ITEM_COLUMNS if c in out.columns]
    out = out[COLUMNS + extra]
    types = {"layer": "int64", "head": "int64", "value": "float64", "n": "int64"}
    types.update({c: t for c, t in (("item", "string"), ("step", "Int64"), ("token", "string")) if c in extra})
    return out.astype(types)


def top_heads(df: pd.DataFrame, k: int = 5) -> pd.DataFrame:
    """The ``k`` highest-valued heads for each (probe, metric); per-item rows (layer -1) are not heads."""
    ranked = df[df["layer"] >= 0].dropna(subset=["value"]).sort_values("value", ascending=False)
    return (
        ranked.groupby(["probe", "metric"], sort=False)
        .head(k)
        .sort_values(["probe", "metric", "value"], ascending=[True, True, False])
    )
