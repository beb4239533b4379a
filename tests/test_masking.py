"""The one masking helper against a naive recomputation: causal, padding, sliding window,
additive masks, soft-capping, grouped KV heads, and decode steps (fewer queries than keys)."""

from __future__ import annotations

import math

import pytest
import torch

from workbench.engine.call import AttentionCall
from workbench.engine.masking import attention_probs, attention_scores, first_visible_key, key_visibility
from workbench.engine.patterns import collate, iter_pattern_chunks


def naive_probs(q, k, scaling, allowed, softcap=None):
    """Loops over batch, head, query: softmax over the allowed keys, 0 elsewhere (float64)."""
    b, h, n_q, _ = q.shape
    n_kv, n_k = k.shape[1], k.shape[2]
    out = torch.zeros(b, h, n_q, n_k, dtype=torch.float64)
    for bi in range(b):
        for hi in range(h):
            kh = hi // (h // n_kv)
            for qi in range(n_q):
                keys = [j for j in range(n_k) if allowed(bi, qi, j)]
                if not keys:
                    continue
                s = [float(q[bi, hi, qi].double() @ k[bi, kh, j].double()) * scaling for j in keys]
                if softcap is not None:
                    s = [softcap * math.tanh(x / softcap) for x in s]
                m = max(s)
                e = [math.exp(x - m) for x in s]
                z = sum(e)
                for j, ej in zip(keys, e):
                    out[bi, hi, qi, j] = ej / z
    return out


def call(q, k, mask=None, is_causal=True, softcap=None, scaling=0.3):
    return AttentionCall(
        layer=0, module=None, query=q, key=k, value=k, mask=mask, scaling=scaling, is_causal=is_causal, softcap=softcap
    )


@pytest.fixture
def qk():
    g = torch.Generator().manual_seed(0)
    return torch.randn(2, 4, 7, 8, generator=g), torch.randn(2, 2, 7, 8, generator=g)  # 4 query heads share 2 KV heads


@pytest.mark.parametrize("softcap", [None, 2.0])
def test_causal_without_a_mask_tensor(qk, softcap):
    q, k = qk
    got = attention_probs(call(q, k, softcap=softcap))
    want = naive_probs(q, k, 0.3, lambda b, i, j: j <= i, softcap)
    assert torch.allclose(got.double(), want, atol=1e-6)


def test_left_padding_and_sliding_window_boolean_mask(qk):
    q, k = qk
    pad = torch.tensor([0, 3])  # row 1 is left-padded by 3
    window = 3

    def allowed(b, i, j):
        return j >= pad[b] and j <= i and i - j < window

    mask = torch.tensor([[[[allowed(b, i, j) for j in range(7)] for i in range(7)]] for b in range(2)])
    got = attention_probs(call(q, k, mask=mask, is_causal=False))
    want = naive_probs(q, k, 0.3, allowed)
    assert torch.allclose(got.double(), want, atol=1e-6)
    vis = key_visibility(call(q, k, mask=mask, is_causal=False), 2, 5)
    assert vis.n_visible(2, q.device).tolist() == [[3, 3, 3], [0, 1, 2]]
    assert first_visible_key(call(q, k, mask=mask, is_causal=False)).tolist() == [0, 3]


def test_additive_float_mask(qk):
    q, k = qk
    bias = torch.zeros(2, 1, 7, 7)
    bias[..., 2] = -0.7  # a real bias, not a mask
    causal = torch.ones(7, 7, dtype=torch.bool).tril()
    bias = bias.masked_fill(~causal, torch.finfo(torch.float32).min)
    got = attention_probs(call(q, k, mask=bias, is_causal=False))
    # the naive reference with the bias folded into the scaled score
    s = (q.double() @ k.double().repeat_interleave(2, 1).transpose(-1, -2)) * 0.3 + bias.double().clamp_min(-1e30)
    want = torch.softmax(s.masked_fill(~causal, float("-inf")), -1)
    assert torch.allclose(got.double(), want, atol=1e-6)


