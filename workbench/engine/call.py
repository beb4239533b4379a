"""One layer's attention call as observers see it, and how observers are registered.

:class:`AttentionCall` is everything a layer's attention computed with (queries, keys, values, the
mask, scaling, soft-cap) as the kernel saw it. Observers registered with :func:`observe` see every
call of the ``"workbench"`` attention function (:mod:`workbench.engine.attention`) inside the
block, in order; :func:`stop_after_layer` ends a forward once a layer's call has been seen, and
:func:`base_network` is what such a forward runs (the model without its language-model head).
This module is what the masking, kernels and statistics code agree on: it imports none of them.
"""

from __future__ import annotations

import contextlib
import threading
from dataclasses import dataclass
from typing import Any, Iterator

import torch
from jaxtyping import Float
from torch import Tensor


@dataclass
class AttentionCall:
    """Everything one layer's attention computed with, as the kernel saw it."""

    layer: int
    module: torch.nn.Module
    query: Float[Tensor, "batch head query d_head"]
    key: Float[Tensor, "batch kv_head key d_head"]
    value: Float[Tensor, "batch kv_head key d_head"]
    mask: Tensor | None  # bool [batch, 1|head, query, key] (True = attend), additive float, or None
    scaling: float
    is_causal: bool
    softcap: float | None = None
    # Set when an observer asked for statistics (``wants_statistics``) and the fused kernel
    # computed the output (workbench.engine.kernels): each row's log-sum-exp, and E_A[k] per row.
    lse: Float[Tensor, "batch head query"] | None = None
    key_mean: Float[Tensor, "batch head query d_head"] | None = None

    @property
    def n_heads(self) -> int:
        return self.query.shape[1]


_state = threading.local()


def current_observers() -> list:
    """The observers registered on this thread, in order (the attention function reads them)."""
    if not hasattr(_state, "stack"):
        _state.stack = []
    return _state.stack


@contextlib.contextmanager
def observe(*observers: Any) -> Iterator[Any]:
    """Make the observers see every ``"workbench"`` attention call inside the block, in order."""
    stack = current_observers()
    stack.extend(observers)
    try:
        yield observers[0] if len(observers) == 1 else observers
    finally:
        for obs in observers:
            stack.remove(obs)


class ForwardStopped(Exception):
    """Raised by :class:`StopAfterLayer` to end a forward early (:func:`stop_after_layer` catches it)."""


@dataclass
class StopAfterLayer:
    """An observer that ends the forward once layer ``layer``'s attention call has been seen by
    every observer registered before it: what the model computes after that (the layer's output
    projection and MLP, the final norm, the head) is read by nobody. TransformerLens calls it
    ``stop_at_layer``, nnsight ``stop()``. Use it through :func:`stop_after_layer`."""

    layer: int

    def on_attention(self, call: AttentionCall) -> None:
        if call.layer >= self.layer:
            raise ForwardStopped(self.layer)


@contextlib.contextmanager
def stop_after_layer(layer: int) -> Iterator[None]:
    """A forward run inside the block ends after layer ``layer``'s attention call (its output is
    then not computed). Enter it inside the run's :func:`workbench.engine.attention.hooked_run`,
    so the run's observers see that call first."""
    with observe(StopAfterLayer(layer)), contextlib.suppress(ForwardStopped):
        yield


def base_network(hf_model: torch.nn.Module) -> torch.nn.Module:
    """The model without its language-model head (``LlamaModel`` inside ``LlamaForCausalLM``).

    Here rather than in :mod:`workbench.engine.extraction`, so a run that needs only the network
    (a pattern view, :mod:`workbench.engine.rows`) does not import the probe runner and, with it,
    pandas (about 45 MB resident)."""
    base = getattr(hf_model, "base_model", None)
    return base if isinstance(base, torch.nn.Module) else hf_model
