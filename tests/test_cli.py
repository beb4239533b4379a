"""The command line: a good run, and one clear message + non-zero exit for every bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from workbench.cli import main
from workbench.runs.parquet import read_parquet


def run_cli(capsys, *argv):
    rc = main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def test_probe_run_writes_tidy_parquet_with_metadata(tiny_dirs, tmp_path, capsys):
    out = tmp_path / "sub" / "res.parquet"
    rc, stdout, err = run_cli(
        capsys,
        "probe",
        "entropy,sink",
        "--model",
        str(tiny_dirs["llama"]),
        "--n-prompts",
        "5",
        "--param",
        "sink.epsilon=0.2",
        "--seed",
        "3",
        "--out",
        str(out),
    )
    assert rc == 0, err
    df, meta = read_parquet(out)
    assert list(df.columns) == ["model", "dataset", "probe", "metric", "layer", "head", "value", "n"]
    assert set(df.metric) == {"entropy", "entropy_norm", "sink_mass", "sink_rate"}
    assert len(df) == 4 * 3 * 4 and df.value.notna().all()
    assert (df[df.probe == "sink"].n == 5).all()
    assert meta["dataset"]["name"] == "prose" and meta["dataset"]["seed"] == 3 and meta["dataset"]["n_prompts"] == 5
    assert meta["model"]["n_layers"] == 3 and "torch" in meta["versions"]
    assert {"name": "sink", "epsilon": 0.2} in meta["probes"]
    assert "top 5 heads per metric" in stdout and "sink_mass" in stdout
    assert [p.name for p in out.parent.iterdir()] == ["res.parquet"], "no temp files left behind"


def test_attention_path_flag_gives_the_same_numbers(tiny_dirs, tmp_path, capsys):
    """--attention-path chunks forces the reference path; the numbers are auto's to 1e-4."""
    tables = {}
    for path in ("auto", "chunks"):
        out = tmp_path / f"{path}.parquet"
        rc, _, err = run_cli(
            capsys,
            "probe",
            "entropy,sink,induction,streaming",
            "--model",
            str(tiny_dirs["llama"]),
            "--n-prompts",
            "4",
            "--attention-path",
            path,
            "--no-progress",
            "--out",
            str(out),
        )
        assert rc == 0, err
        tables[path], meta = read_parquet(out)
        assert meta["config"]["attention_path"] == path
    both = tables["auto"].merge(tables["chunks"], on=["probe", "metric", "layer", "head"])
    assert len(both) == len(tables["auto"]) and (both.value_x - both.value_y).abs().max() <= 1e-4
    rc, _, err = run_cli(
        capsys,
        "probe",
        "sink",
        "--model",
        str(tiny_dirs["llama"]),
        "--attention-path",
        "rows",
        "--out",
        str(tmp_path / "x.parquet"),
    )
    assert rc == 2 and "error:" in err


def test_token_prompts_are_used_exactly_and_bos_is_explicit(tiny_dirs, tmp_path, capsys):
    prompts = write_jsonl(
        tmp_path / "p.jsonl", [{"id": "a", "tokens": [5, 6, 7, 8]}, {"id": "b", "text": "the king said"}]
    )
    out = tmp_path / "r.parquet"
    assert (
        run_cli(
            capsys, "probe", "entropy", "--model", str(tiny_dirs["llama"]), "--prompts", str(prompts), "--out", str(out)
        )[0]
        == 0
    )
    df, meta = read_parquet(out)
    assert df[df.metric == "entropy"].n.iloc[0] == (4 - 1) + (3 - 1)
    assert meta["dataset"]["prepend_bos"] is False
    assert (
        run_cli(
            capsys,
            "probe",
            "entropy",
            "--model",
            str(tiny_dirs["llama"]),
            "--prompts",
            str(prompts),
            "--prepend-bos",
            "--out",
            str(out),
        )[0]
        == 0
    )
    df, meta = read_parquet(out)
    assert df[df.metric == "entropy"].n.iloc[0] == (4 - 1) + 3, (
        "BOS prepended once to the text prompt, token ids kept as given"
    )
    assert meta["dataset"]["prepend_bos"] is True


