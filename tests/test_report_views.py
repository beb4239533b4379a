"""Pattern views in the sweep's run folder and the report (issue 34, item 3): the head stored for a
role is the atlas' top head of that role; the stored weights are the eager model's attention on
item 0 of the dataset, built independently here (the square crop; niah's decoding rows over the
needle); views are rebuilt when a part changes, not on a no-op resume (no model loaded), absent
with ``views = false``, never half-written; the report draws one figure per role, names the head,
builds without ``views.parquet`` and adds a bounded number of bytes per figure."""

from __future__ import annotations

import json
import math
import os
import re
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from tests.browser import chromium, open_page, playwright_available
from workbench.errors import Interrupted
from workbench.protocol.evidence import probe_roles, strongest_heads
from workbench.protocol.roles import Role
from workbench.runs.folder import RunFolder
from workbench.runs.load import load_results
from workbench.runs.sweep import run_sweep
from workbench.runs.views import COLUMNS, FILE, read_views, source_digest

TOL = 1e-5
PERIOD = 12
CONFIG = f"""models = ["{{model}}"]
probes = ["entropy", "sink", "induction", "retrieval"]
{{extra}}
[datasets.prose]
n_prompts = 3
probes = ["entropy", "sink", "induction"]
[datasets.repeated-random]
n_prompts = 2
period = {PERIOD}
probes = ["induction"]
[datasets.niah]
n_prompts = 1
context_len = [120]
probes = ["retrieval"]
[probe_params.retrieval]
require_correct = false
max_new_tokens = 4
"""
ROLES = {"sink", "previous-token", "duplicate", "induction", "echo", "retrieval"}  # the probes run here


def quiet(*_):
    pass


@pytest.fixture(scope="module", autouse=True)
def every_head_holds():
    """Tiny random heads pass none of the default thresholds: here every role of the probes run
    holds at 0 (retrieval, which scores 0 on a random model, too), so each gets a strongest head."""
    from workbench.protocol.registry import probe_class

    with pytest.MonkeyPatch.context() as mp:
        for name in ("sink", "induction", "retrieval"):
            cls = probe_class(name)
            mp.setattr(cls, "roles", tuple(replace(r, threshold=0.0, strict=False) for r in cls.roles))
        yield


def write_config(root: Path, model: Path, extra: str = "", name: str = "s.toml", prose: int = 3) -> Path:
    text = CONFIG.format(model=model, extra=extra).replace("n_prompts = 3", f"n_prompts = {prose}")
    cfg = root / name
    cfg.write_text(text)
    return cfg


@pytest.fixture(scope="module")
def swept(tiny_dirs, tmp_path_factory):
    root = tmp_path_factory.mktemp("views")
    cfg = write_config(root, tiny_dirs["llama"])
    summary = run_sweep(cfg, root / "run", progress=False, log=quiet)
    assert summary["views"] == "built"
    return {"root": root, "cfg": cfg, "run": root / "run", "model": tiny_dirs["llama"]}


@pytest.fixture
def copy(swept, tmp_path) -> Path:
    """A copy of the swept run folder to change."""
    out = tmp_path / "run"
    shutil.copytree(swept["run"], out)
    return out


# -- which head ----------------------------------------------------------------------------------


def test_each_role_stores_the_atlas_top_head(swept):
    """The atlas lists every head a role holds for; the view's head is its strongest (value x sign
    highest, ties to the lower head), on the dataset the atlas reports for it."""
    from workbench.report.atlas import atlas

    views = read_views(swept["run"])
    assert list(views.columns) == COLUMNS
    at = atlas(load_results(swept["run"]))
    sign = {r.name: r.sign for r in probe_roles()}
    assert set(views["role"]) == set(at["role"]) == ROLES
    for role, g in at.groupby("role"):
        top = g.assign(key=-g["value"] * sign[role]).sort_values(["key", "layer", "head"]).iloc[0]
        mine = views[views["role"] == role]
        assert mine[["layer", "head", "dataset", "metric"]].drop_duplicates().shape[0] == 1
        got = mine.iloc[0]
        assert (got["layer"], got["head"], got["dataset"]) == (top["layer"], top["head"], top["dataset"]), role
        assert math.isclose(got["value"], top["value"], rel_tol=1e-12), role


