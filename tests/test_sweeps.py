"""Sweeps: the minimal config, crash-resume equivalence, queries and config errors."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pandas as pd
import pytest

from workbench.cli import main
from workbench.errors import WorkbenchError
from workbench.runs.load import load_results
from workbench.runs.query import query
from workbench.runs.sweep import run_sweep

MINIMAL = """models = ["{model}"]
probes = ["entropy", "sink"]
[datasets.prose]
n_prompts = 4
"""

GRID = """models = ["{model}"]
probes = ["entropy", "sink", "induction"]
[datasets.prose]
n_prompts = 96
[datasets.repeated-random]
n_prompts = 48
period = 20
[datasets.prose2]
path = "p.jsonl"
"""


def sorted_rows(df: pd.DataFrame) -> pd.DataFrame:
    return df.sort_values(["model", "dataset", "probe", "metric", "layer", "head"]).reset_index(drop=True)


def test_minimal_config_and_rerun_skips(tiny_dirs, tmp_path, capsys):
    cfg = tmp_path / "s.toml"
    cfg.write_text(MINIMAL.format(model=tiny_dirs["llama"]))
    assert main(["sweep", str(cfg), "--out", str(tmp_path / "run"), "--no-progress"]) == 0
    first = load_results(tmp_path / "run")
    assert set(first.probe) == {"entropy", "sink"} and (first[first.probe == "sink"].n == 4).all()
    assert len(list((tmp_path / "run" / "parts").glob("*.parquet"))) == 2
    out = capsys.readouterr().out
    assert "2 run now, 0 already done" in out
    assert main(["sweep", str(cfg), "--out", str(tmp_path / "run"), "--no-progress"]) == 0
    assert "0 run now, 2 already done" in capsys.readouterr().out
    pd.testing.assert_frame_equal(sorted_rows(first), sorted_rows(load_results(tmp_path / "run")))


def test_sigkill_mid_sweep_then_resume_gives_the_uninterrupted_rows(tiny_dirs, tmp_path):
    (tmp_path / "p.jsonl").write_text(
        '{"id": "a", "text": "the king said unto them"}\n{"id": "b", "tokens": [5, 6, 7, 5, 6, 7]}\n'
    )
    cfg = tmp_path / "grid.toml"
    cfg.write_text(GRID.format(model=tiny_dirs["llama"]))
    clean = tmp_path / "clean"
    run_sweep(cfg, clean, progress=False, log=lambda *_: None)
    total = len(list((clean / "parts").glob("*.parquet")))
    assert total == 9

    crashed = tmp_path / "crashed"
    cmd = [sys.executable, "-m", "workbench", "sweep", str(cfg), "--out", str(crashed), "--no-progress"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and not list((crashed / "parts").glob("*.parquet")):
        time.sleep(0.005)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    done = len(list((crashed / "parts").glob("*.parquet")))
    assert 0 < done < total, f"kill landed after {done} of {total} parts"
    assert main(["sweep", str(cfg), "--out", str(crashed), "--no-progress"]) == 0
    assert sorted(p.name for p in (crashed / "parts").iterdir()) == sorted(p.name for p in (clean / "parts").iterdir())
    pd.testing.assert_frame_equal(sorted_rows(load_results(crashed)), sorted_rows(load_results(clean)))


_SIGINT_AFTER_FIRST_PART = """
import os, signal, sys
from workbench.cli import main
from workbench.runs.folder import RunFolder

record = RunFolder.record


def record_then_ctrl_c(self, info):  # a real SIGINT to this process, right after the first part is recorded
    record(self, info)
    os.kill(os.getpid(), signal.SIGINT)


