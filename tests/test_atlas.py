"""Head atlas, metric kinds, definitions and the comparison figures, on synthetic tables
(checked against direct loops over heads, not against the code's own helpers)."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pandas as pd
import pytest

import workbench
from workbench.errors import WorkbenchError
from workbench.protocol.metrics import KINDS
from workbench.report import definitions, kinds, plots
from workbench.report.atlas import atlas, parse_thresholds, probe_roles, roles_with

DATASETS = ("prose", "repeated-random")


def synthetic(models=(("m3", 3, 4), ("m5", 5, 4)), seed=0) -> pd.DataFrame:
    """Every role metric on two datasets for each model, with NaNs and per-item rows mixed in."""
    rng = np.random.default_rng(seed)
    rows = []
    for model, n_layers, n_heads in models:
        for metric, ds, layer, head in itertools.product(
            sorted({r.metric for r in probe_roles()} | {"entropy"}), DATASETS, range(n_layers), range(n_heads)
        ):
            v = (
                rng.normal(0, 0.5)
                if metric == "context_direct_effect"
                else rng.uniform(0, 4)
                if metric == "entropy"
                else rng.random()
            )
            if rng.random() < 0.1:
                v = math.nan
            rows.append(
                {
                    "model": model,
                    "dataset": ds,
                    "probe": "p",
                    "metric": metric,
                    "layer": layer,
                    "head": head,
                    "value": v,
                    "n": int(rng.integers(1, 50)),
                }
            )
        rows.append(
            {
                "model": model,
                "dataset": "cf",
                "probe": "context",
                "metric": "follows_context",
                "layer": -1,
                "head": -1,
                "value": 1.0,
                "n": 1,
            }
        )
    return pd.DataFrame(rows)


def expected_roles(table: pd.DataFrame, roles) -> dict:
    """(model, layer, head, role) -> strongest passing value, by a plain loop over the rows."""
    out: dict = {}
    for r in table.itertuples():
        if r.layer < 0 or not isinstance(r.value, float) or math.isnan(r.value):
            continue
        for role in roles:
            if role.metric != r.metric:
                continue
            v = r.value * role.sign
            if (v > role.threshold) if role.strict else (v >= role.threshold):
                key = (r.model, r.layer, r.head, role.name)
                out[key] = max(out.get(key, -math.inf), v)
    return {k: v for k, v in out.items()}


@pytest.mark.parametrize(
    "thresholds", [None, {"sink": 0.8, "induction": None, "context_direct_effect": 0.1, "previous_token": 0.05}]
)
def test_atlas_matches_a_direct_loop_over_heads(thresholds):
    table = synthetic()
    got = atlas(table, thresholds=thresholds)
    want = expected_roles(table, roles_with(thresholds))
    assert len(want) > 20
    assert set(zip(got.model, got.layer, got["head"], got.role)) == set(want)
    for r in got.itertuples():
        role = next(x for x in roles_with(thresholds) if x.name == r.role)
        assert r.value * role.sign == pytest.approx(want[(r.model, r.layer, r.head, r.role)])
        # the dataset named is where that value was measured
        src = table[
            (table.model == r.model)
            & (table.layer == r.layer)
            & (table["head"] == r.head)
            & (table.metric == r.metric)
            & (table.dataset == r.dataset)
        ]
        assert src.value.iloc[0] == pytest.approx(r.value)
        assert r.threshold == pytest.approx(role.threshold * role.sign)
    assert list(got.columns) == ["model", "layer", "head", "role", "metric", "value", "threshold", "dataset"]
    if thresholds:
        assert "induction" not in set(got.role)
        assert (got.loc[got.role == "sink", "value"] >= 0.8).all()


def test_a_head_gets_every_role_its_scores_support():
    rows = [
        ("sink_mass", 0.9),
        ("streaming", 0.99),
        ("induction", 0.5),
        ("retrieval", 0.1),
        ("context_direct_effect", -0.7),
        ("prev_token", np.nan),
    ]
    table = pd.DataFrame(
        [
            {"model": "m", "dataset": "d", "probe": "p", "metric": m, "layer": 2, "head": 1, "value": v, "n": 4}
            for m, v in rows
        ]
    )
    got = atlas(table)
    # retrieval needs > 0.1 (the paper's cut), NaN supports nothing; memory = negative direct effect
    assert list(got.role) == ["sink", "streaming", "induction", "memory"]
    pd.testing.assert_frame_equal(
        workbench.atlas(table, thresholds={"sink": 0.95}), atlas(table, thresholds={"sink": 0.95})
    )
    assert "sink" not in set(workbench.atlas(table, thresholds={"sink": 0.95}).role)


def test_thresholds_parse_from_the_command_line_form():
    assert parse_thresholds("sink=0.6, induction=off,context_direct_effect=1") == {
        "sink": 0.6,
        "induction": None,
        "context_direct_effect": 1.0,
    }
    assert parse_thresholds(None) == {}
    roles = {r.name: r for r in roles_with(parse_thresholds("context_direct_effect=1,previous_token=0.2"))}
    assert roles["context"].threshold == roles["memory"].threshold == 1.0 and roles["previous-token"].threshold == 0.2
    for bad, msg in [
        ("sink", "bad role threshold"),
        ("sink=abc", "not a number"),
        ("bogus=1", "unknown role"),
        ("sink=-1", ">= 0"),
    ]:
        with pytest.raises(WorkbenchError, match=msg):
            parse_thresholds(bad)


def test_run_column_is_kept_and_circuit_roles_join():
    table = synthetic(models=(("m", 2, 2),)).assign(run="A")
    circuit = {
        "model": "m",
        "task": "ioi",
        "run": "A",
        "nodes": [
            {"layer": 1, "head": 0, "effect": -0.4, "role": "name mover, induction"},
            {"layer": 0, "head": 1, "effect": 0.1, "role": "other"},
        ],
    }
    got = atlas(table, circuits=[circuit])
    assert list(got.columns)[0] == "run" and set(got.run) == {"A"}
    circ = got[got.dataset == "ioi"]
    assert set(zip(circ.layer, circ["head"], circ.role)) == {(1, 0, "name mover"), (0, 1, "ioi circuit")}


def test_every_builtin_probe_metric_declares_its_kind():
    """Each probe declares what its metrics are (metric_info), in its own module."""
    from workbench.protocol.registry import probe_classes

    known = kinds.known_metrics()
    for cls in probe_classes().values():
        for metric in cls.metrics:
            assert metric in cls.metric_info, f"{cls.name}.{metric} needs a MetricInfo in {cls.__name__}.metric_info"
            assert known[metric].kind in KINDS and known[metric].module.startswith("probes/")
    for m in ("path_logits", "path_qkv", "activation_z", "activation_resid_pre", "attribution_z"):
        assert kinds.info(m).kind == "signed"
    assert kinds.infer_kind([-1, 2]) == "signed" and kinds.infer_kind([0.1, 0.9]) == "bounded"
    assert kinds.infer_kind([1e-3, 5.0]) == "log" and kinds.infer_kind([2, 5]) == "positive"


def _heads(metric, values, model="m", dataset="d", n_heads=3):
    return pd.DataFrame(
        [
            {
                "model": model,
                "dataset": dataset,
                "probe": "p",
                "metric": metric,
                "layer": i // n_heads,
                "head": i % n_heads,
                "value": v,
                "n": 1,
            }
            for i, v in enumerate(values)
        ]
    )


def test_heatmap_scales_follow_the_metric_kind():
    hm = plots.head_heatmap(_heads("sink_mass", [0.1, 0.2, 0.3, 0.4, 0.5, 0.45]), "sink_mass").data[0]
    assert (hm.zmin, hm.zmax) == (0, 1)  # a share: fixed 0..1, not the data's range
    hm = plots.head_heatmap(
        _heads("context_direct_effect", [0.1, -0.8, 0.3, 0.2, 0.05, 0.0]), "context_direct_effect"
    ).data[0]
    assert hm.zmid == 0 and hm.zmin == -0.8 and hm.zmax == 0.8
    low, high = hm.colorscale[0][1], hm.colorscale[-1][1]
    assert _rgb(low)[2] > _rgb(low)[0] and _rgb(high)[0] > _rgb(high)[2], "negative blue, positive red"
    vals = [1e-3, 1e-2, 0.5, 2.0, 9.0, 0.02]
    hm = plots.head_heatmap(_heads("context_divergence", vals), "context_divergence").data[0]
    np.testing.assert_allclose(np.asarray(hm.z, dtype=float).ravel(), np.log10(vals))
    assert list(hm.colorbar.ticktext) == ["0.001", "0.01", "0.1", "1", "10"]
    assert list(np.asarray(hm.customdata)[..., 2].ravel()) == vals, "hover shows the value, not its log"
    narrow = plots.head_heatmap(_heads("context_divergence", [1, 2, 3, 4, 5, 6]), "context_divergence").data[0]
    assert narrow.colorbar.ticktext is None and np.asarray(narrow.z).max() == 6, (
        "a log-kind metric within 100x stays linear"
    )
    assert plots.patching_heatmap(_heads("path_logits", [0.1, -0.3, 0, 0, 0, 0]), "path_logits").data[0].zmid == 0


def _rgb(color: str) -> tuple[int, ...]:
    if color.startswith("#"):
        return tuple(int(color[i : i + 2], 16) for i in (1, 3, 5))
    return tuple(int(x) for x in color[color.index("(") + 1 : -1].split(","))


def test_depth_table_and_profile_use_relative_depth():
    table = synthetic()
    d = plots.depth_table(table, "sink_mass")
    for r in d.itertuples():
        n = {"m3": 3, "m5": 5}[r.model]
        vals = table[(table.model == r.model) & (table.metric == "sink_mass") & (table.layer == r.layer)].value.dropna()
        assert r.depth == pytest.approx(r.layer / (n - 1)) and r.n_layers == n
        assert r.mean == pytest.approx(vals.mean()) and r.max == pytest.approx(vals.max())
    fig = plots.depth_profile(table, "sink_mass")
    means = [t for t in fig.data if t.name.endswith("mean over heads")]
    assert [list(t.x) for t in means] == [[0, 0.5, 1], [0, 0.25, 0.5, 0.75, 1]]
    assert fig.layout.xaxis.title.text.startswith("relative depth")
    # explicit layer counts win (a model whose last layers have no rows)
    assert plots.depth_table(table, "sink_mass", n_layers={"m3": 5}).query("model == 'm3'").depth.max() == 0.5
    with pytest.raises(WorkbenchError, match="n_layers"):
        plots.depth_table(table, "sink_mass", n_layers=2)


def test_depth_difference_interpolates_onto_the_union_of_depths():
    table = synthetic()
    fig = plots.depth_difference(table, "streaming", reference="m3")
    (trace,) = fig.data
    a = table[(table.model == "m3") & (table.metric == "streaming")].groupby("layer").value.mean()
    b = table[(table.model == "m5") & (table.metric == "streaming")].groupby("layer").value.mean()
    xa, xb = np.arange(3) / 2, np.arange(5) / 4
    x = np.union1d(xa, xb)
    np.testing.assert_allclose(trace.x, x)
    np.testing.assert_allclose(trace.y, np.interp(x, xb, b.to_numpy()) - np.interp(x, xa, a.to_numpy()))
    assert fig.layout.yaxis.zeroline
    with pytest.raises(WorkbenchError, match="reference"):
        plots.depth_difference(table, "streaming", reference="nope")


def test_head_grids_put_models_side_by_side_on_one_scale():
    table = synthetic()
    fig = plots.head_grids(table[table.dataset == "prose"], "induction", facet="model", n_layers={"m3": 3, "m5": 5})
    assert len(fig.data) == 2 and {t.coloraxis for t in fig.data} == {"coloraxis"}
    assert [np.asarray(t.z).shape for t in fig.data] == [(3, 4), (5, 4)]
    assert fig.layout.coloraxis.cmin == 0 and fig.layout.coloraxis.cmax == 1
    assert [a.text for a in fig.layout.annotations] == ["m3", "m5"]
    depth = np.asarray(fig.data[1].customdata)[:, 0, 2]
    np.testing.assert_allclose(depth, np.arange(5) / 4)
    ov = plots.depth_overview(table, ["sink_mass", "entropy", "context_direct_effect"])
    assert len(ov.data) == 6 and sum(t.showlegend for t in ov.data) == 2


def test_metric_scatter_averages_datasets_per_head():
    table = synthetic(models=(("m", 2, 2),))
    fig = plots.metric_scatter(table, "prev_token", "sink_mass")
    pts = {(h,): (x, y) for h, x, y in zip(fig.data[0].hovertext, fig.data[0].x, fig.data[0].y)}
    assert len(fig.data[0].x) <= 4, "one point per head, not one per dataset pair"
    for (head_id,), (x, y) in pts.items():
        layer, head = map(int, head_id.split("."))
        sel = table[(table.layer == layer) & (table["head"] == head) & (table.metric == "prev_token")].dropna(
            subset=["value"]
        )
        assert x == pytest.approx((sel.value * sel.n).sum() / sel.n.sum())


DOC = """# Metrics