def _slow_strongest(table: pd.DataFrame, roles: list[Role]) -> dict[tuple[str, str], tuple]:
    """Per (model, role): loop over heads and datasets, n-weighted means, the rule written out."""
    out = {}
    for role in roles:
        for model in sorted(set(table["model"])):
            best = None
            rows = table[(table["model"] == model) & (table["metric"] == role.metric) & (table["layer"] >= 0)]
            for layer, head in sorted(set(zip(rows["layer"], rows["head"]))):
                evidence = None
                for dataset in sorted(set(rows["dataset"])):
                    r = rows[(rows["layer"] == layer) & (rows["head"] == head) & (rows["dataset"] == dataset)]
                    r = r[r["value"].notna()]
                    if r.empty:
                        continue
                    w = [max(1, n) for n in r["n"]]
                    v = sum(a * b for a, b in zip(r["value"], w)) / sum(w)
                    passes = v * role.sign > role.threshold if role.strict else v * role.sign >= role.threshold
                    if passes and (evidence is None or v * role.sign > evidence[0] * role.sign):
                        evidence = (v, dataset)
                if evidence is not None and (best is None or evidence[0] * role.sign > best[0] * role.sign):
                    best = (evidence[0], layer, head, evidence[1])
            if best is not None:
                out[(model, role.name)] = best
    return out


def test_strongest_heads_against_a_slow_loop():
    """Two models, repeated rows (n-weighted), NaN, a low role, ties between heads (lower wins)
    and between datasets, a role no head holds."""
    rng = np.random.default_rng(0)
    rows = []
    for model in ("a", "b"):
        for dataset in ("d1", "d2"):
            for layer in range(3):
                for head in range(4):
                    for metric in ("m_high", "m_low"):
                        for _ in range(2):
                            v = float(rng.choice([0.1, 0.5, 0.9, -0.7, np.nan]))
                            rows.append([model, dataset, "p", metric, layer, head, v, int(rng.integers(0, 5))])
    table = pd.DataFrame(rows, columns=["model", "dataset", "probe", "metric", "layer", "head", "value", "n"])
    roles = [
        Role("high", "H", "m_high", 0.4, "#000", "x"),
        Role("low", "L", "m_low", 0.3, "#000", "x", sign=-1),
        Role("never", "N", "m_high", 5.0, "#000", "x"),
    ]
    got = strongest_heads(table, roles)
    want = _slow_strongest(table, roles)
    assert set(zip(got["model"], got["role"])) == set(want) and ("a", "never") not in want
    for r in got.itertuples():
        v, layer, head, dataset = want[(r.model, r.role)]
        assert (r.layer, r.head, r.dataset) == (layer, head, dataset) and math.isclose(r.value, v), r
    tie = pd.DataFrame(
        [["a", "d", "p", "m_high", 2, 0, 0.9, 1], ["a", "d", "p", "m_high", 1, 3, 0.9, 1]],
        columns=table.columns,
    )
    assert strongest_heads(tie, roles[:1])[["layer", "head"]].values.tolist() == [[1, 3]]


# -- which rows, which weights -------------------------------------------------------------------------


def _item_zero(dataset: str, model) -> tuple[list[int], dict]:
    """Item 0 of each dataset of CONFIG, built here from the dataset functions and the tokenizer."""
    from workbench.datasets import make_dataset

    tok = model.tokenizer
    if dataset == "prose":
        p = make_dataset("prose", n_prompts=3, seed=0)[0]
        return list(tok(p.text)["input_ids"]), {}
    if dataset == "repeated-random":
        p = make_dataset("repeated-random", n_prompts=2, seed=0, tokenizer=tok, period=PERIOD)[0]
        return list(p.tokens), p.meta
    p = make_dataset("niah", n_prompts=1, seed=0, tokenizer=tok, context_len=120)[0]
    return list(p.tokens), p.meta


def _expected_rows(dataset: str, ids: list[int], meta: dict) -> tuple[list[int], list[int]]:
    """(tokens to run, query rows): the first 64 rows of the prompt; a repeated prompt of up to 128
    tokens whole, a longer one from its second copy on; on niah the rows whose next token is the
    answer, the answer fed after the prompt."""
    if dataset == "repeated-random":
        second = [p for p in range(len(ids)) if p >= meta["offset"] + meta["period"]]
        return ids, list(range(len(ids))) if len(ids) <= 128 else second[:64]
    if dataset != "niah":
        return ids, list(range(min(len(ids), 64)))
    s, e = meta["answer_span"]
    full = ids + ids[s:e]
    rows = [p for p in range(len(full) - 1) if p + 1 >= len(ids)]
    return full[:-1], rows


