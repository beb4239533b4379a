"""The report's head-gating section, on a real tiny gate run (``workbench.runs.gate.gate_heads`` on
the tiny Llama, task aba, two initialisations, the closing check): the role grid's cells, colours
and hover against roles recomputed from the ``gate`` rows by the definition (open = gate >= 0.5;
consensus = the most frequent role over initialisations, ties in the order facilitating,
irrelevant, interfering, ambiguous), the loss curves and the closing check against loops over the
rows, the path-patching scatter on rows with direct effects added, and the section's absence
without gate rows."""

from __future__ import annotations

import json
import re
import statistics
from collections import Counter

import numpy as np
import pandas as pd
import pytest

from tests.test_report import array, figures
from workbench.errors import WorkbenchError
from workbench.report import gate
from workbench.report.build import build_report
from workbench.report.page import fmt
from workbench.runs.load import load_results
from workbench.runs.parquet import run_metadata, write_parquet

ORDER = ("facilitating", "irrelevant", "interfering", "ambiguous")
CODES = {"facilitating": "F", "irrelevant": "I", "interfering": "X", "ambiguous": "A"}


@pytest.fixture(scope="module")
def gate_run(tiny_models, tmp_path_factory):
    from workbench.runs.gate import gate_heads

    root = tmp_path_factory.mktemp("gate-report")
    model = tiny_models["llama"]
    gate_heads(
        model,
        root / "run",
        task="aba",
        n=16,
        updates=3,
        reg_updates=3,
        n_inits=2,
        batch_size=8,
        check=True,
        log=lambda _: None,
    )
    rows = load_results(root / "run")
    write_parquet(head_rows(model.name), root / "plain.parquet", run_metadata())
    text = build_report(root / "run")
    (root / "report.html").write_text(text)
    return root, rows, text


def head_rows(model: str) -> pd.DataFrame:
    """Ordinary probe rows (a sweep's entropy) for 3 layers x 4 heads."""
    rng = np.random.default_rng(1)
    return pd.DataFrame(
        [
            {"model": model, "dataset": "prose", "probe": "entropy", "metric": "entropy", "layer": layer, "head": h}
            | {"value": float(rng.random()), "n": 10}
            for layer in range(3)
            for h in range(4)
        ]
    )


# -- the definition, re-computed slowly from the gate rows ----------------------------------------------


def slow_roles(rows: pd.DataFrame) -> dict[tuple[int, int], dict]:
    """Per head: each init's role from its G+ and G-, the consensus (ties in ORDER), its share,
    and the G+ / G- means over inits, with plain loops over the ``gate`` rows."""
    gates: dict[tuple[str, int, int, int], float] = {}
    for r in rows[rows["metric"] == "gate"].to_dict("records"):
        gates[(r["stage"], int(r["init"]), int(r["layer"]), int(r["head"]))] = float(r["value"])
    inits = sorted({k[1] for k in gates})
    heads = sorted({(k[2], k[3]) for k in gates})
    out = {}
    for layer, head in heads:
        per_init = []
        for i in inits:
            pos, neg = gates[("positive", i, layer, head)] >= 0.5, gates[("negative", i, layer, head)] >= 0.5
            if pos and neg:
                per_init.append("facilitating")
            elif pos:
                per_init.append("irrelevant")
            elif not neg:
                per_init.append("interfering")
            else:
                per_init.append("ambiguous")
        counts = Counter(per_init)
        top = max(counts.values())
        role = [r for r in ORDER if counts[r] == top][0]
        out[(layer, head)] = {
            "role": role,
            "share": top / len(inits),
            "g_pos": sum(gates[("positive", i, layer, head)] for i in inits) / len(inits),
            "g_neg": sum(gates[("negative", i, layer, head)] for i in inits) / len(inits),
            "inits": len(inits),
        }
    return out


def trace(text: str, title: str, name: str | None = None) -> dict:
    hits = [
        t
        for f in figures(text)
        for t in f["data"]
        if title in json.dumps(f["layout"].get("title")) and (name is None or t.get("name") == name)
    ]
    assert len(hits) == 1, (title, name, len(hits))
    return hits[0]


