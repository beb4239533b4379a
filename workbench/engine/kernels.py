"""Fused attention that also returns each row's log-sum-exp: a layer's output and ``lse_q`` from
one kernel call.

Every fused attention kernel computes ``lse_q = log sum_k exp(s_qk)`` for its online softmax;
the ones below return it. With it any attention weight is one dot product,
``A[q, k] = exp(s_qk - lse_q)`` (:mod:`workbench.engine.statistics`), so the statistics of a probe
that names its keys cost O(T d) next to the forward, not a second O(T^2) pass. A second call
with the keys as values gives ``E_A[k]`` per row, hence the row entropy
``H_q = lse_q - scale * q . E_A[k]`` for the price of one more attention pass.

=========  ==============================================================  ===================
device     kernel                                                          when
=========  ==============================================================  ===================
cpu        ``aten._scaled_dot_product_flash_attention_for_cpu``            always (SDPA's own
           (grouped KV heads native; additive float mask)                  CPU choice)
cuda       ``aten._scaled_dot_product_flash_attention``                    no mask, fp16/bf16,
                                                                           head dim <= 256
cuda       ``aten._scaled_dot_product_efficient_attention``                otherwise (float
           (``compute_log_sumexp=True``; lse padded to 32 rows, cut)       bias, any dtype)
=========  ==============================================================  ===================

On CPU the layer's output is bit-for-bit what ``torch.nn.functional.scaled_dot_product_attention``
returns (SDPA dispatches to the same kernel and builds the same additive mask from a boolean
one; ``tests/test_statistics.py`` checks it), except for long boolean masks that leave most
keys out (below).

**Query blocks under long boolean masks.** A kernel given a mask computes every query against
every key: SDPA turns a boolean mask into a float one of ``[query, key]`` (1 GB at 16k tokens) and
the kernel skips nothing, so a sliding-window layer (Gemma 3: a 512-key window in five layers of
six) costs as much as a global one, and a padded batch loses the causal half. When the mask is
boolean and at least ``BLOCK_QUERIES`` x 2 queries long, :func:`query_blocks` finds, for each
block of ``BLOCK_QUERIES`` queries, the span of keys any of its rows may see; if those spans hold
at most ``BLOCKED_MAX_SHARE`` of the ``query x key`` scores, the kernel runs once per block on its
span, with that block's slice of the mask. Every row still sees exactly its own keys (those
outside a span are masked for the whole block), so the output and lse are the same up to the
order of the kernel's float32 sums (its key tiles start at the span, not at key 0): 1e-6 relative
in the tests, which also hold the block sizes down to a few queries. The spans depend on the
mask only and are kept per mask object, so the layers of a forward that share a mask share them.
The CUDA branch is the same code with the CUDA kernels; it is tested here only by simulation
(which kernel, shapes, dtypes): GPU timings are not measured on this project's machines.

The log-sum-exp is float32 whatever the inputs (the kernels accumulate in float32). The
keys-as-values pass for entropy runs in float32 even for bf16 / fp16 models, since ``E_A[k]``
in half precision would cost the entropy two or three significant digits.
"""

from __future__ import annotations

import threading
import weakref
from typing import Any, Callable

import torch
from jaxtyping import Bool, Float
from torch import Tensor

from workbench.engine.call import AttentionCall
from workbench.engine.masking import additive_mask, boolean_bias

_FLASH_CUDA_DTYPES = (torch.float16, torch.bfloat16)
BLOCK_QUERIES = 256  # queries per kernel call under a long boolean mask (tests shrink it)
BLOCKED_MAX_SHARE = 0.7  # run in blocks only when their spans hold at most this share of the scores
_BIAS_ALIGN = 16  # the memory-efficient kernel wants the bias's row stride a multiple of 16


def device_type(t: Tensor) -> str:
    """The device type a kernel is chosen for (tests simulate a GPU by replacing this)."""
    return t.device.type


def fusable(call: AttentionCall, dropout: float = 0.0, extra: dict[str, Any] | None = None) -> bool:
    """Whether :func:`attention_with_lse` computes exactly this call: no soft-cap (no kernel
    applies ``c tanh(s / c)``), no dropout or position bias, no autograd (statistics runs are
    inference), equal query / value head sizes on CPU, and a causal flag only where the query
    and key counts agree (torch aligns ``is_causal`` to the top-left corner)."""
    q, k, v = call.query, call.key, call.value
    if call.softcap is not None or dropout or (extra or {}).get("position_bias") is not None:
        return False
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
        return False
    if call.is_causal and q.shape[2] != k.shape[2]:
        return False
    if q.shape[1] % k.shape[1]:
        return False
    if device_type(q) == "cpu":
        return q.shape[-1] == v.shape[-1] == k.shape[-1]
    return device_type(q) == "cuda"


