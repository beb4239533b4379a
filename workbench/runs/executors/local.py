"""The local executor: every group in this process, in order, one model load per model.

The last model it loaded stays in :attr:`LocalExecutor.loaded` for the sweep's pattern views
(:mod:`workbench.runs.views`), which would otherwise load it again right after the units."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from workbench.errors import WorkbenchError


class LocalExecutor:
    name = "local"

    def __init__(self, address: str | None = None) -> None:
        if address:
            raise WorkbenchError(
                "--address names a cluster, and the local executor runs in this process",
                "drop --address, or add --executor ray",
            )
        self.loaded: tuple[str, Any] | None = None  # (model name, LoadedModel) of the last group run

    def run(
        self,
        cfg,
        groups: list,
        parts_dir: str | Path,
        record: Callable[[dict[str, Any]], None],
        *,
        config_path: str,
        progress: bool,
        log: Callable[[str], None],
    ) -> None:
        from workbench.models.loading import load_model
        from workbench.runs.group import run_group

        current, model = None, None
        for group in groups:
            if group[0].model != current:
                model, current = load_model(group[0].model, device=cfg.device, dtype=cfg.dtype), group[0].model
            self.loaded = (current, model)
            for info in run_group(cfg, group, parts_dir, model=model, progress=progress, config_path=config_path):
                record(info)
