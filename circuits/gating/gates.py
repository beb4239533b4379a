"""Head gates: one sigmoid gate per query head, on the head's output ``z`` before ``W_O``.

Causal head gating (Nam et al., NeurIPS 2025, arXiv 2505.13737) scales each head's
contribution, ``z_{l,h} <- G_{l,h} z_{l,h}`` with ``G = sigmoid(logit)``, and learns the logits.
That is the edit point the workbench's head ablations use (a :class:`~workbench.engine.edits.ZEdit`,
:class:`workbench.engine.interventions.HeadAblation` with ``zero`` is a gate at 0), so a gate
of 0 and a zero ablation of the same head are the same forward. ``z`` has the size the
attention kernel gave it: Gemma-3's ``head_dim`` comes from its config (256 on Gemma-3-270M,
not hidden / heads), with nothing to reshape.

Several initialisations are fit at once, as the reference code does (``CHG.forward``): the
batch is repeated per initialisation, row ``b * n_inits + k`` of the repeated batch carries
prompt ``b`` under initialisation ``k`` (einops ``"b s -> (b k) s"``).

The initial logits follow ``CHG.create_masks``: gates drawn ``U(low, high)``, clamped to
``[1e-6, 1 - 1e-6]``, stored as ``log(g / (1 - g))``.
"""

from __future__ import annotations

from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor

from workbench.engine.call import AttentionCall
from workbench.engine.edits import Sites, ZEdit
from workbench.errors import WorkbenchError


def init_logits(
    n_inits: int,
    n_layers: int,
    n_heads: int,
    init_range: tuple[float, float] = (0.0, 1.0),
    seed: int = 0,
    device: torch.device | str = "cpu",
) -> Float[Tensor, "init layer head"]:
    """``n_inits`` random starting points in logit space: gates ``U(low, high)`` (one seeded
    CPU generator, so the draw is the same on every device), clamped to ``[1e-6, 1 - 1e-6]``,
    as logits (float32)."""
    low, high = (float(x) for x in init_range)
    if not 0.0 <= low <= high <= 1.0:
        raise WorkbenchError(
            f"the initial gate range must satisfy 0 <= low <= high <= 1, got ({low}, {high})",
            "the paper draws the initial gates from U(0, 1): init_range=(0, 1)",
        )
    g = torch.rand(n_inits, n_layers, n_heads, generator=torch.Generator().manual_seed(int(seed)))
    g = (low + (high - low) * g).clamp(1e-6, 1 - 1e-6)
    return torch.log(g / (1 - g)).to(device)


class HeadGates(ZEdit):
    """Multiply each head's output by its gate, ``sigmoid(logits[k, layer, head])``, where ``k``
    is the initialisation of the batch row (rows in ``(prompt, init)`` order, ``n_inits`` rows per
    prompt). ``logits``: ``[init, layer, head]`` (a parameter when fitting; gradients flow). Set
    :attr:`seen` to collect the layers the edit ran on (the fit checks every layer has a seam)."""

    label = "head gates"

    def __init__(self, logits: Float[Tensor, "init layer head"]) -> None:
        if logits.dim() == 2:
            logits = logits[None]
        self.logits = logits
        self.seen: set[int] | None = None

    def sites(self) -> Sites:
        return {layer: None for layer in range(self.logits.shape[1])}

    def edit(self, call: AttentionCall, z: Float[Tensor, "batch query head d_head"]) -> Tensor:
        if self.seen is not None:
            self.seen.add(call.layer)
        k = self.logits.shape[0]
        if z.shape[0] % k:
            raise WorkbenchError(
                f"a batch of {z.shape[0]} rows cannot carry {k} gate initialisations",
                "repeat each prompt once per initialisation (repeat_interleave)",
            )
        gate = torch.sigmoid(self.logits[:, call.layer]).to(z.dtype)  # [init, head]
        gate = gate.repeat(z.shape[0] // k, 1)  # row b * k + i -> init i
        return z * gate[:, None, :, None]


def check_gateable(model: Any, what: str = "head gates") -> None:
    """Refuse a model the gates cannot act on: no language-model head (an encoder), or a family
    whose attention does not go through transformers' attention interface, where the workbench
    has no head edit point (``_supports_attention_backend`` is False: Bloom, GPT-Neo, Mamba, ...)."""
    hf = model.hf_model
    name = type(hf).__name__
    if hf.get_output_embeddings() is None:
        raise WorkbenchError(
            f"{model.name} ({name}) has no language-model head: {what} are fit on a next-token task",
            "use a causal language model, e.g. smollm2-135m or gemma3-270m",
        )
    if model.is_causal is False:
        raise WorkbenchError(
            f"{model.name} ({name}) is not a causal language model: {what} are fit on a next-token task",
            "use a causal language model, e.g. smollm2-135m or gemma3-270m",
        )
    if not getattr(type(hf), "_supports_attention_backend", False):
        raise WorkbenchError(
            f"{model.name} ({name}) has no known head edit point: its attention does not go through "
            "transformers' attention interface, where the workbench edits each head's output",
            "use a family the workbench supports (Llama/SmolLM2, Gemma, Qwen, Mistral, GPT-2, ...)",
        )
