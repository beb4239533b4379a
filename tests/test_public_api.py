"""The public API users, notebooks and plugins rely on: every name below keeps working.

When the package was laid out by layer (0.2), modules moved; the names users import did not
change, and old module paths stay importable as aliases for one release (:mod:`workbench.compat`)
with a DeprecationWarning that names the new place. This file is the list: a name that disappears
or an alias that stops resolving fails here.
"""

from __future__ import annotations

import importlib
import importlib.metadata as md
import warnings

import pandas as pd
import pytest

import workbench

PUBLIC = {
    "workbench": [
        "WorkbenchError",
        "load_model",
        "run_probes",
        "get_probe",
        "load_results",
        "atlas",
        "store",
        "plots",
        "__version__",
    ],
    "workbench.store": ["open", "open_store", "ActivationStore", "TokenActivations", "HOOKS"],
    "workbench.plots": [
        "head_heatmap",
        "layer_curve",
        "metric_scatter",
        "compare_runs",
        "depth_profile",
        "depth_overview",
        "head_grids",
        "patching_heatmap",
        "circuit_graph",
        "token_curve",
        "faithfulness_curve",
        "attention_pattern",
        "offline_notebook",
    ],
    "workbench.models": ["load_model", "LoadedModel", "list_models", "resolve_source", "model_identity"],
    "workbench.datasets": ["make_dataset", "DATASETS"],
    "workbench.report": ["build_report", "write_report"],
    "workbench.experiments": ["retrieval_ablation", "needle_accuracy", "reinforce"],
    "workbench.protocol": [
        "Probe",
        "PatternProbe",
        "TokenProbe",
        "ItemProbe",
        "DivergenceProbe",
        "NoParams",
        "Need",
        "BatchInfo",
        "PatternView",
        "MetricInfo",
        "Role",
        "ProbeResult",
        "head_rows",
        "Options",
        "RunContext",
    ],
    # plugin authors have always imported the protocol from here
    "probes.base": [
        "Probe",
        "PatternProbe",
        "TokenProbe",
        "ItemProbe",
        "DivergenceProbe",
        "NoParams",
        "MetricInfo",
        "Role",
        "Options",
    ],
    "circuits.patching": ["activation_patching", "path_patching", "attribution_patching", "baseline", "Baseline"],
    "circuits.baseline": ["baseline", "Baseline", "logit_diff", "pair_batch"],
    "circuits.tasks": ["Pair"],
    "circuits.discovery": ["discover_circuit", "find_circuit", "faithfulness", "label_roles"],
    "circuits.faithfulness": ["completeness", "minimality", "head_curve"],
    "circuits.edges": ["edge_attribution", "edge_curve"],
    "circuits.ablation": ["make_ablation"],
    "circuits.graph": ["graph_for"],
}


@pytest.mark.parametrize("module", sorted(PUBLIC))
def test_public_names(module):
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)  # the public paths are not aliases
        mod = importlib.import_module(module)
    missing = [n for n in PUBLIC[module] if not hasattr(mod, n)]
    assert not missing, f"{module} lost {missing}"


def test_workbench_atlas_is_callable_and_get_probe_builds_probes():
    table = pd.DataFrame(
        {
            "model": "m",
            "dataset": "d",
            "probe": "sink",
            "metric": "sink_mass",
            "layer": [0, 0],
            "head": [0, 1],
            "value": [0.9, 0.1],
            "n": 4,
        }
    )
    roles = workbench.atlas(table)
    assert list(roles["head"]) == [0] and list(roles["role"]) == ["sink"]
    assert workbench.get_probe("sink", epsilon=0.3).params["epsilon"] == 0.3


def test_both_entry_point_groups():
    """Probes and executors of other packages register under these groups; the names are API."""
    from workbench.protocol.registry import GROUP
    from workbench.runs.executors import ENTRY_POINTS, executor_names

    assert GROUP == "workbench.probes" and ENTRY_POINTS == "workbench.executors"
    ours = {ep.name for ep in md.entry_points(group="workbench.probes") if ep.value.startswith("probes.")}
    assert ours >= {"entropy", "sink", "induction", "streaming", "retrieval", "vhd", "context"}
    assert {"local", "ray"} <= set(executor_names())


def test_cli_commands():
    from workbench.cli import COMMANDS, build_parser

    build_parser()
    assert set(COMMANDS) >= {
        "probe",
        "probes",
        "models",
        "datasets",
        "dataset",
        "sweep",
        "query",
        "report",
        "cache",
        "patch",
        "task",
        "circuit",
        "reinforce",
        "retrieval-ablation",
    }