RunFolder.record = record_then_ctrl_c
sys.exit(main(sys.argv[1:]))
"""


def test_ctrl_c_mid_sweep_says_how_many_units_were_saved_and_resume_uses_them(tiny_dirs, tmp_path):
    """SIGINT after some parts: not "no results written" (parts were), but how many units are saved
    and that a re-run resumes; the re-run then computes only the rest. The signal is sent by the
    sweep process to itself once its first part is recorded, so it lands mid-sweep however fast
    the machine is (polling for the first part from outside raced the sweep on a loaded machine)."""
    (tmp_path / "p.jsonl").write_text('{"id": "a", "text": "the king said unto them"}\n')
    cfg = tmp_path / "grid.toml"
    cfg.write_text(GRID.format(model=tiny_dirs["llama"]))
    run = tmp_path / "run"
    argv = ["sweep", str(cfg), "--out", str(run), "--no-progress"]
    proc = subprocess.run(
        [sys.executable, "-c", _SIGINT_AFTER_FIRST_PART, *argv], capture_output=True, text=True, timeout=300
    )
    err = proc.stderr
    saved = len(list((run / "parts").glob("*.parquet")))
    assert 0 < saved < 9, f"the interrupt landed after {saved} of 9 parts"
    assert proc.returncode == 130, err
    assert f"interrupted: {saved} of 9 units saved in {run}" in err and "re-run the same command to resume" in err, err
    assert "no results written" not in err and "Traceback" not in err
    summary = run_sweep(cfg, run, progress=False, log=lambda *_: None)
    assert summary["skipped"] == saved and summary["ran"] == 9 - saved


def test_query_across_runs(tiny_dirs, tmp_path):
    cfg = tmp_path / "s.toml"
    cfg.write_text(MINIMAL.format(model=tiny_dirs["llama"]))
    run_sweep(cfg, tmp_path / "a", progress=False)
    run_sweep(cfg, tmp_path / "b", progress=False)
    df = query(
        "select run, metric, count(*) as n from results group by all order by run, metric",
        [tmp_path / "a", tmp_path / "b"],
    )
    assert len(df) == 8 and set(df.n) == {12}
    with pytest.raises(WorkbenchError, match="query failed"):
        query("select nope from results", [tmp_path / "a"])


@pytest.mark.parametrize(
    "text, message",
    [
        ("models = [", "not valid TOML"),
        (
            'models = ["m"]\nprobes = ["entropy"]\nfrobnicate = 1\n[datasets.prose]\n',
            "top level: unknown key 'frobnicate'",
        ),
        ('models = ["m"]\nprobes = ["nope"]\n[datasets.prose]\n', "unknown probe 'nope'"),
        ('models = ["m"]\nprobes = ["entropy"]\n[datasets.nope]\n', "unknown dataset 'nope'"),
        ('models = ["m"]\nprobes = ["entropy"]\n', "top level.datasets: missing"),
        ('models = []\nprobes = ["entropy"]\n[datasets.prose]\n', "top level.models: list should have at least 1 item"),
        ('models = ["m"]\nprobes = ["entropy"]\n[datasets.x]\npath = "missing.jsonl"\n', "does not exist"),
    ],
)
def test_bad_configs(tmp_path, capsys, text, message):
    cfg = tmp_path / "s.toml"
    cfg.write_text(text)
    rc = main(["sweep", str(cfg), "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert rc == 2 and message in err and "Traceback" not in err


def test_empty_and_incompatible_run_folders(tiny_dirs, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert main(["report", str(tmp_path / "empty"), "--out", str(tmp_path / "r.html")]) == 2
    assert "holds no results" in capsys.readouterr().err
    old = tmp_path / "old" / "parts"
    old.mkdir(parents=True)
    pd.DataFrame({"model": ["m"], "score": [1.0]}).to_parquet(old / "x.parquet")
    assert main(["report", str(tmp_path / "old"), "--out", str(tmp_path / "r.html")]) == 2
    assert "incompatible workbench version" in capsys.readouterr().err
    assert not (tmp_path / "r.html").exists()


def test_sweep_runs_item_probes_on_their_datasets(tmp_path):
    """vhd on generated images for a VLM and context on counterfact items for a text model, in one
    sweep; the per-token rows keep their item / step / token columns."""
    cfg = tmp_path / "vlm.toml"
    cfg.write_text(
        'models = ["tiny-llava"]\nprobes = ["vhd"]\n[datasets.shapes]\nn_prompts = 3\n'
        '[probe_params.vhd]\nsteps = "all"\nmax_new_tokens = 2\n'
    )
    run_sweep(cfg, tmp_path / "run", progress=False)
    df = load_results(tmp_path / "run")
    assert set(df.metric) == {"vhd", "image_attention", "t_vhd"}
    assert len(df[df.metric == "t_vhd"]) == 6 and df[df.metric == "t_vhd"]["item"].notna().all()
    cfg2 = tmp_path / "ctx.toml"
    cfg2.write_text('models = ["tiny-llama"]\nprobes = ["context"]\n[datasets.counterfact]\nn_prompts = 4\n')
    run_sweep(cfg2, tmp_path / "run2", progress=False)
    df2 = load_results(tmp_path / "run2")
    assert {"context_divergence", "context_attention"} <= set(df2.metric)