def _cpu(q: Tensor, k: Tensor, v: Tensor, bias: Tensor | None, causal: bool, scale: float) -> tuple[Tensor, Tensor]:
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, causal, attn_mask=bias, scale=scale)


def _cuda_flash(
    q: Tensor, k: Tensor, v: Tensor, bias: Tensor | None, causal: bool, scale: float
) -> tuple[Tensor, Tensor]:
    out = torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, 0.0, causal, False, scale=scale)
    return out[0], out[1]


def _cuda_efficient(
    q: Tensor, k: Tensor, v: Tensor, bias: Tensor | None, causal: bool, scale: float
) -> tuple[Tensor, Tensor]:
    out = torch.ops.aten._scaled_dot_product_efficient_attention(q, k, v, bias, True, 0.0, causal, scale=scale)
    return out[0], out[1]


# name -> kernel; tests replace entries to simulate a GPU on CPU tensors
KERNELS: dict[str, Callable[..., tuple[Tensor, Tensor]]] = {
    "cpu_flash": _cpu,
    "cuda_flash": _cuda_flash,
    "cuda_efficient": _cuda_efficient,
}


def choose_kernel(device: str, dtype: torch.dtype, head_dim: int, has_mask: bool) -> str:
    """The kernel :func:`attention_with_lse` calls for these inputs (see the table above)."""
    if device == "cpu":
        return "cpu_flash"
    if device == "cuda":
        if not has_mask and dtype in _FLASH_CUDA_DTYPES and head_dim <= 256:
            return "cuda_flash"
        return "cuda_efficient"
    raise ValueError(f"no fused attention kernel with log-sum-exp for device type {device!r}")


def _aligned_bias(bias: Tensor, shape: tuple[int, int, int, int]) -> Tensor:
    """``bias`` expanded to ``[batch, head, query, key]`` with its rows padded to a multiple of
    16 elements and cut back (a view), as SDPA prepares a mask for the memory-efficient kernel."""
    n_k = bias.shape[-1]
    pad = (-n_k) % _BIAS_ALIGN
    if pad:
        bias = torch.nn.functional.pad(bias, (0, pad))[..., :n_k]
    return bias.expand(shape)


def attention_with_lse(
    query: Float[Tensor, "batch head query d"],
    key: Float[Tensor, "batch kv_head key d"],
    value: Float[Tensor, "batch kv_head key d_v"],
    bias: Float[Tensor, "batch mask_head query key"] | None,
    is_causal: bool,
    scale: float,
) -> tuple[Float[Tensor, "batch head query d_v"], Float[Tensor, "batch head query"]]:
    """Attention output and float32 row log-sum-exp from one fused kernel call.

    ``bias`` is an additive float mask in the query's dtype (:func:`workbench.engine.masking.additive_mask`).
    Grouped KV heads are passed as they are to the CPU kernel and repeated for the CUDA ones.
    """
    b, h, n_q, d = query.shape
    name = choose_kernel(device_type(query), query.dtype, d, bias is not None)
    if name != "cpu_flash" and key.shape[1] != h:
        g = h // key.shape[1]
        key, value = key.repeat_interleave(g, dim=1), value.repeat_interleave(g, dim=1)
    if name == "cuda_efficient" and bias is not None:
        bias = _aligned_bias(bias, (b, h, n_q, key.shape[2]))
    out, lse = KERNELS[name](query, key, value, bias, is_causal, scale)
    return out, lse[..., :n_q].float()


Block = tuple[int, int, int, int]  # queries [q0, q1) see keys within [k0, k1)


def _spans(mask: Bool[Tensor, "batch mask_head query key"], block: int) -> list[Block] | None:
    n_q, n_k = mask.shape[-2:]
    if n_q < 2 * block or n_k == 0:
        return None
    starts = range(0, n_q, block)
    seen = torch.empty(len(starts), n_k, dtype=torch.bool, device=mask.device)
    for i, q0 in enumerate(starts):  # keys any row of the block (in any batch row, mask head) sees
        torch.any(mask[..., q0 : q0 + block, :].flatten(0, -3), dim=(0, 1), out=seen[i])
    ar = torch.arange(n_k, device=mask.device)
    first = torch.where(seen, ar, n_k).amin(-1)
    last = torch.where(seen, ar, -1).amax(-1)
    blocks, work = [], 0
    for q0, k0, k1 in zip(starts, first.tolist(), (last + 1).tolist()):
        q1 = min(q0 + block, n_q)
        if k1 <= k0:  # no row of the block sees a key: any one masked key gives the kernel's answer
            k0, k1 = 0, 1
        blocks.append((q0, q1, k0, k1))
        work += (q1 - q0) * (k1 - k0)
    return blocks if work <= BLOCKED_MAX_SHARE * n_q * n_k else None


