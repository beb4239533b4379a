"""The files of an activation store: ``index.json``, ``manifest.json`` and the shards.

The index says what the store holds and is written once; the manifest says which shards are
finished (size, SHA-256) and whether the store is complete, and is rewritten atomically after
each shard. A store whose manifest says ``complete: false`` was interrupted: readers refuse it
and name the command that resumes it.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from workbench.errors import WorkbenchError

FORMAT = "workbench-activation-store"
VERSION = 1
INDEX = "index.json"
MANIFEST = "manifest.json"
SHARDS = "shards"
# q / k / v: the queries, keys and values the attention kernel used (post-rotary where the model
# rotates); z: each head's output before W_O; resid_pre / resid_post: the residual stream entering
# and leaving the block.
HOOKS = ("q", "k", "v", "z", "resid_pre", "resid_post")
STORE_DTYPES = ("float32", "float16", "bfloat16")


def shard_name(i: int) -> str:
    return f"shard-{i:05d}.safetensors"


def tensor_name(hook: str, layer: int) -> str:
    return f"{hook}.{layer}"


def tokenizer_identity(tokenizer: Any) -> dict[str, Any]:
    """A hash of what maps text to ids: the fast tokenizer's full definition (vocabulary, merges,
    normalizer, pre-tokenizer) when there is one, else the vocabulary, plus the special tokens."""
    h = hashlib.sha256()
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        h.update(backend.to_str().encode())
    else:
        h.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    specials = {
        k: getattr(tokenizer, k, None) for k in ("bos_token_id", "eos_token_id", "pad_token_id", "unk_token_id")
    }
    h.update(json.dumps(specials, sort_keys=True).encode())
    return {"class": type(tokenizer).__name__, "sha256": h.hexdigest()[:16], "vocab_size": len(tokenizer), **specials}


def read_json(path: Path, what: str) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise WorkbenchError(
            f"{path.parent} is not an activation store (no {path.name})", "give the --out folder of `workbench cache`"
        ) from None
    except (ValueError, OSError) as exc:
        raise WorkbenchError(
            f"{path} ({what}) is unreadable: {exc}", "re-run the `workbench cache` command that wrote it"
        ) from None
    if not isinstance(data, dict):
        raise WorkbenchError(
            f"{path} ({what}) is not a JSON object", "re-run the `workbench cache` command that wrote it"
        )
    return data


def write_json(path: Path, data: dict[str, Any]) -> None:
    from workbench.files.atomic import atomic_write_text

    atomic_write_text(path, json.dumps(data, indent=1, sort_keys=True, default=str))


def token_shapes(geometry: dict[str, Any]) -> dict[str, list[int]]:
    """The shape of one token's activation per hook."""
    h, kv, d, dv, dm = (geometry[k] for k in ("n_heads", "n_kv_heads", "head_dim", "v_head_dim", "d_model"))
    return {"q": [h, d], "k": [kv, d], "v": [kv, dv], "z": [h, dv], "resid_pre": [dm], "resid_post": [dm]}


def bytes_per_token(geometry: dict[str, Any], hooks: list[str], layers: list[int], itemsize: int) -> int:
    """Bytes one token takes in the shards (activations plus its int32 token id)."""
    shapes = token_shapes(geometry)
    per_layer = sum(_prod(shapes[h]) for h in hooks)
    return per_layer * len(layers) * itemsize + 4


def _prod(shape: list[int]) -> int:
    out = 1
    for s in shape:
        out *= s
    return out


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"
