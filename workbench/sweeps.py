"""Probe sweeps: a grid of models x datasets x probes from a TOML file, resumable and self-healing.

Config (``workbench sweep CONFIG.toml --out runs/NAME``)::

    models = ["smollm2-135m"]
    probes = ["entropy", "sink"]
    batch_size = "auto"        # optional; also device, dtype, seed, prepend_bos
    [datasets.prose]
    n_prompts = 4
    [datasets.niah]            # any dataset option: context_len, depths, period, ...
    n_prompts = 10
    context_len = [1000]
    probes = ["retrieval"]     # optional: this dataset runs only these probes
    [datasets.niah-long]       # the same generator twice: name it with `dataset`
    dataset = "niah"
    context_len = [4000]
    [datasets.mine]            # a prompts JSONL file of your own (relative to the config)
    path = "prompts.jsonl"
    [probe_params.sink]        # optional per-probe parameters
    epsilon = 0.3

**Validation first.** The whole config is checked with the command line's own rules (model names,
every dataset option against the dataset's schema, every probe parameter against the probe's,
``batch_size``, ``dtype``, ``device``, ``seed``; prompts files are read) before anything is
written or any model loads; a failed re-run leaves the run folder's ``sweep.json`` as it was.

**Units and keys.** A *unit* is one (model, dataset, probe). Its table is written atomically to
``parts/<model>__<dataset>__<probe>__<key>.parquet``; the key hashes everything that decides its
numbers (:meth:`Unit.identity`): the model's identity (a local folder's config and weights, a hub
snapshot), device type and dtype, the dataset and every option (incl. ``n_prompts`` and ``seed``),
a prompts file's content, ``prepend_bos``, the probe, its version and its parameters with
defaults filled in. ``batch_size`` is not in the key: a prompt's numbers do not depend on its
batch (tested to 1e-5).

**The run folder reports exactly its current config.** A re-run checks every existing part against
the checksum recorded in ``run.json`` (or, for a part written just before a kill, by reading it
whole), sets aside parts that are unreadable or that no current unit names (an earlier config) in
``superseded/<time>/``, says so, and computes what is missing. So a sweep killed at any point
(even SIGKILL) continues with nothing lost or duplicated, a corrupted part is recomputed, and
``load_results`` / ``query`` / ``report`` never mix two versions of a unit.

**Where.** The run folder is a path or an fsspec URL (``s3://bucket/runs/a``, ``gs://...``,
``file:///shared/runs/a``); :mod:`workbench.runfs` writes, lists, reads and moves its files, with
local paths on the plain file-system code. On an object store a part is written straight to its
key (a PUT is atomic per object) and a part set aside is copied then deleted (``run.json``
records each such move under ``set_aside``).

Units of the same (model, dataset) share one run of :func:`workbench.runner.run_probes` (one
forward for all their pattern probes); :func:`run_group` is that step, the unit of work an
executor schedules (:mod:`workbench.executors`: in this process, or as Ray tasks with the
resources of an optional ``[executor]`` table: ``cpus``, ``gpus``, ``memory``, ``retries``).
"""
from __future__ import annotations

import hashlib
import json
import re
import sys
import time
import tomllib
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

from workbench import runfs
from workbench.errors import WorkbenchError

TOP_KEYS = {"models", "probes", "datasets", "probe_params", "batch_size", "device", "dtype", "seed", "prepend_bos", "executor"}
EXECUTOR_KEYS = {"cpus", "gpus", "memory", "retries"}  # resources of one group's task (not in any unit's key)
DATASET_KEYS = {"probes", "path", "dataset"}  # besides the dataset's own options
KEY_FORMAT = 2
MANIFEST = "run.json"


@dataclass(frozen=True)
class Unit:
    """One (model, dataset, probe) of a sweep and everything that decides its numbers."""

    model: str
    dataset: str
    probe: str
    identity: str  # canonical JSON of what the numbers depend on

    @property
    def key(self) -> str:
        return hashlib.sha256(self.identity.encode()).hexdigest()[:12]

    @property
    def filename(self) -> str:
        safe = lambda s: re.sub(r"[^A-Za-z0-9._-]+", "-", s).strip("-")  # noqa: E731
        return f"{safe(self.model)}__{safe(self.dataset)}__{safe(self.probe)}__{self.key}.parquet"


