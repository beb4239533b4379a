"""The report's KV-cache section: every number against a slow loop over its definition on a
synthetic grid (two models, two protocols, niah and loss, scored and random selectors over five
seeds, uneven item counts n, missing values, tied points), and the section in a real report
page: offline, present only when a run has KV rows."""

from __future__ import annotations

import itertools
import json
import re

import numpy as np
import pandas as pd
import pytest

from tests.test_report import array, figures, needs_browser
from workbench.errors import WorkbenchError
from workbench.protocol.table import COLUMNS
from workbench.report import kv
from workbench.report.build import build_report
from workbench.runs.parquet import run_metadata, write_parquet

MODELS = ("smol", "gemma")
PROTOCOLS = ("question-agnostic", "question-aware")
BUDGETS = (0.1, 0.25, 0.5, 0.75)
LENGTHS = (1024, 2048)
DEPTHS = (0.0, 50.0, 100.0)
GAIN = {"retrieval": 2.0, "duo": 1.2, "random": 0.6}
SELECTORS = {"full": ([1.0], [-1]), "retrieval": (BUDGETS, [-1]), "duo": (BUDGETS, [-1]), "random": (BUDGETS, range(5))}


def grid(seed: int = 0) -> pd.DataFrame:
    """A tidy grid as `workbench kv` writes it; kv_fraction grows with length (the fixed sliding cost)."""
    rng = np.random.default_rng(seed)
    rows = []
    for model, proto, (task, metric) in itertools.product(
        MODELS, PROTOCOLS, [("niah", "accuracy"), ("loss", "loss"), ("loss", "delta_loss")]
    ):
        for sel, (budgets, seeds) in SELECTORS.items():
            for budget, s, length in itertools.product(budgets, seeds, LENGTHS):
                frac = 1.0 if sel == "full" else min(1.0, budget * (0.8 + 0.2 * length / 2048) + 0.01 * (s + 1))
                for depth in DEPTHS if task == "niah" else [np.nan]:
                    n = int(rng.integers(1, 7))
                    p = 0.85 if sel == "full" else min(1.0, 0.2 + budget * GAIN[sel])  # accuracy rises with budget
                    value = rng.binomial(n, p) / n if metric == "accuracy" else rng.normal(0.5, 0.3)
                    rows.append(
                        {
                            "model": model,
                            "policy": "full" if sel == "full" else f"{sel}(b={budget})",
                            "selector": sel,
                            "budget": budget,
                            "kv_tokens": frac * length * 90,
                            "kv_fraction": frac,
                            "kv_bytes": 2 * 64 * 2 * frac * length * 90,
                            "head_sparsity": 1 - budget,
                            "task": task,
                            "protocol": proto,
                            "length": length,
                            "depth": depth,
                            "metric": metric,
                            "value": np.nan if task == "niah" and rng.random() < 0.05 else value,  # not measured
                            "seed": s,
                            "n": n,
                        }
                    )
    return pd.DataFrame(rows)


@pytest.fixture(scope="module")
def frame() -> pd.DataFrame:
    return kv.tidy(grid())


def slow_mean(rows: list[dict], col: str) -> float:
    rows = [r for r in rows if not np.isnan(r["value"]) and r["n"] > 0]
    return sum(r["n"] * r[col] for r in rows) / sum(r["n"] for r in rows)


def slow_points(frame: pd.DataFrame) -> dict[tuple, dict]:
    """Per (model, task, protocol, metric, selector, budget), with a plain loop over the rows."""
    groups: dict[tuple, list[dict]] = {}
    for r in frame.to_dict("records"):
        groups.setdefault(tuple(r[k] for k in kv.POINT_KEYS), []).append(r)
    out = {}
    for key, rows in groups.items():
        valued = [r for r in rows if not np.isnan(r["value"])]
        if not valued:
            continue
        out[key] = {
            "value": slow_mean(rows, "value"),
            "kv_fraction": slow_mean(rows, "kv_fraction"),
            "kv_bytes": slow_mean(rows, "kv_bytes"),
            "n": sum(r["n"] for r in valued),
            "kv_fraction_min": min(r["kv_fraction"] for r in valued),
            "kv_fraction_max": max(r["kv_fraction"] for r in valued),
            "seeds": len({r["seed"] for r in valued if r["seed"] >= 0}),
        }
    return out