BAD_PROMPTS = {
    "malformed": (['{"id": "a", "text": "ok"}', "{not json"], "p.jsonl:2: not valid JSON"),
    "no_text": ([{"id": "a"}], "exactly one of 'text' or 'tokens'"),
    "empty_prompt": ([{"id": "a", "text": ""}], "is empty"),
    "too_long": ([{"id": "long", "tokens": [5] * 300}], "longer than the model's context of 256"),
    "out_of_vocab": ([{"id": "a", "tokens": [5, 99999]}], "outside the vocabulary"),
    "negative_token": ([{"id": "a", "tokens": [-1, 5]}], "outside the vocabulary"),
    "empty_file": ([], "has no prompts"),
    "duplicate_id": ([{"id": "a", "text": "x"}, {"id": "a", "text": "y"}], "duplicate prompt id"),
}


@pytest.mark.parametrize("case", sorted(BAD_PROMPTS))
def test_bad_prompts_fail_cleanly(tiny_dirs, tmp_path, capsys, case):
    rows, message = BAD_PROMPTS[case]
    prompts = write_jsonl(tmp_path / "p.jsonl", rows)
    out = tmp_path / "r.parquet"
    rc, _, err = run_cli(
        capsys, "probe", "entropy", "--model", str(tiny_dirs["llama"]), "--prompts", str(prompts), "--out", str(out)
    )
    assert rc == 2
    assert message in err and err.startswith("error:") and "fix:" in err
    assert "Traceback" not in err
    assert not out.exists() and list(tmp_path.iterdir()) == [prompts]


@pytest.mark.parametrize(
    "argv, message",
    [
        (["probe", "entropy", "--model", "no-such-model!", "--out", "{tmp}/r.parquet"], "unknown model"),
        (["probe", "entropy", "--model", "{tmp}", "--out", "{tmp}/r.parquet"], "no config.json"),
        (["probe", "entropy,bogus", "--model", "tiny-llama", "--out", "{tmp}/r.parquet"], "unknown probe 'bogus'"),
        (["probe", "entropy", "--prompts", "{tmp}/missing.jsonl", "--out", "{tmp}/r.parquet"], "does not exist"),
        (["probe", "entropy", "--dataset", "nope", "--out", "{tmp}/r.parquet"], "unknown dataset 'nope'"),
        (["probe", "entropy", "--out", "/proc/no/r.parquet"], "cannot write to /proc/no/r.parquet"),
        (["probe", "entropy", "--out", "{tmp}/r.csv"], "should end in .parquet"),
        (["probe", "entropy", "--n-prompts", "0", "--out", "{tmp}/r.parquet"], "--n-prompts: must be >= 1"),
        (["probe", "entropy", "--batch-size", "zero", "--out", "{tmp}/r.parquet"], "--batch-size must be"),
        (
            ["probe", "sink", "--param", "sink.bogus=1", "--model", "tiny-llama", "--out", "{tmp}/r.parquet"],
            "sink: unknown parameter 'bogus'",
        ),
        (
            ["probe", "sink", "--param", "sink.epsilon=abc", "--out", "{tmp}/r.parquet"],
            "sink.epsilon: expected a number, got 'abc'",
        ),
        (
            ["probe", "sink", "--param", "sink.epsilon=5", "--out", "{tmp}/r.parquet"],
            "sink.epsilon: must be <= 1, got 5",
        ),
        (
            ["probe", "sink", "--param", "sink.epsilon=NaN", "--out", "{tmp}/r.parquet"],
            "sink.epsilon: must be a finite number",
        ),
        (["probe", "streaming", "--param", "streaming.recent=true", "--out", "{tmp}/r.parquet"], "streaming.recent"),
        (
            ["probe", "retrieval", "--param", "retrieval.span=everything", "--out", "{tmp}/r.parquet"],
            "retrieval.span: must be one of",
        ),
        (["probe", "sink", "--param", "entropy.x=1", "--out", "{tmp}/r.parquet"], "not in this run"),
        (["probe", "entropy", "--dtype", "float8", "--out", "{tmp}/r.parquet"], "unknown dtype"),
    ],
)
def test_bad_arguments_fail_cleanly(tmp_path, capsys, argv, message):
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    rc, _, err = run_cli(capsys, *argv)
    assert rc == 2, err
    assert message in err and "Traceback" not in err
    assert not list(tmp_path.glob("*.parquet"))