@dataclass
class DatasetSpec:
    """One ``[datasets.NAME]`` table, validated."""

    name: str  # the table's name: the dataset column of its rows
    generator: str | None  # a shipped / generated dataset, or None for a prompts file
    options: dict[str, Any]  # validated options, defaults filled in (incl. n_prompts, seed)
    path: str | None = None
    sha256: str | None = None
    probes: list[str] | None = None

    def identity(self) -> dict[str, Any]:
        return {"dataset": self.name, "generator": self.generator, "options": self.options, "data_sha256": self.sha256}


@dataclass
class SweepConfig:
    models: list[str]
    probes: list[str]
    datasets: dict[str, DatasetSpec]
    probe_params: dict[str, dict[str, Any]]  # validated, defaults filled in
    batch_size: int | str = "auto"
    device: str = "auto"
    dtype: str = "float32"
    seed: int = 0
    prepend_bos: bool = False
    raw: dict = field(default_factory=dict)
    model_identity: dict[str, dict] = field(default_factory=dict)
    device_type: str = "cpu"
    probe_versions: dict[str, int] = field(default_factory=dict)
    executor: dict[str, Any] = field(default_factory=dict)  # [executor]: cpus, gpus, memory (bytes), retries

    def units(self) -> list[Unit]:
        out = []
        for m in self.models:
            for d, spec in self.datasets.items():
                for p in self.probes:
                    if spec.probes is not None and p not in spec.probes:
                        continue
                    ident = {"format": KEY_FORMAT, "model": m, "model_identity": self.model_identity.get(m), "device": self.device_type,
                             "dtype": self.dtype, **spec.identity(), "prepend_bos": self.prepend_bos, "probe": p,
                             "probe_version": self.probe_versions.get(p, 1), "probe_params": self.probe_params.get(p, {})}
                    out.append(Unit(m, d, p, json.dumps(ident, sort_keys=True, default=str)))
        return out


def _fail(path: Path, message: str, fix: str) -> WorkbenchError:
    return WorkbenchError(f"{path}: {message}", fix)


def _dataset_spec(path: Path, name: str, table: Any, probes: list[str], seed: int) -> DatasetSpec:
    from workbench.datasets import DATASETS, OPTIONS
    from workbench.params import validate_options
    from workbench.prompts import read_prompts

    if not isinstance(table, dict):
        raise _fail(path, f"[datasets.{name}] must be a table", "e.g. [datasets.prose] with n_prompts = 4")
    only = table.get("probes")
    if only is not None and (not isinstance(only, list) or not only or any(p not in probes for p in only)):
        raise _fail(path, f"[datasets.{name}] probes must list probes of this sweep", f"probes here: {', '.join(probes)}")
    if "path" in table:
        extra = sorted(set(table) - {"path", "n_prompts", "probes"})
        if extra:
            raise _fail(path, f"[datasets.{name}] with a path takes only path, n_prompts, probes; not {', '.join(extra)}", "remove those keys")
        if not isinstance(table["path"], str):
            raise _fail(path, f"[datasets.{name}] path must be a string", 'e.g. path = "prompts.jsonl"')
        file = (path.parent / table["path"]).resolve()
        if not file.is_file():
            raise _fail(path, f"[datasets.{name}] path {file} does not exist", "paths are relative to the config file")
        n = table.get("n_prompts")
        if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
            raise _fail(path, f"[datasets.{name}] n_prompts must be a whole number >= 1, got {n!r}", "e.g. n_prompts = 16")
        read_prompts(file)  # a malformed file fails now, naming its line, not after the model loaded
        return DatasetSpec(name, None, {"n_prompts": n}, str(file), hashlib.sha256(file.read_bytes()).hexdigest()[:16], only)
    generator = table.get("dataset", name)
    if generator not in DATASETS:
        raise _fail(path, f"unknown dataset {generator!r}" + (f" in [datasets.{name}]" if generator != name else ""),
                    f"choose from: {', '.join(DATASETS)}, or give a path to a prompts file")
    opts = {k: v for k, v in table.items() if k not in DATASET_KEYS}
    opts.setdefault("seed", seed)
    valid = validate_options(OPTIONS[generator], opts, f"[datasets.{name}]", noun="option")
    return DatasetSpec(name, generator, valid.model_dump(mode="json"), probes=only)


