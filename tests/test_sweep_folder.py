"""A run folder reports exactly its current config: damaged parts are recomputed, parts of an
earlier config are set aside, every setting that changes numbers is in a unit's key, and configs
are validated before anything is written (issue 10, items 2-5)."""

from __future__ import annotations

import json
import os
import shutil
import textwrap

import pandas as pd
import pytest

from workbench.cli import main
from workbench.runs.config import load_config
from workbench.runs.load import load_results
from workbench.runs.sweep import run_sweep

BASE = """models = ["{model}"]
probes = ["entropy", "sink", "induction"]
{extra}
[datasets.prose]
n_prompts = 3
probes = ["entropy", "sink"]
[datasets.repeated-random]
n_prompts = 2
period = 12
probes = ["induction"]
"""


def write(tmp_path, model, extra="", name="s.toml", body=BASE):
    cfg = tmp_path / name
    cfg.write_text(body.format(model=model, extra=extra))
    return cfg


def quiet(*_):
    pass


def rows(run):
    df = load_results(run)
    return df.sort_values(["model", "dataset", "probe", "metric", "layer", "head"]).reset_index(drop=True)


def test_a_damaged_part_is_detected_set_aside_and_recomputed(tiny_dirs, tmp_path):
    cfg = write(tmp_path, tiny_dirs["llama"])
    run = tmp_path / "run"
    run_sweep(cfg, run, progress=False, log=quiet)
    clean = rows(run)
    part = sorted((run / "parts").glob("*__prose__sink__*.parquet"))[0]
    part.write_bytes(part.read_bytes()[: part.stat().st_size // 2])  # truncated (a full disk, a bad copy)
    said = []
    summary = run_sweep(cfg, run, progress=False, log=said.append)
    assert summary["ran"] == 1 and summary["set_aside_corrupt"] == 1
    assert any("unreadable or damaged" in s for s in said)
    assert list((run / "superseded").rglob(part.name)), "the damaged part is kept aside, not deleted"
    pd.testing.assert_frame_equal(rows(run), clean)
    # a damaged part that was never recorded (run.json lost) is found by reading it
    (run / "run.json").unlink()
    part.write_bytes(b"PAR1 not really")
    summary = run_sweep(cfg, run, progress=False, log=quiet)
    assert summary["ran"] == 1 and summary["set_aside_corrupt"] == 1
    pd.testing.assert_frame_equal(rows(run), clean)
    assert run_sweep(cfg, run, progress=False, log=quiet)["ran"] == 0, "now everything is sound"


def test_parts_of_an_earlier_config_are_set_aside_never_mixed_in(tiny_dirs, tmp_path, capsys):
    cfg = write(tmp_path, tiny_dirs["llama"])
    run = tmp_path / "run"
    assert main(["sweep", str(cfg), "--out", str(run), "--no-progress"]) == 0
    before = rows(run)
    cfg.write_text(cfg.read_text().replace("n_prompts = 3", "n_prompts = 5"))
    capsys.readouterr()
    assert main(["sweep", str(cfg), "--out", str(run), "--no-progress"]) == 0
    err = capsys.readouterr().err
    assert "set aside 2 part(s) of an earlier config" in err
    after = rows(run)
    keys = ["model", "dataset", "probe", "metric", "layer", "head"]
    assert not after.duplicated(keys).any(), "one version of each unit"
    assert (after[after.probe == "sink"].n == 5).all() and (before[before.probe == "sink"].n == 3).all()
    pd.testing.assert_frame_equal(after[after.probe == "induction"], before[before.probe == "induction"])
    assert len(list((run / "superseded").rglob("*.parquet"))) == 2
    from workbench.runs.query import query

    n = query("select count(*) as n from results where probe = 'sink'", [run]).n.iloc[0]
    assert n == 2 * 3 * 4  # two sink metrics x 3 layers x 4 heads: no stale rows


def keys(cfg):
    return {(u.dataset, u.probe): u.key for u in load_config(cfg).units()}


CONFIG_EDITS = {  # the changes made to the config's text
    "seed": lambda text: "seed = 1\n" + text,
    "n_prompts": lambda text: text.replace("n_prompts = 2", "n_prompts = 3"),
    "period": lambda text: text.replace("period = 12", "period = 13"),
    "dtype": lambda text: 'dtype = "bfloat16"\n' + text,
    "prepend_bos": lambda text: "prepend_bos = true\n" + text,
    "probe_param": lambda text: text.replace("epsilon = 0.3", "epsilon = 0.4"),
}


def _make_change(change, cfg, tmp_path, model, monkeypatch):
    """Make the one change a case names: to the config's text, the prompts file, the model folder or a probe."""
    text = cfg.read_text()
    if change in CONFIG_EDITS:
        cfg.write_text(CONFIG_EDITS[change](text))
    elif change == "prompts_file":
        (tmp_path / "p.jsonl").write_text('{"id": "a", "text": "the king said unto"}\n')
    elif change == "model_folder":
        conf = json.loads((model / "config.json").read_text())
        conf["rms_norm_eps"] = 1e-5
        (model / "config.json").write_text(json.dumps(conf))
    elif change == "model_weights":
        w = next(model.glob("*.safetensors"))  # one byte of the weights: same size, same time
        st, data = w.stat(), bytearray(w.read_bytes())
        data[-1] ^= 0x01
        w.write_bytes(bytes(data))
        os.utime(w, ns=(st.st_atime_ns, st.st_mtime_ns))
    elif change == "probe_version":
        from workbench.protocol.registry import probe_class

        monkeypatch.setattr(probe_class("sink"), "version", 2)


@pytest.mark.parametrize(
    "change",
    [
        "seed",
        "n_prompts",
        "period",
        "dtype",
        "prepend_bos",
        "probe_param",
        "prompts_file",
        "model_folder",
        "model_weights",
        "probe_version",
    ],
)
def test_every_setting_that_changes_numbers_changes_the_key(tiny_dirs, tmp_path, change, monkeypatch):
    model = tmp_path / "model"
    shutil.copytree(tiny_dirs["llama"], model)
    (tmp_path / "p.jsonl").write_text('{"id": "a", "text": "the king said"}\n')
    body = BASE + '[datasets.mine]\npath = "p.jsonl"\nprobes = ["entropy"]\n[probe_params.sink]\nepsilon = 0.3\n'
    cfg = write(tmp_path, model, body=body)
    base = keys(cfg)
    _make_change(change, cfg, tmp_path, model, monkeypatch)
    after = keys(cfg)
    changed = {k for k in base if base[k] != after[k]}
    expect = {
        "seed": set(base) - {("mine", "entropy")},  # a prompts file is used as given: no seed
        "dtype": set(base),
        "prepend_bos": set(base),
        "model_folder": set(base),
        "model_weights": set(base),
        "n_prompts": {("repeated-random", "induction")},
        "period": {("repeated-random", "induction")},
        "probe_param": {("prose", "sink")},
        "prompts_file": {("mine", "entropy")},
        "probe_version": {("prose", "sink")},
    }[change]
    assert changed == expect


def test_what_does_not_change_numbers_does_not_change_the_key(tiny_dirs, tmp_path):
    cfg = write(tmp_path, tiny_dirs["llama"])
    base = keys(cfg)
    cfg.write_text(
        "batch_size = 1\n" + cfg.read_text().replace("[datasets.prose]\n", "[datasets.prose]\nmin_words = 40\n")
    )
    assert keys(cfg) == base, "batch size and options given at their default value leave the key alone"


BAD = [
    ('batch_size = "many"\n', "batch_size must be a whole number or auto"),
    ("batch_size = 0\n", "batch_size must be at least 1"),
    ('dtype = "float8"\n', "unknown dtype"),
    ("dtype = 3\n", "top level.dtype: expected a string, got 3"),
    ('device = "cuda:7"\n', "no CUDA GPU is visible"),
    ("seed = -1\n", "top level.seed: must be >= 0, got -1"),
    ('seed = "x"\n', "top level.seed: expected a whole number"),
    ("prepend_bos = 1\n", "top level.prepend_bos: expected true or false, got 1"),
]


@pytest.mark.parametrize("extra, message", BAD)
def test_bad_top_level_values_fail_before_anything_is_written(tiny_dirs, tmp_path, capsys, extra, message):
    cfg = write(tmp_path, tiny_dirs["llama"], extra=extra)
    run = tmp_path / "run"
    rc = main(["sweep", str(cfg), "--out", str(run)])
    err = capsys.readouterr().err
    assert rc == 2 and message in err and "fix:" in err and "Traceback" not in err
    assert not run.exists()


@pytest.mark.parametrize(
    "table, message",
    [
        ('[datasets.prose]\nn_prompts = "many"\n', "[datasets.prose].n_prompts: expected a whole number"),
        ("[datasets.prose]\nn_prompts = 0\n", "[datasets.prose].n_prompts: must be >= 1"),
        ("[datasets.repeated-random]\nperiod = 1.5\n", "[datasets.repeated-random].period"),
        ("[datasets.niah]\ndepths = [2.0]\n", "[datasets.niah].depths[0]: must be <= 1"),
        ("[datasets.prose]\nbogus = 1\n", "unknown option 'bogus'"),
        ("[datasets.mine]\npath = 3\n", "path must be a string"),
        ('[datasets.mine]\ndataset = "nope"\n', "unknown dataset 'nope' in [datasets.mine]"),
        ('[datasets.prose]\n[probe_params.sink]\nepsilon = "abc"\n', "sink.epsilon: expected a number"),
        ("[datasets.prose]\n[probe_params.sink]\nepsilon = 5\n", "sink.epsilon: must be <= 1"),
        ("[datasets.prose]\n[probe_params.sink]\nepsilon = nan\n", "sink.epsilon: must be a finite number"),
        ('[datasets.prose]\nprobes = ["retrieval"]\n', "probes must list probes of this sweep"),
    ],
)
def test_bad_dataset_and_probe_values_fail_with_the_cli_rules(tiny_dirs, tmp_path, capsys, table, message):
    cfg = tmp_path / "s.toml"
    cfg.write_text(f'models = ["{tiny_dirs["llama"]}"]\nprobes = ["entropy", "sink"]\n' + table)
    rc = main(["sweep", str(cfg), "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert rc == 2 and message in err and "Traceback" not in err, err
    assert not (tmp_path / "run").exists()


def test_a_failed_rerun_keeps_the_run_and_its_config(tiny_dirs, tmp_path, capsys):
    cfg = write(tmp_path, tiny_dirs["llama"])
    run = tmp_path / "run"
    assert main(["sweep", str(cfg), "--out", str(run), "--no-progress"]) == 0
    saved = (run / "sweep.json").read_text()
    parts = sorted(p.name for p in (run / "parts").iterdir())
    bad = write(tmp_path, tiny_dirs["llama"], extra='dtype = "float8"\n', name="bad.toml")
    assert main(["sweep", str(bad), "--out", str(run)]) == 2
    assert (run / "sweep.json").read_text() == saved
    assert sorted(p.name for p in (run / "parts").iterdir()) == parts and not (run / "superseded").exists()


def test_the_same_generator_twice_and_timing_in_the_metadata(tiny_dirs, tmp_path):
    body = textwrap.dedent("""
        models = ["{model}"]
        probes = ["induction"]
        [datasets.rep-short]
        dataset = "repeated-random"
        n_prompts = 2
        period = 8
        [datasets.rep-long]
        dataset = "repeated-random"
        n_prompts = 2
        period = 20
    """)
    cfg = write(tmp_path, tiny_dirs["llama"], body=body)
    run = tmp_path / "run"
    run_sweep(cfg, run, progress=False, log=quiet)
    table, metas = load_results(run, with_metadata=True)
    assert set(table.dataset) == {"rep-short", "rep-long"}
    for m in metas:
        assert (
            m["timing"]["seconds"] >= 0
            and m["dataset"]["n_tokens"] > 0
            and m["dataset"]["generator"] == "repeated-random"
        )


def test_one_writer_per_run_folder(tiny_dirs, tmp_path, capsys):
    """Issue 30, bug 2: a second sweep into a folder another sweep is writing stops at once, with
    nothing moved or written, whatever its config; once the first is done it resumes as usual.
    (The other sweep is stood in for by holding its lock from a second open file, which flock
    treats as another writer, as it does another process.)"""
    from workbench.files.atomic import WRITER_LOCK, file_lock

    cfg = write(tmp_path, tiny_dirs["llama"])
    run = tmp_path / "run"
    assert main(["sweep", str(cfg), "--out", str(run), "--no-progress"]) == 0
    other = write(tmp_path, tiny_dirs["llama"], name="other.toml", body=BASE.replace("n_prompts = 3", "n_prompts = 2"))
    before = {p.relative_to(run): p.read_bytes() for p in run.rglob("*") if p.is_file()}
    capsys.readouterr()
    with file_lock(run / WRITER_LOCK):
        for config in (other, cfg):  # another config, or the same one twice
            assert main(["sweep", str(config), "--out", str(run), "--no-progress"]) == 2
            err = capsys.readouterr().err
            assert f"run folder {run} is being written by another sweep right now" in err and "fix:" in err
            assert {p.relative_to(run): p.read_bytes() for p in run.rglob("*") if p.is_file()} == before
    assert main(["sweep", str(other), "--out", str(run), "--no-progress"]) == 0  # the lock is gone with its holder