def test_unwritable_output_directory(tmp_path, capsys):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        if os.access(locked, os.W_OK):  # root ignores permissions; use a path under a file instead
            target = tmp_path / "afile"
            target.write_text("x")
            out = target / "r.parquet"
        else:
            out = locked / "r.parquet"
        rc, _, err = run_cli(capsys, "probe", "entropy", "--model", "tiny-llama", "--out", str(out))
        assert rc == 2 and "cannot write to" in err
    finally:
        locked.chmod(0o700)


def test_failed_write_leaves_no_file(tiny_dirs, tmp_path, capsys, monkeypatch):
    """A crash while writing leaves neither the final file nor a temp file."""
    import workbench.runs.parquet as results

    def boom(table, f, **kw):
        f.write(b"PAR1 partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(results.pq, "write_table", boom)
    out = tmp_path / "r.parquet"
    rc, _, err = run_cli(
        capsys, "probe", "entropy", "--model", str(tiny_dirs["llama"]), "--n-prompts", "2", "--out", str(out)
    )
    assert rc != 0 and "Traceback" not in err
    assert list(tmp_path.iterdir()) == []


def test_console_script_exit_code_and_listing(tmp_path):
    exe = Path(sys.executable).parent / "workbench"
    res = subprocess.run(
        [str(exe), "probe", "nope", "--out", str(tmp_path / "r.parquet")], capture_output=True, text=True
    )
    assert res.returncode == 2 and "unknown probe 'nope'" in res.stderr and "Traceback" not in res.stderr
    res = subprocess.run([str(exe), "probes"], capture_output=True, text=True)
    assert res.returncode == 0 and "entropy_norm" in res.stdout and "sink_rate" in res.stdout


def test_dataset_export_round_trips(tiny_dirs, tmp_path, capsys):
    path = tmp_path / "prose.jsonl"
    assert run_cli(capsys, "dataset", "prose", "--n-prompts", "3", "--out", str(path))[0] == 0
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert len(rows) == 3 and all(r["text"] and r["id"] for r in rows)
    out = tmp_path / "r.parquet"
    assert (
        run_cli(capsys, "probe", "sink", "--model", str(tiny_dirs["llama"]), "--prompts", str(path), "--out", str(out))[
            0
        ]
        == 0
    )
    assert pq.read_table(out).num_rows == 2 * 3 * 4


def test_retrieval_cli_errors(tiny_dirs, tmp_path, capsys):
    out = tmp_path / "r.parquet"
    rc, _, err = run_cli(capsys, "probe", "retrieval", "--dataset", "niah", "--depths", "0,1.5", "--out", str(out))
    assert rc == 2 and "depth 1.5 is outside [0, 1]" in err
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"id": "a", "text": "no needle here"}])
    rc, _, err = run_cli(
        capsys, "probe", "retrieval", "--model", str(tiny_dirs["llama"]), "--prompts", str(prompts), "--out", str(out)
    )
    assert rc == 2 and "needs niah prompts" in err
    rc, _, err = run_cli(
        capsys,
        "probe",
        "retrieval",
        "--model",
        str(tiny_dirs["llama"]),
        "--dataset",
        "niah",
        "--context-len",
        "20",
        "--out",
        str(out),
    )
    assert rc == 2 and "too short" in err
    rc, _, err = run_cli(
        capsys,
        "probe",
        "retrieval",
        "--model",
        str(tiny_dirs["llama"]),
        "--dataset",
        "niah",
        "--context-len",
        "999",
        "--out",
        str(out),
    )
    assert rc == 2 and "exceeds the model's context of 256" in err
    assert not out.exists()


