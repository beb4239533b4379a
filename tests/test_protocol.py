"""One probe protocol, one runner, probes from other packages, and the import direction.

A tiny plugin package (one pattern probe, one item probe) is made visible through a real
``*.dist-info/entry_points.txt`` on ``sys.path`` (the same mechanism ``pip install`` uses), then
run through the CLI, a sweep and a report with no edit to this repository.
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.reference import eager_model, patterns
from tests.test_metrics import random_prompts
from workbench.errors import WorkbenchError
from workbench.protocol import registry
from workbench.runner import run_probes
from workbench.runs.load import load_results
from workbench.runs.parquet import read_parquet

ROOT = Path(__file__).resolve().parents[1]

PLUGIN = '''
"""A third-party probe package, as a user would write it."""
import pandas as pd
from pydantic import Field

from probes.base import ItemProbe, PatternProbe
from workbench.protocol.roles import Role
from workbench.protocol.metrics import MetricInfo
from workbench.protocol.params import Options


class FirstKeyProbe(PatternProbe):
    name = "plugin-first"
    metrics = ("plugin_first",)
    description = "attention on the prompt's first token, pooled over queries (plugin test)"
    metric_info = {"plugin_first": MetricInfo("bounded", "pooled attention on the first token", "a first-token head")}
    roles = (Role("first-key", "F1", "plugin_first", 0.2, "#000000", "reads the first token"),)
    definitions = {"plugin_first": """
        The mean attention weight on the prompt's first token, over every real query. Times `scale`.
    """}

    class Params(Options):
        scale: float = Field(1.0, gt=0, description="multiplies the value")

    def on_pattern_chunk(self, chunk):
        a0 = chunk.key_probs(chunk.batch.first_index).double()
        use = chunk.query_valid.unsqueeze(1)
        self.acc("sum", self.n_layers, self.n_heads)[chunk.layer] += (a0 * use).sum((0, 2))
        self.acc("n", self.n_layers, self.n_heads)[chunk.layer] += use.sum()

    def results(self):
        t = self.total
        return self.rows("plugin_first", self.options.scale * t["sum"] / t["n"], t["n"])


class LengthProbe(ItemProbe):
    name = "plugin-length"
    metrics = ("text_length",)
    description = "characters of each item's text (plugin test)"

    def run(self, model, items, ctx):
        rows = [{"metric": "text_length", "layer": -1, "head": -1, "value": float(len(it.text or "")), "n": 1,
                 "item": it.id, "step": 0, "token": None} for it in items]
        return self.finish(pd.DataFrame(rows), {"n_items": len(items)}, [f"plugin-length: {len(items)} items measured"])


class NotAProbe:
    name = "plugin-broken"
'''


@pytest.fixture
def plugin(tmp_path, monkeypatch):
    """The plugin package on sys.path with its entry points (and PYTHONPATH for subprocesses)."""
    site = tmp_path / "site"
    (site / "wb_plugin_demo-0.1.dist-info").mkdir(parents=True)
    (site / "wb_plugin_demo.py").write_text(PLUGIN)
    (site / "wb_plugin_demo-0.1.dist-info" / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: wb-plugin-demo\nVersion: 0.1\n"
    )
    (site / "wb_plugin_demo-0.1.dist-info" / "entry_points.txt").write_text(
        "[workbench.probes]\nplugin-first = wb_plugin_demo:FirstKeyProbe\nplugin-length = wb_plugin_demo:LengthProbe\n"
        "plugin-broken = wb_plugin_demo:NotAProbe\nplugin-missing = wb_plugin_demo_nope:Gone\n"
    )
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(site), str(ROOT), os.environ.get("PYTHONPATH", "")]))
    registry.refresh()
    yield site
    registry.refresh()


def cli(*argv, cwd=None):
    return subprocess.run(
        [sys.executable, "-m", "workbench", *argv], capture_output=True, text=True, cwd=cwd, timeout=600
    )


def test_builtin_probes_register_through_entry_points():
    classes = registry.probe_classes()
    assert list(classes)[:7] == ["entropy", "sink", "streaming", "induction", "retrieval", "context", "vhd"]
    assert {c.kind for c in classes.values()} == {"pattern", "tokens", "items"}
    assert registry.broken_probes() == {}


def test_a_plugin_probe_is_listed_and_broken_plugins_are_named(plugin):
    assert {"plugin-first", "plugin-length"} <= set(registry.probe_classes())
    broken = registry.broken_probes()
    assert "plugin-broken" in broken and "kind" in broken["plugin-broken"]
    assert "plugin-missing" in broken and "ModuleNotFoundError" in broken["plugin-missing"]
    with pytest.raises(WorkbenchError, match="registered but cannot be loaded"):
        registry.get_probe("plugin-missing")
    res = cli("probes")
    assert res.returncode == 0, res.stderr
    assert "plugin-first" in res.stdout and "(pattern)" in res.stdout and "plugin-length" in res.stdout
    assert "plugin-broken" in res.stdout and "cannot be loaded" in res.stdout


def test_plugin_pattern_probe_numbers_and_fusion(plugin, tiny_models):
    """The plugin's pattern probe runs in the same forward as a built-in one and equals the
    pooled attention on the first token recomputed from eager patterns."""
    model = tiny_models["llama"]
    prompts = random_prompts(model.vocab_size, [9, 23, 4], seed=8)
    res = run_probes(
        model, prompts, [registry.get_probe("plugin-first", scale=2.0), registry.get_probe("sink")], batch_size=3
    )
    assert res.stats.n_batches == 1, "one forward for both pattern probes"
    got = res.table[res.table.metric == "plugin_first"].set_index(["layer", "head"])["value"]
    pats = [patterns(eager_model(model.source), p.ids) for p in prompts]
    for layer in range(model.n_layers):
        for head in range(model.n_heads):
            total = sum(float(pp[layer][head, :, 0].sum()) for pp in pats)
            want = 2.0 * total / sum(len(p) for p in prompts)
            assert abs(got[(layer, head)] - want) < 1e-5
    with pytest.raises(WorkbenchError, match="plugin-first.scale"):
        registry.get_probe("plugin-first", scale=-1)
    # its own declarations reach captions and the atlas, with no edit to this repository
    from workbench.report import kinds
    from workbench.report.atlas import atlas

    assert kinds.info("plugin_first").what == "pooled attention on the first token"
    roles = atlas(res.table.assign(model="m", dataset="d"), thresholds={"sink": None})
    assert "first-key" in set(roles.role)


def test_plugin_probes_through_the_cli_a_sweep_and_a_report(plugin, tiny_dirs, tmp_path):
    model = str(tiny_dirs["llama"])
    out = tmp_path / "cli.parquet"
    res = cli(
        "probe",
        "plugin-first,entropy",
        "--model",
        model,
        "--n-prompts",
        "3",
        "--param",
        "plugin-first.scale=0.5",
        "--no-progress",
        "--out",
        str(out),
    )
    assert res.returncode == 0, res.stderr
    df, meta = read_parquet(out)
    assert set(df.probe) == {"plugin-first", "entropy"} and (df[df.probe == "plugin-first"].value <= 0.5 + 1e-9).all()
    assert {"name": "plugin-first", "scale": 0.5} in meta["probes"]
    items = tmp_path / "items.jsonl"
    items.write_text(
        json.dumps({"id": "a", "text": "the king said"}) + "\n" + json.dumps({"id": "bb", "text": "and it came"}) + "\n"
    )
    res = cli(
        "probe", "plugin-length", "--model", model, "--prompts", str(items), "--out", str(tmp_path / "items.parquet")
    )
    assert res.returncode == 0, res.stderr
    assert "plugin-length: 2 items measured" in res.stdout
    bad = cli(
        "probe",
        "plugin-first",
        "--model",
        model,
        "--param",
        "plugin-first.scale=abc",
        "--out",
        str(tmp_path / "x.parquet"),
    )
    assert bad.returncode == 2 and "plugin-first.scale" in bad.stderr and "Traceback" not in bad.stderr

    cfg = tmp_path / "s.toml"
    cfg.write_text(
        textwrap.dedent(f"""
        models = ["{model}"]
        probes = ["plugin-first", "plugin-length", "sink"]
        [datasets.prose]
        n_prompts = 3
        probes = ["plugin-first", "sink"]
        [datasets.mine]
        path = "items.jsonl"
        probes = ["plugin-length"]
        [probe_params.plugin-first]
        scale = 3.0
    """)
    )
    res = cli("sweep", str(cfg), "--out", str(tmp_path / "run"), "--no-progress")
    assert res.returncode == 0, res.stderr
    table = load_results(tmp_path / "run")
    assert set(table.probe) == {"plugin-first", "plugin-length", "sink"}
    lengths = table[table.probe == "plugin-length"].set_index("item")["value"]
    assert lengths.to_dict() == {"a": 13.0, "bb": 11.0}
    res = cli("report", str(tmp_path / "run"), "--out", str(tmp_path / "report.html"))
    assert res.returncode == 0, res.stderr
    page = (tmp_path / "report.html").read_text()
    assert "plugin_first" in page
    # the definition the plugin ships, named with its distribution (not looked up in the checkout)
    assert "The mean attention weight on the prompt&#x27;s first token" in page or (
        "The mean attention weight on the prompt's first token" in page
    )
    assert "wb-plugin-demo 0.1" in page


def test_workbench_probes_shows_each_metrics_definition_and_each_parameters_description(plugin):
    res = cli("probes")
    assert res.returncode == 0, res.stderr
    out = res.stdout
    assert "plugin-first (pattern) from wb-plugin-demo 0.1:" in out
    assert "plugin_first  The mean attention weight on the prompt's first token, over every real query." in out
    assert "scale=1.0  multiplies the value" in out
    assert "epsilon=0.3  sink_rate counts prompts with alpha_0 > epsilon" in out, "built-in parameters too"
    assert "entropy       mean entropy of a query's attention row, in nats" in out
    assert "plugin-broken (cannot be loaded)" in out


def test_runner_runs_every_kind_in_one_call(tiny_models):
    """Pattern and item probes in one call: one table, each probe's lines."""
    from workbench.inputs.prompts import Prompt

    model = tiny_models["llama"]
    items = [
        Prompt("a", text="and he said unto them", meta={"context": "the lord spake"}),
        Prompt("b", text="the king went", meta={"context": "it came to pass that"}),
    ]
    res = run_probes(model, items, [registry.get_probe("entropy"), registry.get_probe("context")], batch_size=2)
    assert set(res.table.probe) == {"entropy", "context"}
    assert list(res.results) == ["entropy", "context"]
    assert any(line.startswith("context:") for line in res.lines())
    with pytest.raises(WorkbenchError, match="appears twice"):
        run_probes(model, items, [registry.get_probe("entropy"), registry.get_probe("entropy")])