def test_curve_points_are_n_weighted_means_over_lengths_depths_and_seeds(frame):
    points = kv.curve_table(frame)
    want = slow_points(frame)
    assert len(points) == len(want) > 100
    for p in points.to_dict("records"):
        w = want[tuple(p[k] for k in kv.POINT_KEYS)]
        for col, v in w.items():
            assert p[col] == pytest.approx(v, rel=1e-12, abs=1e-12), (col, p)
    assert set(points.loc[points["selector"] == "random", "seeds"]) == {5}


def dominated(p: dict, q: dict, higher: bool) -> bool:
    """q dominates p: no more memory and a value at least as good, one of the two strictly."""
    better_or_equal = q["value"] >= p["value"] if higher else q["value"] <= p["value"]
    strictly = q["kv_fraction"] < p["kv_fraction"] or q["value"] != p["value"]
    return q["kv_fraction"] <= p["kv_fraction"] and better_or_equal and strictly


def brute_front(frame: pd.DataFrame, by: list[str]) -> set[int]:
    rows = [(i, r) for i, r in frame.iterrows() if not (np.isnan(r["value"]) or np.isnan(r["kv_fraction"]))]
    keep = set()
    for i, p in rows:
        peers = [q for _, q in rows if all(q[k] == p[k] for k in by)]
        higher = p["metric"] not in ("loss", "delta_loss")
        if not any(dominated(p, q, higher) for q in peers):
            keep.add(i)
    return keep


@pytest.mark.parametrize("seed", range(4))
def test_pareto_front_is_the_brute_force_set_of_non_dominated_points(seed):
    rng = np.random.default_rng(seed)
    n = 120
    pts = pd.DataFrame(
        {
            "model": rng.choice(["a", "b"], n),
            "selector": rng.choice(["x", "y", "z"], n),
            "metric": rng.choice(["accuracy", "delta_loss"], n),
            "kv_fraction": rng.integers(1, 8, n) / 8,  # few values: many ties on x, on y and on both
            "value": rng.integers(0, 5, n) / 4,
        }
    )
    pts.loc[rng.choice(n, 6, replace=False), "value"] = np.nan
    for by in (["model", "metric", "selector"], ["model", "metric"]):
        got = kv.pareto_front(pts, by=by)
        assert set(got.index) == brute_front(pts, by), by
        assert all((g["kv_fraction"].diff().dropna() >= 0).all() for _, g in got.groupby(by))
    assert set(kv.pareto_front(pts).index) == brute_front(pts, ["model", "metric", "selector"])


def test_pareto_front_by_hand():
    pts = pd.DataFrame(
        {
            "metric": ["accuracy"] * 5 + ["delta_loss"] * 3,
            "kv_fraction": [0.1, 0.1, 0.2, 0.3, 0.3, 0.1, 0.2, 0.3],
            "value": [0.5, 0.5, 0.5, 0.9, 0.4, 0.3, 0.1, 0.1],
        }
    )
    got = kv.pareto_front(pts)
    # equal points both stay; the same value for more memory goes; lower loss is better
    assert list(got.index) == [0, 1, 3, 5, 6]


def test_pareto_front_of_the_grid_matches_brute_force(frame):
    points = kv.curve_table(frame)
    assert set(kv.pareto_front(points).index) == brute_front(points, kv.FRONT_KEYS)