Intro text.

## Attention entropy

Shared text about entropy.

### `entropy`

Mean row entropy, *in nats*.

<a id="entropy_norm"></a>
### Normalised entropy

H / ln(visible keys). See [entropy](#entropy).

## Sinks: `sink_mass`, `sink_rate`

alpha_0 <script>alert(1)</script> averaged.

```python
# not a heading
```
"""


def test_definitions_come_from_the_metrics_document_by_heading(tmp_path):
    doc = tmp_path / "metrics.md"
    doc.write_text(DOC)
    d = definitions.definition("entropy", doc)
    assert d.text == "Mean row entropy, *in nats*." and d.source.endswith("#entropy")
    assert d.group == "Attention entropy" and d.group_intro == "Shared text about entropy."
    assert definitions.definition("entropy_norm", doc).text.startswith("H / ln(visible keys)")
    assert "alpha_0" in definitions.definition("sink_rate", doc).text == definitions.definition("sink_mass", doc).text
    sections = definitions.parse_sections(DOC)
    assert (
        sections["attention-entropy"].startswith("Shared text") and "Mean row entropy" in sections["attention-entropy"]
    )
    assert "not a heading" not in sections, "a # line inside a code fence is not a heading"
    doc.write_text(
        '# M\n\n## Circuits\n\nShared.\n\n<a id="path-patching"></a>\n### path_patching\n\nSender to receiver.\n'
    )
    d = definitions.definition("path_logits", doc)
    assert (d.text, d.group) == ("Sender to receiver.", "Circuits"), "patching metrics find their family's section"


def test_definitions_fall_back_to_the_probe_docstring(tmp_path):
    d = definitions.definition("entropy_norm", tmp_path / "missing.md")
    assert (
        d.text.startswith("- `entropy_norm`: mean of H_q / ln(n_visible(q))")
        and d.source == "probes/entropy.py (docstring)"
    )
    d = definitions.definition("streaming", tmp_path / "missing.md")
    assert "DuoAttention" in d.text and "S_q" in d.text and d.group is None
    assert definitions.definition("no_such_metric", tmp_path / "missing.md") is None
