"""Reports: summary first, head atlas, figures that fit the metric, comparisons on relative
depth, navigation; one self-contained file with user text inert, rendered in headless Chromium
(driven with Playwright: no console errors, the atlas tooltip appears on hover)."""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

from tests.browser import chromium, open_page, playwright_available
from workbench.cli import main
from workbench.report.build import build_report, top_heads_table
from workbench.runs.load import load_results

ARTIFACTS = Path(__file__).resolve().parents[1] / "test-artifacts"
XSS = "<script>alert(1)</script>"
ROLES = "sink=0.3,streaming=0.5,echo=0.1"  # low enough that tiny random heads get several roles each

needs_browser = pytest.mark.skipif(
    (chromium() is None or not playwright_available()) and not os.environ.get("CI"),
    reason="chromium or playwright not installed (make test installs both)",
)


def sweep(root: Path, name: str, models: list[str], extra: str = "") -> Path:
    cfg = root / f"{name}.toml"
    cfg.write_text(
        f'models = {json.dumps([str(m) for m in models])}\nprobes = ["entropy", "sink", "induction", "streaming"]\n'
        "[datasets.prose]\nn_prompts = 6\n"
        '[datasets.repeated-random]\nn_prompts = 2\nperiod = 12\nprobes = ["induction"]\n' + extra
    )
    assert main(["sweep", str(cfg), "--out", str(root / name), "--no-progress"]) == 0
    return root / name


@pytest.fixture(scope="module")
def report_run(tiny_dirs, tmp_path_factory):
    root = tmp_path_factory.mktemp("report")
    (root / "p.jsonl").write_text(
        '{"id": "xss '
        + XSS.replace('"', '\\"')
        + '", "text": "the king said '
        + XSS.replace('"', '\\"')
        + ' unto them"}\n'
        '{"id": "plain", "text": "and it came to pass that the people went"}\n'
    )
    sweep(root, "run", [tiny_dirs["llama"]], '[datasets.mine]\npath = "p.jsonl"\nprobes = ["entropy", "sink"]\n')
    assert main(["report", str(root / "run"), "--out", str(root / "report.html"), "--roles", ROLES]) == 0
    return root


@pytest.fixture(scope="module")
def depth_runs(tmp_path_factory):
    """Tiny Llamas of 3 and 5 layers: one sweep over both, and one run per model."""
    from workbench.models.tiny import make_tiny_model

    root = tmp_path_factory.mktemp("depth")
    m3 = make_tiny_model(root / "llama3", "llama", seed=2, n_layers=3)
    m5 = make_tiny_model(root / "llama5", "llama", seed=3, n_layers=5)
    return {
        "both": sweep(root, "both", [m3, m5]),
        "a": sweep(root, "a", [m3]),
        "b": sweep(root, "b", [m5]),
        "root": root,
    }


def figures(page: str) -> list[dict]:
    return json.loads(re.search(r'<script id="wb-figures" type="application/json">(.*?)</script>', page, re.S).group(1))


def array(value) -> np.ndarray:
    """A plotly JSON array: a list, or plotly's typed-array form {dtype, bdata (base64), shape}."""
    if isinstance(value, dict) and "bdata" in value:
        out = np.frombuffer(base64.b64decode(value["bdata"]), dtype=value["dtype"])
        return out.reshape([int(x) for x in str(value.get("shape", len(out))).split(",")])
    return np.asarray(value, dtype=float)


def test_report_is_self_contained_and_escaped(report_run):
    text = (report_run / "report.html").read_text()
    figs = figures(text)
    assert len(re.findall(r'<div id="fig\d+" class="figure"', text)) == len(figs) > 10
    assert {f["id"] for f in figs} == set(re.findall(r'<div id="(fig\d+)" class="figure"', text))
    assert not re.search(r"<script[^>]*\bsrc=", text), "plotly.js is inlined, not loaded"
    markup = re.sub(r"<script[^>]*>.*?</script>", "", text, flags=re.S)
    assert not re.search(r"""(href|src)=["']?(https?:)?//""", markup), (
        "no link or resource outside the page (the browser test checks requests)"
    )
    assert text.count("<script") == text.count("</script>")
    assert XSS not in text and "&lt;script&gt;alert(1)&lt;/script&gt;" in text
    umask = os.umask(0)
    os.umask(umask)
    assert (report_run / "report.html").stat().st_mode & 0o777 == 0o666 & ~umask, (
        "a page to share is not private to its writer"
    )