_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def _executor_table(path: Path, table: Any) -> dict[str, Any]:
    """``[executor]``: what one group's task asks of a cluster (the local executor ignores it).

    ``cpus`` (> 0, default 1), ``gpus`` (>= 0, default 0), ``memory`` (bytes, or "16GB" / "8GiB"),
    ``retries`` (whole >= 0, default 3: how often a task whose worker died is re-run)."""
    if not isinstance(table, dict):
        raise _fail(path, "[executor] must be a table", "e.g. [executor] with cpus = 4, gpus = 1, memory = \"16GB\"")
    unknown = sorted(set(table) - EXECUTOR_KEYS)
    if unknown:
        raise _fail(path, f"[executor] unknown key(s) {', '.join(map(repr, unknown))}", f"allowed: {', '.join(sorted(EXECUTOR_KEYS))}")
    out: dict[str, Any] = {}
    for key, low, strict in (("cpus", 0, True), ("gpus", 0, False)):
        if key in table:
            v = table[key]
            if isinstance(v, bool) or not isinstance(v, (int, float)) or v != v or (v <= low if strict else v < low) or v == float("inf"):
                raise _fail(path, f"[executor] {key} must be a number {'>' if strict else '>='} {low}, got {v!r}", f"e.g. {key} = {1 if strict else 0}")
            out[key] = v
    if "retries" in table:
        v = table["retries"]
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise _fail(path, f"[executor] retries must be a whole number >= 0, got {v!r}", "e.g. retries = 3")
        out["retries"] = v
    if "memory" in table:
        v = table["memory"]
        m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*", v, re.I) if isinstance(v, str) else None
        if isinstance(v, int) and not isinstance(v, bool) and v >= 1:
            out["memory"] = v
        elif m and float(m.group(1)) > 0:
            out["memory"] = int(float(m.group(1)) * _UNITS[(m.group(2) or "").upper()])
        else:
            raise _fail(path, f"[executor] memory must be bytes or a size such as \"16GB\", got {v!r}", 'e.g. memory = "16GB"')
    return out


