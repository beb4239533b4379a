"""A sweep's config: a grid of models x datasets x probes from a TOML file, resumable and self-healing.

Config (``workbench sweep CONFIG.toml --out runs/NAME``)::

    models = ["smollm2-135m"]
    probes = ["entropy", "sink"]
    batch_size = "auto"        # optional; also device, dtype, seed, prepend_bos
    views = true               # optional: pattern views of each role's strongest head (views.parquet)
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

The run folder it is written into is :mod:`workbench.runs.folder`; :mod:`workbench.runs.sweep` drives a
sweep.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

from pydantic import Field, StrictBool, StringConstraints, field_validator

from workbench.errors import WorkbenchError
from workbench.protocol.params import Float, Int, Options
from workbench.runs.config_files import read_toml, validate_table

DATASET_KEYS = {"probes", "path", "dataset"}  # besides the dataset's own options


KEY_FORMAT = 2


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
    # probes from other packages: {probe: {"distribution", "version", "params_schema"}} (built-ins: absent,
    # so their unit keys are those of earlier versions and their saved parts stay reusable)
    probe_origins: dict[str, dict[str, str]] = field(default_factory=dict)
    views: bool = True  # store the strongest head of each role's pattern (OUT/views.parquet); not in any key

    def units(self) -> list[Unit]:
        out = []
        for m in self.models:
            for d, spec in self.datasets.items():
                for p in self.probes:
                    if spec.probes is not None and p not in spec.probes:
                        continue
                    ident = {
                        "format": KEY_FORMAT,
                        "model": m,
                        "model_identity": self.model_identity.get(m),
                        "device": self.device_type,
                        "dtype": self.dtype,
                        **spec.identity(),
                        "prepend_bos": self.prepend_bos,
                        "probe": p,
                        "probe_version": self.probe_versions.get(p, 1),
                        "probe_params": self.probe_params.get(p, {}),
                    }
                    if p in self.probe_origins:
                        ident["probe_origin"] = self.probe_origins[p]
                    out.append(Unit(m, d, p, json.dumps(ident, sort_keys=True, default=str)))
        return out


_UNITS = {
    "": 1,
    "B": 1,
    "KB": 10**3,
    "MB": 10**6,
    "GB": 10**9,
    "TB": 10**12,
    "KIB": 2**10,
    "MIB": 2**20,
    "GIB": 2**30,
    "TIB": 2**40,
}


Name = Annotated[str, StringConstraints(min_length=1, pattern=r"\S")]  # not empty, not blank


class SweepFile(Options):
    """The top level of a sweep TOML (each dataset table and probe's parameters are then checked
    against their own schemas)."""

    models: list[Name] = Field(min_length=1, json_schema_extra={"fix": 'e.g. models = ["smollm2-135m"]'})
    probes: list[Name] = Field(min_length=1, json_schema_extra={"fix": 'e.g. probes = ["entropy", "sink"]'})
    datasets: dict[str, Any] = Field(
        min_length=1, json_schema_extra={"fix": "e.g. [datasets.prose] with n_prompts = 4"}
    )
    probe_params: dict[str, dict[str, Any]] = Field(
        {}, json_schema_extra={"fix": "e.g. [probe_params.sink] with epsilon = 0.3"}
    )
    batch_size: Int | str = "auto"
    device: str = Field("auto", json_schema_extra={"fix": "use cpu, cuda, cuda:N or auto"})
    dtype: str = Field("float32", json_schema_extra={"fix": "use float32, bfloat16 or float16"})
    seed: Int = Field(0, ge=0, json_schema_extra={"fix": "e.g. seed = 0"})
    prepend_bos: StrictBool = Field(False, json_schema_extra={"fix": "e.g. prepend_bos = true"})
    views: StrictBool = Field(True, json_schema_extra={"fix": "views = true or views = false"})
    executor: dict[str, Any] = Field(
        {}, json_schema_extra={"fix": 'e.g. [executor] with cpus = 4, gpus = 1, memory = "16GB"'}
    )


class ExecutorTable(Options):
    """``[executor]``: what one group's task asks of a cluster (the local executor ignores it; not
    in any unit's key). ``cpus`` (> 0, default 1), ``gpus`` (>= 0, default 0), ``memory`` (bytes, or
    "16GB" / "8GiB"), ``retries`` (whole >= 0, default 3: how often a task whose worker died is re-run)."""

    cpus: Float = Field(1, gt=0, json_schema_extra={"fix": "e.g. cpus = 1"})
    gpus: Float = Field(0, ge=0, json_schema_extra={"fix": "e.g. gpus = 0"})
    memory: Int | str | None = Field(None, json_schema_extra={"fix": 'e.g. memory = "16GB"'})
    retries: Int = Field(3, ge=0, json_schema_extra={"fix": "e.g. retries = 3"})

    @field_validator("memory")
    @classmethod
    def _bytes(cls, v: int | str | None) -> int | None:
        if v is None:
            return None
        m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*", v, re.I) if isinstance(v, str) else None
        if isinstance(v, int) and v >= 1:
            return v
        if m and float(m.group(1)) > 0:
            return int(float(m.group(1)) * _UNITS[(m.group(2) or "").upper()])
        raise ValueError(f'must be bytes or a size such as "16GB", got {v!r}')


def _fail(path: Path, message: str, fix: str) -> WorkbenchError:
    return WorkbenchError(f"{path}: {message}", fix)


def _dataset_spec(path: Path, name: str, table: Any, probes: list[str], seed: int) -> DatasetSpec:
    from workbench.datasets import DATASETS, OPTIONS
    from workbench.inputs.prompts import read_prompts
    from workbench.protocol.params import validate_options

    if not isinstance(table, dict):
        raise _fail(path, f"[datasets.{name}] must be a table", "e.g. [datasets.prose] with n_prompts = 4")
    only = table.get("probes")
    if only is not None and (not isinstance(only, list) or not only or any(p not in probes for p in only)):
        raise _fail(
            path, f"[datasets.{name}] probes must list probes of this sweep", f"probes here: {', '.join(probes)}"
        )
    if "path" in table:
        extra = sorted(set(table) - {"path", "n_prompts", "probes"})
        if extra:
            raise _fail(
                path,
                f"[datasets.{name}] with a path takes only path, n_prompts, probes; not {', '.join(extra)}",
                "remove those keys",
            )
        if not isinstance(table["path"], str):
            raise _fail(path, f"[datasets.{name}] path must be a string", 'e.g. path = "prompts.jsonl"')
        file = (path.parent / table["path"]).resolve()
        if not file.is_file():
            raise _fail(path, f"[datasets.{name}] path {file} does not exist", "paths are relative to the config file")
        n = table.get("n_prompts")
        if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
            raise _fail(
                path, f"[datasets.{name}] n_prompts must be a whole number >= 1, got {n!r}", "e.g. n_prompts = 16"
            )
        read_prompts(file)  # a malformed file fails now, naming its line, not after the model loaded
        return DatasetSpec(
            name, None, {"n_prompts": n}, str(file), hashlib.sha256(file.read_bytes()).hexdigest()[:16], only
        )
    generator = table.get("dataset", name)
    if generator not in DATASETS:
        raise _fail(
            path,
            f"unknown dataset {generator!r}" + (f" in [datasets.{name}]" if generator != name else ""),
            f"choose from: {', '.join(DATASETS)}, or give a path to a prompts file",
        )
    opts = {k: v for k, v in table.items() if k not in DATASET_KEYS}
    opts.setdefault("seed", seed)
    valid = validate_options(OPTIONS[generator], opts, f"[datasets.{name}]", noun="option")
    return DatasetSpec(name, generator, valid.model_dump(mode="json"), probes=only)


def _dataset_specs(path: Path, datasets: dict[str, Any], probes: list[str], seed: int) -> dict[str, DatasetSpec]:
    """Every ``[datasets.X]`` table as a :class:`DatasetSpec`, a problem reported against the config file."""
    specs = {}
    for name, table in datasets.items():
        try:
            specs[name] = _dataset_spec(path, name, table, probes, seed)
        except WorkbenchError as exc:
            if exc.message.startswith(str(path)):
                raise
            raise _fail(path, exc.message, exc.fix or "") from None
    return specs


def probe_origin(name: str, probe: Any) -> dict[str, str] | None:
    """What a saved result of plugin probe ``name`` depends on beyond its parameters: the
    distribution that registers it, that distribution's version and a hash of its parameter schema
    (``Params``: names, types, defaults, bounds). Editing a plugin and bumping its version, or
    changing its parameters, never reuses stale parts. None for the built-in probes, whose code is
    the workbench's own (their ``version`` attribute marks a change of numbers)."""
    from workbench.protocol.registry import BUILTIN_DISTRIBUTION, origin

    dist, version = origin(name)
    if dist == BUILTIN_DISTRIBUTION:
        return None
    schema_of = getattr(getattr(probe, "Params", None), "model_json_schema", None)
    schema = json.dumps(schema_of() if schema_of is not None else None, sort_keys=True, default=str)
    cls = type(probe)
    return {
        "distribution": dist,
        "version": version,
        "class": f"{cls.__module__}.{cls.__qualname__}",
        "params_schema": hashlib.sha256(schema.encode()).hexdigest()[:16],
    }


