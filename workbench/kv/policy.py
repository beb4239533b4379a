"""KV-cache policies: what each (layer, KV head) keeps of the context, as first-class objects.

The cache is stored per *KV head* (one key/value stream shared by the query heads of a GQA
group), so a policy decides per ``(layer, kv_head)``. Four kinds of head policy, one per source:

=====================  =========================================================  ==================
kind                   keeps of the ``n`` context tokens                            source
=====================  =========================================================  ==================
:class:`Full`          all of them                                                 (upper bound)
:class:`Window`        the first ``sink`` and the last ``recent``                   StreamingLLM,
                                                                                   DuoAttention's
                                                                                   streaming heads
:class:`Compensated`   ``capacity`` slots: ``sink`` first tokens, one              RazorAttention
                       compensation token (the mean key and mean value of the
                       dropped tokens), the last ``capacity - sink - 1``
:class:`Budget`        the last ``window`` tokens and the ``capacity`` earlier      SnapKV, HeadKV
                       ones the window's queries attend to most (mean over the
                       window and the group's query heads, pooled over
                       neighbouring keys)
=====================  =========================================================  ==================

**When.** A policy compresses the cache once, at a *compression point* ``c`` of each prompt (the
end of the context, or of context + question: the two protocols of :mod:`workbench.kv.grid`).
Queries before ``c`` attend as the model does; every query at or after ``c`` sees only what each
KV head kept of the keys before ``c``, plus every key from ``c`` on (tokens appended while the
question is read and the answer decoded are kept, as kvpress and the reference protocol do).
A head whose policy would keep every context token is left uncompressed.

**Sliding-window layers** (Gemma-3: five of every six layers see the last 512 tokens only)
already hold at most ``window`` tokens; a :class:`CachePolicy` leaves them as the model has them
unless ``compress_sliding`` is set (a variant that changes native behaviour, reported apart), and
:mod:`workbench.kv.budget` counts them as a fixed cost.

Two implementations apply a policy and give the same logits (tested to 1e-5 on padded batches):
masking (:mod:`workbench.kv.masked`, a ``SCORES`` edit) and real eviction
(:mod:`workbench.kv.evicted`, the evicted keys and values are gone from memory). The keys each
head keeps are chosen by one function for both, :func:`workbench.kv.select.select_row`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, Union

from workbench.errors import WorkbenchError


@dataclass(frozen=True)
class Full:
    """Keep every context token."""

    kind = "full"

    def kept(self, n: int) -> int:
        return n


@dataclass(frozen=True)
class Window:
    """Keep the first ``sink`` tokens (attention sinks) and the last ``recent`` (StreamingLLM;
    a DuoAttention streaming head)."""

    sink: int = 4
    recent: int = 256
    kind = "window"

    def __post_init__(self) -> None:
        if self.sink < 0 or self.recent < 0 or self.sink + self.recent < 1:
            raise WorkbenchError(
                f"a window policy keeps sink={self.sink} + recent={self.recent} tokens",
                "keep at least one token: sink >= 0, recent >= 0, sink + recent >= 1",
            )

    def kept(self, n: int) -> int:
        return min(n, self.sink + self.recent)


@dataclass(frozen=True)
class Compensated:
    """RazorAttention's non-retrieval head: ``capacity`` slots in all, the ``sink`` first tokens,
    one compensation token (mean key, mean value of the dropped tokens; attended like any key),
    and the most recent ``capacity - sink - 1`` (golden-stick ``DeployRACompressCell``; the
    paper's weighting of the compensation token is not published, so none is applied)."""

    sink: int = 4
    capacity: int = 256
    kind = "compensated"

    def __post_init__(self) -> None:
        if self.sink < 0 or self.capacity < self.sink + 2:
            raise WorkbenchError(
                f"a compensated policy needs capacity >= sink + 2 (sink, one compensation token, one recent), "
                f"got sink={self.sink}, capacity={self.capacity}",
                "raise the capacity or lower the sink",
            )

    def kept(self, n: int) -> int:
        return min(n, self.capacity)


Pooling = Literal["max", "avg"]


@dataclass(frozen=True)
class Budget:
    """SnapKV inside one head (HeadKV gives each head its own ``capacity``): the last ``window``
    context tokens, plus the ``capacity`` earlier tokens with the highest pooled attention from
    the window's queries (softmax over each query's visible keys, mean over the window's queries
    and over the query heads of the KV group, then ``pooling`` over ``kernel`` neighbouring keys).

    Defaults are HeadKV's (window 8, kernel 7, max pooling); kvpress' SnapKVPress uses window 64,
    kernel 5, average pooling."""

    capacity: int
    window: int = 8
    kernel: int = 7
    pooling: Pooling = "max"
    kind = "budget"

    def __post_init__(self) -> None:
        if self.capacity < 0 or self.window < 1:
            raise WorkbenchError(
                f"a budget policy keeps capacity={self.capacity} tokens besides a window of {self.window}",
                "give capacity >= 0 and window >= 1",
            )
        if self.kernel < 1 or self.kernel % 2 == 0:
            raise WorkbenchError(f"pooling kernel {self.kernel} must be odd and positive", "use e.g. 5 or 7")
        if self.pooling not in ("max", "avg"):
            raise WorkbenchError(f"unknown pooling {self.pooling!r}", "use max or avg")

    def kept(self, n: int) -> int:
        return min(n, self.capacity + self.window)


HeadPolicy = Union[Full, Window, Compensated, Budget]
FULL = Full()


@dataclass(frozen=True)
class Geometry:
    """What a cache policy needs to know of a model: layers, query and KV heads, head size,
    which layers have a sliding window (layer -> window; absent = global) and the cache dtype."""

    n_layers: int
    n_heads: int
    n_kv_heads: int
    d_head: int
    sliding: dict[int, int] = field(default_factory=dict)
    dtype_bytes: int = 2  # the deployed cache dtype (bf16/fp16); kv_bytes counts with it

    @property
    def group(self) -> int:
        """Query heads per KV head."""
        return self.n_heads // self.n_kv_heads

    def window(self, layer: int) -> int | None:
        return self.sliding.get(layer)

    @property
    def global_layers(self) -> list[int]:
        return [layer for layer in range(self.n_layers) if layer not in self.sliding]


def _shorter_window(p: HeadPolicy) -> bool:
    return isinstance(p, Window) and p.sink == 0


def geometry(model: Any, dtype_bytes: int = 2) -> Geometry:
    """The :class:`Geometry` of a loaded model (``LoadedModel`` or an HF model), sliding layers
    read from ``config.layer_types`` (``"sliding_attention"``) and ``config.sliding_window``."""
    hf = getattr(model, "hf_model", model)
    cfg = hf.config.get_text_config() if hasattr(hf.config, "get_text_config") else hf.config
    n_heads = int(cfg.num_attention_heads)
    n_kv = int(getattr(cfg, "num_key_value_heads", None) or n_heads)
    d_head = int(getattr(cfg, "head_dim", None) or cfg.hidden_size // n_heads)
    types = list(getattr(cfg, "layer_types", None) or [])
    window = getattr(cfg, "sliding_window", None)
    sliding = {i: int(window) for i, t in enumerate(types) if t == "sliding_attention" and window}
    return Geometry(int(cfg.num_hidden_layers), n_heads, n_kv, d_head, sliding, dtype_bytes)


@dataclass
class CachePolicy:
    """One policy per ``(layer, kv_head)`` (absent: :class:`Full`), with how it was chosen.

    ``selector`` and ``budget`` record where the policy came from (e.g. ``"retrieval"``, 0.25);
    ``seed`` is set for random selectors. ``compress_sliding``: apply the head policies of
    sliding-window layers too (default: those layers stay as the model has them)."""

    geometry: Geometry
    heads: dict[tuple[int, int], HeadPolicy] = field(default_factory=dict)
    name: str = "full"
    selector: str = "none"
    budget: float = 1.0
    seed: int = -1
    compress_sliding: bool = False

    def __post_init__(self) -> None:
        g = self.geometry
        for layer, kv in self.heads:
            if not (0 <= layer < g.n_layers and 0 <= kv < g.n_kv_heads):
                raise WorkbenchError(
                    f"policy for layer {layer}, KV head {kv}: the model has "
                    f"{g.n_layers} layers x {g.n_kv_heads} KV heads",
                    "give layers and KV heads inside the model",
                )
        for (layer, kv), p in self.heads.items():
            if self.compress_sliding and layer in g.sliding and not (isinstance(p, Full) or _shorter_window(p)):
                raise WorkbenchError(
                    f"layer {layer} has a {g.sliding[layer]}-token sliding window: compressing it means a shorter "
                    f"window, but KV head {kv} was given {p}",
                    "give sliding layers Window(sink=0, recent=r) policies, or leave them as the model has them",
                )

    def head(self, layer: int, kv_head: int) -> HeadPolicy:
        if layer in self.geometry.sliding and not self.compress_sliding:
            return FULL
        return self.heads.get((layer, kv_head), FULL)

    def layer(self, layer: int) -> list[HeadPolicy]:
        """The policies of a layer's KV heads, in order."""
        return [self.head(layer, kv) for kv in range(self.geometry.n_kv_heads)]

    def compresses(self, layer: int) -> bool:
        """Whether any KV head of ``layer`` drops anything (for some context length)."""
        return any(not isinstance(p, Full) for p in self.layer(layer))

    @property
    def eligible(self) -> list[tuple[int, int]]:
        """The KV heads a head selector chooses among: every KV head of the global layers (and of
        the sliding ones when they are compressed)."""
        layers = range(self.geometry.n_layers) if self.compress_sliding else self.geometry.global_layers
        return [(layer, kv) for layer in layers for kv in range(self.geometry.n_kv_heads)]

    def describe(self) -> dict[str, Any]:
        kinds: dict[str, int] = {}
        for layer, kv in self.eligible:
            kinds[self.head(layer, kv).kind] = kinds.get(self.head(layer, kv).kind, 0) + 1
        return {"name": self.name, "selector": self.selector, "budget": self.budget, "seed": self.seed, "heads": kinds}
