"""``workbench report --config report.toml``: which runs a report shows, and how.

::

    runs = ["runs/a", "runs/b"]      # run folders, results files or URLs; relative to this file
    labels = ["before", "after"]     # optional, one per run
    title = "Sinks before and after"
    out = "report.html"
    [roles]                          # atlas thresholds: a number, or "off"
    sink = 0.6
    echo = "off"
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import Field

from workbench.files.targets import is_url
from workbench.protocol.params import Float, Options
from workbench.runs.config_files import read_toml, validate_table


class ReportFile(Options):
    """The keys of a report config."""

    runs: list[str] = Field([], json_schema_extra={"fix": 'e.g. runs = ["runs/a", "runs/b"]'})
    labels: list[str] | None = None
    title: str | None = None
    out: str | None = None
    roles: dict[str, Float | str] = Field(
        {}, json_schema_extra={"fix": 'e.g. [roles] with sink = 0.6 and echo = "off"'}
    )


def load_report_config(path: str | Path) -> dict[str, Any]:
    """The validated config: ``runs`` and ``out`` resolved beside the file (URLs and absolute paths
    as given), role thresholds with "off" / "none" as None."""
    file = Path(path)
    cfg = validate_table(
        file,
        ReportFile,
        read_toml(file, "report config", 'e.g. runs = ["runs/a", "runs/b"] and a [roles] table'),
        "top level",
    )

    def beside(r: str) -> str:
        return r if is_url(r) or Path(r).is_absolute() else str(file.parent / r)

    thresholds = {k: (None if isinstance(v, str) and v.lower() in ("off", "none") else v) for k, v in cfg.roles.items()}
    return {
        "runs": [beside(r) for r in cfg.runs],
        "labels": cfg.labels,
        "title": cfg.title,
        "out": cfg.out and beside(cfg.out),
        "thresholds": thresholds,
    }