def load_config(path: str | Path) -> SweepConfig:
    """Parse and validate a sweep TOML with the command line's own rules; every problem names
    the key and the fix. Nothing is written and no model is loaded."""
    from workbench.batching import parse_batch_size
    from workbench.device import resolve_device, resolve_dtype
    from workbench.models import model_identity
    from workbench.params import options_dict
    from workbench.registry import get_probe, probe_class

    path = Path(path)
    if not path.is_file():
        raise WorkbenchError(f"sweep config {path} does not exist", "check the path")
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise WorkbenchError(f"{path} is not valid TOML: {exc}", "fix the syntax (see the example in `workbench sweep --help`)") from None
    unknown = sorted(set(raw) - TOP_KEYS)
    if unknown:
        raise _fail(path, f"unknown key(s) {', '.join(map(repr, unknown))}", f"allowed keys: {', '.join(sorted(TOP_KEYS))}")
    for key in ("models", "probes", "datasets"):
        if key not in raw:
            raise _fail(path, f"missing {key!r}", 'e.g. models = ["smollm2-135m"], probes = ["entropy"], [datasets.prose]')
    models, probes, datasets = raw["models"], raw["probes"], raw["datasets"]
    if not isinstance(models, list) or not models or not all(isinstance(m, str) and m.strip() for m in models):
        raise _fail(path, "'models' must be a non-empty list of names", 'e.g. models = ["smollm2-135m"]')
    if not isinstance(probes, list) or not probes or not all(isinstance(p, str) for p in probes):
        raise _fail(path, "'probes' must be a non-empty list of probe names", 'e.g. probes = ["entropy", "sink"]')
    for p in probes:
        try:
            probe_class(p)
        except WorkbenchError as exc:
            raise _fail(path, exc.message, exc.fix or "") from None
    probes = list(dict.fromkeys(probes))
    seed = raw.get("seed", 0)
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise _fail(path, f"seed must be a whole number >= 0, got {seed!r}", "e.g. seed = 0")
    prepend_bos = raw.get("prepend_bos", False)
    if not isinstance(prepend_bos, bool):
        raise _fail(path, f"prepend_bos must be true or false, got {prepend_bos!r}", "e.g. prepend_bos = true")
    try:
        batch_size = parse_batch_size(raw.get("batch_size", "auto"), "batch_size")
        dtype = str(resolve_dtype(raw.get("dtype", "float32"), None)).replace("torch.", "") if isinstance(raw.get("dtype", "float32"), str) else None
        device = raw.get("device", "auto")
        if not isinstance(device, str):
            raise WorkbenchError(f"device must be a string, got {device!r}", "use cpu, cuda, cuda:N or auto")
        device_type = resolve_device(device).type
    except WorkbenchError as exc:
        raise _fail(path, exc.message, exc.fix or "") from None
    if dtype is None:
        raise _fail(path, f"dtype must be a string, got {raw.get('dtype')!r}", "use float32, bfloat16 or float16")
    if not isinstance(datasets, dict) or not datasets:
        raise _fail(path, "'datasets' must be a table of dataset tables", "e.g. [datasets.prose] with n_prompts = 4")
    specs = {}
    for name, table in datasets.items():
        try:
            specs[name] = _dataset_spec(path, name, table, probes, seed)
        except WorkbenchError as exc:
            if exc.message.startswith(str(path)):
                raise
            raise _fail(path, exc.message, exc.fix or "") from None
    probe_params = raw.get("probe_params", {})
    if not isinstance(probe_params, dict) or any(p not in probes or not isinstance(v, dict) for p, v in probe_params.items()):
        raise _fail(path, "[probe_params.X] tables must name probes of this sweep", f"probes here: {', '.join(probes)}")
    params, versions = {}, {}
    for p in probes:
        try:
            probe = get_probe(p, **probe_params.get(p, {}))
        except WorkbenchError as exc:
            raise _fail(path, f"[probe_params.{p}] {exc.message}", exc.fix or "") from None
        params[p] = options_dict(probe.options)
        versions[p] = int(getattr(probe, "version", 1))
    executor = _executor_table(path, raw.get("executor", {}))
    identities = {}
    for m in dict.fromkeys(models):
        try:
            identities[m] = model_identity(m)
        except WorkbenchError as exc:
            raise _fail(path, exc.message, exc.fix or "") from None
    return SweepConfig(list(dict.fromkeys(models)), probes, specs, params, batch_size, device, dtype, seed, prepend_bos, raw,
                       identities, device_type, versions, executor)


# -- the run folder ---------------------------------------------------------------------------
def _readable(path: runfs.Target) -> bool:
    from workbench.results import read_table

    try:
        read_table(path)
        return True
    except Exception:
        return False


