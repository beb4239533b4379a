"""The cross-model study's files: shipped sweep configs parse, the distil script builds the notebook's table
(relative depth, each layer's attention kind), and the shipped table has what notebooks/06 reads."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pandas as pd
import pytest

from workbench.cli import main
from workbench.runs.config import load_config

ROOT = Path(__file__).resolve().parents[1]


def build_script():
    spec = importlib.util.spec_from_file_location(
        "build_cross_model", ROOT / "data" / "results" / "build_cross_model.py"
    )
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("path", sorted((ROOT / "data" / "sweeps").glob("*.toml")), ids=lambda p: p.stem)
def test_shipped_sweep_configs_load(path):
    cfg = load_config(path)
    assert cfg.models and cfg.probes


def test_build_from_a_tiny_two_family_sweep(tiny_dirs, tmp_path):
    cfg = tmp_path / "cross.toml"
    cfg.write_text(
        f'models = ["{tiny_dirs["llama"]}", "tiny-gemma3-text"]\nprobes = ["entropy", "sink"]\n'
        "[datasets.prose]\nn_prompts = 3\n"
    )
    assert main(["sweep", str(cfg), "--out", str(tmp_path / "run"), "--no-progress"]) == 0
    t = build_script().build(tmp_path / "run")
    heads = t[t.kind == "head"]
    assert set(heads.metric) >= {"entropy", "entropy_norm", "sink_mass", "sink_rate"}
    assert ((heads.depth >= 0) & (heads.depth <= 1)).all()
    assert (heads.depth == heads.layer / (heads.n_layers - 1)).all()
    gemma = heads[heads.model == "tiny-gemma3-text"]
    # tiny-gemma3-text: 4 layers, sliding window except layer 2
    assert gemma.groupby("layer").attention.first().to_dict() == {0: "sliding", 1: "sliding", 2: "global", 3: "sliding"}
    assert (heads[heads.model != "tiny-gemma3-text"].attention == "global").all()


def test_the_shipped_table_has_what_the_notebook_reads():
    t = pd.read_parquet(ROOT / "data" / "results" / "cross_model.parquet")
    assert set(t.model) == {"smollm2-135m", "gemma3-270m"}
    assert list(t.columns) == build_script().COLUMNS
    heads = t[t.kind == "head"]
    gemma = heads[heads.model == "gemma3-270m"]
    assert sorted(gemma[gemma.attention == "global"].layer.unique()) == [5, 11, 17]
    for dataset, metric in [
        ("prose", "sink_mass"),
        ("long-prose", "entropy_norm"),
        ("repeated-random", "induction"),
        ("niah-1k", "retrieval"),
        ("bos-prose", "sink_mass"),
        ("no-bos-prose", "sink_mass"),
    ]:
        assert len(heads[(heads.dataset == dataset) & (heads.metric == metric)]) > 0, (dataset, metric)
    summary = t[t.kind == "summary"]
    assert set(summary[summary.dataset == "ioi"].metric) == {"ld_clean", "ld_corrupted"}
    assert len(summary[summary.metric == "accuracy"]) >= 6
