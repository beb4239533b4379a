"""One layer's attention statistics from the kernel's log-sum-exp: weights on named keys and row
entropies without forming a single attention row.

When the fused kernel computed a layer's output (:mod:`workbench.engine.kernels`), it also returned
``lse_q = log sum_k exp(s_qk)`` for every head and query. Then

- any weight is one dot product: ``A[q, k] = exp(s_qk - lse_q)``, with ``s_qk`` formed exactly as
  the model did (:mod:`workbench.engine.masking`: scaling, grouped KV heads, the mask). A probe that
  names a few keys per query (the first token, the previous token, the earlier copy) costs
  O(T n d) (:func:`~workbench.engine.masking.key_products`), not O(T^2 d);
- the mass on a key range per query (a block of sink keys, a recent window, or the earlier
  occurrences of the query's token once positions are sorted by token) is a banded product:
  blocks of queries against the keys their ranges span (:meth:`LayerStatistics.mass_in`),
  blocks grouped by span so a few wide blocks do not widen the rest;
- the row entropy is ``H_q = lse_q - sum_k A_qk s_qk = lse_q - scale * q . E_A[k]``, with
  ``E_A[k]`` from one more kernel call with the keys as values (boolean or no mask: a float
  mask's bias would add ``E_A[bias]``, so such layers take the chunked path).

:class:`LayerStatistics` answers what a :class:`~workbench.engine.patterns.PatternChunk` answers
(:class:`~workbench.protocol.views.PatternView`) except whole rows, for all queries of the layer at
once, so a probe's reduction is the same code on both. Everything is float32 whatever the model's
dtype; extra memory stays within the chunk budget.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, Callable, Iterator, NamedTuple

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from workbench.engine.call import AttentionCall
from workbench.engine.masking import (
    NEG,
    band_mask,
    grouped_queries,
    key_products,
    named_key_mask,
    product_rows,
    take_positions,
)
from workbench.engine.scratch import Scratch
from workbench.protocol.views import BatchInfo

BLOCK = 32  # query rows per block of a banded product (a window of W keys spans W + 31)
LOG2E = 1.4426950408889634  # log2(e): the statistics work with base-2 log-weights (exp2 is ~2.5x faster than exp here)
LOG2_MIN = -126.0  # log2 of the smallest normal float32 (2^-126 = 1.2e-38)


def weights(log2_weights: Tensor, allowed: Tensor) -> Tensor:
    """Attention weights ``2^((s - lse) log2 e) = exp(s - lse)`` where ``allowed``, 0 elsewhere,
    in place on the base-2 log-weights.

    Base 2 because torch's vectorised ``exp2`` is 2-3x faster than its ``exp`` on this
    project's CPUs (AVX-512: 0.09 against 0.25 ms on a layer's 276k banded scores; both within
    1 ulp), and the factor ``log2 e`` costs nothing: it is folded into the queries and ``lse``
    before the products (:meth:`LayerStatistics._augmented`). Log-weights are clamped at
    :data:`LOG2_MIN` before ``exp2`` and masked keys are zeroed after it, rather than filled
    with -inf before: the vectorised exponentials are 5-10x slower on elements whose result is
    denormal or whose input is -inf. A weight below 2^-126 (1.2e-38) is counted as 2^-126: at
    most 1e-33 on any sum a probe takes.
    """
    return log2_weights.clamp_min_(LOG2_MIN).exp2_().mul_(allowed)


SMALL_LAYER = 1 << 14  # (batch x head x query) rows below which a busy machine runs a layer's statistics on one thread


_CPUS = os.cpu_count() or 1  # asked once: os.cpu_count() costs ~7 us, every layer asks machine_busy


def machine_busy() -> bool:
    """Whether more threads want to run than there are CPUs: a one-minute load average above the
    number of CPUs by one (our own threads count in it: a run alone on the machine keeps the load
    at about its thread count, which is not busy). False where the platform reports no load."""
    try:
        return os.getloadavg()[0] >= _CPUS + 1
    except (AttributeError, OSError):
        return False


@contextlib.contextmanager
def statistics_threads(rows: int) -> Iterator[None]:
    """Run the block on one intra-op thread when a layer's statistics are small (fewer than
    :data:`SMALL_LAYER` rows) and the machine is busy (:func:`machine_busy`), on the process's
    threads otherwise.

    The statistics of a layer are a few dozen tensor operations whose size scales with its rows.
    On a machine whose cores are taken, every parallel operation waits for all its threads:
    measured here at load 8 on 2 cores, ~1 ms per small operation with two threads against ~20
    us with one, which made short prompts' statistics cost as much as the forward. On an idle
    machine the second thread pays from a few hundred rows on (SmolLM2 at 512 tokens, 4608 rows:
    the statistics 25% faster), and long layers' operations take milliseconds each (1 x 9 heads
    x 8192 queries: a banded product is ~15 ms), where a second thread halves the time whatever
    the load.
    """
    n = torch.get_num_threads()
    if n == 1 or rows >= SMALL_LAYER or not machine_busy():
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


SHARED_MOST = 64  # keys named for every query that one product per layer takes at most (LayerPlans.shared_keys)


class LayerPlans:
    """What the layers of one forward share, computed at the first layer that asks and reused
    by the others: which keys each query may see in a banded product or among named keys (the
    mask, and the probes' key ranges, are the same in every layer of a batch; only the queries,
    keys and log-sum-exps change). Short prompts gain most: there the statistics are many small
    tensor operations, and about half of them only rebuild these masks.

    Entries match on what they were computed from: the kind of plan, the call's mask (the same
    tensor object: models build one mask per kind of layer per forward), causal flag and
    shapes, and the index tensors (the same objects, or equal content by ``torch.equal``, O(T)).
    The pattern engine makes one per batch. The layers also share its :class:`Scratch`, the
    working buffers of their statistics (the same shapes in every layer).
    """

    def __init__(self, most: int = 64) -> None:
        self.entries: dict[
            tuple, list[tuple[tuple, Any, Any]]
        ] = {}  # (kind, id(mask), causal, shapes) -> [(args, value, mask)]
        self.most = most
        self.scratch = Scratch()
        self.shared_keys: Tensor | None = (
            None  # [batch, 1, n]: the keys probes name for every query alike, in request order
        )
        self._shared_at: list[tuple[Tensor, slice]] = []

    def get(self, call: AttentionCall, kind: str, args: tuple, compute: Callable[[], Any]) -> Any:
        sig = (kind, id(call.mask), call.is_causal, call.query.shape, call.key.shape)
        entries = self.entries.setdefault(sig, [])
        for e_args, value, _ in entries:
            if _same(e_args, args):
                return value
        value = compute()
        entries.append((args, value, call.mask))  # the mask kept alive: its id stays its own
        if len(entries) > self.most:
            entries.pop(0)
        return value

    def __len__(self) -> int:
        """Plans held."""
        return sum(len(e) for e in self.entries.values())

    def shared_columns(self, key_index: Int[Tensor, "batch 1 n"]) -> slice | None:
        """Where the keys ``key_index`` names for every query (the first token, a block of sink
        keys) sit among :attr:`shared_keys`, appended the first time they are asked for. Each
        layer then takes one product for all of them (:meth:`LayerStatistics._probs`), however
        many probes name some: ``sink`` and ``streaming`` both read the first token. None when
        they would take the shared keys past :data:`SHARED_MOST` (the caller takes its own
        product: a probe naming ever new keys does not grow every layer's product)."""
        for idx, cols in self._shared_at:
            if _same((idx,), (key_index,)):
                return cols
        start = 0 if self.shared_keys is None else self.shared_keys.shape[-1]
        if start + key_index.shape[-1] > SHARED_MOST:
            return None
        self.shared_keys = key_index if self.shared_keys is None else torch.cat([self.shared_keys, key_index], dim=-1)
        cols = slice(start, start + key_index.shape[-1])
        self._shared_at.append((key_index, cols))
        return cols


def _same(a: tuple, b: tuple) -> bool:
    if len(a) != len(b):
        return False
    for x, y in zip(a, b):
        if x is y:  # probes hand every layer the same index tensors (per_queries): no comparison
            continue
        if isinstance(x, Tensor) or isinstance(y, Tensor):
            if not (
                isinstance(x, Tensor)
                and isinstance(y, Tensor)
                and x.shape == y.shape
                and x.dtype == y.dtype
                and torch.equal(x, y)
            ):
                return False
        elif x != y:
            return False
    return True


@dataclass
class _BandCall:
    """One run of products of a banded plan: blocks ``sel`` at one key width.

    ``q_first``: the first block when ``sel`` is consecutive (the blocks' queries are then a
    view), else None. ``k_first``: the first key when each block starts :data:`BLOCK` keys after
    the one before (the blocks' keys are then a strided view, as for a recent window), else
    None and ``k_index`` names every block's keys. ``bias``: 0 where a query may attend to a key
    of its range (a float mask's value there), :data:`~workbench.engine.masking.NEG` elsewhere, laid
    out as the products (``[batch, kv | 1, block, row x group, key]``). In an order
    (``mass_in``'s ``rank``) the blocks' queries and keys are gathered by column instead:
    ``q_cols``, ``k_cols``.
    """

    sel: Tensor
    width: int
    bias: Tensor
    q_first: int | None
    k_first: int | None
    k_index: Tensor | None
    q_cols: Tensor | None = None  # in an order: the column of each block row's query, [batch, block x row]
    k_cols: Tensor | None = None  # in an order: the column of each block's keys, [batch, block x key]


@dataclass
class _BandPlan:
    """Everything :meth:`LayerStatistics.mass_in` needs that does not depend on the layer."""

    order: Tensor | None  # in an order: the column of each query position (those with a range first)
    rows: int
    n_blocks: int
    key_end: int = 0  # one past the last key any product reads
    calls: list[_BandCall] = field(default_factory=list)


class _NarrowKeys(NamedTuple):
    """Ranges of a few keys as named keys (:meth:`LayerStatistics._narrow_mass`)."""

    # [batch, 1, n] when every row's non-empty ranges are the same (then ``full``), else
    # [batch, query, n]; -1 pads; None: every range is empty
    keys: Tensor | None
    full: Tensor | None  # [batch, query]: which queries have a range, for [batch, 1, n] keys


def _blocks_of(n_q: int) -> int:
    """Query rows of a layer's banded products: whole blocks of :data:`BLOCK` (one block of
    ``n_q`` rows when there are no more)."""
    return -(-n_q // BLOCK) * BLOCK if n_q > BLOCK else n_q


MERGE_SCORES = 1 << 14  # scores per KV head that one more product costs in fixed overhead (~50 us here)


def band_widths(spans: Int[Tensor, " block"], rows: int, group: int) -> Int[Tensor, " block"]:
    """The key width each block's product takes: its span rounded up to two steps per octave
    (at most 50% more keys), then narrower widths merged into the next wider one while the
    extra scores cost less than another product's fixed overhead (:data:`MERGE_SCORES`). Short
    prompts end up with one or two products per range, long ones with a few tight ones."""
    unit = (2 ** (torch.log2(spans.clamp_min(1).double()).floor() - 1)).long().clamp_min(1)
    width_of = torch.where(spans > 0, -(-spans // unit) * unit, 0)
    widths = [w for w in width_of.unique().tolist() if w > 0]
    for narrow, wide in zip(widths, widths[1:]):
        blocks = width_of == narrow
        if int(blocks.sum()) * (wide - narrow) * rows * group <= MERGE_SCORES:
            width_of = torch.where(blocks, wide, width_of)
    return width_of


def _compact_order(
    rank: Int[Tensor, "batch pos"], lo: Int[Tensor, "batch query"], hi: Int[Tensor, "batch query"]
) -> tuple[Int[Tensor, "batch query"], Int[Tensor, "batch pos"], Int[Tensor, "batch row"], Int[Tensor, "batch row"]]:
    """Key ranges in an order (``lo[b, q] <= rank[b, k] < hi[b, q]``), with what no range needs
    left out: the queries whose range is empty and the keys no range covers (on prose, echo's
    first occurrences and words seen once: most of them). Returns ``(order, key_order, lo, hi)``:
    position i of the queries is column ``order[b, i]`` (those with a range first, in rank
    order; ``lo``, ``hi`` are theirs, cut to the longest row's count), key i is column
    ``key_order[b, i]`` (covered keys first, in rank order), and the ranges count along it.
    Covered keys keep their relative order, so each range stays one contiguous run, and blocks
    of queries from different tokens do not span the uncovered keys between them."""
    n = rank.shape[1]
    full = hi > lo
    by_rank = rank.argsort(dim=1)  # rank position -> column
    edges = torch.zeros(rank.shape[0], n + 1, dtype=torch.long, device=rank.device)
    edges.scatter_add_(1, torch.where(full, lo, n), full.long()).scatter_add_(1, torch.where(full, hi, n), -full.long())
    covered = edges.cumsum(1)[:, :n] > 0  # by rank position
    new_pos = covered.long().cumsum(1) - 1
    arange = torch.arange(n, device=rank.device)
    key_order = by_rank.gather(1, torch.where(covered, arange, arange + n).argsort(dim=1))
    lo = torch.where(full, new_pos.gather(1, lo.clamp(0, n - 1)), 0)
    hi = torch.where(full, new_pos.gather(1, (hi - 1).clamp(0, n - 1)) + 1, 0)
    order = torch.where(full, rank, rank + n).argsort(dim=1)
    n_rows = int(full.sum(1).max())
    return order, key_order, lo.gather(1, order)[:, :n_rows], hi.gather(1, order)[:, :n_rows]


def _named_mask(
    call: AttentionCall, key_index: Tensor, q0: int, q1: int
) -> tuple[Float[Tensor, "batch mask_head block n"], Tensor | None]:
    """:func:`~workbench.engine.masking.named_key_mask` with ``allowed`` as float32 0 / 1: :func:`weights`
    multiplies by it every layer, and a boolean factor would be converted every time."""
    allowed, additive = named_key_mask(call, key_index, q0, q1)
    return allowed.float(), additive


def _live_keys(idx: Int[Tensor, "batch query_or_1 n"]) -> tuple[Bool[Tensor, " n"] | None, Tensor | None]:
    """Which of the ``n`` named keys some query sees (None when all do) and the index of those
    alone (None when none does)."""
    live = (idx >= 0).flatten(0, 1).any(0)
    if bool(live.all()):
        return None, None
    return live, (idx[..., live] if bool(live.any()) else None)


class LayerStatistics:
    """Attention statistics of one layer for every query of a batch (no rows materialised).

    Built by the pattern engine from a call whose ``lse`` (and, for entropy, ``key_mean``) the
    fused kernel filled; ``n_visible`` is the number of keys each query may see (from the mask);
    ``plans``: the :class:`LayerPlans` of the batch, shared by its layers.
    """

    def __init__(
        self,
        call: AttentionCall,
        batch: BatchInfo,
        n_visible: Int[Tensor, "batch query"],
        chunk_elements: int = 1 << 22,
        plans: LayerPlans | None = None,
    ) -> None:
        if call.lse is None:
            raise ValueError("LayerStatistics needs the kernel's log-sum-exp (call.lse)")
        if call.softcap is not None:
            raise ValueError(
                "LayerStatistics needs a layer the fused kernel computed exactly: "
                "a soft-capped one takes pattern chunks"
            )
        self.call = call
        self.layer = call.layer
        self.batch = batch
        self.n_visible = n_visible
        self.chunk_elements = chunk_elements
        self.plans = plans if plans is not None else LayerPlans()
        b, h, n_q, _ = call.query.shape
        self.shape = (b, h, n_q)
        # rows that see no key have no log-sum-exp (kernels differ: 0, -inf): 0 keeps exp() finite
        self.lse: Float[Tensor, "batch head query"] = torch.where((n_visible > 0).unsqueeze(1), call.lse, 0.0)
        self._qo = batch.positions.shape[1] - n_q  # queries are the last n_q columns
        self.q_start, self.q_end = 0, n_q
        self.query_pos: Int[Tensor, "batch query"] = batch.positions[:, self._qo :]

    @cached_property
    def query_valid(self) -> Bool[Tensor, "batch query"]:
        """Real queries that see a key (probes read it once per batch: ``per_queries``)."""
        return (self.query_pos >= 0) & (self.n_visible > 0)

    def release_scratch(self) -> None:
        """Drop the tensors cached in the batch's scratch buffers (another layer writes them now;
        they are rebuilt if this one is asked again)."""
        self.__dict__.pop("_augmented", None)

    def _buffer(self, name: str, shape: tuple[int, ...]) -> Tensor:
        return self.plans.scratch.get(name, shape, torch.float32, self.call.query.device)

    @property
    def queries(self) -> slice:
        """The batch columns of the layer's queries (all of them)."""
        return slice(self._qo, self._qo + self.shape[2])

    @property
    def n_keys(self) -> int:
        return int(self.call.key.shape[2])

    # -- weights on named keys -----------------------------------------------------------------
    def probs_at(self, key_index: Int[Tensor, "batch query *n"]) -> Float[Tensor, "batch head query *n"]:
        """A[q, key_index[b, q]] per query, or per named key when ``key_index`` has a trailing
        axis of n keys (0 where an index is negative or not visible)."""
        one = key_index.dim() == 2
        p = self._probs(key_index.unsqueeze(-1) if one else key_index)
        return p.squeeze(-1) if one else p

    def key_probs(self, key_index: Int[Tensor, " batch"]) -> Float[Tensor, "batch head query"]:
        """A[q, key_index[b]] for every head and query (one product per row)."""
        return self._probs(key_index.view(-1, 1, 1)).squeeze(-1)

    def _probs(self, idx: Int[Tensor, "batch query_or_1 n"]) -> Float[Tensor, "batch head query n"]:
        """Weights on named keys: per query (``[b, query, n]``) or the same for all (``[b, 1, n]``:
        a view of the layer's one product over the batch's :attr:`LayerPlans.shared_keys`)."""
        if idx.shape[1] > 1:
            return self._named_probs(idx)
        cols = self.plans.shared_columns(idx)
        if cols is None:  # past SHARED_MOST keys: its own product
            return self._named_probs(idx)
        have = self.__dict__.get("_shared_probs")
        if have is None or have.shape[-1] < cols.stop:  # the first layer, while probes add their keys
            have = self._shared_probs = self._named_probs(self.plans.shared_keys)
        return have[..., cols]

    def _named_probs(self, idx: Int[Tensor, "batch query_or_1 n"]) -> Float[Tensor, "batch head query n"]:
        b, h, n_q = self.shape
        d, n_kv, n = self.call.query.shape[3], self.call.key.shape[1], idx.shape[-1]
        live, some = self.plans.get(self.call, "live", (idx,), lambda: _live_keys(idx))
        if live is not None:  # named keys that no query sees (induction's on prose: two of three) are 0
            out = self.lse.new_zeros(b, h, n_q, n)
            if some is not None:
                out[..., live] = self._named_probs(some)
            return out
        per_query = idx.shape[1] > 1
        step = max(1, self.chunk_elements // (b * (n * n_kv * d * per_query + h * n)))
        self.plans.scratch.claim(self)
        queries, keys = self._augmented
        out = []
        for q0 in range(0, n_q, step):
            q1 = min(n_q, q0 + step)
            block = idx[:, q0:q1] if per_query else idx
            allowed, additive = self.plans.get(
                self.call, "named", (block, q0, q1), lambda: _named_mask(self.call, block, q0, q1)
            )
            rows = product_rows(self.call, queries, per_query, q0, q1)
            taken = self._buffer("named_keys", (b, n_kv, rows * n if per_query else n, d + 1))
            s = key_products(
                self.call, block, q0, q1, queries=queries, keys=keys, key_buffer=taken
            )  # [b, h, block, n]: (s - lse) log2 e
            if additive is not None:
                s.add_(additive, alpha=LOG2E)
            out.append(weights(s, allowed))
        return torch.cat(out, dim=2) if len(out) > 1 else out[0]

    def mass_in(
        self,
        lo: Int[Tensor, "batch query"],
        hi: Int[Tensor, "batch query"],
        rank: Int[Tensor, "batch pos"] | None = None,
    ) -> Float[Tensor, "batch head query"]:
        """sum_k A[q, k] over the keys k with ``lo[b, q] <= rank[b, k] < hi[b, q]`` (empty where
        ``hi <= lo``): a key range per query, in column order by default or in the per-row order
        ``rank`` gives (a permutation of each row's columns; queries and keys the same columns).

        Queries are taken in that order in blocks of :data:`BLOCK` (in an order, only those
        whose range is not empty: on prose, echo's queries with an earlier copy, ~45% at 512
        tokens); each block is scored only against the keys its ranges span, blocks of similar
        span together. Which blocks, spans and masks is the layer-independent :class:`_BandPlan`,
        made once per batch. Each product is one ``baddbmm`` of the :meth:`_augmented` queries
        and keys onto the plan's bias per batch row and KV head (in an order: one ``bmm`` of the
        gathered queries and keys for all of them, then the bias added), so it yields
        ``(s - lse) log2 e`` with masked keys at -1e30, then ``exp2`` and a sum: four passes.
        """
        b, h, n_q = self.shape
        n_kv = self.call.key.shape[1]
        if rank is None:
            narrow = self._narrow_mass(lo, hi)
            if narrow is not None:
                return narrow
        plan = self.plans.get(self.call, "band", (lo, hi, rank), lambda: self._band_plan(lo, hi, rank))
        if plan is None:
            return self.lse.new_zeros(b, h, n_q)
        order, rows, n_blocks = plan.order, plan.rows, plan.n_blocks
        self.plans.scratch.claim(self)
        queries, keys = self._augmented
        keys = self._band_keys(keys, plan.key_end)
        # in an order: gathered per call
        qb = queries.view(b, n_kv, n_blocks, rows * (h // n_kv), -1) if order is None else None
        mass = self.lse.new_zeros(b, n_kv, n_blocks, rows * (h // n_kv))
        for c in plan.calls:
            if c.q_cols is not None:
                self._gathered_band_mass(c, queries, keys, rows, mass)
            else:
                self._column_band_mass(c, qb, keys, rows, mass)
        g = h // n_kv
        m = min(n_blocks * rows, n_q)
        mass = mass.view(b, n_kv, n_blocks * rows, g).transpose(2, 3).reshape(b, h, n_blocks * rows)[:, :, :m]
        if order is None:
            return mass
        return self.lse.new_zeros(b, h, n_q).scatter_(2, order[:, :m].unsqueeze(1).expand(b, h, m), mass)

    def _band_keys(self, keys: Tensor, key_end: int) -> Tensor:
        """The :meth:`_augmented` keys reaching to ``key_end``, where the plan's last bands end: a
        view into the zero keys kept after the last, or a padded copy when the bands reach further."""
        # the last blocks' widths reach past the zero keys after the last: more of them
        if key_end > keys.shape[2] + BLOCK:
            b, n_kv = self.shape[0], self.call.key.shape[1]
            padded = self._buffer("padded_keys", (b, n_kv, key_end, keys.shape[3]))
            padded[:, :, : keys.shape[2]] = keys
            padded[:, :, keys.shape[2] :] = 0.0
            return padded
        if key_end > keys.shape[2]:  # into the zero keys :meth:`_augmented` keeps after the last (masked)
            return keys.as_strided(keys.shape[:2] + (key_end, keys.shape[3]), keys.stride(), keys.storage_offset())
        return keys

    def _gathered_band_mass(self, c: _BandCall, queries: Tensor, keys: Tensor, rows: int, mass: Tensor) -> None:
        """:meth:`mass_in`'s products of band call ``c`` in an order: every block's queries and keys
        gathered once, contiguous, then one product for all of them, summed into ``mass``."""
        b, h, _ = self.shape
        n_kv = self.call.key.shape[1]
        n_sel, g = c.sel.shape[0], h // n_kv
        q_all = take_positions(
            queries, c.q_cols, out=self._buffer("band_queries", (b, n_kv, n_sel * rows) + queries.shape[3:])
        )
        k_all = take_positions(keys, c.k_cols, out=self._buffer("band_keys", (b, n_kv, n_sel * c.width, keys.shape[3])))
        scores = self._buffer("band_scores", (b * n_kv * n_sel, rows * g, c.width))
        torch.bmm(
            q_all.view(b * n_kv * n_sel, rows * g, -1),
            k_all.view(b * n_kv * n_sel, c.width, -1).transpose(1, 2),
            out=scores,
        )
        # bias: [b, kv | 1, block, row x group, key]
        blocks = scores.view(b, n_kv, n_sel, rows * g, c.width).add_(c.bias)
        blocks.clamp_min_(LOG2_MIN).exp2_()
        mass.index_copy_(2, c.sel, blocks.sum(-1))

    def _column_band_mass(self, c: _BandCall, qb: Tensor, keys: Tensor, rows: int, mass: Tensor) -> None:
        """:meth:`mass_in`'s products of band call ``c`` in column order, per batch row and KV head:
        the blocks' queries are a view of a slice (or gathered), their keys a strided view (or
        gathered), summed into ``mass``."""
        b, h, _ = self.shape
        n_kv = self.call.key.shape[1]
        n_sel, g = c.sel.shape[0], h // n_kv
        scores = self._buffer("band_scores", (n_sel, rows * g, c.width))
        gathered = None if c.q_first is not None else self._buffer("band_queries", (n_sel, rows * g, qb.shape[-1]))
        for i in range(b):
            for j in range(n_kv):
                if c.q_first is not None:
                    q = qb[i, j, c.q_first : c.q_first + n_sel]
                else:
                    q = torch.index_select(qb[i, j].flatten(1), 0, c.sel, out=gathered.flatten(1)).view_as(gathered)
                k = keys[i, j]
                if c.k_first is not None:
                    k = k[c.k_first :].as_strided((n_sel, c.width, k.shape[-1]), (rows * k.stride(0), k.stride(0), 1))
                else:
                    k = torch.index_select(
                        k, 0, c.k_index, out=self._buffer("band_keys", (n_sel * c.width, k.shape[-1]))
                    )
                    k = k.view(n_sel, c.width, -1)
                bias = c.bias[i, j if c.bias.shape[1] > 1 else 0]
                torch.baddbmm(bias, q, k.transpose(1, 2), out=scores)
                scores.clamp_min_(LOG2_MIN).exp2_()
                if c.q_first is not None:
                    torch.sum(scores, -1, out=mass[i, j, c.q_first : c.q_first + n_sel])  # [block, row x group]
                else:
                    mass[i, j].index_copy_(0, c.sel, scores.sum(-1))

    @cached_property
    def _augmented(self) -> tuple[Float[Tensor, "batch kv pos group d1"], Float[Tensor, "batch kv pos d1"]]:
        """Queries (scaled, grouped by KV head) with ``-lse`` appended, both times ``log2 e``,
        and keys with 1 appended (followed by :data:`BLOCK` zero keys in their buffer, for bands
        that reach past the last key), float32, the queries padded with zero rows to whole blocks:
        ``log2 e (q, -lse_q) . (k, 1) = (s_qk - lse_q) log2 e``, so a product yields base-2
        log-weights (:func:`weights`). One copy of each per layer, in the batch's scratch
        buffers; every banded and named-key product of every probe reads them."""
        q, k = self.call.query, self.call.key
        b, h, n_q, d = q.shape
        n_kv = k.shape[1]
        qa = self._buffer("queries", (b, n_kv, _blocks_of(n_q), h // n_kv, d + 1))
        grouped_queries(self.call, out=qa[:, :, :n_q, :, :d], factor=LOG2E)
        torch.mul(self.lse.view(b, n_kv, h // n_kv, n_q).transpose(2, 3), -LOG2E, out=qa[:, :, :n_q, :, d])
        qa[:, :, n_q:] = 0.0
        n_k = k.shape[2]
        spare = self._buffer("keys", k.shape[:2] + (n_k + BLOCK, d + 1))
        ka = spare[:, :, :n_k]
        ka[..., :d] = k
        ka[..., d] = 1.0
        spare[:, :, n_k:] = 0.0  # zero keys after the last: bands reaching past it read these (masked)
        return qa, ka

    def _band_plan(self, lo: Tensor, hi: Tensor, rank: Tensor | None) -> _BandPlan | None:
        """The blocks, their key spans grouped into a few widths (:func:`band_widths`), and each
        product's bias for :meth:`mass_in`; None when every range is empty."""
        b, h, n_q = self.shape
        n_kv = self.call.key.shape[1]
        order = key_order = None
        lo, hi = lo.clamp(0, self.n_keys), hi.clamp(0, self.n_keys)
        n_rows = n_q
        if rank is not None:
            order, key_order, lo, hi = _compact_order(rank, lo, hi)
            n_rows = lo.shape[1]
        full = hi > lo
        if not bool(full.any()):
            return None
        rows = min(n_rows, BLOCK)
        n_blocks = _blocks_of(n_rows) // rows
        pad = n_blocks * rows - n_rows
        blocked = lambda x, v: torch.nn.functional.pad(x, (0, pad), value=v).view(b, n_blocks, rows)  # noqa: E731
        starts = blocked(torch.where(full, lo, self.n_keys), self.n_keys).amin((0, 2))
        ends = blocked(torch.where(full, hi, 0), 0).amax((0, 2))
        spans = (ends - starts).clamp_min(0)
        lo_b, hi_b = blocked(lo, 0).unsqueeze(-1), blocked(hi, 0).unsqueeze(-1)  # padded rows: empty
        plan = _BandPlan(order, rows, n_blocks)
        width_of = band_widths(spans, rows, h // n_kv)
        for width in width_of.unique().tolist():
            if width == 0:
                continue
            blocks = (width_of == width).nonzero().flatten()
            per_call = max(1, self.chunk_elements // (b * h * rows * width))
            for i in range(0, blocks.numel(), per_call):
                sel = blocks[i : i + per_call]
                k0 = starts[sel]
                if order is None and sel.numel() > 1:  # keys a whole block apart when they can be (a window whose
                    # first block starts late, at the first query that has one): the blocks' keys are then a view
                    aligned = k0[-1] - (sel[-1] - sel) * rows
                    if bool(((aligned >= 0) & (aligned <= k0) & (aligned + width >= ends[sel])).all()):
                        k0 = aligned
                keys_at = (k0.view(-1, 1) + torch.arange(width, device=k0.device)).view(1, -1, 1, width)
                inside = (keys_at >= lo_b.index_select(1, sel)) & (
                    keys_at < hi_b.index_select(1, sel)
                )  # [b, block, row, key]
                allowed, additive = band_mask(
                    self.call, sel * rows, rows, k0, width, None if order is None else (order, key_order), keep=inside
                )
                bias = torch.where(
                    allowed, 0.0 if additive is None else additive * LOG2E, NEG
                )  # [b, kv|1, block, row, g|1, key]
                bias = bias.expand(-1, -1, -1, -1, h // n_kv, -1).reshape(b, bias.shape[1], sel.shape[0], -1, width)
                if order is not None:
                    q_at = (sel.view(-1, 1) * rows + torch.arange(rows, device=sel.device)).flatten().clamp(max=n_q - 1)
                    k_at = keys_at.flatten().clamp(0, self.n_keys - 1)
                    plan.calls.append(
                        _BandCall(
                            sel,
                            width,
                            bias.contiguous(),
                            None,
                            None,
                            None,
                            order.gather(1, q_at.expand(b, -1)),
                            key_order.gather(1, k_at.expand(b, -1)),
                        )
                    )
                    continue
                consecutive = bool((sel.diff() == 1).all())
                regular = consecutive and bool((k0.diff() == rows).all())
                plan.key_end = max(plan.key_end, int(k0.max()) + width)
                plan.calls.append(
                    _BandCall(
                        sel,
                        width,
                        bias.contiguous(),
                        int(sel[0]) if consecutive else None,
                        int(k0[0]) if regular else None,
                        None if regular else keys_at.flatten().clamp(0, self.n_keys - 1),
                    )
                )
        return plan

    def _narrow_mass(self, lo: Tensor, hi: Tensor, most: int = 8) -> Tensor | None:
        """The mass on ranges of at most ``most`` keys as a sum of named-key weights (fewer
        operations than a banded product; one product per row when every non-empty range of a
        row is the same, e.g. the sink tokens), or None for wider ranges."""
        named = self.plans.get(self.call, "narrow", (lo, hi, most), lambda: self._narrow_keys(lo, hi, most))
        if named is None:
            return None
        if named.keys is None:  # every range empty
            return self.lse.new_zeros(self.shape)
        mass = self._probs(named.keys).sum(-1)
        return mass if named.full is None else mass * named.full.unsqueeze(1)

    def _narrow_keys(self, lo: Tensor, hi: Tensor, most: int) -> _NarrowKeys | None:
        """The named keys of :meth:`_narrow_mass`, or None when a range is too wide."""
        full = hi > lo
        n = int((hi - lo)[full].max()) if bool(full.any()) else 0
        if n > most:
            return None
        if n == 0:
            return _NarrowKeys(None, None)
        big = self.n_keys + 1
        same = bool(
            ((torch.where(full, lo, big).amin(1) == torch.where(full, lo, -1).amax(1)) | ~full.any(1)).all()
            and ((torch.where(full, hi, big).amin(1) == torch.where(full, hi, -1).amax(1)) | ~full.any(1)).all()
        )
        if same:  # one range per row: [b, 1, n] keys, named once
            lo_r, hi_r = (
                torch.where(full, lo, big).amin(1, keepdim=True),
                torch.where(full, hi, -1).amax(1, keepdim=True),
            )
            idx = lo_r.unsqueeze(-1) + torch.arange(n, device=lo.device)
            return _NarrowKeys(torch.where(idx < hi_r.unsqueeze(-1), idx, -1), full)
        idx = lo.unsqueeze(-1) + torch.arange(n, device=lo.device)
        return _NarrowKeys(torch.where(idx < hi.unsqueeze(-1), idx, -1), None)

    # -- row entropy ---------------------------------------------------------------------------
    @cached_property
    def row_entropy(self) -> Float[Tensor, "batch head query"]:
        """H_q = lse_q - scale * q . E_A[k] (nats); 0 for queries that see at most one key."""
        km = self.call.key_mean
        if km is None:
            raise ValueError("row entropy needs E_A[k] (call.key_mean): the kernel was not asked for 'key_mean'")
        expected = (self.call.query.float() * km).sum(-1).mul_(self.call.scaling)
        return (self.lse - expected).clamp_min_(0.0) * (self.n_visible > 1).unsqueeze(1)

    def __getattr__(self, name: str):
        if name in ("probs", "mass_on", "key_positions", "key_tokens", "n_keys_visible"):
            raise AttributeError(
                f"LayerStatistics has no {name!r}: it holds no attention rows. A probe that reads "
                "whole rows declares needs = ('rows',) (probes/base.py) and receives PatternChunks"
            )
        raise AttributeError(name)