class RunFolder:
    """``OUT/parts/*.parquet`` plus ``OUT/run.json``: every finished part with its size and
    SHA-256; ``OUT/superseded/<time>/`` holds what was set aside. ``OUT`` is a path or an
    fsspec URL (:mod:`workbench.runfs`)."""

    def __init__(self, out: str | Path) -> None:
        self.out = runfs.as_target(out)
        self.parts = runfs.join(self.out, "parts")
        self.manifest_path = runfs.join(self.out, MANIFEST)
        self.manifest: dict[str, Any] = {"format": 1, "parts": {}}
        if runfs.is_file(self.manifest_path):
            try:
                loaded = json.loads(runfs.read_bytes(self.manifest_path))
                if isinstance(loaded, dict) and isinstance(loaded.get("parts"), dict):
                    self.manifest = loaded
            except (ValueError, OSError):
                pass  # a damaged manifest: every part is verified by reading it
        self._aside: runfs.Target | None = None

    def save(self) -> None:
        runfs.write_text(self.manifest_path, json.dumps(self.manifest, indent=1, sort_keys=True))

    def aside_dir(self) -> runfs.Target:
        if self._aside is None:
            stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S%fZ")
            self._aside = runfs.join(self.out, "superseded", stamp)
        return self._aside

    def set_aside(self, path: runfs.Target, why: str) -> runfs.Target:
        """Move a part to ``superseded/<time>/<why>/``: a rename on a file system; on an object
        store a copy and a delete, recorded under ``set_aside`` in ``run.json`` (a crash between
        the two leaves the part in both places, and the next run sets it aside again)."""
        name = runfs.name(path)
        dest = runfs.join(self.aside_dir(), why, name)
        runfs.move(path, dest)
        self.manifest["parts"].pop(name, None)
        if runfs.is_url(str(self.out)):
            self.manifest.setdefault("set_aside", []).append(
                {"part": name, "to": str(dest), "why": why, "at": datetime.now(timezone.utc).isoformat(timespec="seconds")})
        return dest

    def is_sound(self, path: runfs.Target) -> bool:
        """The part matches its recorded checksum; a part without a record (written just before
        a kill, or by an older version) must read whole, and is then recorded."""
        name = runfs.name(path)
        entry = self.manifest["parts"].get(name)
        if entry is not None:
            return runfs.size(path) == entry.get("size") and runfs.sha256(path) == entry.get("sha256")
        if not _readable(path):
            return False
        self.manifest["parts"][name] = {"size": runfs.size(path), "sha256": runfs.sha256(path)}
        return True

    def record(self, info: dict[str, Any]) -> None:
        self.manifest["parts"][info["filename"]] = {k: v for k, v in info.items() if k != "filename"}
        self.save()

    def reconcile(self, units: list[Unit], log: Callable[[str], None]) -> tuple[set[str], dict[str, int]]:
        """Set aside parts no unit names and parts that are damaged; the names of sound parts."""
        wanted = {u.filename for u in units}
        moved = {"stale": 0, "corrupt": 0}
        sound: set[str] = set()
        for part in (runfs.join(self.parts, n) for n in runfs.list_names(self.parts, ".parquet")):
            if runfs.name(part) not in wanted:
                self.set_aside(part, "stale")
                moved["stale"] += 1
            elif self.is_sound(part):
                sound.add(runfs.name(part))
            else:
                self.set_aside(part, "corrupt")
                moved["corrupt"] += 1
        for name in list(self.manifest["parts"]):
            if name not in sound:
                self.manifest["parts"].pop(name)
        if moved["stale"]:
            log(f"set aside {moved['stale']} part(s) of an earlier config in {runfs.join(self.aside_dir(), 'stale')} "
                "(this run reports its current config only)")
        if moved["corrupt"]:
            log(f"set aside {moved['corrupt']} unreadable or damaged part(s) in {runfs.join(self.aside_dir(), 'corrupt')}; recomputing them")
        self.save() if runfs.is_dir(self.out) else None
        return sound, moved


# -- running ----------------------------------------------------------------------------------
def example_prompts(model, prompts, prepend_bos: bool, n: int = 3, width: int = 64) -> list[dict]:
    """The first prompts' first tokens, for reports (nothing if they cannot be tokenized)."""
    from workbench.prompts import tokenize_prompts

    try:
        tokenized = tokenize_prompts(list(prompts[:n]), model.tokenizer, model.n_ctx, model.vocab_size, prepend_bos=prepend_bos)
    except Exception:
        return []
    tok = model.tokenizer
    return [{"id": p.id, "tokens": tok.convert_ids_to_tokens(p.ids[:width]), "ids": p.ids[:width], "text": tok.decode(p.ids[:width])} for p in tokenized]


def group_prompts(cfg: SweepConfig, spec: DatasetSpec, model) -> list:
    """The prompts of one dataset table for ``model`` (token-space datasets use its tokenizer)."""
    from workbench.datasets import NEEDS_TOKENIZER, make_dataset
    from workbench.prompts import read_prompts

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


