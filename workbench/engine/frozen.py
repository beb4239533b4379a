"""Frozen weights: optimise a handful of parameters (gates) through a model without touching it.

Learned gates (DuoAttention's in :mod:`workbench.kv.duo`, causal head gating's in
:mod:`circuits.gating.fit`) and attribution patching back-propagate through the model to a few
tensors of their own; the model's own weights must neither collect gradients (memory, time) nor
stay changed afterwards. :func:`frozen` sets every weight's ``requires_grad`` to False and the
model to eval mode (no dropout) for the duration, and restores both, whatever happens inside.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch


@contextlib.contextmanager
def frozen(hf_model: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """``hf_model`` in eval mode with no weight requiring a gradient, restored on exit."""
    params = list(hf_model.parameters())
    was = [p.requires_grad for p in params]
    was_training = hf_model.training
    hf_model.eval()
    try:
        for p in params:
            p.requires_grad_(False)
        yield hf_model
    finally:
        for p, r in zip(params, was):
            p.requires_grad_(r)
        hf_model.train(was_training)