def test_random_band_is_the_spread_over_seeds_of_each_seeds_mean(frame):
    band = kv.random_band(frame)
    rand = frame[(frame["selector"] == "random") & (frame["seed"] >= 0)]
    per_seed: dict[tuple, dict[float, list[dict]]] = {}
    for r in rand.to_dict("records"):
        per_seed.setdefault(tuple(r[k] for k in kv.POINT_KEYS), {}).setdefault(r["seed"], []).append(r)
    assert len(band) == len(per_seed) == len(MODELS) * len(PROTOCOLS) * 3 * len(BUDGETS)
    for b in band.to_dict("records"):
        seeds = per_seed[tuple(b[k] for k in kv.POINT_KEYS)]
        means = [slow_mean(rows, "value") for rows in seeds.values()]
        m = sum(means) / len(means)
        std = (sum((x - m) ** 2 for x in means) / (len(means) - 1)) ** 0.5
        assert b["seeds"] == len(means) == 5
        assert (b["mean"], b["std"], b["min"], b["max"]) == pytest.approx((m, std, min(means), max(means)), abs=1e-12)
        fr = [slow_mean(rows, "kv_fraction") for rows in seeds.values()]
        assert b["kv_fraction"] == pytest.approx(sum(fr) / len(fr), abs=1e-12)


def slow_keep(frame: pd.DataFrame, share: float) -> dict[tuple, float | None]:
    out = {}
    niah = frame[(frame["task"] == "niah") & (frame["metric"] == "accuracy")].to_dict("records")
    for model, proto in itertools.product(MODELS, PROTOCOLS):
        full = [r for r in niah if r["model"] == model and r["protocol"] == proto and r["selector"] == "full"]
        acc = slow_mean(full, "value") if full else float("nan")
        for sel in ("duo", "random", "retrieval"):
            best = None
            for budget in BUDGETS:
                rows = [
                    r
                    for r in niah
                    if (r["model"], r["protocol"], r["selector"], r["budget"]) == (model, proto, sel, budget)
                ]
                if rows and slow_mean(rows, "value") >= share * acc - 1e-12:
                    x = slow_mean(rows, "kv_fraction")
                    best = x if best is None else min(best, x)
            out[(model, proto, sel)] = best
    return out


@pytest.mark.parametrize("share", [0.5, 0.8, 0.95])
def test_fraction_to_keep_is_the_smallest_fraction_reaching_the_share_of_full_cache_accuracy(frame, share):
    got = kv.fraction_to_keep(frame, share=share)
    want = slow_keep(frame, share)
    assert len(got) == len(want)
    for r in got.to_dict("records"):
        w = want[(r["model"], r["protocol"], r["selector"])]
        assert r["reached"] == (w is not None)
        assert (r["kv_fraction"] == pytest.approx(w, abs=1e-12)) if w is not None else np.isnan(r["kv_fraction"])
    if share == 0.95:
        assert got["reached"].any() and not got["reached"].all(), "the grid exercises both outcomes"


def test_fraction_to_keep_by_hand_and_without_a_full_cache():
    rows = [
        ("full", 1.0, 1.0, 0.8),
        ("s", 0.2, 0.2, 0.5),
        ("s", 0.4, 0.4, 0.77),  # 0.77 >= 0.95 * 0.8 = 0.76
        ("s", 0.6, 0.6, 0.7),
        ("t", 0.5, 0.5, 0.1),
    ]
    f = kv.tidy(
        pd.DataFrame(
            [
                dict(
                    model="m",
                    policy=sel,
                    selector=sel,
                    budget=b,
                    kv_fraction=x,
                    kv_tokens=1,
                    kv_bytes=1,
                    head_sparsity=0,
                    task="niah",
                    protocol="p",
                    length=1024,
                    depth=0,
                    metric="accuracy",
                    value=v,
                    seed=-1,
                    n=3,
                )
                for sel, b, x, v in rows
            ]
        )
    )
    got = kv.fraction_to_keep(f).set_index("selector")
    assert got.loc["s", "kv_fraction"] == pytest.approx(0.4) and got.loc["s", "reached"]
    assert not got.loc["t", "reached"] and np.isnan(got.loc["t", "kv_fraction"])
    nofull = kv.fraction_to_keep(f[f["selector"] != "full"])
    assert nofull["full_accuracy"].isna().all() and not nofull["reached"].any()
    html = kv._keep_table(got.reset_index(), 0.95) + kv._keep_table(nofull, 0.95)
    assert "not reached" in html and "no full-cache rows" in html and "0.400 (budget 0.4" in html


