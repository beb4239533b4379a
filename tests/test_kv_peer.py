"""The kvpress peer's pure-Python pieces: kvpress budgets -> workbench policies, and the items file.

Each mapping is checked against a direct simulation of what the kvpress 0.5.5 press does with its
scores (NVIDIA/kvpress: ``streaming_llm_press.py``, ``snapkv_press.py``, ``scorer_press.py``'s top-k
of ``compute_n_kept`` keys, ``duo_attention_press.py``'s argsort of head scores), written out here
position by position. The kvpress venv itself is not needed (its build is a benchmark step).
"""

from __future__ import annotations

import json
import random

import pytest

from benchmarks.kvpress_peer.mapping import (
    Items,
    LossItem,
    NiahItem,
    answer_correct,
    duo_reported_ratio,
    duo_streaming_heads,
    n_kept,
    read_items,
    snapkv_budget,
    streaming_window,
    write_items,
)

GRID = [(k, r) for k in (100, 257, 1000, 1024, 2000, 2048, 4093) for r in (0.0, 0.1, 0.25, 0.5, 0.7, 0.75, 0.9)]


def _topk(scores: list[float], k: int) -> set[int]:
    """The k best positions; every test below has a strict k-th / (k+1)-th gap or all ties inside."""
    order = sorted(range(len(scores)), key=lambda i: -scores[i])
    return set(order[:k])


def _kvpress_n_kept(k_len: int, ratio: float) -> int:
    # kvpress/utils.py compute_n_kept, as written there
    return 0 if ratio >= 1.0 else max(1, int(k_len * (1 - ratio)))


def test_n_kept_is_kvpress_float_arithmetic():
    assert n_kept(2000, 0.9) == 199  # 2000 * (1 - 0.9) = 199.99999999999997
    assert n_kept(1024, 0.9) == 102
    assert n_kept(10, 0.99) == 1 and n_kept(10, 1.0) == 0
    for k, r in GRID:
        assert n_kept(k, r) == _kvpress_n_kept(k, r)


@pytest.mark.parametrize("n_sink", [0, 4])
def test_streaming_window_keeps_what_streaming_llm_press_keeps(n_sink):
    for k_len, ratio in GRID:
        # StreamingLLMPress.score: ones, zeros on [n_sink, n_sink + n_pruned); ScorerPress keeps top n_kept
        n_pruned = k_len - int(k_len * (1 - ratio))
        scores = [1.0] * k_len
        for i in range(n_sink, min(k_len, n_sink + n_pruned)):
            scores[i] = 0.0
        kept_by_press = _topk(scores, _kvpress_n_kept(k_len, ratio))
        w = streaming_window(k_len, ratio, n_sink)
        kept_by_window = {i for i in range(k_len) if i < w["sink"] or i >= k_len - w["recent"]}
        assert kept_by_window == kept_by_press, (k_len, ratio)


def test_snapkv_budget_keeps_the_window_inside_n_kept():
    rng = random.Random(0)
    for k_len, ratio in GRID:
        window = 64
        if n_kept(k_len, ratio) < window:
            with pytest.raises(ValueError, match="arbitrary subset of the window"):
                snapkv_budget(k_len, ratio, window)
            continue
        # SnapKVPress.score: pooled prefix scores, the window padded with max + 1
        prefix = [rng.random() for _ in range(k_len - window)]
        scores = prefix + [max(prefix) + 1] * window
        kept = _topk(scores, _kvpress_n_kept(k_len, ratio))
        b = snapkv_budget(k_len, ratio, window, kernel_size=5)
        assert b["window"] == window and b["kernel"] == 5 and b["pooling"] == "avg"
        assert set(range(k_len - window, k_len)) <= kept
        assert len(kept) == b["capacity"] + b["window"]
        assert kept - set(range(k_len - window, k_len)) == _topk(prefix, b["capacity"])