def test_workbench_never_imports_probes():
    """probes/ depends on workbench, never the reverse (the registry finds probes by entry point)."""
    offenders = []
    for path in sorted((ROOT / "workbench").rglob("*.py")):
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            offenders += [f"{path.relative_to(ROOT)}: {n}" for n in names if n == "probes" or n.startswith("probes.")]
    assert offenders == []
    code = (
        "import sys, workbench.cli, workbench.runner, workbench.runs.config, workbench.report; "
        "print('probes' in sys.modules)"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert res.stdout.strip() == "False", res.stderr


def _code_strings(path: Path) -> set[str]:
    """String constants in a module's code (docstrings left out)."""
    tree = ast.parse(path.read_text())
    docs = {
        id(n.body[0].value)
        for n in ast.walk(tree)
        if isinstance(n, (ast.Module, ast.FunctionDef, ast.ClassDef)) and n.body and isinstance(n.body[0], ast.Expr)
    }
    return {
        n.value
        for n in ast.walk(tree)
        if isinstance(n, ast.Constant) and isinstance(n.value, str) and id(n) not in docs
    }


def test_no_probe_module_is_dispatched_on_by_name():
    """The probe command and sweeps run every probe through the runner: no probe names or kinds."""
    import re

    names = set(registry.probe_classes()) | {"pattern"}
    cli = ROOT / "workbench" / "cli"
    for path in [
        cli / "probe.py",
        cli / "common.py",
        cli / "runs.py",
        *sorted((ROOT / "workbench" / "runs").glob("*.py")),
    ]:
        text = path.read_text()
        for bad in ["takes_items", "generates", "run_items"]:
            assert bad not in text, f"{path.name} mentions {bad}"
        assert not (_code_strings(path) & names), f"{path.name} names probes or kinds: {_code_strings(path) & names}"
        assert not re.search(r"\.kind\s*[=!]=", text), f"{path.name} dispatches on a probe's kind"


def _keys(cfg_path):
    from workbench.runs.config import load_config

    registry.refresh()
    return {u.probe: u.key for u in load_config(cfg_path).units()}


def test_a_plugins_unit_key_names_its_distribution_version_and_parameter_schema(plugin, tiny_dirs, tmp_path):
    """Bumping a plugin's version, or changing its parameter schema (here: a bound),
    gives its units new keys, so a sweep recomputes them (the parameter values alone
    would not see a changed bound); the built-in probes' keys do not move."""
    cfg = tmp_path / "s.toml"
    cfg.write_text(f'models = ["{tiny_dirs["llama"]}"]\nprobes = ["plugin-first", "sink"]\n'
                   "[datasets.prose]\nn_prompts = 2\n")
    before = _keys(cfg)
    assert _keys(cfg) == before, "the key is a function of the config and the installed code"

    info = plugin / "wb_plugin_demo-0.1.dist-info"
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: wb-plugin-demo\nVersion: 0.2\n")
    bumped = _keys(cfg)
    assert bumped["plugin-first"] != before["plugin-first"] and bumped["sink"] == before["sink"]

    source = plugin / "wb_plugin_demo.py"
    source.write_text(source.read_text().replace("Field(1.0, gt=0", "Field(1.0, ge=0"))  # same values, new bound
    sys.modules.pop("wb_plugin_demo", None)
    schema = _keys(cfg)
    assert schema["plugin-first"] not in (before["plugin-first"], bumped["plugin-first"])
    assert schema["sink"] == before["sink"]
