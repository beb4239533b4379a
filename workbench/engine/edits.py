"""Interventions as a declared protocol: named edit points, typed edits, a declared order.

Everything that changes a forward pass (ablation, patching, head scaling, the intervening probes)
is an :class:`Intervention` at one of six **edit points**, in the order a layer computes them:

=================  ============================================  ========================================
point              what the edit receives (and returns)           shape
=================  ============================================  ========================================
``Point.RESID``    the residual stream entering decoder layer      ``[batch, pos, d_model]``
``Point.QKV``      queries, keys, values after RoPE, before the    :class:`QKV` of ``[batch, head, pos, d]``
                   kernel
``Point.SCORES``   attention logits before softmax (scaled,        :class:`Rows`: ``[batch, head, block,
                   soft-capped, masked keys at ``-inf``)            key]``, a block of query rows
``Point.WEIGHTS``  attention weights after softmax; each row is    the same
                   renormalised over its visible keys after
``Point.Z``        each head's output before ``W_O``               ``[batch, query, head, d_head]``
``Point.MLP_IN``   what the layer's MLP block reads (the residual  ``[batch, pos, d_model]``
                   after attention, before the MLP's norm); the
                   residual stream itself goes on unchanged
=================  ============================================  ========================================

An intervention declares its ``point`` and its ``sites`` (which ``(layer, head)`` it edits;
:data:`EVERY` for all), and implements ``edit``. A :class:`Reader` sees the value at a point
after every edit there and changes nothing (recording z for patching, capturing activations);
readers never conflict.

**Order and conflicts.** Within a layer, points run in the order above. At one point,
interventions run in the order they were registered. Two interventions that edit the same point
of the same head are an :class:`~workbench.errors.WorkbenchError` when a run starts
(:func:`check_conflicts`, called by :func:`workbench.engine.attention.hooked_run`), unless the user
ordered them: :func:`ordered` (``--order`` on the command line) groups interventions whose
overlap is intended, applied in the order given.

**Cost.** Edits at ``RESID``, ``QKV`` and ``Z`` cost what the edit costs; the kernel is unchanged.
An edit at ``SCORES`` or ``WEIGHTS`` needs the layer's attention rows, so the layers it touches
run an eager kernel over blocks of query rows (:func:`edited_attention`): memory stays
``block x keys`` per head, never every layer's pattern at once. Observers reading patterns
(pattern probes) see the pattern the model formed before a ``SCORES``/``WEIGHTS`` edit of the
same layer, and every edit of earlier layers.

The engine side: :func:`workbench.engine.attention.workbench_attention_forward` dispatches on
``point`` (never on method names); ``RESID`` edits run in a forward pre-hook of each decoder
layer, ``MLP_IN`` edits in one on the norm before each MLP, installed by
:func:`workbench.engine.attention.hooked_run` when a run has them. The edge-level circuit engine
(:class:`circuits.graph.ModelGraph`, an explicit forward for edge patching) applies the same
``QKV``, ``Z`` and ``MLP_IN`` interventions, and refuses the others.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from enum import Enum
from typing import Any, ClassVar, Iterable, Mapping, NamedTuple, Sequence

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from workbench.engine.call import AttentionCall
from workbench.engine.masking import attention_scores, first_visible_key, wide
from workbench.errors import WorkbenchError
from workbench.protocol.ordering import Ordered, ordered


class Point(str, Enum):
    """The named edit points of a layer, in the order the layer computes them."""

    RESID = "resid"
    QKV = "qkv"
    SCORES = "scores"
    WEIGHTS = "weights"
    Z = "z"
    MLP_IN = "mlp_in"


ORDER: tuple[Point, ...] = (Point.RESID, Point.QKV, Point.SCORES, Point.WEIGHTS, Point.Z, Point.MLP_IN)

Sites = Mapping[int, "frozenset[int] | None"]  # layer -> heads edited there (None: every head)
EVERY: Sites = {}  # the marker "every head of every layer" (compared by identity)


class QKV(NamedTuple):
    """A layer's queries, keys and values as the kernel reads them (after RoPE)."""

    query: Float[Tensor, "batch head query d_head"]
    key: Float[Tensor, "batch kv_head key d_head"]
    value: Float[Tensor, "batch kv_head key d_head"]


@dataclass
class Rows:
    """A block of a layer's attention rows, as a ``SCORES``/``WEIGHTS`` edit sees them.

    ``values`` are float32 scores (masked keys ``-inf``) or weights (masked keys 0), for queries
    ``q0 .. q1-1`` of the call against keys ``0 .. n_keys-1``. Positions count from each prompt's
    first real token (left padding is negative), so an edit reads ``key_pos == 0`` for "the
    first token" whatever the padding."""

    values: Float[Tensor, "batch head block key"]
    visible: Bool[Tensor, "batch head block key"]
    query_pos: Int[Tensor, "batch block"]
    key_pos: Int[Tensor, "batch key"]
    q0: int
    q1: int

    @property
    def first_key(self) -> Bool[Tensor, "batch 1 1 key"]:
        """Where each prompt's first real token is among the keys."""
        return (self.key_pos == 0)[:, None, None, :]


