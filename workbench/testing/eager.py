"""The slow, obviously correct side of a probe test: a plain transformers model with eager attention.

A probe computes its metric inside the workbench's forward pass, on padded batches, from
statistics or chunks of attention rows. Its test recomputes the same metric from the definition
the plain way: one prompt at a time, unpadded, through a *separate* transformers model loaded with
``attn_implementation="eager"`` and ``output_attentions=True``, in float64. The two share no code
but the weights, so agreement means the probe computes what its definition says.

The project's own tests check every built-in metric this way (``tests/reference.py``); plugin
authors use the same functions through :mod:`workbench.testing`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import torch
from transformers import AutoModelForCausalLM


def eager_model(source: str | Path) -> Any:
    """A plain transformers model of ``source`` (a model folder or a hub id) with eager attention,
    in float32 and eval mode: the reference the workbench's numbers are checked against."""
    return AutoModelForCausalLM.from_pretrained(str(source), attn_implementation="eager", dtype=torch.float32).eval()


def eager_patterns(model: Any, ids: Sequence[int]) -> list[torch.Tensor]:
    """Per layer, the ``[head, query, key]`` attention of one unpadded prompt (float64), from
    the eager model's ``output_attentions``."""
    with torch.no_grad():  # the base network: the LM head's logits are not needed here
        out = model.base_model(torch.tensor([list(ids)]), output_attentions=True, use_cache=False)
    return [a[0].double() for a in out.attentions]


def attention_windows(model: Any) -> list[int | None]:
    """Per layer, how many of the most recent keys a query may see: the config's
    ``sliding_window`` on layers whose ``layer_types`` entry is ``sliding_attention``, None (every
    earlier key) on the others. Read from the plain model's config, i.e. the architecture's
    definition, not from the workbench's masking code."""
    cfg = model.config.get_text_config()
    types = getattr(cfg, "layer_types", None) or ["full_attention"] * cfg.num_hidden_layers
    return [cfg.sliding_window if t == "sliding_attention" else None for t in types]


def visible_keys(q: int, window: int | None) -> slice:
    """Keys query ``q`` may attend to: ``k <= q``, and ``q - k < window`` on a sliding-window layer."""
    return slice(0 if window is None else max(0, q - window + 1), q + 1)


def check_visibility(all_patterns: Sequence[Sequence[torch.Tensor]], windows: Sequence[int | None]) -> None:
    """The eager patterns put exactly zero weight outside :func:`visible_keys` (the windows are
    what the model does), and each row sums to 1; an AssertionError names the layer and query."""
    for pats in all_patterns:
        for layer, A in enumerate(pats):
            for q in range(A.shape[-1]):
                keys = visible_keys(q, windows[layer])
                outside = float(A[:, q, : keys.start].abs().sum() + A[:, q, keys.stop :].abs().sum())
                assert outside == 0.0, f"layer {layer}, query {q}: weight outside the visible keys"
                assert torch.allclose(A[:, q, keys].sum(-1), torch.ones((), dtype=A.dtype), atol=1e-6), (layer, q)


__all__ = ["attention_windows", "check_visibility", "eager_model", "eager_patterns", "visible_keys"]
