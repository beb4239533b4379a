"""One ranking rule for heads, wherever heads are picked by a score.

Top-k selections (AttentionInfluence's masked heads, the retrieval-head ablation, the KV-cache
head selectors, head gating's strongest facilitating heads, the gating/patching agreement) must
agree on ties and on heads without a score, or the same scores pick different heads in different
places: best first by score, ties to the lower ``(layer, head)``, a missing or NaN score last.
"""

from __future__ import annotations

import math
from typing import Callable, Hashable, Iterable, TypeVar

H = TypeVar("H", bound=Hashable)


def rank_heads(heads: Iterable[H], score: Callable[[H], float | None]) -> list[H]:
    """``heads`` (``(layer, head)`` or ``(layer, kv_head)`` pairs) best first: highest ``score``,
    ties to the lower pair, missing (None) or NaN scores last."""

    def key(h: H) -> tuple[float, H]:
        v = score(h)
        v = -math.inf if v is None or math.isnan(float(v)) else float(v)
        return (-v, h)

    return sorted(heads, key=key)
