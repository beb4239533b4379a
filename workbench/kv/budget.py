"""Budget accounting: what a cache policy keeps, in tokens, as a fraction, and in bytes.

Methods count "sparsity" differently (DuoAttention: the share of streaming heads; kvpress: a
compression ratio of tokens; HeadKV: an average per-head capacity), and users keep asking what a
number means in memory (duo-attention #26, kvpress #228). Every grid point reports all of:

- ``kv_tokens``: key/value slots held over all layers and KV heads after compressing a context of
  ``n`` tokens: a full head ``n``; a window head ``min(n, sink + recent)``; a RazorAttention head
  ``min(n, capacity)`` (sinks and the compensation token included); a SnapKV/HeadKV head
  ``min(n, capacity + window)``; a sliding-window layer that is not compressed holds what the
  model's cache holds between steps, ``min(n, window - 1)`` (the reference's ``min(n, 512)``
  counts the step's own token too; we count what :mod:`workbench.kv.evicted` stores, and a test
  checks the two agree);
- ``kv_fraction``: ``kv_tokens`` over the same count for the full cache (sliding layers as the
  model keeps them, a fixed cost in numerator and denominator). The x axis of every figure;
- ``kv_bytes``: ``2 (keys and values) x d_head x dtype bytes x kv_tokens``;
- ``head_sparsity``: the share of eligible KV heads (global layers; every layer when sliding
  layers are compressed) that drop tokens at this ``n``. Recorded, never an axis.

Tokens are counted per KV head, as the cache stores them (GQA: 3 KV heads per SmolLM2 layer, not
9); HeadKV's reference code duplicates KV per query head, which costs ``g`` times this.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from workbench.kv.policy import CachePolicy, Full


@dataclass(frozen=True)
class Cost:
    """One policy's cache at one context length."""

    kv_tokens: int
    full_tokens: int
    kv_bytes: int
    head_sparsity: float

    @property
    def kv_fraction(self) -> float:
        return self.kv_tokens / self.full_tokens if self.full_tokens else 1.0

    def as_dict(self) -> dict[str, float]:
        return {**asdict(self), "kv_fraction": self.kv_fraction}


def _held(n: int, window: int | None) -> int:
    return n if window is None else min(n, window - 1)


def cost(policy: CachePolicy, n: int) -> Cost:
    """The :class:`Cost` of ``policy`` on a context of ``n`` tokens."""
    g = policy.geometry
    kept = full = 0
    for layer in range(g.n_layers):
        window = g.window(layer)
        for kv in range(g.n_kv_heads):
            native = _held(n, window)
            full += native
            kept += min(native, policy.head(layer, kv).kept(n))
    eligible = policy.eligible
    dropping = sum(1 for layer, kv in eligible if policy.head(layer, kv).kept(n) < n)
    return Cost(
        kv_tokens=kept,
        full_tokens=full,
        kv_bytes=2 * g.d_head * g.dtype_bytes * kept,
        head_sparsity=dropping / len(eligible) if eligible else 0.0,
    )


def is_full(policy: CachePolicy) -> bool:
    """Whether the policy keeps every head's cache whole (the full-cache reference point)."""
    return all(isinstance(policy.head(layer, kv), Full) for layer, kv in policy.eligible)
