"""Model loading: the embedded default, tiny test models, local HF folders and hub ids.

``load_model(name)`` returns a :class:`LoadedModel`: the transformers model, the tokenizer with
the model's *own* defaults (TransformerLens' boot forces ``add_bos_token=True``; we keep an
untouched copy so ``text`` prompts tokenize as the model's authors intended, and BOS is only
added when asked for) and, booted on first use of ``.bridge``, a TransformerLens
``TransformerBridge`` for hook-based work (``run_with_cache``, patching, the bridge's hook points).

The bridge is lazy because the probes never need it: they run the plain transformers modules
under the workbench attention kernel. Importing TransformerLens (it pulls in ``datasets`` and
more) and booting the bridge (with its own tokenizer) cost ~0.1 GB of resident memory and ~1 s
before a probe run's first token: on SmolLM2 at 4096 tokens that alone was 1.1x the peak memory
of a bare forward. The model's shape (layers, heads, KV heads, head size, context) is read from
its transformers config, which is what the bridge derives its own from (a test holds the two equal).

Names resolve in this order:
1. the embedded models ``smollm2-135m`` (the default) and ``gemma3-270m`` (see
   :mod:`workbench.models.embedded`), ``tiny-llama`` / ``tiny-gpt2`` / ``tiny-gemma3-text`` / ... (random
   tiny models, see :mod:`workbench.models.tiny`);
2. a local folder with a ``config.json``;
3. a Hugging Face hub id, fetched by transformers (works where the hub is reachable; fails
   with a message naming the cause where it is not).

Vision-language models (any config with a ``vision_config``: LLaVA, LLaVA-NeXT, Gemma 3, ...)
load with ``AutoModelForImageTextToText`` and the model's own ``AutoProcessor``, always with the
PIL image backend (``backend="pil"``): transformers would otherwise pick the torchvision backend
when torchvision happens to be installed, so the same folder would give slightly different
pixels on different machines, and the path a user takes with a hub id would not be the tested
one. torchvision is therefore not needed (TransformerLens only requires it for Qwen2.5-VL /
Qwen3-VL / GLM-4V, whose processors have no PIL backend).

Nothing here installs packages at run time: TransformerLens 4.3 pip-installs torchvision when
a multimodal processor fails to load, which can replace torch with a multi-GB CUDA build; we
disable that hook before every boot.
"""

from __future__ import annotations

import copy
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from workbench.errors import WorkbenchError, first_line
from workbench.files.hashing import sha256_file
from workbench.models import embedded
from workbench.models.device import resolve_device, resolve_dtype

TINY_NAMES = {
    "tiny-llama": "llama",
    "tiny-gpt2": "gpt2",
    "tiny-gemma3-text": "gemma3_text",
    "tiny-llava": "llava",
    "tiny-gemma3": "gemma3",
}
KNOWN_MODELS: dict[str, str] = {
    **{name: spec.summary for name, spec in embedded.EMBEDDED.items()},
    "tiny-llama": "random tiny Llama with GQA (3 layers, 4 heads, 2 KV heads), for tests",
    "tiny-gpt2": "random tiny GPT-2 (3 layers, 4 heads), for tests",
    "tiny-gemma3-text": (
        "random tiny Gemma 3 text model (4 layers, sliding window 8 except layer 2, 2 KV heads, BOS), for tests"
    ),
    "tiny-llava": "random tiny LLaVA (CLIP tower + tiny Llama) with a real LlavaProcessor, for tests",
    "tiny-gemma3": "random tiny Gemma 3 multimodal (SigLIP tower) with a real Gemma3Processor, for tests",
}
# where a config keeps its context length, in the order TransformerLens' bridge looks
_CTX_FIELDS = (
    "n_positions",
    "max_position_embeddings",
    "max_context_length",
    "max_length",
    "seq_length",
    "max_sequence_length",
)
HUB_TIMEOUT = 10.0  # seconds for one look-up of a model on the hub
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*(/[\w.\-]+)?$")


