"""Every class of bad input, fed to every command that takes it: one `error:` line naming the fix,
exit status 2, no traceback, no "internal error" (that is for bugs), no file left behind.

Input classes: a value that is not a number, NaN, out of its meaning (negative counts, a
probability of 5), a wrong type in a config, a file that is missing / not UTF-8 / has a line
that is not an object / a field of the wrong type, an absurd size, an unknown name, an
unwritable or wrong output path.
"""

from __future__ import annotations

import json

import pytest

from workbench.cli import main

NON_UTF8 = b'{"id": "a", "text": "caf\xe9"}\n'
NOT_OBJECT = "[1, 2]\n"
BAD_FIELD_PAIRS = '{"id": "a", "clean": 3, "corrupted": "x", "correct": " a", "incorrect": " b"}\n'
GOOD_PAIRS = (
    '{"id": "a", "clean": "the king said", "corrupted": "the man said", "correct": " king", "incorrect": " man"}\n'
)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("inputs")
    (root / "nonutf8.jsonl").write_bytes(NON_UTF8)
    (root / "notobject.jsonl").write_text(NOT_OBJECT)
    (root / "badfield.jsonl").write_text(BAD_FIELD_PAIRS)
    (root / "pairs.jsonl").write_text(GOOD_PAIRS)
    (root / "nonutf8.toml").write_bytes(b'models = ["caf\xe9"]\n')
    (root / "good.toml").write_text('models = ["tiny-llama"]\nprobes = ["entropy"]\n[datasets.prose]\nn_prompts = 2\n')
    (root / "badexec.toml").write_text(
        'models = ["tiny-llama"]\nprobes = ["entropy"]\n[executor]\ncpus = 0\n[datasets.prose]\nn_prompts = 2\n'
    )
    (root / "badmem.toml").write_text(
        'models = ["tiny-llama"]\nprobes = ["entropy"]\n[executor]\nmemory = "lots"\n[datasets.prose]\nn_prompts = 2\n'
    )
    (root / "badviews.toml").write_text(
        'models = ["tiny-llama"]\nprobes = ["entropy"]\nviews = "no"\n[datasets.prose]\nn_prompts = 2\n'
    )
    (root / "afile").write_text("x")
    (root / "emptytarget.jsonl").write_text('{"text": "the cat sat on the", "target": ""}\n')
    (root / "longtarget.jsonl").write_text(json.dumps({"text": "a b", "target": " a" * 5000}) + "\n")
    _tiny_bloom(root / "bloom")
    (root / "run" / "parts").mkdir(parents=True)
    return root


def _tiny_bloom(folder):
    """A tiny Bloom (its attention bypasses transformers' attention interface: no head edit point),
    with the tiny Llama's tokenizer."""
    from transformers import AutoTokenizer, BloomConfig, BloomForCausalLM

    from workbench.models.loading import resolve_source

    BloomForCausalLM(BloomConfig(vocab_size=600, hidden_size=32, n_layer=2, n_head=4)).save_pretrained(folder)
    AutoTokenizer.from_pretrained(resolve_source("tiny-llama")[0]).save_pretrained(folder)