def test_user_text_in_labels_and_titles_is_inert(report_run):
    text = build_report([report_run / "run", report_run / "run"], title=XSS, labels=[XSS, "b</script>"])
    assert XSS not in text and "b</script>" not in text
    assert "\\u003cscript\\u003ealert(1)" in text, "user text inside JSON blocks (figures, atlas) is escaped too"
    assert "<title>&lt;script&gt;alert(1)&lt;/script&gt;</title>" in text


def section_positions(text: str, ids: list[str]) -> list[int]:
    return [text.index(f'id="{i}"') for i in ids]


def test_summary_first_then_atlas_then_figures_and_raw_metadata_last(report_run, tiny_models):
    from workbench.datasets import make_dataset
    from workbench.inputs.prompts import tokenize_prompts

    text = (report_run / "report.html").read_text()
    body = text.split("<body>")[1]
    pos = section_positions(
        body, ["summary", "findings", "top-heads", "atlas", "views", "probe-entropy", "definitions", "raw"]
    )
    assert pos == sorted(pos)
    # the sweep stored pattern views (views.parquet); no tiny head passes a default threshold, and the section says so
    assert (report_run / "run" / "views.parquet").is_file()
    assert "no head passes a role&#x27;s threshold" in body[pos[4] : pos[5]]
    assert body.index('id="toc"') < pos[0] and body.index('class="figure"') > pos[3]
    assert "<pre" not in body[: pos[-2]], "no raw JSON before the collapsed section (definitions may show formulas)"
    raw = body[pos[-1] :]
    assert re.search(r"<details class=\"raw\"><summary>", raw) and "&quot;models&quot;" in raw
    summary = re.search(r'<p class="run-summary">(.*?)</p>', body, re.S).group(1)
    model = tiny_models["llama"]
    tokens = sum(
        len(p.ids)
        for p in tokenize_prompts(
            make_dataset("prose", n_prompts=6, seed=0), model.tokenizer, model.n_ctx, model.vocab_size
        )
    )
    for want in [
        "3 layers x 4 heads = 12 heads",
        "LlamaForCausalLM",
        f"prose (6 prompts, {tokens:,} tokens)",
        "repeated-random (2 prompts",
        "mine (2 prompts",
        "Probes: entropy, sink (epsilon=0.3), induction, streaming (sink=4, recent=64)",
        "s of computation over 3 model x dataset group(s)",
    ]:
        assert want in summary, want


def test_summary_states_recorded_timing(tmp_path):
    from benchmarks.bench_report import synthetic_run
    from workbench.runs.parquet import read_parquet, write_parquet

    run = synthetic_run(tmp_path / "run", n_layers=2, n_heads=2)
    for i, f in enumerate(sorted((run / "parts").glob("*.parquet"))):
        df, meta = read_parquet(f)
        meta["timing"] = {
            "started": f"2026-01-01T10:0{i % 2}:00+00:00",
            "finished": f"2026-01-01T10:0{i % 2}:30+00:00",
            "seconds": 30.0,
        }
        write_parquet(df, f, meta)
    text = build_report(run)
    assert (
        "Ran from 2026-01-01 10:00 UTC to 2026-01-01 10:01 UTC: 60 s of computation over 2 model x dataset group(s)."
        in text
    )


def test_summary_counts_groups_that_share_their_timing_values(tmp_path):
    """Two quick groups can start and finish in the same second with the same rounded duration
    (it made the report fixture flaky on an idle machine): the recorded group name tells them apart."""
    from benchmarks.bench_report import synthetic_run
    from workbench.runs.parquet import read_parquet, write_parquet

    run = synthetic_run(tmp_path / "run", n_layers=2, n_heads=2)
    parts = sorted((run / "parts").glob("*.parquet"))
    assert len(parts) >= 2
    for i, f in enumerate(parts):
        df, meta = read_parquet(f)
        meta["timing"] = {
            "started": "2026-01-01T10:00:00+00:00",
            "finished": "2026-01-01T10:00:00+00:00",
            "seconds": 0.05,
            "group": f"model x dataset{i % 2}",
        }
        write_parquet(df, f, meta)
    assert "of computation over 2 model x dataset group(s)." in build_report(run)


