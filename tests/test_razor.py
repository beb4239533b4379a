"""razor (RazorAttention echo / induction scores) against loops over the full attention matrix.

The reference builds each prompt's S x S masks with explicit Python loops from the definition
(occurrences: earlier positions holding the same token, in the random part; golden-stick: their
absolute-index loop ``for j in range(i % SEG, i, SEG)``), multiplies them with each head's full
eager attention matrix of that prompt alone (unpadded, float64) and normalises as the probe's
parameter says. The probe runs on one padded batch of unequal lengths (different SEG, with and
without BOS, 2-4 copies, a prompt without a period), on both attention paths, on a tiny Llama
(GQA 4:2) and a tiny Gemma-3 whose layer 0 has a sliding window of 6 keys (so copies 5 back are
visible there and copies 7 or 10 back are not).
"""

from __future__ import annotations

import random

import pytest
import torch

from probes.razor import RazorProbe, kv_head_table, to_kv_heads
from workbench.datasets import make_dataset
from workbench.errors import WorkbenchError
from workbench.inputs.prompts import TokenizedPrompt, tokenize_prompts
from workbench.testing import ReferenceInputs, assert_probe_matches, attention_windows, check_visibility


@pytest.fixture(scope="module")
def models(tiny_models, tiny_gemma3):
    return {"llama": tiny_models["llama"], "gemma3": tiny_gemma3}


def razor_prompts(model) -> list[TokenizedPrompt]:
    """One padded batch: SEG 5 x 4 with BOS (21 tokens), SEG 7 x 4 without (28), SEG 4 x 3 with
    BOS (13), SEG 6 x 2 without (12) and a prompt without a period (ignored by the probe)."""
    tok = model.tokenizer

    def rep(seed, period, repeats, bos):
        return make_dataset(
            "repeated-random", n_prompts=1, seed=seed, tokenizer=tok, period=period, repeats=repeats, prepend_bos=bos
        )

    prompts = rep(0, 5, 4, True) + rep(1, 7, 4, False) + rep(2, 4, 3, True) + rep(3, 6, 2, False)
    out = tokenize_prompts(prompts, tok, model.n_ctx, model.vocab_size)
    rng = random.Random(0)
    out.append(TokenizedPrompt("text", [rng.randrange(4, 20) for _ in range(17)]))
    return out


