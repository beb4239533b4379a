"""A faulty plugin is named, with its distribution and version, and the fix is its authors'
(issue 30, bug 10): raising inside a hook, a table without the protocol's columns, rows for
layers the model does not have, a metric it did not declare; and a plugin that registers a
built-in's name does not take the built-in away.

The plugin is a real installed distribution as far as the registry can tell: a module and a
``*.dist-info`` with its entry points on ``sys.path`` (what ``pip install`` leaves).
"""

from __future__ import annotations

import pytest

from workbench.cli import main
from workbench.errors import WorkbenchError, WorkbenchWarning
from workbench.protocol import registry

PLUGIN = '''
"""A plugin package with defects."""
import pandas as pd

from probes.base import ItemProbe, PatternProbe


class Raises(PatternProbe):
    name, metrics, description = "bad-raise", ("bad",), "raises inside the attention hook"

    def on_pattern_chunk(self, chunk):
        raise ValueError("the plugin's own bug")

    def results(self):
        return self.rows("bad", 0.0, 0)


class _Rows(ItemProbe):
    metrics, description = ("bad",), "returns a bad table"
    rows_out: list = []

    def run(self, model, items, ctx):
        return self.finish(pd.DataFrame(self.rows_out))


class NoHead(_Rows):
    name = "bad-columns"
    rows_out = [{"metric": "bad", "layer": 0, "value": 1.0, "n": 1}]


class TooDeep(_Rows):
    name = "bad-layers"
    rows_out = [{"metric": "bad", "layer": 99, "head": 0, "value": 1.0, "n": 1}]


class Undeclared(_Rows):
    name = "bad-metric"
    rows_out = [{"metric": "surprise", "layer": 0, "head": 0, "value": 1.0, "n": 1}]


class FakeSink(PatternProbe):
    name, metrics, description = "sink", ("fake",), "takes a built-in's name"
'''


@pytest.fixture
def bad_plugin(tmp_path, monkeypatch):
    site = tmp_path / "site"
    info = site / "wb_bad_plugin-0.3.dist-info"
    info.mkdir(parents=True)
    (site / "wb_bad_plugin.py").write_text(PLUGIN)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: wb-bad-plugin\nVersion: 0.3\n")
    (info / "entry_points.txt").write_text(
        "[workbench.probes]\nbad-raise = wb_bad_plugin:Raises\nbad-columns = wb_bad_plugin:NoHead\n"
        "bad-layers = wb_bad_plugin:TooDeep\nbad-metric = wb_bad_plugin:Undeclared\nsink = wb_bad_plugin:FakeSink\n"
    )
    monkeypatch.syspath_prepend(str(site))
    registry.refresh()
    yield site
    registry.refresh()


@pytest.mark.parametrize(
    "probe, problem",
    [
        ("bad-raise", "failed: ValueError: the plugin's own bug"),
        ("bad-columns", "returned a table without the column(s) head"),
        ("bad-layers", "returned rows for layers 99-99 and heads 0-0, but the model has 3 layers of 4 heads"),
        ("bad-metric", "returned metric(s) it does not declare: surprise (it declares bad)"),
    ],
)
def test_a_faulty_plugin_is_named_with_its_distribution(bad_plugin, tmp_path, capsys, probe, problem):
    argv = ["probe", probe, "--model", "tiny-llama", "--dataset", "prose", "--n-prompts", "2"]
    rc = main([*argv, "--out", str(tmp_path / "o.parquet")])
    err = capsys.readouterr().err
    assert rc == 2, err
    assert f"error: probe {probe!r} (wb-bad-plugin 0.3) {problem}" in err, err
    assert "report it to the authors of wb-bad-plugin" in err and "internal error" not in err
    # the plugin's clash over "sink" (see below) is one warning line
    assert "warning: probe 'sink' is registered by the workbench and also by wb-bad-plugin" in err
    assert not (tmp_path / "o.parquet").exists()


def test_a_plugin_cannot_take_a_builtin_name(bad_plugin):
    with pytest.warns(WorkbenchWarning, match="registered by the workbench and also by wb-bad-plugin"):
        cls = registry.probe_class("sink")
    assert cls.__module__ == "probes.sink" and registry.origin("sink")[0] == registry.BUILTIN_DISTRIBUTION


def test_two_plugins_with_one_name_name_both(bad_plugin, tmp_path, monkeypatch):
    other = tmp_path / "other"
    (other / "wb_other-1.0.dist-info").mkdir(parents=True)
    (other / "wb_other.py").write_text("from wb_bad_plugin import Raises as Again\n")
    (other / "wb_other-1.0.dist-info" / "METADATA").write_text("Metadata-Version: 2.1\nName: wb-other\nVersion: 1.0\n")
    (other / "wb_other-1.0.dist-info" / "entry_points.txt").write_text(
        "[workbench.probes]\nbad-raise = wb_other:Again\n"
    )
    monkeypatch.syspath_prepend(str(other))
    registry.refresh()
    with pytest.warns(WorkbenchWarning), pytest.raises(WorkbenchError, match="registered by both wb-"):
        registry.get_probe("bad-raise")


def test_a_builtin_probe_failing_is_still_our_bug(tiny_models, monkeypatch):
    """The blame goes to a plugin only when its own code is on the traceback."""
    import workbench
    from probes.entropy import EntropyProbe

    def broken(self, chunk):
        raise RuntimeError("a workbench bug")

    monkeypatch.setattr(EntropyProbe, "on_pattern_chunk", broken)
    monkeypatch.setattr(EntropyProbe, "needs", ("rows",))
    from workbench.inputs.prompts import Prompt

    with pytest.raises(RuntimeError, match="a workbench bug"):
        workbench.run_probes(
            tiny_models["llama"], [Prompt("a", text="the king said")], [workbench.get_probe("entropy")]
        )
