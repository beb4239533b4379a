"""What a layer's attention was computed with, recorded so it can be replayed without the model.

For each layer the store records the number of query and KV heads (grouped-query attention),
the head size, the scaling, the logit soft-cap, whether the layer is causal and its sliding
window (``None`` for full attention), plus the model's positional encoding: with rotary
embeddings the stored queries and keys are *post-rotary* (exactly what the kernel saw), so
scores recomputed from them need nothing else. :func:`visible_keys` rebuilds the mask from
these facts; while caching, every layer's real mask is compared with it (:func:`mask_agrees`)
and a layer whose mask was something else (an ALiBi bias, bidirectional spans) is recorded as
not replayable rather than replayed wrongly.
"""

from __future__ import annotations

from typing import Any

import torch
from jaxtyping import Bool, Int
from torch import Tensor

from workbench.engine.call import AttentionCall
from workbench.engine.masking import key_visibility


def positional_encoding(hf_model: torch.nn.Module) -> str:
    """``rotary`` (queries and keys rotated before the kernel), ``absolute`` (learned or sinusoidal
    positions added to the embeddings) or ``unknown``."""
    names = {n.rsplit(".", 1)[-1] for n, _ in hf_model.named_modules()}
    if "rotary_emb" in names or any("rotary" in n for n in names):
        return "rotary"
    if names & {"wpe", "embed_positions", "position_embeddings"}:
        return "absolute"
    return "unknown"


def layer_geometry(call: AttentionCall, config: Any) -> dict[str, Any]:
    """One layer's attention facts from a call the kernel made."""
    module = call.module
    window = getattr(module, "sliding_window", None)
    layer_types = getattr(config, "layer_types", None)
    return {
        "n_heads": int(call.query.shape[1]),
        "n_kv_heads": int(call.key.shape[1]),
        "head_dim": int(call.query.shape[-1]),
        "v_head_dim": int(call.value.shape[-1]),
        "scaling": float(call.scaling),
        "softcap": None if call.softcap is None else float(call.softcap),
        "causal": bool(getattr(module, "is_causal", True)),
        "sliding_window": int(window) if window else None,
        "layer_type": layer_types[call.layer] if layer_types and call.layer < len(layer_types) else None,
    }


def visible_keys(
    lengths: Int[Tensor, " batch"],
    width: int,
    causal: bool = True,
    sliding_window: int | None = None,
    device: torch.device | str = "cpu",
) -> Bool[Tensor, "batch 1 query key"]:
    """The mask of a right-padded batch: key k is visible to query q when it is a real token,
    k <= q (causal) and q - k < window (transformers' sliding-window rule)."""
    q = torch.arange(width, device=device)[:, None]
    k = torch.arange(width, device=device)[None, :]
    allowed = (k <= q) if causal else torch.ones(width, width, dtype=torch.bool, device=device)
    if sliding_window:
        allowed = allowed & (q - k < sliding_window)
    real = k[None] < lengths.to(device)[:, None, None]  # [batch, 1, key]
    return (allowed[None] & real)[:, None]


def mask_agrees(call: AttentionCall, lengths: Int[Tensor, " batch"], geometry: dict[str, Any]) -> bool:
    """Whether the mask the kernel used equals :func:`visible_keys` on every real query row."""
    width = call.query.shape[2]
    if call.key.shape[2] != width:
        return False  # a KV cache: not what a store records
    vis = key_visibility(call)
    eff = vis.mask(call.query.device)
    if vis.additive is not None:
        bias = vis.additive.float()
        if bool(((bias != 0) & vis.allowed).any()):
            return False  # an additive bias (e.g. ALiBi) beyond masking
    eff = torch.nn.functional.pad(eff, (0, width - eff.shape[-1])) if eff.shape[-1] < width else eff
    want = visible_keys(lengths, width, geometry["causal"], geometry["sliding_window"], call.query.device)
    real_rows = (torch.arange(width, device=call.query.device)[None, :] < lengths.to(call.query.device)[:, None])[
        :, None, :, None
    ]
    return not bool(((eff != want) & real_rows).any())