def test_stored_weights_are_the_eager_attention_on_item_zero(swept, tiny_models):
    from workbench.engine.rows import attention_rows
    from workbench.testing import eager_model, eager_patterns

    model = tiny_models["llama"]
    ref = eager_model(model.source)
    views = read_views(swept["run"])
    assert set(views["dataset"]) == {"prose", "repeated-random", "niah"}
    for role, v in views.groupby("role"):
        layer, head, dataset = int(v["layer"].iloc[0]), int(v["head"].iloc[0]), v["dataset"].iloc[0]
        ids, meta = _item_zero(dataset, model)
        run_ids, rows = _expected_rows(dataset, ids, meta)
        n_k = rows[-1] + 1  # a causal model: keys up to the last row
        assert sorted(set(v["query"])) == rows and sorted(set(v["key"])) == list(range(n_k)), role
        assert len(v) == len(rows) * n_k and set(v["view"]) == {"strip" if dataset == "niah" else "square"}
        w = v.pivot(index="query", columns="key", values="weight").loc[rows, list(range(n_k))].to_numpy()
        assert v["weight"].dtype == np.float32
        eager = eager_patterns(ref, run_ids)[layer][head][rows][:, :n_k].numpy()
        assert np.abs(w - eager).max() <= TOL, role
        mine = attention_rows(model, run_ids, [(layer, head)], rows)[(layer, head)][:, :n_k].numpy()
        assert np.abs(w - mine).max() <= 1e-6, role
        assert np.allclose(w.sum(axis=1), 1.0, atol=1e-5), "the kept keys hold every row's whole weight"
        keys = v.drop_duplicates("key").sort_values("key")
        assert list(keys["key_token"]) == [model.tokenizer.decode([t]) for t in run_ids[:n_k]], role
        if dataset == "niah":
            s, e = meta["needle_span"]
            assert set(keys.loc[keys["mark"] == "needle", "key"]) == set(range(s, e)), "the needle is marked"
            assert len(ids) > 64 and n_k == len(run_ids)
        else:
            assert set(v["mark"]) == {""}
            if dataset == "prose":
                assert len(ids) > 64 and len(rows) == 64, "a long prompt is cropped to its first 64 rows"


def test_dataset_view_rows_default_and_niah():
    from workbench.datasets import pattern_rows
    from workbench.datasets.niah import view_rows

    ids = list(range(100))
    for generator in ("prose", None):
        got = pattern_rows(generator, ids, {})
        assert got.view == "square" and got.queries == list(range(64)) and got.ids == ids
    meta = {"answer_span": [40, 43], "needle_span": [35, 45]}
    got = pattern_rows("niah", ids, meta)
    assert got == view_rows(ids, meta)
    assert got.ids == ids + [40, 41] and got.queries == [99, 100, 101] and got.mark == (35, 45)


def test_repeated_views_show_the_second_copy():
    """The first 64 rows of a prompt with period >= 64 hold no repeat: the view starts at the
    second copy (rows 71..134 with a BOS and period 70) and keeps every key before them; a prompt
    of at most 128 tokens is shown whole."""
    from workbench.datasets import pattern_rows

    got = pattern_rows("repeated-random", list(range(141)), {"period": 70, "offset": 1})
    assert got.view == "square" and got.queries == list(range(71, 135)) and len(got.ids) == 141
    got = pattern_rows("repeated-random", list(range(100)), {"period": 50, "offset": 0})
    assert got.queries == list(range(100))