def test_retrieval_and_induction_from_the_cli(tiny_dirs, tmp_path, capsys):
    out = tmp_path / "r.parquet"
    rc, stdout, err = run_cli(
        capsys,
        "probe",
        "retrieval,sink",
        "--model",
        str(tiny_dirs["llama"]),
        "--dataset",
        "niah",
        "--context-len",
        "120",
        "--depths",
        "0.5",
        "--n-prompts",
        "2",
        "--param",
        "retrieval.max_new_tokens=3",
        "--out",
        str(out),
    )
    assert rc == 0, err
    df, meta = read_parquet(out)
    assert set(df.probe) == {"retrieval", "sink"}
    assert meta["summaries"]["retrieval"]["n_prompts"] == 2 and "prompts counted" in stdout
    niah = tmp_path / "niah.jsonl"
    assert (
        run_cli(
            capsys,
            "dataset",
            "niah",
            "--model",
            str(tiny_dirs["llama"]),
            "--context-len",
            "100",
            "--n-prompts",
            "2",
            "--out",
            str(niah),
        )[0]
        == 0
    )
    rows = [json.loads(line) for line in niah.read_text().splitlines()]
    assert all("answer_span" in r and "tokens" in r for r in rows)
    rc, _, err = run_cli(
        capsys,
        "probe",
        "retrieval",
        "--model",
        str(tiny_dirs["llama"]),
        "--prompts",
        str(niah),
        "--param",
        "retrieval.max_new_tokens=2",
        "--out",
        str(out),
    )
    assert rc == 0, err


def test_help_lists_every_command_and_each_has_an_example(capsys):
    from workbench.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    with pytest.raises(SystemExit):
        main(["--help"])
    top = capsys.readouterr().out
    for name, cmd in sub.choices.items():
        assert name in top, f"`workbench --help` does not list {name}"
        assert cmd.description and cmd.epilog and cmd.epilog.startswith("example:\n  workbench "), name
        help_line = next(a.help for a in sub._choices_actions if a.dest == name)
        assert help_line and len(help_line) < 100, name
    assert {
        "probe",
        "probes",
        "models",
        "datasets",
        "dataset",
        "patch",
        "task",
        "circuit",
        "sweep",
        "query",
        "report",
        "reinforce",
        "retrieval-ablation",
    } <= set(sub.choices)


def test_a_closed_pipe_is_not_an_internal_error(tmp_path):
    """`workbench probes | head -1`: the reader is gone before we write; no error, no traceback."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        res = subprocess.run(
            [sys.executable, "-m", "workbench", "probes"],
            stdout=write_end,
            stderr=subprocess.PIPE,
            text=True,
            timeout=120,
        )
    finally:
        os.close(write_end)
    assert res.returncode == 0 and res.stderr == "", res.stderr


def test_patching_near_equal_baselines_print_one_warning_line(tmp_path, capsys):
    """Pairs whose clean and corrupted logit differences are nearly equal: the effects mean
    little, and the CLI says so in one `warning:` line (no library warnings, no traceback)."""
    pairs = write_jsonl(
        tmp_path / "p.jsonl",
        [
            {"id": "a", "clean": "the king said", "corrupted": "the man said", "correct": " the", "incorrect": " and"},
        ],
    )
    import warnings

    from circuits import baseline as patching
    from workbench.errors import WorkbenchWarning

    real = patching.baseline

    def flat(model, pairs_):  # the real baseline, then the warning it gives for near-equal LDs
        warnings.warn("clean and corrupted logit differences are nearly equal", WorkbenchWarning)
        warnings.warn("a library's deprecation notice", FutureWarning)  # must not reach the terminal
        return real(model, pairs_)

    patching.baseline = flat
    try:
        rc, _, err = run_cli(
            capsys,
            "patch",
            "path",
            "--model",
            "tiny-llama",
            "--pairs",
            str(pairs),
            "--out",
            str(tmp_path / "o.parquet"),
        )
    finally:
        patching.baseline = real
    assert rc == 0, err
    assert [line for line in err.splitlines() if line.strip()] == [
        "warning: clean and corrupted logit differences are nearly equal"
    ], err
