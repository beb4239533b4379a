"""The package works from a normal (non-editable) install, run from outside the checkout.

Builds the wheel, installs it into a fresh virtual environment, and runs ``probe``, ``sweep``,
``report`` and ``query`` from a folder that is not the checkout, so the prose corpus and the
metric definitions must come from the installed package (package data), not from files beside it.

The new environment borrows this environment's third-party packages (torch, transformers, ...)
through a path entry, so nothing is downloaded; the workbench itself (``workbench``, ``probes``,
``circuits`` and its entry points) comes from the wheel only: the borrowed folder's own ``.pth``
files, which would put the checkout on the path for an editable install, are not run.
"""

from __future__ import annotations

import json
import os
import shutil
import site
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SWEEP = """models = ["tiny-llama"]
probes = ["entropy", "sink"]
[datasets.prose]
n_prompts = 4
"""


def _run(cmd: list[str], cwd: Path, env: dict[str, str], timeout: int = 600) -> subprocess.CompletedProcess:
    done = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, (
        f"{' '.join(map(str, cmd))} exited {done.returncode}:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    )
    return done


TOP_LEVEL_SKIP = {".git", ".venv", "build", "dist", "site", "runs", "test-artifacts", ".pytest_cache"}


def _not_sources(folder: str, names: list[str]) -> set[str]:
    """What the copy of the checkout leaves out: local environments and outputs at the top level,
    caches anywhere (``runs`` only at the top: ``workbench/runs`` is code)."""
    top = Path(folder) == ROOT
    return {n for n in names if (top and n in TOP_LEVEL_SKIP) or n == "__pycache__" or n.endswith(".egg-info")}


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """A venv with the wheel installed; returns (its bin folder, an env without the checkout)."""
    tmp = tmp_path_factory.mktemp("install")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["WORKBENCH_HOME"] = str(tmp / "home")
    # build from a copy: setuptools writes build/ beside the sources, which must not touch the checkout
    src = tmp / "src"
    shutil.copytree(ROOT, src, symlinks=True, ignore=_not_sources)
    wheel_cmd = ["pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp / "dist"), str(src)]
    _run([sys.executable, "-m", *wheel_cmd], tmp, env)
    wheel = next((tmp / "dist").glob("attention_head_workbench-*.whl"))
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
        assert "workbench/inputs/prose.jsonl.gz" in names and "workbench/report/metrics.md" in names, (
            "package data left out of the wheel"
        )
        sources = {
            p.relative_to(ROOT).as_posix()
            for pkg in ("workbench", "probes", "circuits")
            for p in (ROOT / pkg).rglob("*.py")
        }
        assert not sources - set(names), f"modules left out of the wheel: {sorted(sources - set(names))[:5]}"
        # in the checkout metrics.md is a link to docs/metrics.md; the wheel holds the text itself
        assert zf.read("workbench/report/metrics.md") == (ROOT / "docs" / "metrics.md").read_bytes()
    assert not any(n.startswith(("tests/", "docs/", "benchmarks/")) for n in names)
    venv = tmp / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", str(venv)], tmp, env)
    purelib = Path(sysconfig.get_path("purelib", vars={"base": str(venv), "platbase": str(venv)}))
    # this environment's packages, as a plain path entry (its .pth files, the editable install's among
    # them, are not run)
    (purelib / "borrowed.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    _run(
        [
            sys.executable,
            "-m",
            "pip",
            "--python",
            str(venv / "bin" / "python"),
            "install",
            "--no-deps",
            "-q",
            str(wheel),
        ],
        tmp,
        env,
    )
    return venv / "bin", env, tmp


def test_the_installed_package_is_the_wheel_not_the_checkout(installed):
    bin_dir, env, tmp = installed
    out = _run(
        [
            str(bin_dir / "python"),
            "-c",
            "import workbench, probes, circuits; print(workbench.__file__, probes.__file__)",
        ],
        tmp,
        env,
    )
    assert str(ROOT) not in out.stdout and str(tmp / "venv") in out.stdout, out.stdout


def test_probe_sweep_report_and_query_from_another_folder(installed):
    bin_dir, env, tmp = installed
    work = tmp / "elsewhere"
    work.mkdir()
    workbench = str(bin_dir / "workbench")
    probe = _run(
        [
            workbench,
            "probe",
            "entropy,sink",
            "--model",
            "tiny-llama",
            "--dataset",
            "prose",
            "--n-prompts",
            "4",
            "--out",
            "prose.parquet",
        ],
        work,
        env,
    )
    assert (work / "prose.parquet").is_file() and "entropy" in probe.stdout
    (work / "s.toml").write_text(SWEEP)
    _run([workbench, "sweep", "s.toml", "--out", "run", "--no-progress"], work, env)
    assert len(list((work / "run" / "parts").glob("*.parquet"))) == 2
    _run([workbench, "report", "run", "--out", "report.html"], work, env)
    page = (work / "report.html").read_text(encoding="utf-8")
    # the definitions section is copied from the packaged metrics.md, not the module docstrings' fallback
    assert "Copied from docs/metrics.md" in page and "(docstring)" not in page
    q = _run([workbench, "query", "select count(*) as n from results", "--runs", "run"], work, env)
    assert q.stdout.split()[-1].isdigit() and int(q.stdout.split()[-1]) > 0
    listing = _run([workbench, "probes"], work, env)
    assert "entropy" in listing.stdout and "retrieval" in listing.stdout
    assert json.loads((work / "run" / "run.json").read_text())


PLUGIN_SWEEP = """models = ["tiny-llama"]
probes = ["prev_offset", "entropy"]
[datasets.prose]
n_prompts = 4
[probe_params.prev_offset]
offset = 2
"""


def test_a_scaffolded_plugin_installs_and_runs_through_probe_sweep_report_and_query(installed):
    """`workbench new-probe` from the installed wheel (its templates are package data), the
    package installed without the network (no index, no dependencies, no build isolation), then
    the plugin's probe through the CLI, a sweep, a report and a query, like a built-in one."""
    import pandas as pd

    bin_dir, env, tmp = installed
    work = tmp / "plugin-author"
    work.mkdir()
    workbench = str(bin_dir / "workbench")
    _run([workbench, "new-probe", "prev_offset", "--out", "plugin"], work, env)
    assert (work / "plugin" / "workbench_probe_prev_offset" / "probe.py").is_file()
    pip = [sys.executable, "-m", "pip", "--python", str(bin_dir / "python"), "install"]
    _run([*pip, "--no-deps", "--no-index", "--no-build-isolation", "-q", str(work / "plugin")], work, env)
    show = "import workbench_probe_prev_offset as m; print(m.__file__)"
    where = _run([str(bin_dir / "python"), "-c", show], work, env)
    assert str(tmp / "venv") in where.stdout, "the plugin is imported from the venv, not its folder"

    listing = _run([workbench, "probes"], work, env)
    assert "prev_offset" in listing.stdout and "offset" in listing.stdout, listing.stdout
    probe_cmd = [workbench, "probe", "prev_offset,sink", "--model", "tiny-llama", "--dataset", "prose"]
    _run([*probe_cmd, "--n-prompts", "4", "--param", "prev_offset.offset=2", "--out", "p.parquet"], work, env)
    table = pd.read_parquet(work / "p.parquet")
    mine = table[table.probe == "prev_offset"]
    assert set(mine.metric) == {"prev_offset"} and len(mine) == 3 * 4, "tiny-llama: 3 layers x 4 heads"
    assert mine.value.between(0, 1).all() and (mine.n > 0).all()

    (work / "s.toml").write_text(PLUGIN_SWEEP)
    _run([workbench, "sweep", "s.toml", "--out", "run", "--no-progress"], work, env)
    assert len(list((work / "run" / "parts").glob("*.parquet"))) == 2
    _run([workbench, "report", "run", "--out", "report.html"], work, env)
    page = (work / "report.html").read_text(encoding="utf-8")
    assert "prev_offset" in page
    sql = "select metric, count(*) as heads, min(value) >= 0 and max(value) <= 1 as bounded from results "
    q = _run([workbench, "query", sql + "where probe = 'prev_offset' group by metric", "--runs", "run"], work, env)
    row = q.stdout.strip().splitlines()[-1].split()
    assert row[-3:] == ["prev_offset", "12", "True"], q.stdout
