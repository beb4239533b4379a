"""Atomic writes give the mode a normal new file gets (issue 10, item 9): temp file + rename used
to keep mkstemp's 0600 under umask 022."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pandas as pd
import pytest

from circuits.tasks import Pair, write_pairs
from workbench.errors import WorkbenchError
from workbench.files.atomic import atomic_write, atomic_write_text, current_umask
from workbench.inputs.prompts import Prompt, read_prompts, write_prompts
from workbench.protocol.table import tidy
from workbench.report.build import write_report
from workbench.runs.parquet import read_parquet, write_parquet


@pytest.fixture
def umask():
    """Set the process umask for one test, and put the old one back."""
    old = os.umask(0o022)
    os.umask(old)
    yield lambda mask: os.umask(mask)
    os.umask(old)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _table() -> pd.DataFrame:
    return tidy(
        pd.DataFrame({"probe": "entropy", "metric": "entropy", "layer": [0], "head": [0], "value": [0.5], "n": [3]}),
        "m",
        "prose",
    )


def _writers(tmp_path: Path):
    run = tmp_path / "run"
    write_parquet(_table(), run / "parts" / "a.parquet", {"schema_version": 1})
    pair = Pair("p", [1, 2], [1, 3], 4, 5, {"clean": "a b", "corrupted": "a c", "correct": " d", "incorrect": " e"})
    return {
        "parquet": lambda p: write_parquet(_table(), p, {}),
        "report": lambda p: write_report(run, p),
        "prompts": lambda p: write_prompts([Prompt("a", text="hello")], p),
        "pairs": lambda p: write_pairs([pair], p),
        "text": lambda p: atomic_write_text(p, "hi\n"),
    }


@pytest.mark.parametrize("what", ["parquet", "report", "prompts", "pairs", "text"])
@pytest.mark.parametrize("mask, expected", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_outputs_get_the_normal_mode_for_new_files(tmp_path, umask, what, mask, expected):
    write = _writers(tmp_path)[what]
    umask(mask)
    out = tmp_path / f"out-{what}"
    write(out)
    assert out.is_file() and mode(out) == expected
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp file left


def test_current_umask_reads_without_changing_it(umask):
    umask(0o027)
    assert current_umask() == 0o027
    assert current_umask() == 0o027
    assert os.umask(0o027) == 0o027


def test_overwrite_keeps_the_existing_files_mode(tmp_path, umask):
    """As `open(path, "w")` would: a file the user made private stays private."""
    umask(0o022)
    out = tmp_path / "r.txt"
    atomic_write_text(out, "one")
    os.chmod(out, 0o600)
    atomic_write_text(out, "two")
    assert out.read_text() == "two" and mode(out) == 0o600


def test_failed_write_leaves_nothing(tmp_path):
    out = tmp_path / "x.bin"
    out.write_bytes(b"old")

    def boom(f):
        f.write(b"partial")
        raise RuntimeError("writer failed")

    with pytest.raises(RuntimeError):
        atomic_write(out, boom)
    assert out.read_bytes() == b"old" and sorted(p.name for p in tmp_path.iterdir()) == ["x.bin"]


def test_unwritable_folder_is_a_workbench_error(tmp_path):
    if os.geteuid() == 0:
        pytest.skip("root can write anywhere")
    ro = tmp_path / "ro"
    ro.mkdir()
    os.chmod(ro, 0o500)
    try:
        with pytest.raises(WorkbenchError, match="cannot write"):
            atomic_write_text(ro / "x.txt", "x")
    finally:
        os.chmod(ro, 0o700)


def test_writing_into_a_missing_folder_or_onto_a_directory(tmp_path):
    with pytest.raises(WorkbenchError, match="cannot write"):
        atomic_write_text(tmp_path / "nope" / "x.txt", "x")
    (tmp_path / "d").mkdir()
    with pytest.raises(WorkbenchError, match="cannot write"):
        atomic_write_text(tmp_path / "d", "x")
    assert (tmp_path / "d").is_dir()


def test_round_trips(tmp_path):
    write_prompts([Prompt("a", text="héllo"), Prompt("b", tokens=[1, 2])], tmp_path / "p.jsonl")
    assert [p.id for p in read_prompts(tmp_path / "p.jsonl")] == ["a", "b"]
    write_parquet(_table(), tmp_path / "t.parquet", {"k": 1})
    df, meta = read_parquet(tmp_path / "t.parquet")
    assert meta == {"k": 1} and df.value.tolist() == [0.5]
