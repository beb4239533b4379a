"""One (model, dataset) of a sweep: the unit of work an executor schedules.

**Where.** The run folder is a path or an fsspec URL (``s3://bucket/runs/a``, ``gs://...``,
``file:///shared/runs/a``); :mod:`workbench.files.targets` writes, lists, reads and moves its files, with
local paths on the plain file-system code. On an object store a part is written straight to its
key (a PUT is atomic per object) and a part set aside is copied then deleted (``run.json``
records each such move under ``set_aside``).
"""

from __future__ import annotations

import json
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from workbench.files import targets
from workbench.runs.config import DatasetSpec, SweepConfig, Unit


# -- running ----------------------------------------------------------------------------------
def example_prompts(model, prompts, prepend_bos: bool, n: int = 3, width: int = 64) -> list[dict]:
    """The first prompts' first tokens, for reports (nothing if they cannot be tokenized)."""
    from workbench.inputs.prompts import tokenize_prompts

    try:
        tokenized = tokenize_prompts(
            list(prompts[:n]), model.tokenizer, model.n_ctx, model.vocab_size, prepend_bos=prepend_bos
        )
    except Exception:
        return []
    tok = model.tokenizer
    return [
        {
            "id": p.id,
            "tokens": tok.convert_ids_to_tokens(p.ids[:width]),
            "ids": p.ids[:width],
            "text": tok.decode(p.ids[:width]),
        }
        for p in tokenized
    ]


def group_prompts(cfg: SweepConfig, spec: DatasetSpec, model) -> list:
    """The prompts of one dataset table for ``model`` (token-space datasets use its tokenizer)."""
    from workbench.datasets import NEEDS_TOKENIZER, make_dataset
    from workbench.inputs.prompts import read_prompts

    if spec.path is not None:
        return read_prompts(spec.path)[: spec.options.get("n_prompts") or None]
    opts = dict(spec.options)
    n_prompts, seed = opts.pop("n_prompts", None), opts.pop("seed", cfg.seed)
    extra: dict[str, Any] = {}
    if spec.generator in NEEDS_TOKENIZER:
        extra["tokenizer"] = model.tokenizer
        if spec.generator == "niah" and opts.get("n_ctx") is None:
            opts["n_ctx"] = model.n_ctx
    return make_dataset(spec.generator, n_prompts=n_prompts, seed=seed, **opts, **extra)


def run_group(
    cfg: SweepConfig,
    units: list[Unit],
    parts_dir: str | Path,
    model=None,
    progress: bool = False,
    config_path: str = "",
) -> list[dict[str, Any]]:
    """Compute every unit of one (model, dataset) in one run of the runner and write each part
    atomically into ``parts_dir`` (a path or an fsspec URL); returns each part's ``filename``,
    ``size``, ``sha256`` (of the file as stored) and ``key``. The unit of work of every executor."""
    from workbench.models.loading import load_model
    from workbench.protocol.registry import get_probe
    from workbench.protocol.table import tidy
    from workbench.runner import run_probes
    from workbench.runs.parquet import run_metadata, write_parquet

    if not units:
        return []
    model_name, dataset = units[0].model, units[0].dataset
    if any(u.model != model_name or u.dataset != dataset for u in units):
        raise ValueError("run_group takes the units of one (model, dataset)")
    spec = cfg.datasets[dataset]
    started, t0 = datetime.now(timezone.utc), time.perf_counter()
    model = model or load_model(model_name, device=cfg.device, dtype=cfg.dtype)
    prompts = group_prompts(cfg, spec, model)
    probes = [get_probe(u.probe, **cfg.probe_params.get(u.probe, {})) for u in units]
    result = run_probes(
        model,
        prompts,
        probes,
        batch_size=cfg.batch_size,
        prepend_bos=cfg.prepend_bos,
        root=Path(spec.path).parent if spec.path else None,
        progress=progress,
    )
    timing = {
        "started": started.isoformat(timespec="seconds"),
        "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "seconds": round(time.perf_counter() - t0, 3),
        "group": f"{model_name} x {dataset}",
    }
    shown = example_prompts(model, prompts, cfg.prepend_bos)
    infos = []
    for u, probe in zip(units, probes):
        meta = run_metadata(
            model=model.describe(),
            dataset={
                "name": dataset,
                "generator": spec.generator,
                "n_prompts": len(prompts),
                "n_tokens": result.stats.n_tokens,
                "seed": spec.options.get("seed", cfg.seed),
                "options": spec.options,
                "path": spec.path,
                "sha256": spec.sha256,
                "prepend_bos": cfg.prepend_bos,
            },
            probes=[probe.config()],
            config={"sweep": config_path, "unit": u.key, "batch_size": cfg.batch_size, "dtype": cfg.dtype},
            unit=json.loads(u.identity),
            summary=result.results[u.probe].summary,
            timing=timing,
            prompts=shown,
        )
        path = targets.join(targets.as_target(parts_dir), u.filename)
        write_parquet(tidy(result.results[u.probe].table, model=model_name, dataset=dataset), path, meta)
        infos.append({"filename": u.filename, "size": targets.size(path), "sha256": targets.sha256(path), "key": u.key})
    return infos