def test_length_depth_grid_matches_a_loop(frame):
    sub = frame[frame["model"] == "smol"]
    got = kv.length_depth(sub, "random", 0.25, "question-aware")
    assert got.shape == (len(LENGTHS), len(DEPTHS))
    for length, depth in itertools.product(LENGTHS, DEPTHS):
        rows = sub[
            (sub["task"] == "niah")
            & (sub["protocol"] == "question-aware")
            & (sub["selector"] == "random")
            & (sub["budget"] == 0.25)
            & (sub["length"] == length)
            & (sub["depth"] == depth)
        ].to_dict("records")
        assert got.loc[length, depth] == pytest.approx(slow_mean(rows, "value"), abs=1e-12)


@pytest.mark.parametrize(
    "n, text",
    [
        (0, "0 B"),
        (1023, "1023 B"),
        (1023.6, "1.00 KiB"),
        (1024, "1.00 KiB"),
        (1536, "1.50 KiB"),
        (10 * 1024, "10.0 KiB"),
        (1023.9 * 1024, "1.00 MiB"),
        (12.34 * 2**20, "12.3 MiB"),
        (345.6 * 2**20, "346 MiB"),
        (3.25 * 2**30, "3.25 GiB"),
        (2**40, "1.00 TiB"),
        (float("nan"), "n/a"),
        (-1, "n/a"),
        (None, "n/a"),
    ],
)
def test_kv_bytes_in_binary_units(n, text):
    assert kv.human_bytes(n) == text


def results_rows(frame: pd.DataFrame) -> pd.DataFrame:
    """KV grid rows as the run folder holds them: the results columns (probe kv, layer = head = -1) plus the grid's."""
    out = frame.assign(probe="kv", dataset=frame["task"].map({"niah": "niah", "loss": "prose"}), layer=-1, head=-1)
    out["n"] = out["n"].astype("int64")
    out["seed"] = out["seed"].astype("int64")
    return out[COLUMNS + [c for c in kv.GRID_COLUMNS if c not in COLUMNS]]


def head_rows() -> pd.DataFrame:
    rng = np.random.default_rng(1)
    return pd.DataFrame(
        [
            {"model": "smol", "dataset": "prose", "probe": "entropy", "metric": "entropy", "layer": layer, "head": h}
            | {"value": float(rng.random()), "n": 10}
            for layer in range(3)
            for h in range(4)
        ]
    )


def test_kv_rows_are_recognised_by_probe_or_kind_and_refused_without_grid_columns(frame):
    table = pd.concat([head_rows(), results_rows(frame)], ignore_index=True)
    rows, rest = kv.split_kv(table)
    assert len(rows) == len(frame) and list(rest["probe"].unique()) == ["entropy"]
    by_kind = table.assign(probe=np.where(table["probe"] == "kv", "grid", table["probe"]))
    by_kind["kind"] = np.where(by_kind["probe"] == "grid", "kv", None)
    assert len(kv.split_kv(by_kind)[0]) == len(frame)
    assert kv.split_kv(head_rows())[0].empty
    with pytest.raises(WorkbenchError, match="kv_fraction"):
        kv.split_kv(table.drop(columns=["kv_fraction"]))


@pytest.fixture(scope="module")
def kv_report(frame, tmp_path_factory):
    root = tmp_path_factory.mktemp("kvreport")
    parts = root / "run" / "parts"
    write_parquet(results_rows(frame), parts / "kv.parquet", run_metadata(kind="kv"))
    write_parquet(head_rows(), parts / "heads.parquet", run_metadata())
    write_parquet(head_rows(), root / "plain.parquet", run_metadata())
    html = root / "report.html"
    html.write_text(build_report(root / "run"))
    return root, html.read_text()