def test_findings_count_roles_and_their_overlaps(tmp_path):
    import workbench
    from benchmarks.bench_report import synthetic_run

    run = synthetic_run(tmp_path / "run", n_layers=6, n_heads=4, seed=3)
    text = build_report(run)
    roles = workbench.atlas(load_results(run))
    heads = {r: set(zip(g.layer, g["head"])) for r, g in roles.groupby("role")}
    for role, hs in heads.items():
        share = f"{100 * len(hs) / 24:.0f}% of 24"
        assert re.search(rf"<b>{len(hs)}</b> {role} heads? \({share}\)", text), role
    both = sorted(heads["induction"] & heads["retrieval"])
    assert both, "the synthetic run has induction heads that are retrieval heads"
    listed = ", ".join(f'<span class="hd">{layer}.{h}</span>' for layer, h in both[:6])
    verb = "is also a retrieval head" if len(both) == 1 else "are also retrieval heads"
    assert f"{len(both)} of the {len(heads['induction'])} induction heads {verb}: {listed}" in text


def test_top_heads_and_atlas_agree_with_the_table(report_run):
    table = load_results(report_run / "run")
    top = top_heads_table(table)
    for r in top.itertuples():
        sub = table[(table.metric == r.metric) & (table.dataset == r.dataset) & (table.layer >= 0)].dropna(
            subset=["value"]
        )
        best = (
            sub.value.abs().max()
            if r.metric.startswith("context_direct")
            else sub.value.min()
            if r.metric.startswith("entropy")
            else sub.value.max()
        )
        assert r._5[0][2] == pytest.approx(best), r.metric
    text = (report_run / "report.html").read_text()
    data = json.loads(re.search(r'<script id="wb-atlas" type="application/json">(.*?)</script>', text, re.S).group(1))
    (grid,) = data
    assert grid["n_layers"] == 3 and len(grid["vals"]) == 3 and len(grid["vals"][0]) == 4
    col = grid["cols"].index(["sink_mass", "prose"])
    row = table[
        (table.metric == "sink_mass") & (table.dataset == "prose") & (table.layer == 2) & (table["head"] == 1)
    ].value.iloc[0]
    assert grid["vals"][2][1][col] == pytest.approx(row, rel=1e-3)
    cells = re.findall(r'<td tabindex="0" data-s="0" data-l="(\d+)" data-h="(\d+)"( class="has")?>', text)
    assert len(cells) == 12
    import workbench
    from workbench.report.atlas import parse_thresholds

    roles = workbench.atlas(table, thresholds=parse_thresholds(ROLES))
    assert roles.groupby(["layer", "head"]).size().max() >= 2, "some head has several roles"
    assert {(int(layer), int(h)) for layer, h, has in cells if has} == set(zip(roles.layer, roles["head"]))
    for (layer, h), g in roles.groupby(["layer", "head"]):
        cell = re.search(rf'data-l="{layer}" data-h="{h}" class="has">(.*?)</td>', text).group(1)
        assert re.findall(r">(\w+)</span>", cell) == [
            {"sink": "S", "streaming": "W", "echo": "E", "previous-token": "P"}.get(r, "?") for r in g.role
        ]
    assert "sink_mass &gt;= 0.3" in text and "streaming &gt;= 0.5" in text


def test_toc_links_and_captions_resolve(report_run):
    text = (report_run / "report.html").read_text()
    ids = set(re.findall(r'\bid="([^"]+)"', text))
    links = re.findall(r'href="#([^"]+)"', text)
    assert len(links) > 20 and not [x for x in links if x not in ids]
    toc = re.search(r'<nav class="toc" id="toc">(.*?)</nav>', text, re.S).group(1)
    for probe in ("entropy", "sink", "induction", "streaming"):
        assert f'href="#probe-{probe}"' in toc
    caps = re.findall(r'<div id="fig\d+" class="figure"[^>]*></div><figcaption>(.*?)</figcaption>', text, re.S)
    assert len(caps) == len(figures(text))
    for cap in caps:
        assert re.search(r'href="#def-[a-z_]+"', cap) and len(cap) > 80, cap
    assert '<section class="def" id="def-sink_mass">' in text


def test_figures_fit_their_metric(report_run):
    figs = {f["layout"]["title"]["text"]: f for f in figures((report_run / "report.html").read_text())}
    sink = (
        figs["sink_mass per head (tiny: one panel per dataset)"]
        if "sink_mass per head (tiny: one panel per dataset)" in figs
        else next(f for t, f in figs.items() if t.startswith("sink_mass per head"))
    )
    assert (sink["layout"]["coloraxis"]["cmin"], sink["layout"]["coloraxis"]["cmax"]) == (0, 1)
    ent = next(f for t, f in figs.items() if t.startswith("entropy per head"))
    assert ent["layout"]["coloraxis"].get("cmin") is None, "entropy (nats) is not forced into [0, 1]"
    curve = figs["sink_mass by layer"]
    assert curve["layout"]["yaxis"]["range"] == [-0.02, 1.02]
    assert any(t.startswith("sink_mass vs entropy") for t in figs), "sink vs entropy scatter where both ran"