def test_mappings_refuse_what_kvpress_leaves_to_chance():
    with pytest.raises(ValueError, match="arbitrary subset of the sinks"):
        streaming_window(100, 0.99, n_sink=4)  # n_kept = 1 < 4
    with pytest.raises(ValueError, match="more than window_size"):
        snapkv_budget(64, 0.5, window_size=64)
    with pytest.raises(ValueError, match="compression_ratio"):
        streaming_window(100, 1.0)


def test_duo_streaming_heads_are_the_lowest_scores_rounded_half_to_even():
    rng = random.Random(1)
    scores = [[rng.random() for _ in range(3)] for _ in range(30)]  # SmolLM2: 30 layers x 3 KV heads
    flat = sorted((s, layer, kv) for layer, row in enumerate(scores) for kv, s in enumerate(row))
    for ratio, n in ((0.0, 0), (0.25, 22), (0.5, 45), (0.75, 68), (0.9, 81), (1.0, 90)):
        # 90 * 0.25 = 22.5 -> 22 and 90 * 0.75 = 67.5 -> 68 (Python's round, as kvpress calls it)
        heads = duo_streaming_heads(scores, ratio)
        assert len(heads) == n
        # brute force: a head is streaming iff fewer than n heads score lower
        for s, layer, kv in flat:
            lower = sum(1 for t, _, _ in flat if t < s)
            assert ((layer, kv) in heads) == (lower < n)
    with pytest.raises(ValueError, match="distinct"):
        duo_streaming_heads([[0.5, 0.5]], 0.5)


def test_duo_reported_ratio_is_masked_keys_over_all_keys():
    # 45 of 90 heads streaming, sink 64 + recent 256 of 1024 keys: masked keys / all keys of all heads
    masked = 45 * (1024 - 64 - 256)
    assert duo_reported_ratio(45, 90, 64, 256, 1024) == pytest.approx(masked / (90 * 1024))
    assert duo_reported_ratio(45, 90, 64, 256, 300) < 0  # kvpress does not clip short contexts


def _items() -> Items:
    return Items(
        niah=[NiahItem("n0", [1, 2, 3], [4, 5], [6, 7], "67", 1024, 0.5)],
        loss=[LossItem("p0", list(range(10)), 3)],
        presses=[{"name": "snapkv", "ratios": [0.5], "window_size": 64, "kernel_size": 5}],
        protocols=["question-agnostic", "question-aware"],
        max_new_tokens=4,
    )


def test_items_round_trip(tmp_path):
    items = _items()
    path = write_items(items, tmp_path / "items.json")
    assert read_items(path) == items
    raw = json.loads(path.read_text())
    assert raw["niah"][0]["context"] == [1, 2, 3] and raw["loss"][0]["tail"] == 3


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda it: setattr(it.loss[0], "tail", 10), "tail 10"),
        (lambda it: setattr(it.niah[0], "question", []), "non-empty"),
        (lambda it: it.presses.append({"name": "knorm"}), "unknown press"),
        (lambda it: setattr(it, "protocols", ["both"]), "unknown protocol"),
    ],
)
def test_bad_items_are_refused(tmp_path, edit, message):
    items = _items()
    edit(items)
    with pytest.raises(ValueError, match=message):
        write_items(items, tmp_path / "items.json")


def test_items_version_is_checked(tmp_path):
    path = write_items(_items(), tmp_path / "items.json")
    raw = json.loads(path.read_text())
    raw["version"] = 0
    path.write_text(json.dumps(raw))
    with pytest.raises(ValueError, match="version"):
        read_items(path)