def test_counterfact_views_the_context_probes_input(tiny_models):
    """The counterfact item as the context probe runs it with its passage (passage_pair, the
    probe's own construction), the passage marked."""
    from workbench.datasets import make_dataset, pattern_rows
    from workbench.inputs.conditions import passage_pair

    model = tiny_models["llama"]
    item = make_dataset("counterfact", n_prompts=1)[0]
    ids = list(model.tokenizer(item.text)["input_ids"])
    got = pattern_rows("counterfact", ids, item.meta, item.text, model.tokenizer)
    pair = passage_pair(model, item)
    assert got.ids == pair.cond.input_ids and got.queries == list(range(min(64, len(got.ids))))
    assert got.mark_label == "passage" and got.mark[0] == 0
    assert all(pair.cond.condition_mask[1 : got.mark[1]]) and not any(pair.cond.condition_mask[got.mark[1] :])
    assert pattern_rows("counterfact", ids, item.meta).ids == ids, "without the text: the question alone"


# -- when they are computed ------------------------------------------------------------------------


def test_noop_resume_loads_no_model_and_a_changed_part_rebuilds(swept, copy, monkeypatch):
    import workbench.models.loading as loading

    before = (copy / FILE).read_bytes()
    real = loading.load_model
    loaded: list[str] = []

    def refuse(*args, **kwargs):
        raise AssertionError("a fresh run folder must not load a model")

    monkeypatch.setattr(loading, "load_model", refuse)
    summary = run_sweep(swept["cfg"], copy, progress=False, log=quiet)
    assert summary["ran"] == 0 and summary["views"] == "fresh" and (copy / FILE).read_bytes() == before

    def counting(name, *args, **kwargs):
        loaded.append(name)
        return real(name, *args, **kwargs)

    monkeypatch.setattr(loading, "load_model", counting)
    cfg = write_config(copy.parent, swept["model"], name="fewer.toml", prose=2)
    summary = run_sweep(cfg, copy, progress=False, log=quiet)
    assert summary["ran"] == 3 and summary["views"] == "built"  # prose's 3 units, then the views
    assert loaded == [str(swept["model"])], "one load: the views use the model the units ran on"
    entry = json.loads((copy / "run.json").read_text())["views"]
    assert entry["built_from"] == source_digest(RunFolder(copy)) and read_views(copy) is not None

    (copy / FILE).write_bytes(b"not parquet")  # a damaged file is rebuilt, not trusted
    assert run_sweep(cfg, copy, progress=False, log=quiet)["views"] == "built"
    assert len(read_views(copy)) == len(read_views(swept["run"]))


def test_views_false_builds_none_and_sets_an_earlier_file_aside(swept, copy, tmp_path):
    off = write_config(tmp_path, swept["model"], extra="views = false", name="off.toml")
    fresh = tmp_path / "fresh"
    assert run_sweep(off, fresh, progress=False, log=quiet)["views"] == "off"
    assert not (fresh / FILE).exists() and read_views(fresh) is None
    assert run_sweep(off, copy, progress=False, log=quiet)["views"] == "off"
    assert not (copy / FILE).exists() and "views" not in json.loads((copy / "run.json").read_text())
    assert len(list((copy / "superseded").glob(f"*/views-off/{FILE}"))) == 1


@pytest.mark.parametrize("error", [KeyboardInterrupt, RuntimeError])
def test_an_interrupt_or_failure_leaves_no_half_written_views(swept, copy, monkeypatch, error):
    import workbench.engine.rows as rows

    before = (copy / FILE).read_bytes()
    manifest = json.loads((copy / "run.json").read_text())
    manifest["views"]["built_from"] = "stale"
    (copy / "run.json").write_text(json.dumps(manifest))
    names = sorted(p.name for p in copy.iterdir())

    def stop(*args, **kwargs):
        raise error("stopped")

    monkeypatch.setattr(rows, "attention_rows", stop)
    with pytest.raises(Interrupted if error is KeyboardInterrupt else RuntimeError) as info:
        run_sweep(swept["cfg"], copy, progress=False, log=quiet)
    if error is KeyboardInterrupt:
        assert "interrupted while computing the pattern views: all 5 units are saved" in info.value.message
    assert (copy / FILE).read_bytes() == before and sorted(p.name for p in copy.iterdir()) == names
    monkeypatch.undo()
    assert run_sweep(swept["cfg"], copy, progress=False, log=quiet)["views"] == "built"


# -- the report ----------------------------------------------------------------------------------------


def _section(text: str) -> str:
    start = text.index('id="views"')
    return text[start : text.index("<h2", start)]


def _figures(text: str) -> dict[str, dict]:
    blob = re.search(r'<script id="wb-figures" type="application/json">(.*?)</script>', text, re.S).group(1)
    return {f["id"]: f for f in json.loads(blob)}