def _probe_settings(
    path: Path, probes: list[str], probe_params: dict[str, dict[str, Any]]
) -> tuple[dict[str, dict[str, Any]], dict[str, int], dict[str, dict[str, str]]]:
    """Each probe's validated parameters (``[probe_params.X]`` over its defaults), its version and,
    for a plugin's probe, its origin (:func:`probe_origin`)."""
    from workbench.protocol.params import options_dict
    from workbench.protocol.registry import get_probe

    if any(p not in probes for p in probe_params):
        raise _fail(path, "[probe_params.X] tables must name probes of this sweep", f"probes here: {', '.join(probes)}")
    params, versions, origins = {}, {}, {}
    for p in probes:
        try:
            probe = get_probe(p, **probe_params.get(p, {}))
        except WorkbenchError as exc:
            raise _fail(path, f"[probe_params.{p}] {exc.message}", exc.fix or "") from None
        params[p] = options_dict(probe.options)
        versions[p] = int(getattr(probe, "version", 1))
        found = probe_origin(p, probe)
        if found is not None:
            origins[p] = found
    return params, versions, origins


def load_config(path: str | Path) -> SweepConfig:
    """Parse and validate a sweep TOML with the command line's own rules; every problem names
    the key and the fix. Nothing is written and no model is loaded."""
    from workbench.inputs.batching import parse_batch_size
    from workbench.models.device import resolve_device, resolve_dtype
    from workbench.models.loading import model_identity
    from workbench.protocol.registry import probe_class

    path = Path(path)
    raw = read_toml(path, "sweep config", "fix the syntax (see the example in `workbench sweep --help`)")
    top = validate_table(path, SweepFile, raw, "top level")
    models, probes, datasets = top.models, top.probes, top.datasets
    for p in probes:
        try:
            probe_class(p)
        except WorkbenchError as exc:
            raise _fail(path, exc.message, exc.fix or "") from None
    probes = list(dict.fromkeys(probes))
    seed, prepend_bos = top.seed, top.prepend_bos
    try:
        batch_size = parse_batch_size(top.batch_size, "batch_size")
        dtype = str(resolve_dtype(top.dtype, None)).replace("torch.", "")
        device = top.device
        device_type = resolve_device(device).type
    except WorkbenchError as exc:
        raise _fail(path, exc.message, exc.fix or "") from None
    specs = _dataset_specs(path, datasets, probes, seed)
    params, versions, origins = _probe_settings(path, probes, top.probe_params)
    executor = validate_table(path, ExecutorTable, top.executor, "[executor]").model_dump(exclude_unset=True)
    identities = {}
    for m in dict.fromkeys(models):
        try:
            identities[m] = model_identity(m)
        except WorkbenchError as exc:
            raise _fail(path, exc.message, exc.fix or "") from None
    return SweepConfig(
        list(dict.fromkeys(models)),
        probes,
        specs,
        params,
        batch_size,
        device,
        dtype,
        seed,
        prepend_bos,
        raw,
        identities,
        device_type,
        versions,
        executor,
        origins,
        views=top.views,
    )