@pytest.mark.parametrize("n_q", [1, 3])
def test_decode_steps_align_queries_to_the_last_keys(qk, n_q):
    """With a KV cache the n_q queries sit at key positions n_k - n_q .. n_k - 1."""
    q, k = qk
    q = q[:, :, :n_q]
    offset = k.shape[2] - n_q
    got = attention_probs(call(q, k, is_causal=True))
    want = naive_probs(q, k, 0.3, lambda b, i, j: j <= i + offset)
    assert torch.allclose(got.double(), want, atol=1e-6)
    # the last-row scores retrieval takes the argmax of
    s, vis = attention_scores(call(q, k), n_q - 1, n_q)
    assert vis.k_end == k.shape[2] and torch.equal(s[:, :, 0].argmax(-1), want[:, :, -1].argmax(-1))


def test_pattern_chunks_use_the_same_masking(qk):
    """Chunked patterns (any chunk size) equal the helper's full pattern, and count visible keys."""
    q, k = qk
    pad = torch.tensor([0, 3])
    mask = torch.tensor(
        [[[[j >= pad[b] and j <= i and i - j < 4 for j in range(7)] for i in range(7)]] for b in range(2)]
    )
    c = call(q, k, mask=mask, is_causal=False)
    full = attention_probs(c)
    batch = collate([[1] * 7, [1] * 7], 0)
    for budget in (8, 64, 1 << 20):
        rows = []
        for chunk in iter_pattern_chunks(c, batch, budget):
            p = torch.nn.functional.pad(chunk.probs, (0, 7 - chunk.n_keys))
            rows.append(p)
            assert chunk.n_visible.tolist() == mask[:, 0, chunk.q_start : chunk.q_end].sum(-1).tolist()
        assert torch.allclose(torch.cat(rows, dim=2), full, atol=1e-6)


@pytest.mark.parametrize("kind", ["bool", "float"])
def test_visible_counts_count_in_row_blocks(kind):
    """visible_counts equals the plain count on a mask large enough to be counted in several
    blocks of rows (the whole-mask sum made an int64 copy of it: 2 GB at 16k tokens)."""
    from workbench.engine.masking import visible_counts

    g = torch.Generator().manual_seed(0)
    n = 3000  # 2 x 3000 x 3000 elements: more than one 4M-element block
    allowed = torch.rand(2, 1, n, n, generator=g) > 0.3
    mask = allowed if kind == "bool" else torch.where(allowed, 0.0, torch.finfo(torch.float32).min)
    call = AttentionCall(
        0, None, torch.zeros(2, 2, n, 4), torch.zeros(2, 1, n, 4), torch.zeros(2, 1, n, 4), mask, 1.0, False
    )
    assert torch.equal(visible_counts(call), allowed[:, 0].sum(-1))


def test_take_positions_writes_into_any_view():
    """``take_positions(x, index, out=...)`` equals plain indexing, also into strided views: the
    first rows of a longer buffer, and columns of a wider one (trailing dimensions that cannot be
    flattened into one without a copy, which would take the writes)."""
    from workbench.engine.masking import take_positions

    torch.manual_seed(0)
    x = torch.randn(2, 3, 7, 4, 5)
    index = torch.stack([torch.randperm(7), torch.randperm(7)])
    want = torch.stack([x[i][:, index[i]] for i in range(2)])
    assert torch.equal(take_positions(x, index), want)
    longer = torch.full((2, 3, 9, 4, 5), -1.0)
    take_positions(x, index, out=longer[:, :, :7])
    assert torch.equal(longer[:, :, :7], want) and (longer[:, :, 7:] == -1).all()
    wider = torch.full((2, 3, 7, 4, 6), -1.0)
    take_positions(x, index, out=wider[..., :5])
    assert torch.equal(wider[..., :5], want) and (wider[..., 5] == -1).all()