def test_report_draws_one_figure_per_role_naming_the_head(swept):
    from workbench.report.build import build_report

    text = build_report(swept["run"])
    section = _section(text)
    views = read_views(swept["run"])
    ids = re.findall(r'<div id="(fig\d+)" class="figure"', section)
    assert len(ids) == views["role"].nunique() == len(ROLES)
    assert text.index('id="atlas"') < text.index('id="views"') < text.index('id="probe-entropy"')
    figs = _figures(text)
    titles = [figs[i]["layout"]["title"]["text"] for i in ids]
    for role, v in views.groupby("role"):
        head = f"L{v['layer'].iloc[0]}.H{v['head'].iloc[0]}"
        title = next(t for t in titles if t.startswith(f"{role}: "))
        assert head in title and v["dataset"].iloc[0] in title and f"head {head}" in section
    strip = next(figs[i] for i, t in zip(ids, titles) if t.startswith("retrieval: "))
    assert strip["layout"]["shapes"] and strip["layout"]["annotations"][0]["text"] == "needle"
    assert "the decoding rows lighting up on the needle" in section and "the sub-diagonal" in section


def test_report_of_a_run_without_views_builds_and_says_how_to_get_them(swept, copy):
    from workbench.report.build import build_report

    (copy / FILE).unlink()
    section = _section(build_report(copy))
    assert "No pattern views stored in run" in section and "re-run its sweep" in section
    assert 'class="figure"' not in section
    one_file = next((copy / "parts").glob("*.parquet"))
    assert 'id="views"' not in build_report(one_file), "a results file is no sweep folder: no section"


@pytest.mark.skipif(
    (chromium() is None or not playwright_available()) and not os.environ.get("CI"),
    reason="chromium or playwright not installed (make test installs both)",
)
def test_views_render_in_headless_chromium(swept, tmp_path):
    from workbench.report.build import write_report

    out = write_report(swept["run"], tmp_path / "r.html")
    with open_page(out) as s:
        drawn = s.page.evaluate(
            """() => { const out = []; let el = document.getElementById('views').nextElementSibling;
                while (el && el.tagName !== 'H2') {
                    const fig = el.tagName === 'FIGURE' ? el.querySelector('div.figure') : null;
                    if (fig) out.push(fig.classList.contains('js-plotly-plot')
                                      && !!fig.querySelector('g.heatmaplayer'));
                    el = el.nextElementSibling; }
                return out; }"""
        )
        assert drawn == [True] * len(ROLES), "every view became a plotly heatmap"
        errors = [c for c in s.console if re.match(r"(error|warning)", c)] + s.errors
        assert not errors, errors


def test_views_add_a_bounded_size_per_figure(swept, copy):
    """Each view adds at most ~100 KB (a 64 x 64 square, z stored three times for the colour
    switch): the demo's nine views stay well inside the report's 10 MB."""
    from workbench.report.build import build_report

    with_views = len(build_report(swept["run"]).encode())
    (copy / FILE).unlink()
    without = len(build_report(copy).encode())
    per_figure = (with_views - without) / len(ROLES)
    assert 0 < per_figure < 100_000, per_figure


def test_caption_says_what_the_role_declares_to_look_for():
    """The caption's "look for" comes from the probe's own Role declaration (no list of role
    names in the report), falling back to the role's one-line description; the rows named are
    the stored ones (a repeated prompt's view starts at its second copy)."""
    from workbench.protocol.evidence import probe_roles
    from workbench.protocol.roles import Role
    from workbench.report.views import caption

    frame = pd.DataFrame(
        {"role": "induction", "layer": 2, "head": 1, "metric": "induction", "value": 0.9, "dataset": "rr",
         "item": "rep-0", "view": "square", "query": [71, 71, 72], "key": [0, 1, 72]}
    )  # fmt: skip
    declared = {r.name: r for r in probe_roles()}
    text = caption(frame, declared["induction"])
    assert "one key to the right of the earlier copy" in text and "query rows 71..72 over keys 0..72" in text
    plain = Role("induction", "I", "induction", 0.3, "#000", "a one-line description")
    assert "Look for a one-line description." in caption(frame, plain)
    assert all(r.look_for for r in declared.values()), "every built-in role says what its pattern looks like"
