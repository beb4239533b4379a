"""The activation store: extract once, analyse many times.

``workbench cache --model M --dataset D --hooks q,k,v,z,resid_pre,resid_post --out store/``
runs the model once and writes every requested activation of every real (unpadded) token to
disk; afterwards

    store = workbench.store.open("store/")
    store.get("q", layer=5, prompt="p0")             # [tokens, head, d_head], memory-mapped
    store.dataset(hook="resid_post", layer=5)         # torch Dataset of [d_model] rows
    run_probes_from_store(store, [get_probe("entropy")])   # pattern probes, no model weights

**Format: safetensors shards**, not zarr. safetensors is already a dependency (the embedded
model ships in it), is read memory-mapped and lazily (``safe_open(...).get_slice(name)[a:b]``
reads only those rows), is what SAELens and most activation-caching tools write, and is a flat,
documented format (an 8-byte header length, a JSON header, raw little-endian tensors) that any
language can read. zarr would add a dependency for chunking we get from shards anyway, and its
many small files per array suit object stores more than the atomic-rename we rely on.

Layout of ``store/`` (:mod:`workbench.store.layout`):

- ``index.json``: written once, before the first shard: what the store holds (model name and
  :func:`~workbench.models.loading.model_identity`, tokenizer hash, hooks, layers, dtype, shapes per
  token), the attention geometry of every layer (heads, KV heads, head size, scaling, logit
  soft-cap, causal / sliding window, positional encoding: whether keys are post-rotary), and
  the plan: every prompt's id, metadata, token count, shard and row.
- ``shards/shard-NNNNN.safetensors``: whole prompts, token-major: tensor ``"{hook}.{layer}"`` is
  ``[tokens, ...]`` (q, z: ``[tokens, head, d_head]``; k, v: ``[tokens, kv_head, d_head]``;
  resid_pre, resid_post: ``[tokens, d_model]``) plus ``input_ids`` ``[tokens]``. Each shard is
  written to a temporary file, fsynced and renamed, so a shard is whole or absent.
- ``manifest.json``: each finished shard's size and SHA-256, and ``complete``; rewritten
  atomically after every shard. A killed run leaves ``complete: false``, and the same
  ``workbench cache`` command resumes at the first missing shard.
"""

from __future__ import annotations

from workbench.store.layout import HOOKS
from workbench.store.reader import ActivationStore, TokenActivations, open_store

open = open_store  # noqa: A001  (``workbench.store.open(path)`` reads like ``zarr.open``)

__all__ = ["HOOKS", "ActivationStore", "TokenActivations", "open", "open_store"]
