"""Scratch buffers the layers of one batch reuse for their statistics, instead of allocating
fresh tensors in every layer.

A layer's statistics (:mod:`workbench.engine.statistics`) copy its queries and keys into float32
working tensors, gather blocks of them, and write banded products: megabytes per layer at a few thousand
tokens, the same shapes in every layer of a batch. Allocated afresh, each of those tensors
comes from the operating system's zero pages: measured on SmolLM2 at 1024 tokens, ~500 page
faults per layer, and copies into fresh memory 5-20x slower than into memory touched before
(a 2.4 MB gather: 1.4 ms against 0.07 ms). The forward itself does not allocate like this, so
it made the statistics, not the model, pay. A :class:`Scratch` keeps one buffer per name for
the batch (grown when a larger one is asked for), so after the first layer they cost nothing
to obtain. On a GPU the caching allocator does this already; the buffers are harmless there.

Buffers are shared, so at most one user holds them at a time: :meth:`Scratch.claim` makes a
user the holder and tells the previous one to drop what it cached in them. They stay allocated
while the batch's forward runs its other layers, so they are capped (``max_bytes``, 32 MB by
default, all of SmolLM2's at 2048 tokens): past it a request gets a fresh tensor as before.
Long prompts' buffers are large (Gemma-3 at 32k tokens: ~370 MB) and would raise the run's
peak, while their page faults cost nothing next to such layers (a fault per 4 kB, ~1 us,
against seconds of attention).
"""

from __future__ import annotations

import math
import weakref
from typing import Protocol

import torch
from torch import Tensor


class ScratchUser(Protocol):
    def release_scratch(self) -> None:
        """Forget every tensor that views this scratch's buffers (another user will write them)."""


class Scratch:
    """Named reusable buffers (one per name, any shape up to its size)."""

    def __init__(self, max_bytes: int = 32 << 20) -> None:
        self._buffers: dict[str, Tensor] = {}
        self._holder: weakref.ref | None = None
        self.max_bytes = max_bytes

    def claim(self, user: ScratchUser) -> None:
        """Make ``user`` the holder of the buffers; the previous holder, if another one is still
        alive, releases what it cached in them."""
        previous = self._holder() if self._holder is not None else None
        if previous is user:
            return
        if previous is not None:
            previous.release_scratch()
        self._holder = weakref.ref(user)

    def get(self, name: str, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> Tensor:
        """A contiguous tensor of ``shape`` on the buffer ``name`` (contents undefined), or a
        fresh one when keeping it would take the buffers past :attr:`max_bytes`."""
        n = math.prod(shape)
        buf = self._buffers.get(name)
        if buf is None or buf.numel() < n or buf.dtype != dtype or buf.device != device:
            self._buffers.pop(name, None)
            buf = torch.empty(n, dtype=dtype, device=device)
            if self.nbytes + buf.numel() * buf.element_size() > self.max_bytes:
                return buf.view(shape)
            self._buffers[name] = buf
        return buf[:n].view(shape)

    @property
    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self._buffers.values())