class Hook(ABC):
    """Something that runs at a declared edit point."""

    point: ClassVar[Point]

    def sites(self) -> Sites:
        """The ``(layer, head)`` this hook acts on: layer -> heads (None: every head of that
        layer); :data:`EVERY` for every head of every layer (the default)."""
        return EVERY

    def active(self, layer: int) -> bool:
        s = self.sites()
        return s is EVERY or layer in s

    def heads(self, layer: int) -> frozenset[int] | None:
        """The heads of ``layer`` this hook acts on (None: all)."""
        s = self.sites()
        return None if s is EVERY else s.get(layer)


class Intervention(Hook):
    """An edit at ``point``: ``edit(call, x)`` returns the value the model goes on with.

    Subclass one of :class:`ResidEdit`, :class:`QKVEdit`, :class:`ScoresEdit`,
    :class:`WeightsEdit`, :class:`ZEdit`; their ``edit`` signatures are typed per point."""

    @abstractmethod
    def edit(self, call: Any, x: Any) -> Any: ...


class Reader(Hook):
    """Sees the value at ``point`` after every edit there, changes nothing (never conflicts)."""

    @abstractmethod
    def read(self, call: Any, x: Any) -> None: ...


class ResidEdit(Intervention):
    """Edit the residual stream entering a decoder layer (``call`` is the layer index)."""

    point = Point.RESID

    @abstractmethod
    def edit(self, call: int, x: Float[Tensor, "batch pos d_model"]) -> Float[Tensor, "batch pos d_model"]: ...


class QKVEdit(Intervention):
    """Replace a layer's queries / keys / values before the kernel reads them."""

    point = Point.QKV

    @abstractmethod
    def edit(self, call: AttentionCall, x: QKV) -> QKV: ...


class ScoresEdit(Intervention):
    """Edit attention logits before softmax, a block of query rows at a time."""

    point = Point.SCORES

    @abstractmethod
    def edit(self, call: AttentionCall, x: Rows) -> Float[Tensor, "batch head block key"]: ...


class WeightsEdit(Intervention):
    """Edit attention weights after softmax; rows are renormalised over visible keys after."""

    point = Point.WEIGHTS

    @abstractmethod
    def edit(self, call: AttentionCall, x: Rows) -> Float[Tensor, "batch head block key"]: ...


class ZEdit(Intervention):
    """Edit each head's output before ``W_O``."""

    point = Point.Z

    def replaces(self, call: AttentionCall) -> bool:
        """True when the edit overwrites every head's output of this call: the kernel is skipped."""
        return False

    @abstractmethod
    def edit(
        self, call: AttentionCall, x: Float[Tensor, "batch query head d_head"]
    ) -> Float[Tensor, "batch query head d_head"]: ...


class MLPInEdit(Intervention):
    """Give a layer's MLP block another input (``call`` is the layer index): the residual stream
    after the layer's attention, as the MLP's norm reads it. Only the MLP sees the edit; the
    residual stream goes on unchanged (edge-level circuits let one MLP read an ablated upstream
    node this way, :mod:`circuits.edges`)."""

    point = Point.MLP_IN

    @abstractmethod
    def edit(self, call: int, x: Float[Tensor, "batch pos d_model"]) -> Float[Tensor, "batch pos d_model"]: ...


class ResidReader(Reader):
    point = Point.RESID


class QKVReader(Reader):
    point = Point.QKV


class ZReader(Reader):
    point = Point.Z


def sites_of(heads: Iterable[tuple[int, int]]) -> dict[int, frozenset[int]]:
    """``[(layer, head), ...]`` as :data:`Sites`."""
    out: dict[int, set[int]] = {}
    for layer, head in heads:
        out.setdefault(int(layer), set()).add(int(head))
    return {layer: frozenset(h) for layer, h in out.items()}


__all__ = ["Ordered", "ordered"]  # declared in workbench.protocol.ordering (the run context composes with them)


def flatten(observers: Iterable[Any]) -> list[Any]:
    """The observers with every :class:`Ordered` group expanded in place."""
    out: list[Any] = []
    for obs in observers:
        out.extend(obs.members if isinstance(obs, Ordered) else [obs])
    return out


def _overlap(a: Sites, b: Sites) -> list[str]:
    """Where two site declarations meet, as ``layer.head`` / ``layer.*`` labels."""
    if a is EVERY or b is EVERY:
        return ["every head"]
    shared = []
    for layer in sorted(set(a) & set(b)):
        ha, hb = a[layer], b[layer]
        if ha is None or hb is None:
            shared.append(f"{layer}.*")
        elif ha & hb:
            shared.extend(f"{layer}.{h}" for h in sorted(ha & hb))
    return shared