# Old module path -> a name it must still give, and where that name lives now.
ALIASES = [
    ("workbench.results", "load_results", "workbench.runs.load"),
    ("workbench.results", "ProbeResult", "workbench.protocol.table"),
    ("workbench.results", "write_parquet", "workbench.runs.parquet"),
    ("workbench.results", "query", "workbench.runs.query"),
    ("workbench.sweeps", "run_sweep", "workbench.runs.sweep"),
    ("workbench.sweeps", "load_config", "workbench.runs.config"),
    ("workbench.sweeps", "RunFolder", "workbench.runs.folder"),
    ("workbench.metric_kinds", "MetricInfo", "workbench.protocol.metrics"),
    ("workbench.metric_kinds", "info", "workbench.report.kinds"),
    ("workbench.atlas", "Role", "workbench.protocol.roles"),
    ("workbench.atlas", "roles_with", "workbench.report.atlas"),
    ("workbench.interventions", "HeadAblation", "workbench.engine.interventions"),
    ("workbench.interventions", "vhr_heads", "workbench.experiments.vhr"),
    ("workbench.attention", "AttentionCall", "workbench.engine.call"),
    ("workbench.attention", "hooked_run", "workbench.engine.attention"),
    ("workbench.patterns", "BatchInfo", "workbench.protocol.views"),
    ("workbench.patterns", "collate", "workbench.engine.patterns"),
    ("workbench.registry", "get_probe", "workbench.protocol.registry"),
    ("workbench.prompts", "read_prompts", "workbench.inputs.prompts"),
    ("workbench.runfs", "write_file", "workbench.files.targets"),
    ("workbench.fileio", "atomic_write", "workbench.files.atomic"),
    ("workbench.executors", "get_executor", "workbench.runs.executors"),
    ("workbench.executors.local", "LocalExecutor", "workbench.runs.executors.local"),
    ("workbench.report_page", "Page", "workbench.report.page"),
]


@pytest.mark.parametrize("old, name, new", ALIASES)
def test_old_paths_are_aliases_that_warn(old, name, new):
    import sys

    sys.modules.pop(old, None)
    with pytest.warns(DeprecationWarning, match="moved to"):
        alias = importlib.import_module(old)
    assert getattr(alias, name) is getattr(importlib.import_module(new), name)
    # the alias does not load a second copy of the module
    if old.count(".") == 1 and not hasattr(alias, "_SplitModule__homes"):
        assert alias is importlib.import_module(new)


def test_old_callable_atlas_module():
    import sys

    sys.modules.pop("workbench.atlas", None)
    with pytest.warns(DeprecationWarning):
        old = importlib.import_module("workbench.atlas")
    table = pd.DataFrame(
        {
            "model": "m",
            "dataset": "d",
            "probe": "sink",
            "metric": "sink_mass",
            "layer": [0],
            "head": [0],
            "value": [0.9],
            "n": 4,
        }
    )
    assert list(old(table).role) == ["sink"]


def test_results_written_by_an_earlier_version_still_load():
    """data/results/cross_model.parquet was written by 0.1 before the layout changed."""
    from pathlib import Path

    from workbench.runs.load import load_results

    table = load_results(Path(__file__).resolve().parents[1] / "data" / "results" / "cross_model.parquet")
    assert {"model", "dataset", "probe", "metric", "layer", "head", "value", "n"} <= set(table.columns) and len(
        table
    ) > 100


def test_probes_get_probe_is_an_alias_that_warns():
    import probes
    from workbench.protocol import registry

    with pytest.warns(DeprecationWarning, match="moved"):
        assert probes.get_probe is registry.get_probe


def test_a_run_folder_written_by_the_previous_version_loads_reports_and_resumes(tmp_path, capsys):
    """tests/data/run-0.1 was written by 0.1 (before the layout changed: `workbench sweep
    tests/data/run-0.1.toml` at commit 000c1ef). It loads, queries and reports, and a re-run of
    its config with this version finds every unit done: the unit keys did not change."""
    import shutil
    from pathlib import Path

    from workbench.cli import main
    from workbench.runs.load import load_results
    from workbench.runs.query import query

    data = Path(__file__).resolve().parent / "data"
    run = tmp_path / "run"
    shutil.copytree(data / "run-0.1", run)
    shutil.copy(data / "run-0.1.toml", tmp_path / "s.toml")
    table = load_results(run)
    assert set(table.probe) == {"entropy", "sink"} and len(table) == 2 * 2 * 3 * 4  # 2 metrics each, 3 layers x 4 heads
    assert int(query("select count(*) as n from results", [run]).n[0]) == len(table)
    assert main(["report", str(run), "--out", str(tmp_path / "r.html")]) == 0 and (tmp_path / "r.html").is_file()
    capsys.readouterr()
    assert main(["sweep", str(tmp_path / "s.toml"), "--out", str(run), "--no-progress"]) == 0
    assert "0 run now, 2 already done" in capsys.readouterr().out
