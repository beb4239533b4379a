"""KV-policy selectors, tasks and ``workbench kv``: against slow re-computations and the plain model.

- selectors: HeadKV's allocation from its formula written out, top-share heads with ties, the
  random baseline's count, RazorAttention's union, GQA aggregation rules;
- tasks: with the full cache the grid's answers are the model's own greedy decoding
  (:func:`workbench.engine.decoding.greedy_decode`) and its loss the plain per-token loss
  (:func:`workbench.engine.scoring.token_losses`): the evicted-cache pipeline changes nothing by
  itself;
- the command: tidy rows with the results columns, a second run resumes with nothing to do, and
  each bad input is one error, exit 2, nothing written.
"""

from __future__ import annotations

import math
import subprocess

import pandas as pd
import pytest
import torch

from workbench.errors import WorkbenchError
from workbench.kv import selectors as sel
from workbench.kv.grid import GridSpec, grid_points, razor, run_unit
from workbench.kv.policy import FULL, Compensated, Geometry, Window, geometry

GEOM = Geometry(n_layers=4, n_heads=6, n_kv_heads=2, d_head=8)


def test_headkv_capacities_follow_the_formula():
    scores = torch.tensor([0.5, 0.1, 0.0, 0.4, 2.0])
    caps = sel.headkv_capacities(scores, 100, beta=1.5, temp=1.0)
    s = [x / 3.0 for x in [0.5, 0.1, 0.0, 0.4, 2.0]]
    pool = (100 // 1.5) * 5
    least = 100 - 100 // 1.5
    assert caps == [int(round(x * pool + least)) for x in s]
    assert min(caps) == 34 and abs(sum(caps) / 5 - 100) < 1  # every head >= B - B//beta; mean ~ B
    assert len(set(sel.headkv_capacities(scores, 100, beta=1e6))) == 1  # large beta: uniform (SnapKV)
    with pytest.raises(WorkbenchError, match="beta"):
        sel.headkv_capacities(scores, 100, beta=1.0)


def test_head_selectors_share_ties_and_random_count():
    scores = torch.zeros(4, 2, dtype=torch.float64)
    scores[2, 1], scores[0, 0], scores[3, 0] = 5.0, 3.0, 3.0
    policy = sel.heads(GEOM, 0.25, 100, scores, Window(4, 8))  # 2 of 8 KV heads
    full = [h for h in policy.eligible if policy.head(*h) is FULL]
    assert full == [(0, 0), (2, 1)]  # the tie 3.0 goes to the lower (layer, head)
    assert sel.n_full(GEOM, 0.25) == 2
    draws = [sel.random_heads(GEOM, 0.25, 100, Window(4, 8), seed) for seed in range(6)]
    picked = [frozenset(h for h in d.eligible if d.head(*h) is FULL) for d in draws]
    assert all(len(p) == 2 for p in picked) and len(set(picked)) > 1
    assert picked[0] == frozenset(
        h for h in draws[0].eligible if sel.random_heads(GEOM, 0.25, 100, Window(4, 8), 0).head(*h) is FULL
    )
    scores[1, 1] = float("nan")
    with pytest.raises(WorkbenchError, match="miss 1 KV heads"):
        sel.heads(GEOM, 0.25, 100, scores, Window(4, 8))


def test_razor_union_and_aggregation():
    q = torch.arange(4 * 6, dtype=torch.float64).view(4, 6)
    assert sel.to_kv_heads(q, 2, "max").tolist() == [[2, 5], [8, 11], [14, 17], [20, 23]]
    assert sel.to_kv_heads(q, 2, "mean")[0].tolist() == [1, 4]
    assert sel.to_kv_heads(q, 2, "sum")[0].tolist() == [3, 12]
    induction = torch.zeros(4, 2, dtype=torch.float64)
    echo = torch.zeros(4, 2, dtype=torch.float64)
    induction[3, 1], induction[1, 0], echo[0, 1] = 3.0, 2.0, 1.0
    geom = Geometry(n_layers=15, n_heads=2, n_kv_heads=2, d_head=8)  # 30 KV heads: a share of 1/2 = 15 heads
    ind = torch.zeros(15, 2, dtype=torch.float64)
    ech = torch.zeros(15, 2, dtype=torch.float64)
    ind[:, 0] = torch.arange(15, dtype=torch.float64)
    ech[0, 1] = 9.0
    p = razor(geom, 0.5, 1000, ind, ech, Compensated(4, 64))
    full = {h for h in p.eligible if p.head(*h) is FULL}
    assert (0, 1) in full and len(full) == 15  # 14 by induction + 1 by echo
    assert {(layer, 0) for layer in range(1, 15)} <= full
    assert isinstance(p.head(0, 0), Compensated)


def test_budget_errors():
    with pytest.raises(WorkbenchError, match=r"outside \(0, 1\]"):
        sel.streaming(GEOM, 1.5, 100)
    with pytest.raises(WorkbenchError, match=r"outside \(0, 1\]"):
        sel.streaming(GEOM, 0.0, 100)
    with pytest.raises(WorkbenchError, match="fewer than the 5"):
        sel.streaming(GEOM, 0.01, 100, sink=4)
    with pytest.raises(WorkbenchError, match="observation window"):
        sel.snapkv(GEOM, 0.05, 100, window=8)
    assert sel.snapkv(GEOM, 0.5, 100, window=8).head(0, 0).capacity == 42


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    import workbench

    return workbench.load_model(str(tiny_model_dir))


def test_full_cache_tasks_equal_the_plain_model(tiny):
    """With the full cache the grid's answers are the model's own greedy decoding and its loss the
    plain per-token loss: the shared-prefill pipeline by itself changes nothing."""
    from workbench.engine.decoding import greedy_decode
    from workbench.engine.scoring import token_losses
    from workbench.inputs.prompts import TokenizedPrompt
    from workbench.kv import tasks
    from workbench.kv.grid import loss_segments, niah_items

    spec = GridSpec(lengths=[160], depths=[0.0, 0.5, 1.0], loss_length=96, loss_tail=16, loss_segments=2)
    items = niah_items(tiny, spec, 160) + niah_items(tiny, spec, 200)[1:]
    assert len({len(it.context) for it in items}) > 1  # unequal lengths in one batch
    full = lambda n: sel.full(geometry(tiny))  # noqa: E731
    got = tasks.niah_answers(tiny, items, [full], "question-agnostic", max_new_tokens=5)[0]
    prompts = [TokenizedPrompt(id=it.id, ids=it.context + it.question) for it in items]
    want = greedy_decode(tiny, prompts, 5)
    assert got == want
    aware = tasks.niah_answers(tiny, items, [full], "question-aware", max_new_tokens=5)[0]
    assert aware == want
    segs = loss_segments(tiny, spec)
    rows = pd.DataFrame(tasks.loss_rows(tiny, segs, [full], tail=16))
    ref = token_losses(tiny, [TokenizedPrompt(id=str(i), ids=s) for i, s in enumerate(segs)])
    for r, losses in enumerate(ref):
        want_loss = float(losses[-15:].mean())
        got_loss = float(rows[(rows.metric == "loss") & (rows.item == f"segment-{r}")].value.iloc[0])
        assert math.isclose(got_loss, want_loss, rel_tol=1e-5)
    assert (rows[rows.metric == "delta_loss"].value == 0).all()


def test_a_policy_changes_the_answers(tiny):
    """The grid evaluates what it says: a tight streaming policy decodes other tokens than the
    full cache on the tiny model (so the equality above could fail)."""
    from workbench.kv import tasks
    from workbench.kv.grid import niah_items

    spec = GridSpec(lengths=[160], depths=[0.5, 1.0])
    items = niah_items(tiny, spec, 160)
    g = geometry(tiny)
    full, tight = tasks.niah_answers(
        tiny, items, [lambda n: sel.full(g), lambda n: sel.streaming(g, 0.05, n, sink=1)], max_new_tokens=5
    )
    assert full != tight


def _kv(*args: str) -> subprocess.CompletedProcess:
    """``workbench kv ARGS`` in this process (the command's own entry point, exit status and
    streams; a subprocess per case would reload torch and the model)."""
    import contextlib
    import io

    from workbench.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(["kv", *args])
    return subprocess.CompletedProcess(["workbench", "kv", *args], code, out.getvalue(), err.getvalue())


SMALL = (
    "--budgets 0.5 --seeds 2 --lengths 160 --depths 0.5 --loss-length 96 --loss-tail 16 --loss-segments 1 "
    "--sink 2 --recent 8 --max-new-tokens 3"
).split()


def test_cli_writes_a_resumable_run(tiny_model_dir, tmp_path):
    from workbench.runs.load import load_results

    out = tmp_path / "kv"
    args = ["--model", str(tiny_model_dir), "--selectors", "full,streaming,snapkv,random", *SMALL, "--out", str(out)]
    first = _kv(*args)
    assert first.returncode == 0, first.stderr
    table = load_results(out)
    assert set(table.probe) == {"kv"} and set(table.task) == {"niah", "loss"}
    assert {"kv_fraction", "kv_bytes", "kv_tokens", "head_sparsity", "selector", "budget", "seed"} <= set(table.columns)
    assert sorted(table[table.selector == "random"].seed.unique()) == [0, 1]
    assert (table[table.selector == "full"].kv_fraction == 1.0).all()
    again = _kv(*args)
    assert again.returncode == 0 and "2 units already done" in again.stdout + again.stderr
    assert "(0 of 2 units computed)" in again.stdout


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--budgets", "1.5"], "outside (0, 1]"),
        (["--budgets", "0.01"], "fewer than"),
        (["--lengths", "100000"], "exceeds"),
        (["--selectors", "full,telepathy"], "unknown selector"),
        (["--selectors", "retrieval"], "needs retrieval scores"),
    ],
)
def test_cli_bad_input(tiny_model_dir, tmp_path, extra, message):
    out = tmp_path / "kv"
    args = ["--model", str(tiny_model_dir), "--selectors", "full,streaming", *SMALL, *extra, "--out", str(out)]
    res = _kv(*args)
    assert res.returncode == 2, res.stderr
    assert message in res.stderr and "Traceback" not in res.stderr
    assert not out.exists()