def colour_at(trace_: dict, z: float) -> str:
    """The colour a stepped plotly colour scale gives ``z`` (strictly inside a step)."""
    p = (z - trace_["zmin"]) / (trace_["zmax"] - trace_["zmin"])
    scale = trace_["colorscale"]
    for (lo, c_lo), (hi, c_hi) in zip(scale, scale[1:]):
        if lo < p < hi:
            assert c_lo == c_hi, "a stepped scale"
            return c_lo
    raise AssertionError(f"z {z} falls on a step's edge")


# -- tests ----------------------------------------------------------------------------------------------


def test_the_role_grid_shows_the_consensus_role_of_every_head_recomputed_from_the_gates(gate_run):
    _, rows, text = gate_run
    want = slow_roles(rows)
    assert len(want) == 12 and {w["inits"] for w in want.values()} == {2}
    shares = {w["share"] for w in want.values()}
    assert shares == {0.5, 1.0}, "the run has heads where the two inits disagree, so the tie order is tested"
    table = rows[rows["metric"] == "role_agreement"]
    assert {(int(r.layer), int(r.head)): r.role for r in table.itertuples()} == {k: w["role"] for k, w in want.items()}

    grid = trace(text, "head roles from gates")
    z = array(grid["z"])
    assert z.shape == (3, 4)
    colours = {}
    for (layer, head), w in want.items():
        role = w["role"]
        assert z[layer, head] == ORDER.index(role), (layer, head, role)
        assert grid["text"][layer][head] == CODES[role]
        colours[role] = colour_at(grid, z[layer, head])
        assert colours[role] == gate.ROLE_COLOURS[role]
        hover = grid["hovertext"][layer][head]
        for part in (
            f"layer {layer}, head {head}<",
            f"role: {role}<",
            f"agreement: {fmt(w['share'])} of 2 init(s)",
            f"G+ mean: {fmt(w['g_pos'])}<",
            f"G- mean: {fmt(w['g_neg'])}",
        ):
            assert part in hover, (part, hover)
    assert len(set(gate.ROLE_COLOURS.values())) == 4
    assert [colour_at(grid, i) for i in range(4)] == [gate.ROLE_COLOURS[r] for r in ORDER]
    assert grid["colorbar"]["ticktext"] == list(ORDER)


def test_the_loss_curves_are_the_nll_rows_per_stage(gate_run):
    _, rows, text = gate_run
    for stage in ("none", "positive", "negative"):
        mine = sorted(
            (int(r["update"]), float(r["value"]))
            for r in rows.to_dict("records")
            if r["metric"] == "nll" and r["stage"] == stage
        )
        assert [u for u, _ in mine] == [1, 2, 3]
        line = trace(text, "target NLL per update", stage)
        assert array(line["x"]).tolist() == [u for u, _ in mine]
        assert array(line["y"]) == pytest.approx([v for _, v in mine], rel=1e-4)


def test_the_closing_check_shows_each_role_and_random_heads_as_mean_and_std_over_seeds(gate_run):
    _, rows, text = gate_run
    bars = trace(text, "closing heads by role")
    checks = [r for r in rows.to_dict("records") if r["metric"] == "check_delta_nll"]
    want = {}
    for closed in ("none", "irrelevant", "random_irrelevant", "facilitating", "interfering", "random"):
        vals = [r["value"] for r in checks if r["closed"] == closed]
        if not vals:
            continue
        n = {int(r["n_closed"]) for r in checks if r["closed"] == closed}
        assert len(n) == 1
        std = statistics.stdev(vals) if closed.startswith("random") else 0.0
        want[f"{closed} ({n.pop()})"] = (statistics.fmean(vals), std)
    for k in sorted({int(r["n_closed"]) for r in checks if r["closed"] == "facilitating_top"}):
        for closed in ("facilitating_top", "random_top"):  # the graded check, each k's pair side by side
            vals = [r["value"] for r in checks if r["closed"] == closed and int(r["n_closed"]) == k]
            std = statistics.stdev(vals) if closed == "random_top" else 0.0
            want[f"{closed} ({k})"] = (statistics.fmean(vals), std)
    assert len([r for r in checks if r["closed"] == "random"]) == 5
    assert bars["x"] == list(want)
    assert array(bars["y"]) == pytest.approx([m for m, _ in want.values()], rel=1e-4, abs=1e-9)
    assert array(bars["error_y"]["array"]) == pytest.approx([s for _, s in want.values()], rel=1e-4, abs=1e-9)
    assert want["random (3)"][1] > 0