M = ["--model", "tiny-llama"]
OUT = ["--out", "{tmp}/o.parquet"]
CASES = {
    # command: [(argv, expected message fragment), ...]
    "probe": [
        (["probe", "sink", *M, "--param", "sink.epsilon=abc", *OUT], "sink.epsilon: expected a number"),
        (["probe", "sink", *M, "--param", "sink.epsilon=nan", *OUT], "must be a finite number"),
        (["probe", "sink", *M, "--param", "sink.epsilon=5", *OUT], "must be <= 1"),
        (["probe", "streaming", *M, "--param", "streaming.recent=0", *OUT], "must be >= 1"),
        (["probe", "entropy", *M, "--batch-size", "-1", *OUT], "--batch-size must be at least 1"),
        (["probe", "entropy", *M, "--n-prompts", "0", *OUT], "--n-prompts: must be >= 1"),
        (["probe", "entropy", *M, "--n-prompts", "100000000", *OUT], "at most"),
        (["probe", "entropy", *M, "--prompts", "{files}/nonutf8.jsonl", *OUT], "UTF-8"),
        (["probe", "entropy", *M, "--prompts", "{files}/notobject.jsonl", *OUT], "expected a JSON object"),
        (["probe", "entropy", *M, "--prompts", "{files}/missing.jsonl", *OUT], "does not exist"),
        (["probe", "entropy", *M, "--out", "{files}/afile/o.parquet"], "cannot write"),
        (["probe", "entropy", *M, "--dtype", "float8", *OUT], "unknown dtype"),
        (["probe", "entropy", *M, "--device", "cuda:7", *OUT], "no CUDA GPU"),
        (["probe", "entropy", *M, "--ablate", "99.0", *OUT], "out of range"),
        (["probe", "entropy", *M, "--ablation", "bogus", *OUT], "unknown ablation"),
        (["probe", "entropy", *M, "--dataset", "nope", *OUT], "unknown dataset"),
        (["probe", "retrieval", *M, "--dataset", "niah", "--context-len", "abc", *OUT], "--context-len takes"),
        (["probe", "retrieval", *M, "--dataset", "niah", "--depths", "2", *OUT], "outside [0, 1]"),
        (["probe", "induction", *M, "--dataset", "repeated-random", "--period", "0", *OUT], "period"),
        (["probe", "nope", *M, *OUT], "unknown probe"),
    ],
    "dataset": [
        (["dataset", "prose", "--n-prompts", "0", "--out", "{tmp}/d.jsonl"], "--n-prompts: must be >= 1"),
        (["dataset", "niah", *M, "--depths", "5", "--out", "{tmp}/d.jsonl"], "outside [0, 1]"),
        (["dataset", "nope", "--out", "{tmp}/d.jsonl"], "unknown dataset"),
        (["dataset", "prose", "--out", "{files}/afile/d.jsonl"], "cannot write"),
    ],
    "patch": [
        (["patch", "path", *M, "--pairs", "{files}/nonutf8.jsonl", *OUT], "UTF-8"),
        (["patch", "path", *M, "--pairs", "{files}/notobject.jsonl", *OUT], "JSON object"),
        (["patch", "path", *M, "--pairs", "{files}/badfield.jsonl", *OUT], "clean"),
        (["patch", "path", *M, "--pairs", "{files}/pairs.jsonl", "--receivers", "x.y", *OUT], "receiver"),
        (["patch", "path", *M, "--pairs", "{files}/pairs.jsonl", "--max-rows", "0", *OUT], "--max-rows"),
        (["patch", "path", *M, "--pairs", "{files}/pairs.jsonl", "--bootstrap", "-1", *OUT], "--bootstrap"),
        (["patch", "activation", *M, "--pairs", "{files}/pairs.jsonl", "--component", "bogus", *OUT], "component"),
        (["patch", "path", *M, "--pairs", "{files}/pairs.jsonl", "--n-prompts", "0", *OUT], "--n-prompts"),
        (["patch", "path", *M, "--pairs", "{files}/pairs.jsonl", "--out", "{tmp}/o.csv"], ".parquet"),
    ],
    "task": [
        (["task", "nope", *M, "--out", "{tmp}/t.jsonl"], "unknown task"),
        (["task", "ioi", *M, "--n-prompts", "0", "--out", "{tmp}/t.jsonl"], "--n-prompts"),
        (["task", "ioi", *M, "--out", "{files}/afile/t.jsonl"], "cannot write"),
    ],
    "circuit": [
        (["circuit", *M, "--task", "nope", "--out", "{tmp}/c"], "unknown task"),
        (["circuit", *M, "--threshold", "nan", "--out", "{tmp}/c"], "--threshold"),
        (["circuit", *M, "--threshold", "-1", "--out", "{tmp}/c"], "--threshold"),
        (["circuit", *M, "--rounds", "0", "--out", "{tmp}/c"], "--rounds"),
        (["circuit", *M, "--max-receivers", "0", "--out", "{tmp}/c"], "--max-receivers"),
        (["circuit", *M, "--n-prompts", "0", "--out", "{tmp}/c"], "--n-prompts"),
        (["circuit", *M, "--target", "0", "--out", "{tmp}/c"], "faithfulness"),
        (["circuit", *M, "--ablation", "median", "--out", "{tmp}/c"], "unknown ablation"),
        (["circuit", *M, "--ig-steps", "0", "--out", "{tmp}/c"], "--ig-steps"),
        (["circuit", *M, "--pairs", "{files}/notobject.jsonl", "--out", "{tmp}/c"], "JSON object"),
    ],
    "sweep": [
        (["sweep", "{files}/missing.toml", "--out", "{tmp}/run"], "does not exist"),
        (["sweep", "{files}/nonutf8.toml", "--out", "{tmp}/run"], "not valid TOML"),
        (["sweep", "{files}/pairs.jsonl", "--out", "{tmp}/run"], "not valid TOML"),
        (["sweep", "{files}/good.toml", "--out", "{tmp}/run", "--executor", "nope"], "unknown executor 'nope'"),
        (
            ["sweep", "{files}/good.toml", "--out", "{tmp}/run", "--address", "127.0.0.1:6379"],
            "--address names a cluster",
        ),
        (["sweep", "{files}/badexec.toml", "--out", "{tmp}/run"], "[executor].cpus: must be > 0"),
        (["sweep", "{files}/badmem.toml", "--out", "{tmp}/run"], "[executor].memory: must be bytes or a size"),
        (["sweep", "{files}/badviews.toml", "--out", "{tmp}/run"], "top level.views: expected true or false, got 'no'"),
    ],
    "cache": [
        (["cache", *M, "--hooks", "q,nope", "--out", "{tmp}/s"], "unknown hook(s) nope"),
        (["cache", *M, "--dtype", "int8", "--out", "{tmp}/s"], "unknown store dtype"),
        (["cache", *M, "--model-dtype", "float8", "--out", "{tmp}/s"], "unknown dtype"),
        (["cache", *M, "--shard-mb", "0", "--out", "{tmp}/s"], "--shard-mb: must be > 0"),
        (["cache", *M, "--layers", "x", "--out", "{tmp}/s"], "--layers takes"),
        (["cache", *M, "--layers", "7", "--out", "{tmp}/s"], "outside 0-2"),
        (["cache", *M, "--dataset", "nope", "--out", "{tmp}/s"], "unknown dataset"),
        (["cache", *M, "--n-prompts", "0", "--out", "{tmp}/s"], "--n-prompts: must be >= 1"),
        (["cache", *M, "--out", "{files}/afile"], "is a file"),
        # a file where a parent folder should be: named, before the model loads (issue 30, bug 7)
        (["cache", *M, "--out", "{files}/afile/store"], "afile is a file, not a folder"),
        (["probe", "entropy", *M, "--out", "{files}/afile/x.parquet"], "afile is a file, not a folder"),
        (["circuit", *M, "--out", "{files}/afile/c"], "afile is a file, not a folder"),
    ],
    "query": [
        (["query", "", "--runs", "{files}/run"], "empty"),
        (["query", "select 1", "--runs", "{files}/missing"], "does not exist"),
        (["query", "select 1", "--runs", "{files}/run", "--max-rows", "0"], "--max-rows"),
    ],
    "report": [
        (["report", "{files}/missing", "--out", "{tmp}/r.html"], "does not exist"),
        (["report", "{files}/run", "--out", "{tmp}/r.html"], "holds no results"),
    ],
    "reinforce": [
        (["reinforce", *M, "--dataset", "counterfact", "--alpha", "nan", *OUT], "--alpha"),
        (["reinforce", *M, "--dataset", "counterfact", "--positions", "x", *OUT], "--positions"),
        (["reinforce", *M, "--dataset", "counterfact", "--max-new-tokens", "0", *OUT], "--max-new-tokens"),
        (["reinforce", *M, "--dataset", "counterfact", "--layers", "x", *OUT], "--layers"),
        (["reinforce", *M, "--dataset", "counterfact", "--heads", "99.0", *OUT], "out of range"),
        (["reinforce", *M, "--dataset", "counterfact", "--batch-size", "0", *OUT], "--batch-size"),
    ],
    "retrieval-ablation": [
        (["retrieval-ablation", *M, "--k", "abc", *OUT], "--k takes"),
        (["retrieval-ablation", *M, "--k", "0", *OUT], "at least 1"),
        (["retrieval-ablation", *M, "--draws", "0", *OUT], "--draws: must be >= 1"),
        (["retrieval-ablation", *M, "--n-prompts", "0", *OUT], "--n-prompts"),
        (["retrieval-ablation", *M, "--context-len", "x", *OUT], "--context-len takes"),
    ],
    "gate": [
        (["gate", *M, "--task", "{files}/emptytarget.jsonl", "--out", "{tmp}/g"], "nothing to predict"),
        (["gate", *M, "--task", "{files}/longtarget.jsonl", "--out", "{tmp}/g"], "longer than the model's context"),
        (["gate", "--model", "{files}/bloom", "--task", "aba", "--out", "{tmp}/g"], "no known head edit point"),
        (["gate", *M, "--task", "aba", "--updates", "0", "--out", "{tmp}/g"], "gate.updates: must be >= 1"),
        (["gate", *M, "--task", "aba", "--stages", "none,sideways", "--out", "{tmp}/g"], "unknown stage(s) sideways"),
        (["gate", *M, "--task", "nope", "--out", "{tmp}/g"], "unknown gating task"),
        (["gate", *M, "--task", "{files}/missing.jsonl", "--out", "{tmp}/g"], "No such file"),
        (["gate", *M, "--task", "aba", "--inits", "0", "--out", "{tmp}/g"], "gate.n_inits"),
        (
            [
                "gate",
                *M,
                "--task",
                "aba",
                "--n",
                "4",
                "--updates",
                "1",
                "--reg-updates",
                "1",
                "--out",
                "{files}/afile/g",
            ],
            "cannot",
        ),
    ],
    "show": [
        (["show", *M, "--heads", "99.0", "--text", "abc", "--out", "{tmp}/s.html"], "is out of range"),
        (["show", *M, "--heads", "x", "--text", "abc", "--out", "{tmp}/s.html"], "is not LAYER.HEAD"),
        (["show", *M, "--heads", "0.0", "--text", "", "--out", "{tmp}/s.html"], "is empty"),
        (["show", *M, "--heads", "0.0", "--text", "abc", "--queries=50", "--out", "{tmp}/s.html"], "is beyond prompt"),
        (["show", *M, "--heads", "0.0", "--text", "abc", "--out", "{files}/afile/s.html"], "afile"),
    ],
    "kv": [
        (["kv", *M, "--budgets", "abc", "--out", "{tmp}/kv"], "--budgets takes"),
        (["kv", *M, "--budgets", "1.5", "--out", "{tmp}/kv"], "outside (0, 1]"),
        (["kv", *M, "--budgets", "0.001", "--lengths", "200", "--out", "{tmp}/kv"], "fewer than"),
        (["kv", *M, "--seeds", "0", "--out", "{tmp}/kv"], "--seeds: must be >= 1"),
        (["kv", *M, "--lengths", "x", "--out", "{tmp}/kv"], "--lengths takes"),
        (["kv", *M, "--lengths", "100000", "--out", "{tmp}/kv"], "exceeds"),
        (["kv", *M, "--depths", "2", "--out", "{tmp}/kv"], "depths"),
        (["kv", *M, "--selectors", "nope", "--out", "{tmp}/kv"], "unknown selector"),
        (["kv", *M, "--selectors", "razor", "--out", "{tmp}/kv"], "needs razor scores"),
        (["kv", *M, "--budgets", "0.5", "--lengths", "200", "--tasks", "niah", "--out", "{files}/afile/k"], "cannot"),
    ],
    "new-probe": [
        (["new-probe", "Bad-Name", "--out", "{tmp}/p"], "not a lowercase Python identifier"),
        (["new-probe", "entropy", "--out", "{tmp}/p"], "the name of a built-in probe"),
        (["new-probe", "prev_token", "--out", "{tmp}/p"], "a metric of the built-in probe 'induction'"),
        (["new-probe", "mine", "--out", "{files}/run"], "exists and is not empty"),
        (["new-probe", "mine", "--out", "{files}/afile"], "afile is a file, not a folder"),
        (["new-probe", "mine", "--out", "{files}/afile/p"], "afile is a file, not a folder"),
    ],
}
PARAMS = [(cmd, i, argv, msg) for cmd, cases in CASES.items() for i, (argv, msg) in enumerate(cases)]