def masks(ids: list[int], meta: dict, mask: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Echo and induction masks [S, S] of one prompt, by loops over (row, column)."""
    S, seg, off = len(ids), meta.get("period", 0), meta.get("offset", 0)
    echo, ind = torch.zeros(S, S, dtype=torch.float64), torch.zeros(S, S, dtype=torch.float64)
    if not seg:
        return echo, ind
    for i in range(S):
        if mask == "occurrences":
            earlier = [j for j in range(off, i) if ids[j] == ids[i]]  # the same token, before, in the random part
        else:  # golden-stick's loop, verbatim in meaning: rows i >= SEG, j = i % SEG, i % SEG + SEG, ... < i
            earlier = list(range(i % seg, i, seg)) if i // seg != 0 else []
        for j in earlier:
            echo[i, j] = 1.0
            ind[i, j + 1] = 1.0
    return echo, ind


def razor_reference(ref: ReferenceInputs, normalise: str, mask: str) -> dict:
    """razor_echo / razor_induction from each prompt's full [head, S, S] attention."""
    check_visibility(ref.patterns, ref.windows)
    sums = {"razor_echo": {}, "razor_induction": {}}
    count = 0
    for prompt, pats in zip(ref.prompts, ref.patterns):
        if not prompt.meta.get("period"):
            continue
        echo, ind = masks(list(prompt.ids), prompt.meta, mask)
        S = len(prompt.ids)
        rows = int((echo.sum(-1) > 0).sum())
        count += 1 if normalise == "matrix" else rows
        scale = 1.0 / (S * S) if normalise == "matrix" else 1.0
        for layer, A in enumerate(pats):
            for head in range(A.shape[0]):
                for metric, m in (("razor_echo", echo), ("razor_induction", ind)):
                    value = float((A[head] * m).sum()) * scale
                    sums[metric][layer, head] = sums[metric].get((layer, head), 0.0) + value
    return {metric: {k: (v / count, count) for k, v in per.items()} for metric, per in sums.items()}


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
@pytest.mark.parametrize("normalise", ["matrix", "rows"])
@pytest.mark.parametrize("mask", ["occurrences", "golden-stick"])
def test_razor_matches_full_matrix_reference(models, arch, normalise, mask):
    model = models[arch]
    prompts = razor_prompts(model)
    assert len({len(p) for p in prompts}) == len(prompts)
    if arch == "gemma3":
        assert model.n_kv_heads < model.n_heads and attention_windows(model.hf_model)[0] == 6
    table = assert_probe_matches(
        RazorProbe(normalise=normalise, mask=mask),
        lambda ref: razor_reference(ref, normalise, mask),
        model,
        prompts,
        atol=1e-7 if normalise == "matrix" else 1e-5,
    )
    assert table.value.abs().max() > 0  # the tiny models do attend to the copies: the check has teeth


def test_the_two_masks_differ_only_on_the_bos(models):
    """golden-stick's loop marks the BOS (column 0) for rows SEG, 2 SEG, ...; otherwise it marks
    exactly the earlier occurrences, with a BOS or without."""
    for p in razor_prompts(models["llama"])[:4]:
        ids, meta = list(p.ids), p.meta
        occ, gs = masks(ids, meta, "occurrences")[0], masks(ids, meta, "golden-stick")[0]
        diff = (gs - occ).nonzero().tolist()
        seg, off = meta["period"], meta["offset"]
        assert diff == ([[i, 0] for i in range(seg, len(ids), seg)] if off == 1 else [])
        copies = (len(ids) - off) // seg
        assert int(occ.sum()) == seg * copies * (copies - 1) // 2  # row r of copy c has c earlier copies


def test_gemma_sliding_layer_sees_only_copies_inside_its_window(models):
    """On the sliding layer (window 6), SEG 7 copies are out of reach: a prompt of SEG 7 alone
    scores exactly 0 there, and > 0 on the global layer."""
    model = models["gemma3"]
    prompts = [p for p in razor_prompts(model) if p.meta.get("period") == 7]
    prompts.append(TokenizedPrompt("short", list(prompts[0].ids[:20]), dict(prompts[0].meta)))
    from workbench.runner import run_probes

    table = run_probes(model, prompts, [RazorProbe()], batch_size=2, progress=False).table
    sliding, full = table[table.layer == 0], table[table.layer == 1]
    assert (sliding.value == 0).all() and (full.value > 0).all()


def test_to_kv_heads_groups_consecutive_query_heads():
    scores = torch.tensor([[0.1, 0.5, 0.2, 0.0, 0.3, 0.9], [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]])
    assert torch.equal(to_kv_heads(scores, 2), torch.tensor([[0.5, 0.9], [3.0, 6.0]]))
    assert torch.allclose(to_kv_heads(scores, 3, "mean"), torch.tensor([[0.3, 0.1, 0.6], [1.5, 3.5, 5.5]]))
    assert torch.equal(to_kv_heads(scores, 6), scores)
    with pytest.raises(WorkbenchError):
        to_kv_heads(scores, 4)
    with pytest.raises(WorkbenchError):
        to_kv_heads(scores, 2, "median")


def test_kv_head_table_from_a_probe_table(models):
    model = models["llama"]
    from workbench.runner import run_probes

    table = run_probes(model, razor_prompts(model), [RazorProbe()], batch_size=8, progress=False).table
    kv = kv_head_table(table, model.n_kv_heads)
    g = model.n_heads // model.n_kv_heads
    for r in kv.itertuples():
        heads = table[(table.metric == r.metric) & (table.layer == r.layer)]
        want = heads[heads["head"].between(r.kv_head * g, r.kv_head * g + g - 1)].value.max()
        assert r.value == pytest.approx(want, abs=0)
    assert len(kv) == 2 * model.n_layers * model.n_kv_heads


def test_without_repeated_prompts_the_scores_are_nan(models):
    model = models["llama"]
    from workbench.runner import run_probes

    prompts = [TokenizedPrompt("a", [5, 6, 7, 5, 6, 7]), TokenizedPrompt("b", [8, 9, 8, 9])]
    table = run_probes(model, prompts, [RazorProbe()], batch_size=2, progress=False).table
    assert table.value.isna().all() and (table.n == 0).all()
