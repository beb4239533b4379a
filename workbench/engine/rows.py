"""A few heads' attention rows on one prompt: what a pattern view draws, and nothing more.

CircuitsVis draws a head's pattern from TransformerLens' ``ActivationCache``, which holds the
whole ``[batch, head, query, key]`` pattern of every layer (20 GB for SmolLM2 at 4096 tokens,
``/work/shared/reference/anchors.md``). A view needs only the heads it shows and, on a long
prompt, only the query rows it shows (a decoding row over the needle, a few rows of a repeated
sequence). :class:`RowsReader` is an attention observer (:mod:`workbench.engine.attention`) that
keeps exactly those: for each requested layer, the requested heads' weights of the requested
query positions over every key, computed from the layer's own call (post-RoPE queries and keys,
scaling, soft-cap, causal / padding / sliding-window mask, grouped KV heads) by
:func:`workbench.engine.masking.attention_scores`, the function every probe reads its weights
through, softmax-normalised in float32. Other layers and heads are never computed; the forward
ends after the last requested layer's attention (:func:`workbench.engine.call.stop_after_layer`).
Extra memory is the kept rows plus one block of scores (``CHUNK_ELEMENTS``), so an 8k-token
prompt with 3 heads and 16 query rows costs a few MB over the bare forward.

:func:`attention_rows` runs one prompt (token ids) and returns ``{(layer, head): [query, key]}``;
:func:`batch_attention_rows` runs prompts of unequal lengths as one right-padded batch (every
real token keeps the index it has alone, :func:`workbench.engine.patterns.collate`) and returns
one such dict per prompt, keys cut to the prompt's length.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from jaxtyping import Float
from torch import Tensor

from workbench.engine.call import AttentionCall
from workbench.engine.masking import attention_scores
from workbench.errors import WorkbenchError

CHUNK_ELEMENTS = 1 << 22  # scores of one block: heads x query rows x keys (16 MB in float32)
Head = tuple[int, int]


def _runs(positions: Sequence[int]) -> list[tuple[int, int]]:
    """Sorted distinct positions as half-open runs of consecutive ones: [1, 2, 3, 7] -> [(1, 4), (7, 8)]."""
    runs: list[tuple[int, int]] = []
    for p in sorted(set(positions)):
        if runs and runs[-1][1] == p:
            runs[-1] = (runs[-1][0], p + 1)
        else:
            runs.append((p, p + 1))
    return runs


def head_call(call: AttentionCall, row: int, heads: list[int]) -> AttentionCall:
    """The call of batch row ``row`` restricted to query heads ``heads``: each head paired with
    the KV head it reads (grouped-query attention), the mask's head axis cut the same way when
    it has one per head. Only the chosen heads' queries and keys are copied."""
    n_h, n_kv = call.query.shape[1], call.key.shape[1]
    idx = torch.tensor(heads, dtype=torch.long, device=call.query.device)
    key = call.key[row : row + 1].index_select(1, idx // (n_h // n_kv))
    mask = call.mask[row : row + 1] if call.mask is not None else None
    if mask is not None and mask.shape[1] > 1:
        mask = mask.index_select(1, idx)
    return AttentionCall(
        layer=call.layer,
        module=call.module,
        query=call.query[row : row + 1].index_select(1, idx),
        key=key,
        value=key,  # not read: only scores are computed
        mask=mask,
        scaling=call.scaling,
        is_causal=call.is_causal,
        softcap=call.softcap,
    )


def call_rows(
    call: AttentionCall, queries: Sequence[int], chunk_elements: int = CHUNK_ELEMENTS
) -> Float[Tensor, "head query key"]:
    """Float32 attention weights of every head of ``call`` (batch 1) at query positions
    ``queries`` (in that order) over all its keys; a row that sees no key is all zero. Scores are
    formed a block of consecutive query rows at a time, at most ``chunk_elements`` per block."""
    h, n_k = call.query.shape[1], call.key.shape[2]
    step = max(1, chunk_elements // max(1, h * n_k))
    pieces: dict[int, Tensor] = {}
    for lo, hi in _runs(queries):
        for q0 in range(lo, hi, step):
            q1 = min(hi, q0 + step)
            s, vis = attention_scores(call, q0, q1)
            p = torch.softmax(s, dim=-1).nan_to_num(0.0).float()
            p = torch.nn.functional.pad(p[0], (0, n_k - vis.k_end))
            for i in range(q1 - q0):
                pieces[q0 + i] = p[:, i]
    out = torch.empty((h, len(queries), n_k), dtype=torch.float32, device=call.query.device)
    for j, q in enumerate(queries):
        out[:, j] = pieces[q]
    return out


class RowsReader:
    """Attention observer keeping the rows of the requested heads and query positions.

    ``heads``: layer -> query heads; ``queries``: per batch row, the query positions to keep;
    ``lengths``: per batch row, its real tokens (keys past it are padding and are cut).
    After the forward, ``rows[b][(layer, head)]`` is a float32 ``[query, key]`` tensor on the CPU.
    """

    def __init__(
        self,
        heads: dict[int, list[int]],
        queries: list[list[int]],
        lengths: list[int],
        chunk_elements: int = CHUNK_ELEMENTS,
    ) -> None:
        self.heads = heads
        self.chunk_elements = chunk_elements
        self.queries = queries
        self.lengths = lengths
        self.rows: list[dict[Head, Tensor]] = [{} for _ in queries]
        self.seen: set[int] = set()

    def on_attention(self, call: AttentionCall) -> None:
        hs = self.heads.get(call.layer)
        if not hs:
            return
        self.seen.add(call.layer)
        for b, (qs, n) in enumerate(zip(self.queries, self.lengths)):
            w = call_rows(head_call(call, b, hs), qs, self.chunk_elements)[..., :n].cpu()
            for i, h in enumerate(hs):
                self.rows[b][(call.layer, h)] = w[i]


def _by_layer(heads: Sequence[Head]) -> dict[int, list[int]]:
    """Checked ``(layer, head)`` pairs as layer -> sorted heads."""
    by_layer: dict[int, list[int]] = {}
    for layer, head in heads:
        by_layer.setdefault(layer, []).append(head)
    return {layer: sorted(hs) for layer, hs in sorted(by_layer.items())}


def _check_queries(queries: Sequence[int] | None, n: int, which: str) -> list[int]:
    """Query positions of a prompt of ``n`` tokens (None: every one; negative: from the end),
    refusing one beyond the prompt."""
    if queries is None:
        return list(range(n))
    out = []
    for q in queries:
        q = int(q)
        if not -n <= q < n:
            raise WorkbenchError(
                f"query row {q} is beyond {which}, which has {n} tokens (rows 0..{n - 1}, or -{n}..-1 from the end)",
                "pick query rows inside the prompt",
            )
        out.append(q % n)
    if not out:
        raise WorkbenchError("no query rows given", "give at least one query row, or None for every row")
    return out


def _check_ids(model: Any, ids: Sequence[int], which: str) -> list[int]:
    ids = [int(t) for t in ids]
    if not ids:
        raise WorkbenchError(f"{which} is empty (0 tokens)", "give a prompt with at least one token")
    vocab = getattr(model, "vocab_size", None)
    bad = [t for t in ids if t < 0 or (vocab is not None and t >= vocab)]
    if bad:
        raise WorkbenchError(f"{which} has token id {bad[0]} outside the vocabulary", "use this model's token ids")
    return ids


def batch_attention_rows(
    model: Any,
    prompts: Sequence[Sequence[int]],
    heads: Sequence[Head],
    queries: Sequence[Sequence[int] | None] | None = None,
    chunk_elements: int = CHUNK_ELEMENTS,
) -> list[dict[Head, Float[Tensor, "query key"]]]:
    """Per prompt, ``{(layer, head): weights}``: float32 ``[query, key]`` attention of each
    requested head at the prompt's query rows (``queries[i]``: positions, negative from the end;
    None: every row) over the prompt's keys. Prompts of unequal lengths run as one right-padded
    batch; ``model`` is a :class:`workbench.models.LoadedModel`; ``chunk_elements``: scores per block.
    Each dict lists the heads in the order asked."""
    from workbench.engine.attention import hooked_run
    from workbench.engine.call import base_network, stop_after_layer
    from workbench.engine.interventions import parse_heads
    from workbench.engine.patterns import collate
    from workbench.inputs.prompts import pad_token_id

    if not prompts:
        raise WorkbenchError("no prompts given", "give at least one prompt (a list of token ids)")
    ids = [_check_ids(model, p, f"prompt {i}") for i, p in enumerate(prompts)]
    asked = parse_heads(heads, model.n_layers, model.n_heads, "to draw", "heads=[(18, 6)] or '18.6'")  # once each
    by_layer = _by_layer(asked)
    qs_in = list(queries) if queries is not None else [None] * len(ids)
    if len(qs_in) != len(ids):
        raise WorkbenchError(f"{len(qs_in)} query lists for {len(ids)} prompts", "give one query list per prompt")
    qs = [_check_queries(q, len(p), f"prompt {i}") for i, (q, p) in enumerate(zip(qs_in, ids))]
    reader = RowsReader(by_layer, qs, [len(p) for p in ids], chunk_elements)
    batch = collate(ids, pad_token_id(model.tokenizer), model.device)
    with hooked_run(model.hf_model, reader, unwrap=True), stop_after_layer(max(by_layer)):
        base_network(model.hf_model)(
            input_ids=batch.input_ids,
            # no padding: no mask, so transformers builds none ([T, T] booleans, 64 MB at 8k tokens)
            # and SDPA runs causal, as the bare forward does
            attention_mask=batch.attention_mask if len({len(p) for p in ids}) > 1 else None,
            position_ids=batch.positions.clamp_min(0),
            use_cache=False,
        )
    missing = sorted(set(by_layer) - reader.seen)
    if missing:
        raise WorkbenchError(
            f"layers {missing} ran no attention call the workbench could observe",
            "this architecture's attention does not go through transformers' attention interface",
        )
    return [{h: rows[h] for h in asked} for rows in reader.rows]


def attention_rows(
    model: Any,
    prompt_ids: Sequence[int],
    heads: Sequence[Head],
    queries: Sequence[int] | None = None,
    chunk_elements: int = CHUNK_ELEMENTS,
) -> dict[Head, Float[Tensor, "query key"]]:
    """``{(layer, head): weights}`` for one prompt (token ids): float32 ``[query, key]`` attention
    of each requested head at ``queries`` (positions in that order, negative from the end; None:
    every row, the ``T x T`` square) over all ``T`` keys. Errors (:class:`WorkbenchError`): an empty
    prompt, a head out of range, a query row beyond the prompt."""
    return batch_attention_rows(model, [prompt_ids], heads, None if queries is None else [queries], chunk_elements)[0]


__all__ = ["CHUNK_ELEMENTS", "RowsReader", "attention_rows", "batch_attention_rows", "call_rows", "head_call"]
