"""Probe sweeps: a grid of models x datasets x probes from a TOML file, resumable.

Config (``workbench sweep CONFIG.toml --out runs/NAME``)::

    models = ["smollm2-135m"]
    probes = ["entropy", "sink"]
    batch_size = "auto"        # optional; also device, dtype, seed
    [datasets.prose]
    n_prompts = 4
    [datasets.niah]            # any dataset option: context_len, depths, period, ...
    n_prompts = 10
    context_len = [1000]
    probes = ["retrieval"]     # optional: this dataset runs only these probes
    [datasets.mine]            # a prompts JSONL file of your own
    path = "prompts.jsonl"
    [probe_params.sink]        # optional per-probe parameters
    epsilon = 0.3

A *unit* is one (model, dataset, probe). Its table is written atomically to
``parts/<model>__<dataset>__<probe>__<hash>.parquet``, where the hash covers everything that
determines its numbers (model, dataset options, probe parameters, seed, dtype). A re-run skips
units whose part exists, so a sweep killed at any point (even SIGKILL) continues where it
stopped with nothing lost or duplicated. Units of the same (model, dataset) still share one
forward pass. ``sweep.json`` in the run folder records the config.
"""
from __future__ import annotations

import hashlib
import json
import re
import sys
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from workbench.errors import WorkbenchError

TOP_KEYS = {"models", "probes", "datasets", "probe_params", "batch_size", "device", "dtype", "seed", "prepend_bos"}


@dataclass(frozen=True)
class Unit:
    model: str
    dataset: str
    probe: str
    dataset_options: tuple
    probe_params: tuple
    seed: int
    dtype: str

    @property
    def key(self) -> str:
        blob = json.dumps([self.model, self.dataset, self.probe, self.dataset_options, self.probe_params, self.seed, self.dtype], sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:12]

    @property
    def filename(self) -> str:
        safe = lambda s: re.sub(r"[^A-Za-z0-9._-]+", "-", s).strip("-")  # noqa: E731
        return f"{safe(self.model)}__{safe(self.dataset)}__{safe(self.probe)}__{self.key}.parquet"


@dataclass
class SweepConfig:
    models: list[str]
    probes: list[str]
    datasets: dict[str, dict[str, Any]]
    probe_params: dict[str, dict[str, Any]]
    batch_size: int | str = "auto"
    device: str = "auto"
    dtype: str = "float32"
    seed: int = 0
    prepend_bos: bool = False
    raw: dict | None = None

    def units(self) -> list[Unit]:
        out = []
        for m in self.models:
            for d, opts in self.datasets.items():
                only = opts.get("probes")
                opts = {k: v for k, v in opts.items() if k != "probes"}
                for p in self.probes:
                    if only is not None and p not in only:
                        continue
                    out.append(Unit(m, d, p, tuple(sorted((k, json.dumps(v)) for k, v in opts.items())),
                                    tuple(sorted((k, json.dumps(v)) for k, v in self.probe_params.get(p, {}).items())), self.seed, self.dtype))
        return out


def load_config(path: str | Path) -> SweepConfig:
    """Parse and validate a sweep TOML; every problem names the key and the fix."""
    from workbench.datasets import DATASETS
    from workbench.registry import probe_classes

    PROBES = probe_classes()

    path = Path(path)
    if not path.is_file():
        raise WorkbenchError(f"sweep config {path} does not exist", "check the path")
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise WorkbenchError(f"{path} is not valid TOML: {exc}", "fix the syntax (see the example in `workbench sweep --help`)") from None
    unknown = sorted(set(raw) - TOP_KEYS)
    if unknown:
        raise WorkbenchError(f"{path}: unknown key(s) {', '.join(map(repr, unknown))}", f"allowed keys: {', '.join(sorted(TOP_KEYS))}")
    for key in ("models", "probes", "datasets"):
        if key not in raw:
            raise WorkbenchError(f"{path}: missing {key!r}", 'e.g. models = ["smollm2-135m"], probes = ["entropy"], [datasets.prose]')
    models, probes_, datasets = raw["models"], raw["probes"], raw["datasets"]
    if not isinstance(models, list) or not models or not all(isinstance(m, str) and m for m in models):
        raise WorkbenchError(f"{path}: 'models' must be a non-empty list of names", 'e.g. models = ["smollm2-135m"]')
    if not isinstance(probes_, list) or not probes_ or not all(isinstance(p, str) for p in probes_):
        raise WorkbenchError(f"{path}: 'probes' must be a non-empty list of probe names", 'e.g. probes = ["entropy", "sink"]')
    bad = [p for p in probes_ if p not in PROBES]
    if bad:
        raise WorkbenchError(f"{path}: unknown probe {bad[0]!r}", f"choose from: {', '.join(PROBES)}")
    if not isinstance(datasets, dict) or not datasets:
        raise WorkbenchError(f"{path}: 'datasets' must be a table of dataset tables", "e.g. [datasets.prose] with n_prompts = 4")
    for name, opts in datasets.items():
        if isinstance(opts, dict) and "path" in opts:
            extra = sorted(set(opts) - {"path", "n_prompts", "probes"})
            if extra:
                raise WorkbenchError(f"{path}: [datasets.{name}] with a path takes only path, n_prompts, probes; not {', '.join(extra)}", "remove those keys")
            file = (path.parent / opts["path"]).resolve()
            if not file.is_file():
                raise WorkbenchError(f"{path}: [datasets.{name}] path {file} does not exist", "paths are relative to the config file")
            # the file's hash joins the unit key: an edited prompts file is a new unit
            opts.update(path=str(file), sha256=hashlib.sha256(file.read_bytes()).hexdigest()[:16])
            continue
        if name not in DATASETS:
            raise WorkbenchError(f"{path}: unknown dataset {name!r}", f"choose from: {', '.join(DATASETS)}")
        if not isinstance(opts, dict):
            raise WorkbenchError(f"{path}: [datasets.{name}] must be a table", "e.g. n_prompts = 4")
        only = opts.get("probes")
        if only is not None and (not isinstance(only, list) or any(p not in probes_ for p in only)):
            raise WorkbenchError(f"{path}: [datasets.{name}] probes must list probes of this sweep", f"probes here: {', '.join(probes_)}")
    probe_params = raw.get("probe_params", {})
    if not isinstance(probe_params, dict) or any(p not in probes_ or not isinstance(v, dict) for p, v in probe_params.items()):
        raise WorkbenchError(f"{path}: [probe_params.X] tables must name probes of this sweep", f"probes here: {', '.join(probes_)}")
    return SweepConfig(models, list(dict.fromkeys(probes_)), datasets, probe_params, raw.get("batch_size", "auto"),
                       raw.get("device", "auto"), raw.get("dtype", "float32"), int(raw.get("seed", 0)), bool(raw.get("prepend_bos", False)), raw)