def test_cli_missing_head_scores(tiny_model_dir, tmp_path):
    scores = pd.DataFrame(
        {
            "model": "x",
            "probe": "retrieval",
            "metric": "retrieval",
            "layer": [0, 1],
            "head": [0, 0],
            "value": [1.0, 2.0],
        }
    )
    scores.to_parquet(tmp_path / "s.parquet")
    table = str(tmp_path / "s.parquet")
    res = _kv(
        "--model",
        str(tiny_model_dir),
        "--selectors",
        "retrieval",
        *SMALL,
        "--scores",
        table,
        "--out",
        str(tmp_path / "kv"),
    )
    assert res.returncode == 2 and "miss" in res.stderr and "KV heads" in res.stderr


def test_cli_refuses_an_encoder(tmp_path):
    from transformers import BertConfig, BertModel

    from workbench.models.tiny import _tiny_tokenizer

    cfg = BertConfig(vocab_size=512, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)
    BertModel(cfg).save_pretrained(tmp_path / "bert")
    _tiny_tokenizer(512).save_pretrained(tmp_path / "bert")
    res = _kv("--model", str(tmp_path / "bert"), "--selectors", "full,streaming", *SMALL, "--out", str(tmp_path / "kv"))
    assert res.returncode == 2 and "no KV cache" in res.stderr, res.stderr