def _no_runtime_installs() -> None:
    """Replace TransformerLens' ``_ensure_torchvision`` (a run-time ``pip install``) with a check."""
    try:
        from transformer_lens.model_bridge.sources.transformers import helpers
    except ImportError:  # pragma: no cover - other TL layouts
        return

    def _ensure_torchvision() -> bool:
        try:
            import torchvision  # noqa: F401

            return True
        except Exception:
            return False

    helpers._ensure_torchvision = _ensure_torchvision
    try:
        from transformer_lens.model_bridge.sources.transformers import source as tl_source
    except ImportError:  # pragma: no cover - other TL layouts
        return
    # We load the VLM processor ourselves (PIL backend, offline-aware, see load_model) and set
    # bridge.processor; TL's own attempt would ask the hub again with five retries per file.
    tl_source.load_modality_processor = lambda *args, **kwargs: None


def _first(cfg: Any, *names: str) -> Any:
    """The first of ``names`` that ``cfg`` sets (not None)."""
    for n in names:
        v = getattr(cfg, n, None)
        if v is not None:
            return v
    raise WorkbenchError(
        f"{type(cfg).__name__} has none of {', '.join(names)}", "load a model whose config names its shape"
    )


@dataclass
class LoadedModel:
    """A loaded model: the transformers model, its tokenizer and where it came from; the
    TransformerLens bridge is booted on first use of :attr:`bridge`."""

    name: str
    source: str
    hf_model: Any  # the transformers model; once the bridge is booted, its modules are wrapped by the bridge's
    tokenizer: Any
    device: torch.device
    dtype: torch.dtype
    info: dict = field(default_factory=dict)
    processor: Any = None  # the model's own AutoProcessor, for vision-language models
    _bridge: Any = field(default=None, repr=False)

    @property
    def bridge(self) -> Any:
        """The TransformerLens ``TransformerBridge`` around :attr:`hf_model`, booted on first use."""
        if self._bridge is None:
            self._bridge = _boot_bridge(self)
        return self._bridge

    @property
    def bridge_booted(self) -> bool:
        """Whether :attr:`bridge` has been booted (its components then wrap the HF modules)."""
        return self._bridge is not None

    @property
    def is_multimodal(self) -> bool:
        """True for vision-language models (they take images through :attr:`processor`)."""
        return self.processor is not None

    @property
    def is_causal(self) -> bool | None:
        """Whether every attention module declares causal attention (True), one declares
        bidirectional attention (False: an encoder), or none declares either (None). What the
        KV-cache and head-gating commands check before they accept a model."""
        flags = [m.is_causal for m in self.hf_model.modules() if isinstance(getattr(m, "is_causal", None), bool)]
        return all(flags) if flags else None

    @property
    def text_config(self) -> Any:
        """The language model's transformers config (a VLM's ``text_config``)."""
        return self.hf_model.config.get_text_config()

    @property
    def n_layers(self) -> int:
        cfg = self.text_config
        return int(_first(cfg, "num_hidden_layers", "n_layer", "num_layers"))

    @property
    def n_heads(self) -> int:
        return int(_first(self.text_config, "num_attention_heads", "n_head", "num_heads"))

    @property
    def n_kv_heads(self) -> int:
        return int(getattr(self.text_config, "num_key_value_heads", None) or self.n_heads)

    @property
    def d_head(self) -> int:
        cfg = self.text_config
        return int(getattr(cfg, "head_dim", None) or _first(cfg, "hidden_size", "n_embd", "d_model") // self.n_heads)

    @property
    def n_ctx(self) -> int:
        return int(_first(self.text_config, *_CTX_FIELDS))

    @property
    def vocab_size(self) -> int:
        return int(self.text_config.vocab_size)

    def describe(self) -> dict:
        """Metadata recorded with every result file."""
        return {
            "model": self.name,
            "source": self.source,
            "architecture": type(self.hf_model).__name__,
            "n_layers": self.n_layers,
            "n_heads": self.n_heads,
            "n_kv_heads": self.n_kv_heads,
            "n_ctx": self.n_ctx,
            "multimodal": self.is_multimodal,
            "dtype": str(self.dtype).replace("torch.", ""),
            "device": str(self.device),
            **self.info,
        }


def _tiny_folder(name: str) -> Path:
    from workbench.models.tiny import make_tiny_model

    folder = embedded.cache_root() / "models" / name
    if embedded.verify_folder(folder) is not None:
        make_tiny_model(folder, TINY_NAMES[name])
        embedded.write_manifest(folder, {"name": name})
    return folder


def resolve_source(name: str) -> tuple[str, str]:
    """Map a user-facing model name to ``(source, kind)``; kind is embedded/tiny/local/hub."""
    if not isinstance(name, str) or not name.strip():
        raise WorkbenchError("empty model name", f"use one of {', '.join(KNOWN_MODELS)}, a folder or a hub id")
    if name in embedded.EMBEDDED:
        return str(embedded.ensure_embedded(name)), "embedded"
    if name in TINY_NAMES:
        return str(_tiny_folder(name)), "tiny"
    path = local_path(name)
    if path.exists():
        if not (path / "config.json").is_file():
            raise WorkbenchError(
                f"{name} is not a Hugging Face model folder (no config.json in it)",
                "point --model at a folder written by save_pretrained",
            )
        return str(path.resolve()), "local"
    if name.startswith((".", "/", "~")) or not _HUB_ID.match(name):
        raise WorkbenchError(
            f"unknown model {name!r}: not a known name, an existing folder or a hub id",
            f"use one of {', '.join(KNOWN_MODELS)} (see `workbench models`), a local folder, or org/name",
        )
    return name, "hub"


def local_path(name: str) -> Path:
    """The folder ``name`` names, read literally: ``~/x`` is under the home folder only when no
    folder is literally called so, and ``~user`` is never looked up (a folder may be named
    ``~r``)."""
    path = Path(name)
    if not path.exists() and (name == "~" or name.startswith("~/")):
        return Path.home() / name[2:]
    return path


def model_identity(name: str) -> dict:
    """What decides a model's numbers, found without loading it (sweeps key their parts on it):
    a known name with its build format, a local folder's files (a content hash of every file in
    it, weights included: a folder rewritten in place with the same sizes and times is a new
    model), or a hub id with the snapshot the local cache holds. Unknown names fail here, before
    any work. Hashing reads the weights once per call (about a second per GB)."""
    import hashlib
    import os

    if not isinstance(name, str) or not name.strip():
        raise WorkbenchError("empty model name", f"use one of {', '.join(KNOWN_MODELS)}, a folder or a hub id")
    if name in KNOWN_MODELS:
        return {"kind": "known", "name": name, "format": getattr(embedded, "_FORMAT", 1)}
    path = local_path(name)
    if path.exists():
        if not (path / "config.json").is_file():
            raise WorkbenchError(
                f"{name} is not a Hugging Face model folder (no config.json in it)",
                "point the model at a folder written by save_pretrained",
            )
        h = hashlib.sha256()
        for f in sorted(p for p in path.rglob("*") if p.is_file()):
            h.update(f.relative_to(path).as_posix().encode() + b"\0" + sha256_file(f).encode())
        return {"kind": "local", "path": str(path.resolve()), "sha256": h.hexdigest()[:16]}
    if name.startswith((".", "/", "~")) or not _HUB_ID.match(name):
        raise WorkbenchError(
            f"unknown model {name!r}: not a known name, an existing folder or a hub id",
            f"use one of {', '.join(KNOWN_MODELS)} (see `workbench models`), a local folder, or org/name",
        )
    snapshot = cached_snapshot(name)
    if snapshot is None:
        check_on_hub(name)  # a typo fails here, before a sweep moves or writes anything
    return {"kind": "hub", "id": name, "revision": snapshot or os.environ.get("HF_REVISION", "main")}


def cached_snapshot(name: str) -> str | None:
    """The revision of hub model ``name`` the local hub cache holds, or None."""
    try:
        from huggingface_hub import constants

        refs = Path(constants.HF_HUB_CACHE) / f"models--{name.replace('/', '--')}" / "refs" / "main"
        return refs.read_text().strip() if refs.is_file() else None
    except Exception:
        return None


def check_on_hub(name: str) -> None:
    """That hub id ``name``, which is not in the local hub cache, names a model the hub has: before
    a sweep moves or writes anything, a typo is one error, not a folder of set-aside parts. Whose
    failure it is: an unknown name is the user's; an unreachable hub is the network's; another
    answer of the hub is the remote service's."""
    fix = f"check the name (known: {', '.join(KNOWN_MODELS)}; see `workbench models`), a local folder, or org/name"
    offline = hub_unreachable_reason()
    if offline:
        raise WorkbenchError(
            f"unknown model {name!r}: not a known name or local folder, not in the local hub cache, "
            f"and the hub cannot be reached to look it up ({offline})",
            fix + "; or connect to the network (HF_HUB_OFFLINE unset) to download it",
        )
    from huggingface_hub import HfApi
    from huggingface_hub.errors import GatedRepoError, HfHubHTTPError, RepositoryNotFoundError

    try:
        HfApi().model_info(name, timeout=HUB_TIMEOUT)
    except GatedRepoError:
        raise WorkbenchError(
            f"model {name!r} on the hub is gated: your token has no access to it",
            "accept its terms on the hub and set HF_TOKEN",
        ) from None
    except RepositoryNotFoundError:
        raise WorkbenchError(
            f"unknown model {name!r}: not a known name or local folder, and the hub has no such model "
            "(or it is private)",
            fix + "; for a private model set HF_TOKEN",
        ) from None
    except HfHubHTTPError as exc:
        raise WorkbenchError(
            f"the Hugging Face hub could not look up {name!r} (the hub's answer: {first_line(exc)})",
            "a problem on the hub's side: try again later, or use a local folder",
        ) from None
    except Exception as exc:  # connection refused, timeout, TLS: the network between us and the hub
        raise WorkbenchError(
            f"could not reach the Hugging Face hub to look up {name!r} "
            f"(network: {type(exc).__name__}: {first_line(exc)})",
            "check your network or proxy (HF_ENDPOINT), or set HF_HUB_OFFLINE=1 and use a cached model",
        ) from None


def hub_unreachable_reason() -> str | None:
    """Why the Hugging Face hub cannot be reached right now, or None if it may be.

    A DNS lookup of the configured endpoint's host: it answers at once either way, whereas
    letting transformers find out costs five retries with back-off (~50 s) per file.
    """
    import os
    import socket
    from urllib.parse import urlparse

    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on"):
        return "HF_HUB_OFFLINE is set"
    try:
        from huggingface_hub import constants

        host = urlparse(constants.ENDPOINT).hostname or "huggingface.co"
    except Exception:
        host = "huggingface.co"
    try:
        socket.getaddrinfo(host, 443)
    except OSError as exc:
        return f"cannot resolve {host}: {exc.strerror or exc}"
    return None


def _from_pretrained(loader: Any, source: str, kind: str, what: str, **kwargs: Any) -> Any:
    offline = hub_unreachable_reason() if kind == "hub" else None
    if offline:
        kwargs["local_files_only"] = True  # the local hub cache can still serve it
    try:
        return loader.from_pretrained(source, **kwargs)
    except Exception as exc:  # transformers raises OSError, ValueError, HF hub errors ...
        cause = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if kind == "hub":
            why = (
                f"the hub is unreachable ({offline}) and it is not in the local hub cache"
                if offline
                else f"the Hugging Face hub could not provide its {what} ({type(exc).__name__}: {cause})"
            )
            raise WorkbenchError(
                f"unknown model {source!r}: not a known name or local folder, and {why}",
                f"check the id and your network (HF_HUB_OFFLINE, HF_TOKEN), pass a local folder, "
                f"or use one of {', '.join(KNOWN_MODELS)}",
            ) from exc
        raise WorkbenchError(
            f"could not load the {what} of {source}: {type(exc).__name__}: {cause}",
            "check that the folder was written by save_pretrained and is complete",
        ) from exc


def _for_bridge(tokenizer: Any) -> Any:
    """The tokenizer to hand TransformerBridge, which wants one that prepends BOS: it loads its
    own when ours does not (ours is then left alone), and otherwise adopts the one it is given
    and edits it (padding side, special tokens). Only then is ours copied: a deep copy of
    Gemma-3's 262k-token tokenizer holds ~0.3 GB for the whole session."""
    if tokenizer.bos_token is not None and not getattr(tokenizer, "add_bos_token", False):
        return tokenizer
    return copy.deepcopy(tokenizer)


def load_model(
    name: str = embedded.EMBEDDED_NAME,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
) -> LoadedModel:
    """Load ``name``: its transformers model and tokenizer (and processor, for a VLM).

    Args:
        name: ``smollm2-135m`` (default), ``gemma3-270m``, a tiny model (``tiny-llama``, ...),
            a local HF folder or a Hugging Face hub id.
        device: ``cpu``, ``cuda``, ``cuda:N`` or ``None``/``auto`` (CUDA when present).
        dtype: ``float32`` (default), ``bfloat16`` or ``float16``.

    Returns:
        A :class:`LoadedModel` with ``.hf_model`` and ``.tokenizer`` (``.bridge`` boots on first use).
    """
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    source, kind = resolve_source(name)
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText, AutoProcessor, AutoTokenizer
    from transformers.utils import logging as hf_logging

    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # "Loading weights" bars are noise in a CLI and in logs
    processor = None
    try:
        config = _from_pretrained(AutoConfig, source, kind, "config")
        multimodal = getattr(config, "vision_config", None) is not None
        tokenizer = _from_pretrained(AutoTokenizer, source, kind, "tokenizer")
        if multimodal:
            processor = _from_pretrained(AutoProcessor, source, kind, "processor", backend="pil")
        hf = _from_pretrained(
            AutoModelForImageTextToText if multimodal else AutoModelForCausalLM,
            source,
            kind,
            "weights",
            dtype=dt,
            attn_implementation="eager",
        )
    finally:
        if bars:
            hf_logging.enable_progress_bar()
    hf = hf.to(dev).eval()
    info = {"kind": kind}
    if kind == "embedded":
        info["hf_id"] = embedded.EMBEDDED[name].hf_id
    return LoadedModel(
        name=name, source=source, hf_model=hf, tokenizer=tokenizer, device=dev, dtype=dt, info=info, processor=processor
    )


def _boot_bridge(model: LoadedModel) -> Any:
    """Wrap ``model.hf_model`` in a TransformerLens ``TransformerBridge`` (in place: the bridge's
    components replace the HF modules, which they hold as ``original_component``)."""
    from transformer_lens.model_bridge import TransformerBridge

    _no_runtime_installs()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            bridge = TransformerBridge.boot_transformers(
                model.source,
                hf_model=model.hf_model,
                tokenizer=_for_bridge(model.tokenizer),
                device=model.device,
                dtype=model.dtype,
            )
    except Exception as exc:
        cause = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise WorkbenchError(
            f"TransformerLens could not wrap {model.name} ({type(model.hf_model).__name__}): "
            f"{type(exc).__name__}: {cause}",
            "the probes run without TransformerLens; for hook-point work use a model family TransformerLens supports",
        ) from exc
    bridge.eval()
    if model.processor is not None:
        bridge.processor = model.processor  # TL loads its own with the default (machine-dependent) backend
    return bridge


def list_models() -> list[dict]:
    """Known names with whether they are ready to load here, plus hub models in the local cache."""
    rows = []
    for name, desc in KNOWN_MODELS.items():
        if name in embedded.EMBEDDED:
            status = embedded.status(name)
        else:
            status = "built on first load (random weights)"
        rows.append({"name": name, "description": desc, "status": status})
    try:
        from huggingface_hub import scan_cache_dir

        for repo in scan_cache_dir().repos:
            if repo.repo_type == "model":
                rows.append({"name": repo.repo_id, "description": "Hugging Face hub cache", "status": "cached"})
    except Exception:
        pass
    return rows