def test_grid_items_are_the_grid_s_own_with_answer_ids(tiny_model_dir):
    from benchmarks.bench_kv import grid_items
    from workbench.datasets import niah
    from workbench.kv import grid
    from workbench.models.loading import load_model

    model = load_model(str(tiny_model_dir), device="cpu")
    spec = grid.GridSpec(lengths=[120, 160], depths=[0.0, 0.5], loss_length=80, loss_tail=16, loss_segments=2)
    items, segs = grid_items(model, spec)
    assert [it.length for it in items] == [120, 120, 160, 160]
    for length in spec.lengths:
        prompts = niah.make(tokenizer=model.tokenizer, context_len=[length], depths=spec.depths, n_ctx=model.n_ctx)
        ours = [it for it in items if it.length == length]
        for it, g, p in zip(ours, grid.niah_items(model, spec, length), prompts):
            assert (it.id, it.context, it.question, it.answer) == (g.id, g.context, g.question, g.answer)
            a0, a1 = p.meta["answer_span"]
            assert it.answer_ids == list(p.tokens[a0:a1]) and p.meta["needle_span"][1] <= len(it.context)
    assert [s.tokens for s in segs] == grid.loss_segments(model, spec)
    assert [(s.id, s.tail) for s in segs] == [("segment-0", 16), ("segment-1", 16)]


def test_peer_points_are_the_presses_as_policies():
    from benchmarks.bench_kv import peer_points, press_specs
    from workbench.kv.policy import Budget, Full, Geometry, Window

    geom = Geometry(n_layers=30, n_heads=9, n_kv_heads=3, d_head=64, sliding={0: 512})
    scores = [[(3 * layer + kv) / 90 for kv in range(3)] for layer in range(30)]  # lowest: layer 0 first
    points = peer_points(geom, press_specs([0.5, 0.9], scores, sink=64, recent=256))
    kept_share = [(p.selector, p.budget) for p in points][:3]  # budget: the share kept, 1 - compression ratio
    assert kept_share == [("full", 1.0), ("streaming_llm", 0.5), ("streaming_llm", 1 - 0.9)]
    stream, snap, duo = points[1].policy_for(2000), points[4].policy_for(2000), points[5].policy_for(2000)
    # int(2000 * (1 - 0.9)) = 199 kept; the sliding layer 0 stays as the model has it (kvpress compresses it)
    assert stream.head(1, 0) == Window(4, 996) and points[2].policy_for(2000).head(29, 2) == Window(4, 195)
    assert isinstance(stream.head(0, 0), Full) and not stream.compresses(0)
    assert snap.head(1, 1) == Budget(capacity=199 - 64, window=64, kernel=5, pooling="avg")
    assert snap.name == "kvpress-snapkv@0.9" and abs(snap.budget - 0.1) < 1e-12
    # Duo at 0.5: the 45 lowest-scored KV heads (layers 0-14) stream with sink 64 + recent 256
    assert duo.head(14, 2) == Window(64, 256) and isinstance(duo.head(15, 0), Full)
    assert sum(duo.head(layer, kv) == Window(64, 256) for layer in range(1, 30) for kv in range(3)) == 42


def test_peer_rows_are_scored_and_summarised():
    from benchmarks.bench_kv import score_peer, summarise_peer

    class Tok:
        def decode(self, ids, skip_special_tokens=True):
            return "".join(chr(48 + i) for i in ids)

    items = Items(niah=[NiahItem("a", [1], [2], [3], "12"), NiahItem("b", [1], [2], [3], "99")])
    rows = [
        {"item": "a", "task": "niah", "press": "snapkv", "ratio": 0.5, "protocol": "question-agnostic",
         "generated": [0, 1, 2], "loss": 1.0},
        {"item": "b", "task": "niah", "press": "snapkv", "ratio": 0.5, "protocol": "question-agnostic",
         "generated": [9, 8], "loss": 3.0},
        {"item": "b", "task": "niah", "press": "snapkv", "ratio": 0.9, "protocol": "question-agnostic",
         "error": "ValueError: no"},
    ]
    res = {"rows": rows}
    score_peer(res, items, Tok())
    assert [r.get("correct") for r in rows] == [True, False, None]
    summary = {(s["ratio"]): s for s in summarise_peer(res)}
    assert summary[0.5]["accuracy"] == 0.5 and summary[0.5]["loss"] == 2.0 and summary[0.5]["errors"] == 0
    assert summary[0.9]["errors"] == 1 and "loss" not in summary[0.9] and summary[0.9]["error"] == ["ValueError: no"]
    assert answer_correct(" 12345.", "12345") and not answer_correct(" 1234", "12345")