def test_the_section_is_in_the_report_offline_with_the_grid_numbers(frame, kv_report):
    _, text = kv_report
    body = text.split("<body>")[1]
    assert 'id="kv"' in body and 'id="kv-smol"' in body and 'id="kv-gemma"' in body
    assert 'id="probe-kv"' not in body, "KV rows are not a probe section"
    assert body.index('id="probe-entropy"') < body.index('id="kv"') < body.index('id="definitions"')
    assert not re.search(r"<script[^>]*\bsrc=", text)
    markup = re.sub(r"<script[^>]*>.*?</script>", "", text, flags=re.S)
    assert not re.search(r"""(href|src)=["']?(https?:)?//""", markup), "nothing loaded from outside the page"
    assert "not reached" in body and 'id="kv-keep"' in body
    figs = figures(text)
    points = kv.curve_table(frame)
    want = points[
        (points["model"] == "smol")
        & (points["task"] == "niah")
        & (points["selector"] == "duo")
        & (points["protocol"] == "question-aware")
    ]
    curve = next(
        t
        for f in figs
        for t in f["data"]
        if "smol: niah accuracy" in json.dumps(f["layout"].get("title")) and t.get("name") == "duo (question-aware)"
    )
    assert array(curve["x"]) == pytest.approx(want["kv_fraction"].to_numpy(), rel=1e-4)
    assert array(curve["y"]) == pytest.approx(want["value"].to_numpy(), rel=1e-4)
    hover = curve["hovertext"][0]
    first = want.iloc[0]
    for part in (
        f"policy: {first['policy']}",
        "budget: 0.1<",
        f"kv_fraction: {first['kv_fraction']:.3f}",
        f"kv_bytes: {kv.human_bytes(first['kv_bytes'])} ",
        "MiB",
        f"head_sparsity: {first['head_sparsity']:.3g}",
        f"n = {int(first['n'])}",
    ):
        assert part in hover, (part, hover)
    assert any("kv_fraction" in json.dumps(f["layout"].get("xaxis", {}).get("title")) for f in figs)
    assert not any("sparsity" in json.dumps(f["layout"].get("xaxis", {}).get("title")) for f in figs)
    bands = [t for f in figs for t in f["data"] if t.get("fill") == "toself"]
    assert bands and all("over 5 seeds" in t["name"] for t in bands)


def test_no_section_without_kv_rows(kv_report):
    root, _ = kv_report
    text = build_report(root / "plain.parquet")
    assert 'id="kv"' not in text and "KV-cache policies" not in text and 'id="probe-entropy"' in text


@needs_browser
def test_the_section_renders_in_chromium_without_errors(kv_report):
    from tests.browser import open_page

    root, text = kv_report
    with open_page(root / "report.html") as s:
        assert s.page.locator("#kv ~ figure .js-plotly-plot").count() >= 6
        assert not [c for c in s.console if re.match(r"(error|warning)", c)] and not s.errors
        assert not [u for u in s.requests if not u.startswith(("file:", "data:", "blob:", "about:"))]


def test_a_run_of_kv_rows_alone_with_one_task_and_protocol_and_no_random_or_full_rows(frame, tmp_path):
    part = frame[
        (frame["task"] == "niah")
        & (frame["protocol"] == "question-aware")
        & ~frame["selector"].isin(["random", "full"])
        & (frame["model"] == "smol")
    ]
    write_parquet(results_rows(part), tmp_path / "run" / "parts" / "kv.parquet", run_metadata())
    text = build_report(tmp_path / "run")
    body = text.split("<body>")[1]
    assert 'id="kv-smol"' in body and "no full-cache rows" in body and "over lengths" in text
    figs = [f for f in figures(text) if "smol" in json.dumps(f["layout"].get("title"))]
    assert len(figs) == 3, "curves, Pareto fronts and the heatmap; no loss figures without loss rows"
    assert not [t for f in figs for t in f["data"] if t.get("fill") == "toself"], "no band without random rows"