@pytest.mark.parametrize("cmd, i, argv, message", PARAMS, ids=[f"{c}-{i}" for c, i, _, _ in PARAMS])
def test_bad_input_is_one_clear_error(files, tmp_path, capsys, cmd, i, argv, message):
    argv = [a.replace("{tmp}", str(tmp_path)).replace("{files}", str(files)) for a in argv]
    rc = main(argv)
    out, err = capsys.readouterr()
    assert rc == 2, f"rc {rc}: {err}"
    assert err.startswith("error:") and "fix:" in err, err
    assert "internal error" not in err and "Traceback" not in err
    assert message in err, err
    assert not [p for p in tmp_path.iterdir() if p.name != "c"], "nothing written"


@pytest.mark.parametrize(
    "argv, why",
    [
        (["cache", *M, "--out", "s3://bucket/store"], "the activation store is read memory-mapped"),
        (["circuit", *M, "--out", "s3://bucket/circuits"], "a temporary folder renamed into place"),
        (["task", "ioi", *M, "--out", "gs://bucket/t.jsonl"], "input of other commands (--pairs)"),
        (["dataset", "prose", "--out", "s3://bucket/d.jsonl"], "input of other commands (--prompts)"),
    ],
    ids=["cache", "circuit", "task", "dataset"],
)
def test_a_url_where_only_a_path_will_do_is_refused(tmp_path, monkeypatch, capsys, argv, why):
    """These outputs stay local (the reason is in the error, with what does take URLs), and no
    folder named "s3:" appears in the working directory."""
    monkeypatch.chdir(tmp_path)
    rc = main(argv)
    err = capsys.readouterr().err
    assert rc == 2 and "is a URL, and this output must be a file-system path" in err and why in err, err
    assert "fsspec URLs are accepted by sweep run folders" in err and "Traceback" not in err
    assert not list(tmp_path.iterdir())


