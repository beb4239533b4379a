"""``workbench new-probe NAME`` writes a probe package that passes its own test.

The package is written into a temporary folder, its module imported from there, and its own
test run by pytest in a subprocess from that folder (so the project's ``tests/`` are not on the
path: the test has only what a plugin author has, ``workbench.testing``). Installing it and
running it through probe, sweep, report and query is in ``tests/test_install.py`` (a venv).
"""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
import tomllib

from tests.test_docs import headings
from workbench.cli import main
from workbench.cli.scaffold import render
from workbench.protocol import PatternProbe

NAME = "prev_offset"
PACKAGE = "workbench_probe_prev_offset"


def run_own_tests(folder: Path) -> subprocess.CompletedProcess:
    """pytest in ``folder``, as its author would run it: the checkout is not on the path."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTEST_ADDOPTS")}
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:xdist"],
        cwd=folder,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


@pytest.fixture(scope="module")
def package(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("scaffold") / "my-probe"
    assert main(["new-probe", NAME, "--out", str(out)]) == 0
    return out


def test_the_package_has_its_files_and_entry_point(package, capsys):
    files = sorted(str(p.relative_to(package)) for p in package.rglob("*") if p.is_file())
    assert files == [
        "README.md",
        "conftest.py",
        "pyproject.toml",
        f"tests/test_{NAME}.py",
        f"{PACKAGE}/__init__.py",
        f"{PACKAGE}/metrics.md",
        f"{PACKAGE}/probe.py",
    ]
    project = tomllib.loads((package / "pyproject.toml").read_text())
    assert project["project"]["name"] == "workbench-probe-prev-offset"
    assert project["project"]["dependencies"][0].startswith("attention-head-workbench")
    assert project["project"]["entry-points"]["workbench.probes"] == {NAME: f"{PACKAGE}.probe:PrevOffsetProbe"}
    assert project["tool"]["setuptools"]["package-data"] == {PACKAGE: ["metrics.md"]}
    # the definition has a section under the metric's own heading, as docs/metrics.md does
    assert NAME in headings((package / PACKAGE / "metrics.md").read_text())
    assert "{{" not in "".join(p.read_text() for p in package.rglob("*") if p.is_file())


def test_its_module_imports_and_declares_a_probe(package, monkeypatch):
    monkeypatch.syspath_prepend(str(package))
    module = importlib.import_module(f"{PACKAGE}.probe")
    cls = module.PrevOffsetProbe
    assert issubclass(cls, PatternProbe) and cls.name == NAME and cls.metrics == (NAME,)
    assert cls.metric_info[NAME].kind == "bounded" and cls.needs == ("key_weights",)
    assert cls(offset=2).params == {"offset": 2}
    assert "how many tokens back" in cls.Params.model_fields["offset"].description


def test_it_passes_its_own_test(package):
    done = run_own_tests(package)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "3 passed" in done.stdout, done.stdout


def test_its_test_fails_when_the_probe_is_wrong(package, tmp_path):
    """The package's test can fail: a probe that reads the key one position off disagrees with
    the definition, and pytest says where."""
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(package, broken)
    probe = broken / PACKAGE / "probe.py"
    text = probe.read_text()
    assert "chunk.query_pos - back, -1)" in text
    probe.write_text(text.replace("chunk.query_pos - back, -1)", "chunk.query_pos - back + 1, -1)"))
    done = run_own_tests(broken)
    assert done.returncode == 1, done.stdout[-3000:]
    assert "disagrees with its reference" in done.stdout and f"{NAME} layer " in done.stdout


def test_default_folder_and_an_empty_folder(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["new-probe", "first_word"]) == 0
    assert (tmp_path / "workbench-probe-first-word" / "workbench_probe_first_word" / "probe.py").is_file()
    out = capsys.readouterr().out
    assert "probe 'first_word'" in out and "pytest" in out and "pip install -e" in out
    (tmp_path / "empty").mkdir()
    assert main(["new-probe", "other", "--out", "empty"]) == 0
    assert (tmp_path / "empty" / "workbench_probe_other" / "metrics.md").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "workbench-probe-first-word"], "no temporary left"


@pytest.mark.parametrize(
    "name, message",
    [
        ("MyProbe", "not a lowercase Python identifier"),
        ("my-probe", "not a lowercase Python identifier"),
        ("2nd", "not a lowercase Python identifier"),
        ("x" * 41, "at most 40 characters"),
        ("sink", "the name of a built-in probe"),
        ("sink_mass", "a metric of the built-in probe 'sink'"),
    ],
)
def test_bad_names_are_refused(tmp_path, capsys, name, message):
    assert main(["new-probe", name, "--out", str(tmp_path / "p")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and message in err and "fix:" in err and "Traceback" not in err, err
    assert not list(tmp_path.iterdir())


def test_an_installed_plugins_name_is_refused(monkeypatch, tmp_path, capsys):
    from workbench.cli import scaffold

    monkeypatch.setattr(scaffold, "_registered", lambda: {"mine": ("workbench-probe-mine", ("mine",))})
    assert main(["new-probe", "mine", "--out", str(tmp_path / "p")]) == 2
    assert "a probe already installed (from workbench-probe-mine)" in capsys.readouterr().err


def test_the_cls_name_and_every_template_mark_are_filled():
    files = render("a_b2")
    probe = files["workbench_probe_a_b2/probe.py"]
    assert "class AB2Probe(PatternProbe):" in probe and 'name = "a_b2"' in probe
    assert all("{{" not in text for text in files.values())