def example_prompts(model, prompts, prepend_bos: bool, n: int = 3, width: int = 64) -> list[dict]:
    """The first prompts' first tokens, for reports (nothing if they cannot be tokenized)."""
    from workbench.prompts import tokenize_prompts

    try:
        tokenized = tokenize_prompts(list(prompts[:n]), model.tokenizer, model.n_ctx, model.vocab_size, prepend_bos=prepend_bos)
    except Exception:
        return []
    tok = model.tokenizer
    return [{"id": p.id, "tokens": tok.convert_ids_to_tokens(p.ids[:width]), "ids": p.ids[:width], "text": tok.decode(p.ids[:width])} for p in tokenized]


def run_sweep(config_path: str | Path, out_dir: str | Path, progress: bool = True, log=print) -> dict[str, Any]:
    """Run every unit that has no part yet; returns a summary."""

    from workbench.datasets import NEEDS_TOKENIZER, make_dataset
    from workbench.models import load_model
    from workbench.prompts import read_prompts
    from workbench.registry import get_probe
    from workbench.results import check_writable, run_metadata, tidy, write_parquet
    from workbench.runner import run_probes

    cfg = load_config(config_path)
    out = Path(out_dir)
    parts = out / "parts"
    check_writable(parts / "probe.parquet")
    (out / "sweep.json").write_text(json.dumps(cfg.raw, indent=1, default=str))
    units = cfg.units()
    todo = [u for u in units if not (parts / u.filename).is_file()]
    summary = {"units": len(units), "skipped": len(units) - len(todo), "ran": 0, "parts": str(parts)}
    if len(todo) < len(units):
        log(f"resuming: {len(units) - len(todo)} of {len(units)} units already done")
    overall = None
    if progress:
        from tqdm.auto import tqdm

        overall = tqdm(total=len(units), initial=len(units) - len(todo), desc="sweep", unit="unit", file=sys.stderr)
    groups: dict[tuple[str, str], list[Unit]] = {}
    for u in todo:
        groups.setdefault((u.model, u.dataset), []).append(u)
    current_model, model = None, None
    try:
        for (model_name, dataset), group in groups.items():
            if model_name != current_model:
                model, current_model = load_model(model_name, device=cfg.device, dtype=cfg.dtype), model_name
            opts = {k: v for k, v in cfg.datasets[dataset].items() if k != "probes"}
            n_prompts = opts.pop("n_prompts", None)
            if "path" in opts:
                prompts = read_prompts(opts["path"])[: n_prompts or None]
            else:
                if dataset in NEEDS_TOKENIZER:
                    opts["tokenizer"] = model.tokenizer
                prompts = make_dataset(dataset, n_prompts=n_prompts, seed=cfg.seed, **opts)
            probes = [get_probe(u.probe, **cfg.probe_params.get(u.probe, {})) for u in group]
            root = Path(opts["path"]).resolve().parent if "path" in opts else None
            result = run_probes(model, prompts, probes, batch_size=cfg.batch_size, prepend_bos=cfg.prepend_bos,
                                root=root, progress=progress)
            shown = example_prompts(model, prompts, cfg.prepend_bos)
            for u in group:
                meta = run_metadata(model=model.describe(), dataset={"name": dataset, "n_prompts": len(prompts), "seed": cfg.seed,
                                    "options": cfg.datasets[dataset]}, probes=[probes[group.index(u)].config()],
                                    config={"sweep": str(config_path), "unit": u.key, "batch_size": cfg.batch_size, "dtype": cfg.dtype},
                                    summary=result.results[u.probe].summary, prompts=shown)
                write_parquet(tidy(result.results[u.probe].table, model=model_name, dataset=dataset), parts / u.filename, meta)
                summary["ran"] += 1
                if overall is not None:
                    overall.update(1)
    finally:
        if overall is not None:
            overall.close()
    return summary
