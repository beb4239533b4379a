"""Attention-pattern views (issue 34): the rows kept for a few heads equal the eager model's own
attention weights (tiny Llama with grouped KV heads, tiny Gemma-3 with a sliding window, padded
batches of unequal lengths), bad input gets one clear error each, and the figures carry the
tokens, hover text, values and log / linear switch they claim."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from workbench.engine.rows import attention_rows, batch_attention_rows
from workbench.errors import WorkbenchError
from workbench.report.patterns import attention_pattern, pattern_figure, token_labels, token_strip_figure
from workbench.testing import eager_model, eager_patterns

TOL = 1e-5


def _ids(model, n: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(4, min(model.vocab_size, 200)) for _ in range(n)]


def _every_head(model) -> list[tuple[int, int]]:
    return [(layer, head) for layer in range(model.n_layers) for head in range(model.n_heads)]


def _assert_rows(got: dict, ref: list[torch.Tensor], queries: list[int]) -> None:
    """Each kept head's rows equal the eager pattern's rows at ``queries`` over every key."""
    for (layer, head), w in got.items():
        want = ref[layer][head][queries]
        assert w.dtype == torch.float32 and tuple(w.shape) == tuple(want.shape), (layer, head)
        assert float((w.double() - want).abs().max()) <= TOL, (layer, head)


@pytest.fixture(scope="module")
def models(tiny_models, tiny_gemma3):
    """(workbench model, its eager reference) by name: Llama has 4 query heads on 2 KV heads,
    Gemma-3 slides layer 0 over 6 tokens (GQA 4:2)."""
    llama = tiny_models["llama"]
    return {
        "llama": (llama, eager_model(llama.source)),
        "gemma3": (tiny_gemma3, eager_model(tiny_gemma3.source)),
    }


@pytest.mark.parametrize("name", ["llama", "gemma3"])
def test_square_equals_eager_attention(models, name):
    """Every head's T x T square (queries=None) on a prompt longer than Gemma's window."""
    model, ref_model = models[name]
    assert model.n_kv_heads < model.n_heads  # grouped KV heads: query head h reads KV head h // 2
    ids = _ids(model, 15, seed=3)
    got = attention_rows(model, ids, _every_head(model))
    assert set(got) == set(_every_head(model))
    ref = eager_patterns(ref_model, ids)
    _assert_rows(got, ref, list(range(len(ids))))
    if name == "gemma3":  # the window is in force: query 14 of the sliding layer sees keys 9..14 only
        assert float(got[(0, 1)][14, :9].abs().max()) == 0.0
        assert float(got[(1, 1)][14, :9].abs().max()) > 0.0


@pytest.mark.parametrize("name", ["llama", "gemma3"])
def test_padded_batch_rows_equal_eager_attention(models, name):
    """Two prompts of unequal lengths in one right-padded batch, chosen query rows (negative from
    the end, unsorted, repeated) of a few heads: each equals its prompt run alone, eagerly."""
    model, ref_model = models[name]
    prompts = [_ids(model, 13, seed=5), _ids(model, 7, seed=6)]
    queries = [[12, 0, 7, -1, 9], [-2, 3, 6]]
    heads = [(1, 3), (0, 2), (1, 0)]
    got = batch_attention_rows(model, prompts, heads, queries)
    assert len(got) == 2
    for ids, qs, rows in zip(prompts, queries, got):
        assert set(rows) == set(heads)  # only the requested heads are kept
        assert all(w.shape[-1] == len(ids) for w in rows.values())  # keys cut to the prompt, no padding
        _assert_rows(rows, eager_patterns(ref_model, ids), [q % len(ids) for q in qs])


def test_chunked_blocks_equal_one_block(models):
    """Blocks of a few query rows (a tiny chunk budget) give the rows one block gives."""
    model, ref_model = models["gemma3"]
    ids = _ids(model, 12, seed=8)
    # 30 scores per block: 2 heads x 12 keys fit once, so one query row at a time
    got = attention_rows(model, ids, [(0, 3), (1, 2)], [11, 2, 3, 4, 10], chunk_elements=30)
    _assert_rows(got, eager_patterns(ref_model, ids), [11, 2, 3, 4, 10])


def test_only_the_requested_heads_and_rows_are_computed(models, monkeypatch):
    """Scores are formed for the asked heads of the asked layers at the asked rows only, and the
    forward ends after the last asked layer: no other layer's or head's pattern exists."""
    from workbench.engine import rows as rows_mod

    seen = []
    real = rows_mod.attention_scores

    def spy(call, q0=0, q1=None, **kw):
        s, vis = real(call, q0, q1, **kw)
        seen.append((call.layer, tuple(s.shape)))
        return s, vis

    monkeypatch.setattr(rows_mod, "attention_scores", spy)
    model = models["llama"][0]
    layers_run = []
    monkeypatch.setattr(rows_mod.RowsReader, "on_attention", _recording(rows_mod.RowsReader.on_attention, layers_run))
    attention_rows(model, _ids(model, 14, seed=9), [(1, 2), (0, 1), (1, 0)], [13, 4, 5])
    assert layers_run == [0, 1]  # layer 2 of 3 never ran
    # layer 0: head 1; layer 1: heads 0 and 2; rows 4..5 then 13, keys up to the last visible one
    assert seen == [(0, (1, 1, 2, 6)), (0, (1, 1, 1, 14)), (1, (1, 2, 2, 6)), (1, (1, 2, 1, 14))]


def test_a_pattern_view_imports_no_table_machinery():
    """The view's forward needs the network and the attention hook only: computing rows must not
    import the probe runner and pandas/pyarrow with it (about 45 MB resident, which put the view
    4% over the bare forward's peak at 8k tokens; benchmarks/bench_pattern_memory.py)."""
    import subprocess
    import sys

    code = (
        "import sys\n"
        "from workbench.models import load_model\n"
        "from workbench.engine.rows import attention_rows\n"
        "m = load_model('tiny-llama')\n"
        "w = attention_rows(m, [5, 6, 7, 8], [(1, 0)], [3])\n"
        "assert w[(1, 0)].shape == (1, 4), w\n"
        "print(sorted(k for k in ('pandas', 'pyarrow', 'plotly', 'transformer_lens') if k in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "[]"


def _recording(method, log):
    def on_attention(self, call):
        log.append(call.layer)
        return method(self, call)

    return on_attention


@pytest.mark.parametrize(
    "prompt, heads, queries, says",
    [
        ([], [(0, 0)], None, "empty"),
        ([5, 6, 7], [(3, 0)], None, "out of range"),
        ([5, 6, 7], [(0, 4)], None, "out of range"),
        ([5, 6, 7], [(-1, 0)], None, "out of range"),
        ([5, 6, 7], [], None, "no heads"),
        ([5, 6, 7], [(0, 0)], [3], "beyond"),
        ([5, 6, 7], [(0, 0)], [-4], "beyond"),
        ([5, 6, 7], [(0, 0)], [], "no query rows"),
        ([5, 10**7], [(0, 0)], None, "vocabulary"),
    ],
)
def test_bad_input_gets_one_clear_error(models, prompt, heads, queries, says):
    model = models["llama"][0]
    with pytest.raises(WorkbenchError, match=says):
        attention_rows(model, prompt, heads, queries)


def test_bad_input_of_the_view(models):
    model = models["llama"][0]
    with pytest.raises(WorkbenchError, match="empty"):
        attention_pattern(model, "", [(0, 0)])
    with pytest.raises(WorkbenchError, match="beyond"):
        attention_pattern(model, [5, 6, 7], [(0, 0)], queries=[7])
    with pytest.raises(WorkbenchError, match="unknown view"):
        attention_pattern(model, [5, 6, 7], [(0, 0)], view="cube")


def test_square_figure_shows_the_rows(models):
    """Token labels (with positions, so repeats stay apart) on both axes, one panel per head whose
    values are the rows, hover naming both tokens and the weight, and a log / linear switch."""
    model = models["llama"][0]
    ids = _ids(model, 6, seed=1) * 2  # repeated tokens: their labels must not merge
    fig = attention_pattern(model, ids, [(2, 1), (0, 3)])
    rows = attention_rows(model, ids, [(2, 1), (0, 3)])
    labels = token_labels(model.tokenizer, ids)
    assert len(set(labels)) == len(ids) and labels[0].startswith("0 ") and labels[6].startswith("6 ")
    assert [t.name for t in fig.data] == ["L2.H1", "L0.H3"]
    for trace, head in zip(fig.data, [(2, 1), (0, 3)]):
        assert list(trace.x) == labels and list(trace.y) == labels
        np.testing.assert_allclose(np.asarray(trace.z), rows[head].numpy(), atol=1e-5)
        for word in ("query %{y}", "key %{x}", "weight %{z"):
            assert word in trace.hovertemplate
    (menu,) = fig.layout.updatemenus
    lin, log = menu.buttons
    assert (lin.label, log.label) == ("linear", "log")
    w = rows[(2, 1)].double().numpy()
    z_log = np.asarray(log.args[0]["z"][0], dtype=float)
    np.testing.assert_allclose(z_log[w > 1e-4], np.log10(w[w > 1e-4]), atol=1e-3)
    assert np.isnan(z_log[w == 0]).all() and (w == 0).sum() == 11 * 12 // 2  # masked future keys: blank
    assert "log10 weight" in log.args[0]["hovertemplate"]
    np.testing.assert_allclose(np.asarray(lin.args[0]["z"][1]), rows[(0, 3)].numpy(), atol=1e-5)


def test_long_prompts_get_the_token_strip(models):
    """Past ``max_square`` tokens the view is one line per (head, query row) over every key,
    the token text in its cells; by default the last row."""
    model = models["gemma3"][0]
    ids = _ids(model, 20, seed=2)
    labels = token_labels(model.tokenizer, ids)
    fig = attention_pattern(model, ids, [(0, 1), (1, 2)], max_square=8)
    (trace,) = fig.data
    assert list(trace.y) == [f"L0.H1 q={labels[19]}", f"L1.H2 q={labels[19]}"]
    assert list(trace.x) == labels and list(trace.text[0]) == [lab.split(" ", 1)[1] for lab in labels]
    rows = attention_rows(model, ids, [(0, 1), (1, 2)], [19])
    np.testing.assert_allclose(np.asarray(trace.z), torch.cat([rows[(0, 1)], rows[(1, 2)]]).numpy(), atol=1e-5)
    fig2 = attention_pattern(model, ids, [(1, 2)], queries=[4, -3], max_square=8)
    assert list(fig2.data[0].y) == [f"L1.H2 q={labels[4]}", f"L1.H2 q={labels[17]}"]
    assert len(fig2.layout.updatemenus[0].buttons) == 2
    assert len(attention_pattern(model, ids, [(1, 2)], max_square=20).data[0].y) == 20  # short enough: the square


def test_figures_refuse_mismatched_input():
    rows = {(0, 0): np.eye(3)}
    with pytest.raises(WorkbenchError, match="labels"):
        pattern_figure(rows, ["a", "b"])
    with pytest.raises(WorkbenchError, match="query positions"):
        token_strip_figure(rows, ["a", "b", "c"], [0])
    with pytest.raises(WorkbenchError, match="beyond the 3 token labels"):  # was an IndexError
        token_strip_figure(rows, ["a", "b", "c"], [0, 5, 1])
    with pytest.raises(WorkbenchError, match="beyond the 3 token labels"):
        pattern_figure(rows, ["a", "b", "c"], [0, 1, -1])
    with pytest.raises(WorkbenchError, match="no heads"):
        pattern_figure({}, ["a"])


# ---- `workbench show`: one offline HTML file; every bad input one error line, exit 2, no file


def _show(capsys, *argv):
    from workbench.cli import main

    rc = main(["show", "--model", "tiny-llama", *argv])
    out, err = capsys.readouterr()
    return rc, out, err


def _figures(html: str) -> list[dict]:
    """The page's figures, typed arrays (plotly's base64 ``bdata``) decoded to lists."""
    import json
    import re

    from workbench.report.page import _typed_to_list

    def decode(obj):
        if isinstance(obj, dict):
            return _typed_to_list(obj) if "bdata" in obj else {k: decode(v) for k, v in obj.items()}
        return [decode(v) for v in obj] if isinstance(obj, list) else obj

    block = re.search(r'<script id="wb-figures" type="application/json">(.*?)</script>', html, re.S).group(1)
    return decode(json.loads(block))


def test_show_writes_one_offline_page(tmp_path, capsys):
    """The page inlines plotly.js (no script loaded from anywhere) and holds the figure the
    Python call draws: the same token labels and weights."""
    from workbench.models.loading import load_model

    model = load_model("tiny-llama", device="cpu")  # the model the command loads
    ids = _ids(model, 9, seed=4)
    out = tmp_path / "head.html"
    rc, text, err = _show(capsys, "--heads", "1.3,2.0", "--tokens", ",".join(map(str, ids)), "--out", str(out))
    assert rc == 0, err
    assert "wrote" in text and out.exists()
    html = out.read_text()
    assert "<script src" not in html.replace(" ", "") and "Plotly.newPlot" in html
    (fig,) = _figures(html)
    assert [t["name"] for t in fig["data"]] == ["L1.H3", "L2.H0"]
    assert fig["data"][0]["x"] == token_labels(model.tokenizer, ids)
    rows = attention_rows(model, ids, [(1, 3)])
    np.testing.assert_allclose(np.asarray(fig["data"][0]["z"], dtype=float), rows[(1, 3)].numpy(), atol=1e-4)
    labels = [b["label"] for b in fig["layout"]["updatemenus"][0]["buttons"]]
    assert labels == ["linear", "log"]
    # a long prompt (past --max-square): the strip of the asked rows
    out2 = tmp_path / "strip.html"
    rc, _, err = _show(capsys, "--heads", "0.1", "--tokens", ",".join(map(str, ids)), "--max-square", "4",
                       "--queries", "-1,2", "--out", str(out2))  # fmt: skip
    assert rc == 0, err
    (fig2,) = _figures(out2.read_text())
    assert len(fig2["data"][0]["y"]) == 2 and fig2["data"][0]["y"][0].startswith("L0.H1 q=8 ")


@pytest.mark.parametrize(
    "argv, joined",
    [
        (["show", "--queries", "-1,40", "--out", "x.html"], ["show", "--queries=-1,40", "--out", "x.html"]),
        (["show", "--queries", "-1", "--heads", "1.2"], ["show", "--queries=-1", "--heads", "1.2"]),
        (["show", "--queries=-1,4"], ["show", "--queries=-1,4"]),
        (["show", "--queries", "3,-1"], ["show", "--queries", "3,-1"]),
        (["show", "-x", "-1,2"], ["show", "-x", "-1,2"]),  # short options are left to argparse
        (["show", "--queries", "-a"], ["show", "--queries", "-a"]),
    ],
)
def test_rows_counted_from_the_end_need_no_equals_sign(argv, joined):
    from workbench.cli import join_negative_values

    assert join_negative_values(argv) == joined


def test_show_page_escapes_token_text(tmp_path):
    """A token that spells a closing script tag stays data: the page has only its own script tags."""
    from workbench.cli.show import html_page

    labels = ["0 </script><b>x", "1 a&b"]
    html = html_page(pattern_figure({(0, 0): np.array([[1.0, 0.0], [0.5, 0.5]])}, labels), "t", "c")
    assert html.count("</script>") == 4  # figures, template, plotly.js, the renderer
    assert _figures(html)[0]["data"][0]["x"] == labels


@pytest.mark.parametrize(
    "argv, says",
    [
        (["--heads", "1.3"], "one prompt source"),
        (["--heads", "1.3", "--text", "a b", "--tokens", "5,6"], "one prompt source"),
        (["--heads", "1-3", "--text", "the cat"], "LAYER.HEAD"),
        (["--heads", "1.3,", "--text", "the cat"], "LAYER.HEAD"),
        (["--heads", "9.0", "--text", "the cat"], "out of range"),
        (["--heads", "0.4", "--text", "the cat"], "out of range"),
        (["--heads", "1.3", "--text", "the cat", "--queries", "a"], "whole numbers"),
        (["--heads", "1.3", "--text", "the cat", "--queries=50"], "beyond"),
        (["--heads", "1.3", "--text", ""], "empty"),
        (["--heads", "1.3", "--tokens", "a,b"], "token ids"),
        (["--heads", "1.3", "--tokens", "5,99999999"], "vocabulary"),
        (["--heads", "1.3", "--prompts", "MISSING.jsonl"], "does not exist"),
        (["--heads", "1.3", "--dataset", "prose", "--prompt-id", "nope"], "nope"),
        (["--heads", "1.3", "--dataset", "no-such-set"], "unknown dataset"),
        (["--heads", "1.3", "--text", "the cat", "--view", "cube"], "invalid choice"),
        (["--heads", "1.3", "--text", "the cat", "--max-square", "0"], "must be"),
    ],
)
def test_show_bad_input_is_one_error_and_no_file(tmp_path, capsys, argv, says):
    out = tmp_path / "o.html"
    argv = [a.replace("MISSING", str(tmp_path / "missing")) for a in argv]
    rc, _, err = _show(capsys, *argv, "--out", str(out))
    assert rc == 2 and err.startswith("error:") and "Traceback" not in err and "internal" not in err, err
    assert says in err.splitlines()[0], err
    assert not out.exists()


@pytest.mark.parametrize(
    "out, says", [("o.txt", "not an .html"), ("afile/o.html", "is a file"), ("s3://bucket/o.html", "URL")]
)
def test_show_bad_out_is_refused_before_the_model_loads(tmp_path, capsys, monkeypatch, out, says):
    import workbench.models.loading as loading

    monkeypatch.setattr(loading, "load_model", lambda *a, **k: pytest.fail("the model loaded"))
    (tmp_path / "afile").write_text("x")
    target = out if "://" in out else str(tmp_path / out)
    rc, _, err = _show(capsys, "--heads", "1.3", "--text", "the cat", "--out", target)
    assert rc == 2 and says in err, err


def test_show_page_renders_offline_and_switches_to_log(tmp_path, capsys):
    """In headless chromium: the page asks for nothing but itself, logs no error, and the "log"
    button restyles every panel to log10 weights (range 1e-4..1, masked keys blank)."""
    from tests.browser import chromium, open_page, playwright_available

    if not (chromium() and playwright_available()):
        pytest.skip("needs chromium and playwright")
    out = tmp_path / "head.html"
    rc, _, err = _show(capsys, "--heads", "1.3,0.0", "--tokens", "5,9,11,5,9,11,7", "--out", str(out))
    assert rc == 0, err
    with open_page(out) as s:
        assert s.requests == [out.resolve().as_uri()] and not s.errors
        assert not [c for c in s.console if c.startswith("error")], s.console
        s.page.get_by_text("log", exact=True).click()
        got = s.page.evaluate(
            "() => document.getElementById('fig1').data.map(t => [t.zmin, t.zmax, t.hovertemplate, t.z[0][1]])"
        )
    assert len(got) == 2
    for zmin, zmax, hover, masked in got:
        assert (zmin, zmax, masked) == (-4, 0, None) and "log10 weight" in hover