def run_group(cfg: SweepConfig, units: list[Unit], parts_dir: str | Path, model=None, progress: bool = False,
              config_path: str = "") -> list[dict[str, Any]]:
    """Compute every unit of one (model, dataset) in one run of the runner and write each part
    atomically into ``parts_dir`` (a path or an fsspec URL); returns each part's ``filename``,
    ``size``, ``sha256`` (of the file as stored) and ``key``. The unit of work of every executor."""
    from workbench.models import load_model
    from workbench.registry import get_probe
    from workbench.results import run_metadata, tidy, write_parquet
    from workbench.runner import run_probes

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
    result = run_probes(model, prompts, probes, batch_size=cfg.batch_size, prepend_bos=cfg.prepend_bos,
                        root=Path(spec.path).parent if spec.path else None, progress=progress)
    timing = {"started": started.isoformat(timespec="seconds"), "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "seconds": round(time.perf_counter() - t0, 3), "group": f"{model_name} x {dataset}"}
    shown = example_prompts(model, prompts, cfg.prepend_bos)
    infos = []
    for u, probe in zip(units, probes):
        meta = run_metadata(
            model=model.describe(),
            dataset={"name": dataset, "generator": spec.generator, "n_prompts": len(prompts), "n_tokens": result.stats.n_tokens,
                     "seed": spec.options.get("seed", cfg.seed), "options": spec.options, "path": spec.path, "sha256": spec.sha256,
                     "prepend_bos": cfg.prepend_bos},
            probes=[probe.config()], config={"sweep": config_path, "unit": u.key, "batch_size": cfg.batch_size, "dtype": cfg.dtype},
            unit=json.loads(u.identity), summary=result.results[u.probe].summary, timing=timing, prompts=shown,
        )
        path = runfs.join(runfs.as_target(parts_dir), u.filename)
        write_parquet(tidy(result.results[u.probe].table, model=model_name, dataset=dataset), path, meta)
        infos.append({"filename": u.filename, "size": runfs.size(path), "sha256": runfs.sha256(path), "key": u.key})
    return infos


def plan(cfg: SweepConfig, todo: list[Unit]) -> list[list[Unit]]:
    """The units to compute, grouped by (model, dataset), models kept together (one load each)."""
    groups: dict[tuple[str, str], list[Unit]] = {}
    for u in todo:
        groups.setdefault((u.model, u.dataset), []).append(u)
    return list(groups.values())


def prepare(config_path: str | Path, out_dir: str | Path, log: Callable[[str], None] = print) -> tuple[SweepConfig, RunFolder, list[Unit], list[Unit], dict[str, int]]:
    """Validate, reconcile the run folder (a path or an fsspec URL) with the config, record the
    config: what to compute."""
    from workbench.results import check_writable

    runfs.check_url(str(out_dir))  # an unknown protocol or a missing package (s3fs): one error, nothing written
    cfg = load_config(config_path)  # raises before anything is written
    folder = RunFolder(out_dir)
    check_writable(runfs.join(folder.parts, "probe.parquet"))
    units = cfg.units()
    sound, moved = folder.reconcile(units, log)
    runfs.write_text(runfs.join(folder.out, "sweep.json"),
                     json.dumps({**cfg.raw, "_units": {u.filename: json.loads(u.identity) for u in units}}, indent=1, default=str))
    todo = [u for u in units if u.filename not in sound]
    if len(todo) < len(units):
        log(f"resuming: {len(units) - len(todo)} of {len(units)} units already done")
    return cfg, folder, units, todo, moved


def run_sweep(config_path: str | Path, out_dir: str | Path, progress: bool = True, log: Callable[[str], None] = print,
              executor: str = "local", address: str | None = None) -> dict[str, Any]:
    """Run every unit that has no sound part yet on ``executor`` (:mod:`workbench.executors`:
    ``local``, in this process; ``ray``, as tasks on a cluster at ``address``); returns a summary."""
    from workbench.executors import get_executor

    runner = get_executor(executor, address=address)  # a missing package or cluster fails before anything is written
    cfg, folder, units, todo, moved = prepare(config_path, out_dir, log)
    summary = {"units": len(units), "skipped": len(units) - len(todo), "ran": 0, "parts": str(folder.parts), "executor": executor,
               **{f"set_aside_{k}": v for k, v in moved.items()}}
    overall = None
    if progress:
        from tqdm.auto import tqdm

        overall = tqdm(total=len(units), initial=len(units) - len(todo), desc="sweep", unit="unit", file=sys.stderr)

    def record(info: dict[str, Any]) -> None:
        folder.record(info)
        summary["ran"] += 1
        if overall is not None:
            overall.update(1)

    try:
        runner.run(cfg, plan(cfg, todo), folder.parts, record, config_path=str(config_path), progress=progress, log=log)
    finally:
        if overall is not None:
            overall.close()
    return summary