class _PerMask:
    """A few masks' query blocks, found again by the mask object itself (weakly held, with its
    in-place version): the layers of one forward hand the kernel the same mask tensor."""

    def __init__(self, size: int = 4) -> None:
        self.size, self.entries, self.lock = size, [], threading.Lock()

    def get(self, mask: Tensor, block: int, make: Callable[[], list[Block] | None]) -> list[Block] | None:
        with self.lock:
            for ref, version, blk, blocks in self.entries:
                if ref() is mask and version == mask._version and blk == block:
                    return blocks
        blocks = make()
        with self.lock:
            self.entries = [e for e in self.entries if e[0]() is not None][-(self.size - 1) :]
            self.entries.append((weakref.ref(mask), mask._version, block, blocks))
        return blocks


_BLOCKS = _PerMask()


def query_blocks(mask: Tensor | None) -> list[Block] | None:
    """Query blocks and their key spans for a boolean mask when running the kernel per block
    computes at most ``BLOCKED_MAX_SHARE`` of the scores the whole call would; None otherwise
    (no mask, a float mask, one not ``[batch, 1|head, query, key]``, fewer than
    ``2 x BLOCK_QUERIES`` queries, or too little to skip)."""
    if mask is None or mask.dtype != torch.bool or mask.dim() != 4:
        return None
    block = BLOCK_QUERIES
    return _BLOCKS.get(mask, block, lambda: _spans(mask, block))


Pass = tuple[Tensor, Tensor, Tensor]  # (query, key, value) of one attention pass over the call's mask


def attend(
    call: AttentionCall, *passes: Pass
) -> list[tuple[Float[Tensor, "batch head query d_v"], Float[Tensor, "batch head query"]]]:
    """Attention of each pass's query over its key / value under the call's mask, and the float32
    row lse: one kernel call per pass, or one per pass and query block under a long boolean mask
    (:func:`query_blocks`). The mask's additive bias is built once and shared by consecutive
    passes of one dtype (a bias in another dtype replaces it, so at most one is kept). Blocked
    outputs are ``[batch, query, head, d_v]`` tensors seen as ``[batch, head, query, d_v]``."""
    blocks = query_blocks(call.mask)
    if blocks is None:
        bias = _Bias(lambda dtype: additive_mask(call, dtype))
        return [attention_with_lse(q, k, v, bias(q.dtype), call.is_causal, call.scaling) for q, k, v in passes]
    outs = []
    for q, _, v in passes:
        b, h, n_q, _ = q.shape
        outs.append((q.new_empty(b, n_q, h, v.shape[-1]), torch.empty(b, h, n_q, dtype=torch.float32, device=q.device)))
    for q0, q1, k0, k1 in blocks:
        bias = _Bias(lambda dtype: boolean_bias(call.mask[..., q0:q1, k0:k1], dtype))  # noqa: B023  (used in this iteration only)
        for (q, k, v), (out, lse) in zip(passes, outs):
            o, s = attention_with_lse(
                q[:, :, q0:q1], k[:, :, k0:k1], v[:, :, k0:k1], bias(q.dtype), False, call.scaling
            )
            out[:, q0:q1] = o.transpose(1, 2)
            lse[:, :, q0:q1] = s
    return [(out.transpose(1, 2), lse) for out, lse in outs]


class _Bias:
    """The last additive bias built, in its dtype: rebuilt only when a pass asks for another dtype."""

    def __init__(self, make: Callable[[torch.dtype], Tensor | None]) -> None:
        self.make, self.dtype, self.bias = make, None, None

    def __call__(self, dtype: torch.dtype) -> Tensor | None:
        if dtype != self.dtype:
            self.bias, self.dtype = None, dtype  # the previous one is freed before the next is built
            self.bias = self.make(dtype)
        return self.bias


def attention_with_statistics(
    call: AttentionCall, key_mean: bool = False
) -> tuple[Tensor, Float[Tensor, "batch head query"], Float[Tensor, "batch head query d"] | None]:
    """The layer's output as the model uses it (``[batch, query, head, d_v]``, like transformers'
    SDPA integration), its row log-sum-exp (float32) and, when asked, ``E_A[k]`` per row (float32,
    from a second call with the keys as values)."""
    q, k = call.query, call.key
    passes = [(q, k, call.value)]
    if key_mean:
        if q.dtype not in (torch.float32, torch.float64):
            q, k = q.float(), k.float()
        passes.append((q, k, k))
    results = attend(call, *passes)
    out, lse = results[0]
    mean = None
    if key_mean:
        mean, lse = results[1]
        mean = mean.float()
    return out.transpose(1, 2).contiguous(), lse, mean