def test_g_minus_against_direct_effects_and_the_agreement_table(gate_run, tmp_path):
    """An aba run has no path patching; direct effects and agreement rows as `workbench gate`
    writes them on IOI are added to its rows."""
    _, rows, _ = gate_run
    base = rows[rows["metric"] == "role_agreement"]
    patch = base.assign(metric="direct_effect", role="", value=[(-1) ** i * 0.1 * i for i in range(len(base))])
    agree = pd.DataFrame(
        {
            "metric": list(gate.AGREEMENT),
            "value": [2.0, 0.25, 3.0, 0.5, 2.0, 1.0],
            "n_closed": [4, 4, 4, 4, 3, 1],
            "layer": -1,
            "head": -1,
        }
    )
    extra = pd.concat([patch, agree.assign(**{c: rows[c].iloc[0] for c in ("model", "dataset", "probe", "n")})])
    write_parquet(
        pd.concat([rows, extra], ignore_index=True), tmp_path / "run" / "parts" / "gate.parquet", run_metadata()
    )
    text = build_report(tmp_path / "run")
    want = slow_roles(rows)
    effect = {(int(r.layer), int(r.head)): abs(r.value) for r in patch.itertuples()}
    seen = 0
    for role in ORDER:
        heads = sorted(k for k, w in want.items() if w["role"] == role)
        if not heads:
            continue
        dots = trace(text, "G- against path patching", role)
        assert dots["marker"]["color"] == gate.ROLE_COLOURS[role]
        got = sorted(zip(array(dots["x"]).tolist(), array(dots["y"]).tolist()))
        expected = sorted((want[k]["g_neg"], effect[k]) for k in heads)
        assert np.asarray(got) == pytest.approx(np.asarray(expected), rel=1e-4)
        seen += len(heads)
    assert seen == 12
    table = re.search(r'<table class="tbl gate-agree">(.*?)</table>', text, re.S).group(1)
    cells = re.findall(r"<tr><td><code>(\w+)</code></td><td>[^<]*</td><td>([^<]*)</td><td>([^<]*)</td></tr>", table)
    assert cells == [
        ("agree_overlap", "2", "4"),
        ("agree_spearman", "0.25", "4"),
        ("agree_top_facilitating", "3", "4"),
        ("agree_spearman_signed", "0.5", "4"),
        ("agree_supporting_facilitating", "2", "3"),
        ("agree_opposing_interfering", "1", "1"),
    ]


def test_a_gate_only_report_is_offline_and_gates_are_no_probe(gate_run):
    _, _, text = gate_run
    body = text.split("<body>")[1]
    assert 'id="gate"' in body and re.search(r'id="gate-[^"]*-aba"', body)
    assert 'id="probe-gate"' not in body, "gate rows are not a probe section"
    assert "gate_mean" not in re.search(r'id="top-heads".*?</table>', body, re.S).group(0)
    assert not re.search(r"<script[^>]*\bsrc=", text)
    markup = re.sub(r"<script[^>]*>.*?</script>", "", text, flags=re.S)
    assert not re.search(r"""(href|src)=["']?(https?:)?//""", markup), "nothing loaded from outside the page"


def test_sweep_rows_and_gate_rows_together_and_no_section_without_gate_rows(gate_run):
    root, _, _ = gate_run
    both = build_report([root / "run", root / "plain.parquet"]).split("<body>")[1]
    assert 'id="probe-entropy"' in both and 'id="gate"' in both and 'id="probe-gate"' not in both
    assert both.index('id="atlas"') < both.index('id="gate"') < both.index('id="probe-entropy"')
    plain = build_report(root / "plain.parquet")
    assert 'id="gate"' not in plain and "Head gates" not in plain and 'id="probe-entropy"' in plain


def test_gate_rows_without_the_gate_columns_are_refused(gate_run):
    _, rows, _ = gate_run
    mine, rest = gate.split_gate(pd.concat([rows, head_rows("m")], ignore_index=True))
    assert len(mine) == len(rows) and list(rest["probe"].unique()) == ["entropy"]
    assert gate.split_gate(head_rows("m"))[0].empty
    with pytest.raises(WorkbenchError, match="stage"):
        gate.split_gate(rows.drop(columns=["stage"]))