def test_definitions_are_copied_from_the_metrics_document(report_run, tmp_path):
    doc = tmp_path / "metrics.md"
    doc.write_text(
        "# Metrics\n\n## Conventions\n\nPadding never counts.\n\n## Probe sink\n\nSource: Gu et al.\n\n"
        "## `sink_mass`\n\nThe first token's share, see [entropy](#entropy), [conventions](#conventions) "
        "and [x](#nowhere). "
        "<b>bold</b>\n\n## entropy\n\nRow entropy in nats.\n"
    )
    text = build_report(report_run / "run", docs=doc)
    sec = re.search(r'<section class="def" id="def-sink_mass">(.*?)</section>', text, re.S).group(1)
    assert "The first token&#x27;s share" in sec or "The first token's share" in sec
    assert 'href="#def-entropy"' in sec and "<b>bold</b>" not in sec, "links rewritten, raw HTML escaped"
    assert (
        'href="#doc-conventions"' in sec
        and '<section class="def" id="doc-conventions"><h4>Conventions</h4><p>Padding never counts.' in text
    )
    assert "nowhere" not in sec and ">x<" not in sec.replace("<p>", ""), (
        "a link to a section the page lacks keeps only its text"
    )
    assert "metrics.md#sink_mass" in sec
    # a metric the document lacks falls back to the probe's docstring
    assert "probes/induction.py (docstring)" in re.search(r'id="def-prev_token">(.*?)</section>', text, re.S).group(1)