def describe(obs: Any) -> str:
    return getattr(obs, "label", None) or type(obs).__name__


def check_conflicts(observers: Iterable[Any]) -> None:
    """Refuse two interventions editing the same point of the same head unless one
    :class:`Ordered` group holds both (the user chose their order)."""
    found: list[tuple[int | None, Intervention]] = []  # (the Ordered group it is in, if any)
    for i, obs in enumerate(observers):
        members = obs.members if isinstance(obs, Ordered) else [obs]
        group = i if isinstance(obs, Ordered) else None
        found.extend((group, m) for m in members if isinstance(m, Intervention))
    for x, (ga, a) in enumerate(found):
        for gb, b in found[x + 1 :]:
            if a.point is not b.point or (ga is not None and ga == gb):
                continue
            where = _overlap(a.sites(), b.sites())
            if where:
                raise WorkbenchError(
                    f"two interventions edit the {a.point.value} of the same heads ({', '.join(where[:6])}"
                    f"{', ...' if len(where) > 6 else ''}): {describe(a)} and {describe(b)}; "
                    "their order would be arbitrary",
                    "edit different heads, or give the order you want: workbench.engine.edits.ordered(first, second) "
                    "(on the command line, --order)",
                )


def at_point(observers: Sequence[Any], point: Point, layer: int) -> tuple[list[Intervention], list[Reader]]:
    """The interventions and readers at ``point`` acting on ``layer``, in order."""
    edits = [o for o in observers if isinstance(o, Intervention) and o.point is point and o.active(layer)]
    reads = [o for o in observers if isinstance(o, Reader) and o.point is point and o.active(layer)]
    return edits, reads


def _positions(call: AttentionCall) -> tuple[Int[Tensor, "batch key"], int]:
    """Each key's position counted from its prompt's first real key, and the query offset."""
    n_q, n_k = call.query.shape[2], call.key.shape[2]
    first = first_visible_key(call)
    key_pos = torch.arange(n_k, device=call.query.device)[None, :] - first[:, None]
    return key_pos, n_k - n_q


def _renormalise(p: Tensor, visible: Tensor) -> Tensor:
    p = torch.where(visible, p, torch.zeros((), dtype=p.dtype, device=p.device))
    total = p.sum(-1, keepdim=True)
    return torch.where(total > 0, p / total.clamp_min(torch.finfo(p.dtype).tiny), p)


BLOCK_ROWS = 256  # query rows per block of an edited layer: block x keys scores per head at a time


def edited_attention(
    call: AttentionCall,
    scores: Sequence[Intervention],
    weights: Sequence[Intervention],
    block_rows: int | None = None,
) -> Float[Tensor, "batch query head d_head"]:
    """The layer's output with ``SCORES`` and ``WEIGHTS`` edits applied, computed eagerly a block
    of query rows at a time (float32 inside, the values' dtype out). Rows that see no key give 0."""
    block_rows = block_rows or BLOCK_ROWS
    q, v = call.query, call.value
    b, h, n_q, _ = q.shape
    group = h // v.shape[1]
    key_pos, offset = _positions(call)
    out = v.new_zeros(b, n_q, h, v.shape[-1])
    vg = wide(v).repeat_interleave(group, dim=1)
    for q0 in range(0, n_q, block_rows):
        q1 = min(n_q, q0 + block_rows)
        s, vis = attention_scores(call, q0, q1)
        k_end = vis.k_end
        visible = torch.isfinite(s)
        # query i sits at key index i + offset; key_pos[:, 0] is minus the prompt's first index
        query_pos = torch.arange(q0, q1, device=q.device)[None, :] + offset + key_pos[:, :1]
        rows = Rows(values=s, visible=visible, query_pos=query_pos, key_pos=key_pos[:, :k_end], q0=q0, q1=q1)
        for iv in scores:
            rows.values = _on_heads(iv, call.layer, rows.values, iv.edit(call, rows))
        p = torch.softmax(rows.values.masked_fill(~visible, float("-inf")), dim=-1).nan_to_num(0.0)
        rows.values = p
        for iv in weights:
            rows.values = _on_heads(iv, call.layer, p, iv.edit(call, rows))
            rows.values = p = _renormalise(rows.values, visible)
        out[:, q0:q1] = (p.to(vg.dtype) @ vg[:, :, :k_end]).transpose(1, 2).to(out.dtype)
    return out


def _on_heads(iv: Intervention, layer: int, before: Tensor, after: Tensor) -> Tensor:
    """``after`` on the heads ``iv`` declared for ``layer``, ``before`` on the others (an edit
    cannot reach heads it did not declare)."""
    heads = iv.heads(layer)
    if heads is None:
        return after
    keep = torch.zeros(before.shape[1], dtype=torch.bool, device=before.device)
    keep[list(heads)] = True
    return torch.where(keep[None, :, None, None], after, before)