URL_COMMANDS = {
    "probe": ["probe", "entropy", *M, "--out", "{url}/r.parquet"],
    "patch": ["patch", "path", *M, "--pairs", "{files}/pairs.jsonl", "--out", "{url}/p.parquet"],
    "reinforce": ["reinforce", *M, "--dataset", "counterfact", "--out", "{url}/v.parquet"],
    "retrieval-ablation": ["retrieval-ablation", *M, "--out", "{url}/a.parquet"],
    "sweep": ["sweep", "{files}/good.toml", "--out", "{url}/run"],
    "report": ["report", "{files}/run", "--out", "{url}/r.html"],
    "report-input": ["report", "{url}/run", "--out", "{tmp}/r.html"],
    "query-input": ["query", "select 1", "--runs", "{url}/run"],
}


@pytest.mark.parametrize("command", URL_COMMANDS)
@pytest.mark.parametrize(
    "url, message, fix",
    [
        ("foo://bucket", "unknown URL protocol 'foo'", "a URL fsspec knows"),
        (
            "gs://bucket",
            "gs:// URLs need a package that is not installed",
            "pip install gcsfs",
        ),  # s3fs is a dev dependency (tests/test_s3_runs.py)
    ],
    ids=["unknown-protocol", "missing-package"],
)
def test_a_url_that_cannot_be_opened_is_one_error(files, tmp_path, monkeypatch, capsys, command, url, message, fix):
    """Where URLs are accepted, one that fsspec cannot open (an unknown protocol, a protocol whose
    package is not installed) is one error naming the fix, before any work, and leaves no folder
    named "gs:" or "foo:"."""
    if url.startswith("gs:"):
        try:
            import gcsfs  # noqa: F401

            pytest.skip("gcsfs is installed")
        except ImportError:
            pass
    work = tmp_path / "cwd"
    work.mkdir()
    monkeypatch.chdir(work)
    argv = [
        a.replace("{url}", url).replace("{files}", str(files)).replace("{tmp}", str(tmp_path))
        for a in URL_COMMANDS[command]
    ]
    rc = main(argv)
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("error:") and message in err and fix in err.split("fix:", 1)[-1], err
    assert "Traceback" not in err and "internal error" not in err
    assert [p.name for p in tmp_path.iterdir()] == ["cwd"] and not list(work.iterdir())


def test_the_matrix_covers_every_command():
    from workbench.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    listing = {"probes", "models", "datasets"}  # take no input
    assert set(sub.choices) - listing == set(CASES)
    assert json.dumps(CASES)  # plain data