def test_roles_flag_changes_the_atlas_and_bad_flags_fail_cleanly(report_run, tmp_path, capsys):
    out = tmp_path / "r.html"
    assert (
        main(
            ["report", str(report_run / "run"), "--out", str(out), "--roles", "sink=0.05,induction=off,prev_token=0.99"]
        )
        == 0
    )
    text = out.read_text()
    assert "sink_mass &gt;= 0.05" in text and "prev_token &gt;= 0.99" in text
    assert ">induction</td>" not in text.split('id="atlas-thresholds"')[1].split("</table>")[0]
    assert "induction=off" not in text and "off here: induction" in text
    for flags, msg in [
        (["--roles", "bogus=1"], "unknown role"),
        (["--roles", "sink=x"], "not a number"),
        (["--labels", "a,b"], "2 labels for 1 runs"),
    ]:
        bad = tmp_path / "bad.html"
        assert main(["report", str(report_run / "run"), "--out", str(bad), *flags]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error:") and msg in err and "fix:" in err and "Traceback" not in err
        assert not bad.exists()
    assert main(["report", str(tmp_path / "missing"), "--out", str(tmp_path / "m.html")]) == 2
    assert "does not exist" in capsys.readouterr().err


def depth_traces(text: str, metric: str = "entropy") -> dict[str, list[float]]:
    (prof,) = [f for f in figures(text) if f["layout"]["title"]["text"] == f"{metric} by relative depth"]
    return {
        t["name"].split(":")[0]: array(t["x"]).tolist() for t in prof["data"] if t["name"].endswith("mean over heads")
    }


@pytest.mark.parametrize("layout", ["one sweep", "two runs"])
def test_compare_models_of_different_depth(depth_runs, layout, tmp_path):
    runs = [depth_runs["both"]] if layout == "one sweep" else [depth_runs["a"], depth_runs["b"]]
    out = tmp_path / "cmp.html"
    assert main(["report", *map(str, runs), "--out", str(out)]) == 0
    text = out.read_text()
    assert 'id="comparison"' in text and 'id="comparison-table"' in text
    assert depth_traces(text) == {"llama3": [0, 0.5, 1], "llama5": [0, 0.25, 0.5, 0.75, 1]}
    grids = re.findall(r'<div class="atlas-title">(.*?)</div><div class="atlas-sub">(\d+) layers x (\d+) heads', text)
    assert grids == [("llama3", "3", "4"), ("llama5", "5", "4")], "per-model atlas grids side by side"
    titles = [f["layout"]["title"]["text"] for f in figures(text)]
    assert any(t.startswith("entropy: difference of layer means by relative depth (minus llama3)") for t in titles)
    side = next(f for f in figures(text) if f["layout"]["title"]["text"] == "sink_mass per head")
    assert [a["text"] for a in side["layout"]["annotations"]] == ["llama3", "llama5"] and len(side["data"]) == 2
    assert "llama3</b> (3 layers x 4 heads = 12 heads" in text and "llama5</b> (5 layers x 4 heads = 20 heads" in text


def test_compare_two_runs_of_one_model_per_head_and_by_config(depth_runs, tmp_path):
    copy = tmp_path / "a-again"
    shutil.copytree(depth_runs["a"], copy)
    cfg = tmp_path / "report.toml"
    cfg.write_text(
        f'runs = ["{depth_runs["a"]}", "a-again"]\nlabels = ["first", "second"]\ntitle = "two seeds"\n'
        'out = "cfg.html"\n[roles]\nsink = 0.9\necho = "off"\n'
    )
    assert main(["report", "--config", str(cfg)]) == 0
    text = (tmp_path / "cfg.html").read_text()
    assert '<h1 id="top">two seeds</h1>' in text and "sink_mass &gt;= 0.9" in text and "off here: echo" in text
    assert re.findall(r'<div class="atlas-title">(.*?)</div>', text) == ["first · llama3", "second · llama3"]
    diffs = [f for f in figures(text) if "minus" in f["layout"]["title"]["text"] and f["data"][0]["type"] == "heatmap"]
    assert diffs and all(np.nan_to_num(array(f["data"][0]["z"])).max() == 0 for f in diffs), (
        "same shape: per-head difference, 0 here"
    )
    assert all(array(f["data"][0]["z"]).shape == (3, 4) for f in diffs)
    assert diffs[0]["data"][0]["zmid"] == 0


def test_circuits_in_a_run_folder_join_the_atlas_and_get_a_graph(report_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(report_run / "run", run)
    model = str(load_results(run).model.iloc[0])
    (run / "circuits" / "ioi").mkdir(parents=True)
    (run / "circuits" / "ioi" / "circuit.json").write_text(
        json.dumps(
            {
                "task": "ioi",
                "model": model,
                "nodes": [
                    {"layer": 2, "head": 3, "effect": -0.6, "round": 1, "role": "name mover, induction"},
                    {"layer": 1, "head": 0, "effect": 0.2, "round": 2, "role": "S-inhibition"},
                ],
                "edges": [
                    {
                        "sender_layer": 2,
                        "sender_head": 3,
                        "receiver_layer": 3,
                        "receiver_head": -1,
                        "receiver": "logits",
                        "effect": -0.6,
                    },
                    {
                        "sender_layer": 1,
                        "sender_head": 0,
                        "receiver_layer": 2,
                        "receiver_head": 3,
                        "receiver": "2.3",
                        "effect": 0.2,
                    },
                ],
                "faithfulness": {"faithfulness": 0.8, "ld_circuit": 2.4, "ld_clean": 3.0, "ld_all_heads_ablated": 0.1},
            }
        )
    )
    text = build_report(run)
    assert 'id="circuits"' in text and "faithfulness 0.8 (logit difference 2.4 with only the circuit of 3 clean" in text
    graph = next(f for f in figures(text) if f["layout"]["title"]["text"] == "ioi circuit (llama)")
    negative = next(t for t in graph["data"] if t.get("text", "").endswith("-0.600"))
    assert negative["line"]["color"] == "crimson" and "red = patching the path lowers the logit difference" in text
    data = json.loads(re.search(r'<script id="wb-atlas" type="application/json">(.*?)</script>', text, re.S).group(1))
    assert [r[0] for r in data[0]["roles"]["2.3"]][-1] == "name mover" and data[0]["roles"]["1.0"][-1][
        0
    ] == "S-inhibition"
    assert "circuit discovery label" in text


def test_270_head_report_with_every_probe_stays_under_10_mb(tmp_path):
    from benchmarks.bench_report import synthetic_run

    out = tmp_path / "big.html"
    assert main(["report", str(synthetic_run(tmp_path / "run")), "--out", str(out)]) == 0
    text = out.read_text()
    assert out.stat().st_size < 10e6
    for probe in ("entropy", "sink", "streaming", "induction", "retrieval", "context", "vhd", "patch-path"):
        assert f'id="probe-{probe}"' in text
    assert "t_vhd per generated token" in text and len(figures(text)) > 30


@needs_browser
def test_report_renders_in_headless_chromium(report_run):
    html_file = report_run / "report.html"
    n_figs = len(figures(html_file.read_text()))
    with open_page(html_file) as s:
        page = s.page
        assert page.locator(".js-plotly-plot").count() == n_figs > 0, "every figure became a plotly plot"
        assert page.locator(".js-plotly-plot .main-svg").count() >= n_figs
        assert page.locator("g.heatmaplayer, g.scatterlayer").count() >= n_figs, "plots have data traces"
        assert page.locator("#toc a").count() > 10 and page.locator("#toc").is_visible()
        assert page.locator("#top-heads-table tbody tr").count() >= 8 and page.locator("#top-heads-table").is_visible()
        assert page.locator("table.atlas td[data-s]").count() == 12
        ARTIFACTS.mkdir(exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / "report.png"))
        # hover the head with the most roles: the tooltip names it, all its roles and every metric measured on it
        cells = page.locator("table.atlas td.has")
        n_chips = [cells.nth(i).locator(".chip").count() for i in range(cells.count())]
        cell = cells.nth(n_chips.index(max(n_chips)))
        assert max(n_chips) >= 2
        layer, head = cell.get_attribute("data-l"), cell.get_attribute("data-h")
        assert not page.locator("#atlas-tip").is_visible()
        cell.hover()
        tip = page.locator("#atlas-tip")
        tip.wait_for(state="visible", timeout=5000)
        text = tip.inner_text()
        assert f"layer {layer}, head {head}" in text and text.count("role ") == max(n_chips)
        for metric in ("entropy", "entropy_norm", "sink_mass", "sink_rate", "prev_token", "echo", "streaming"):
            assert re.search(rf"^{metric}\t", text, re.M), (metric, text)
        page.mouse.move(0, 0)
        tip.wait_for(state="hidden", timeout=5000)
        assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page.content()
        errors = [c for c in s.console if re.match(r"(error|warning)", c)] + s.errors
        assert not errors, errors
        assert not [u for u in s.requests if not u.startswith(("file:", "data:", "blob:", "about:"))], (
            "offline: no network requests"
        )
    assert int(page_attr(html_file)) > 0
    assert (ARTIFACTS / "report.png").stat().st_size > 10_000


def page_attr(html_file: Path) -> str:
    with open_page(html_file) as s:
        return s.page.get_attribute("body", "data-rendered-ms")


@needs_browser
def test_comparison_report_renders_without_errors(depth_runs, tmp_path):
    out = tmp_path / "cmp.html"
    assert main(["report", str(depth_runs["a"]), str(depth_runs["b"]), "--out", str(out)]) == 0
    with open_page(out) as s:
        assert s.page.locator(".js-plotly-plot").count() == len(figures(out.read_text()))
        assert s.page.locator("table.atlas").count() == 2
        s.page.locator('table.atlas[data-series="1"] td[data-l="4"][data-h="3"]').hover()
        assert "llama5: layer 4, head 3 (relative depth 1.00)" in s.page.locator("#atlas-tip").inner_text()
        assert not [c for c in s.console if c.startswith("error")] and not s.errors


@pytest.mark.parametrize(
    "text, message",
    [
        ('runs = "runs/a"\n', "top level.runs: expected a list"),
        ('runs = ["a"]\ncolour = "red"\n', "top level: unknown key 'colour'"),
        ('runs = ["a"]\n[roles]\nsink = [1]\n', "top level.roles"),
        ("runs = [", "is not valid TOML"),
    ],
)
def test_bad_report_configs_are_one_error_naming_the_key(tmp_path, text, message):
    from workbench.errors import WorkbenchError
    from workbench.report.config import load_report_config

    cfg = tmp_path / "report.toml"
    cfg.write_text(text)
    with pytest.raises(WorkbenchError, match=re.escape(message)):
        load_report_config(cfg)


def test_report_config_paths_are_beside_the_file(tmp_path):
    from workbench.report.config import load_report_config

    cfg = tmp_path / "sub" / "report.toml"
    cfg.parent.mkdir()
    cfg.write_text('runs = ["a", "/abs/b", "s3://bucket/c"]\nout = "r.html"\n[roles]\nsink = 0.6\necho = "off"\n')
    got = load_report_config(cfg)
    assert got["runs"] == [str(cfg.parent / "a"), "/abs/b", "s3://bucket/c"] and got["out"] == str(
        cfg.parent / "r.html"
    )
    assert got["thresholds"] == {"sink": 0.6, "echo": None}