def test_run_unit_rows(tiny):
    spec = GridSpec(selectors=["full", "streaming"], budgets=[0.5], lengths=[160], depths=[0.5], sink=2)
    frame = run_unit(tiny, spec, grid_points(spec, geometry(tiny), {}), "niah", 160, "question-agnostic")
    assert set(frame.selector) == {"full", "streaming"}
    s = frame[frame.selector == "streaming"].iloc[0]
    assert 0.45 < s.kv_fraction < 0.55 and s.kv_bytes == 2 * 2 * geometry(tiny).d_head * s.kv_tokens


def test_python_api(tiny, tmp_path):
    from workbench.runs.kv import kv_grid

    rows = kv_grid(tiny, tmp_path / "kv", selectors=["full", "streaming"], budgets=[0.5], lengths=[160],
                   depths=[0.5], tasks=["niah"], sink=2, log=lambda m: None)  # fmt: skip
    assert set(rows.selector) == {"full", "streaming"} and set(rows.probe) == {"kv"}
    with pytest.raises(WorkbenchError, match="budgets"):
        kv_grid(tiny, tmp_path / "kv2", budgets=[2.0], log=lambda m: None)
    assert not (tmp_path / "kv2").exists()


def test_delta_loss_is_against_the_full_cache_whatever_the_order(tiny):
    from workbench.kv import tasks
    from workbench.kv.grid import loss_segments

    spec = GridSpec(loss_length=96, loss_tail=16, loss_segments=2)
    segs = loss_segments(tiny, spec)
    g = geometry(tiny)
    rows = pd.DataFrame(
        tasks.loss_rows(tiny, segs, [lambda n: sel.streaming(g, 0.2, n, sink=2), lambda n: sel.full(g)], 16)
    )
    loss = rows[rows.metric == "loss"].set_index(["selector", "item"]).value
    delta = rows[rows.metric == "delta_loss"].set_index(["selector", "item"]).value
    for item in ("segment-0", "segment-1"):
        assert delta["full", item] == 0.0
        assert math.isclose(delta["streaming", item], loss["streaming", item] - loss["full", item], abs_tol=1e-12)
    assert (delta.loc["streaming"] != 0).all()
