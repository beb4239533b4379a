"""The activation store: what it holds, pattern probes from it against the live run, resume and bad input."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from workbench.cli import main
from workbench.errors import WorkbenchError
from workbench.inputs.prompts import TokenizedPrompt
from workbench.protocol.registry import get_probe
from workbench.runner import run_probes
from workbench.store import open as open_store
from workbench.store.capture import cache_activations
from workbench.store.replay import run_probes_from_store

ALL_HOOKS = ["q", "k", "v", "z", "resid_pre", "resid_post"]
LENGTHS = [17, 5, 33, 1, 12, 2, 40, 9]
KEY = ["probe", "metric", "layer", "head"]


def random_prompts(vocab: int, lengths: list[int], seed: int = 0, period: int | None = None) -> list[TokenizedPrompt]:
    rng = random.Random(seed)
    out = []
    for i, n in enumerate(lengths):
        if period and n >= 2 * period:
            block = [rng.randrange(4, vocab) for _ in range(period)]
            ids = (block * (n // period + 1))[:n]
            out.append(TokenizedPrompt(f"p{i}", ids, {"period": period, "offset": 0}))
        else:
            out.append(TokenizedPrompt(f"p{i}", [rng.randrange(4, vocab) for _ in range(n)]))
    return out


def pattern_probes():
    return [
        get_probe("entropy"),
        get_probe("sink", epsilon=0.1),
        get_probe("induction"),
        get_probe("streaming", sink=2, recent=4),
    ]


def assert_same_rows(live, replayed, tol, skip=()):
    a = live[~live.metric.isin(skip)].sort_values(KEY).reset_index(drop=True)
    b = replayed[~replayed.metric.isin(skip)].sort_values(KEY).reset_index(drop=True)
    assert a[KEY].equals(b[KEY])
    assert (a.n.values == b.n.values).all()
    both_nan = a.value.isna() & b.value.isna()
    assert (a.value.isna() == b.value.isna()).all()
    worst = float((a.value - b.value).abs()[~both_nan].max())
    assert worst <= tol, f"max abs diff {worst}"
    return worst


def gemma_folder(root: Path, arch: str) -> Path:
    """A tiny Gemma 2 (logit soft-cap 5, sliding window 6 on layer 0) or Gemma 3 text model
    (sliding window 6 on layer 0, query_pre_attn_scalar scaling), GQA 4:2, q/k scaled up."""
    from tests.tiny_gemma import gemma_config, save_tiny

    return save_tiny(root / arch, gemma_config(arch))


@pytest.fixture(scope="module")
def llama_store(tiny_models, tmp_path_factory):
    model = tiny_models["llama"]
    prompts = random_prompts(model.vocab_size, LENGTHS, seed=1, period=6)
    out = tmp_path_factory.mktemp("stores") / "llama"
    cache_activations(model, prompts, out, hooks=ALL_HOOKS, batch_size=3, shard_bytes=40_000, log=lambda *_: None)
    return model, prompts, out


def test_replay_from_store_gives_the_live_numbers_gqa(llama_store):
    """Every pattern probe from stored post-rotary q/k equals the live run, on padded batches of
    unequal lengths, whatever the batching of either side."""
    model, prompts, out = llama_store
    store = open_store(out)
    assert store.complete and len(store.index["shards"]) > 2 and store.geometry["n_kv_heads"] == 2
    assert store.geometry["keys_post_rotary"] is True and store.geometry["positional"] == "rotary"
    live = run_probes(model, prompts, pattern_probes(), batch_size=4, progress=False).table
    for batch_size in (1, 3, "auto"):
        replayed = run_probes_from_store(store, pattern_probes(), batch_size=batch_size).table
        assert_same_rows(live, replayed, 1e-4)
    # a small chunk budget (many query chunks per layer) changes nothing either
    assert_same_rows(live, run_probes_from_store(store, pattern_probes(), batch_size=2, chunk_elements=64).table, 1e-4)


@pytest.mark.parametrize("arch", ["gemma2", "gemma3"])
def test_replay_keeps_sliding_windows_softcaps_and_scaling(arch, tmp_path):
    from tests.reference import eager_model, patterns, sink_reference
    from workbench.models.loading import load_model

    folder = gemma_folder(tmp_path, arch)
    model = load_model(str(folder), device="cpu")
    prompts = random_prompts(512, LENGTHS, seed=2, period=5)
    cache_activations(
        model, prompts, tmp_path / "store", hooks=["q", "k"], batch_size=3, shard_bytes=10_000, log=lambda *_: None
    )
    store = open_store(tmp_path / "store")
    layers = store.geometry["layers"]
    assert layers["0"]["sliding_window"] == 6 and layers["1"]["sliding_window"] is None
    assert layers["0"]["softcap"] == (5.0 if arch == "gemma2" else None) and layers["0"]["scaling"] == 0.25
    assert store.manifest["mask_mismatch"] == {}
    live = run_probes(model, prompts, pattern_probes(), batch_size=3, progress=False).table
    replayed = run_probes_from_store(store, pattern_probes(), batch_size=2).table
    assert_same_rows(live, replayed, 1e-4)
    # and against HF's own eager attention (window and soft-cap applied by transformers), prompt by prompt
    ref = eager_model(str(folder))
    mass, _, _ = sink_reference([patterns(ref, p.ids) for p in prompts], 0.1)
    got = replayed[replayed.metric == "sink_mass"]
    assert max(abs(float(r.value) - mass[(int(r.layer), int(r.head))]) for r in got.itertuples()) <= 1e-4


def test_the_store_holds_real_positions_only_and_the_right_tensors(llama_store):
    """q/k/v/z and the residual stream equal HF's own forward of each prompt alone (no padding
    stored); z is softmax(q k^T / sqrt(d)) v with grouped KV heads; the Dataset yields the rows."""
    from transformers import AutoModelForCausalLM

    model, prompts, out = llama_store
    store = open_store(out)
    assert store.n_tokens == sum(LENGTHS) and [store.get("q", 0, p.id).shape[0] for p in prompts] == LENGTHS
    hf = AutoModelForCausalLM.from_pretrained(model.source, attn_implementation="eager").eval()
    for p in (prompts[2], prompts[6]):
        assert store.tokens(p.id) == p.ids and store.meta(p.id) == p.meta
        with torch.no_grad():
            hs = hf(torch.tensor([p.ids]), output_hidden_states=True).hidden_states
        for layer in range(model.n_layers):
            assert torch.allclose(store.get("resid_pre", layer, p.id), hs[layer][0], atol=1e-4)
            if layer < model.n_layers - 1:  # HF's last hidden state is after the final norm
                assert torch.allclose(store.get("resid_post", layer, p.id), hs[layer + 1][0], atol=1e-4)
            q, k, v = (store.get(h, layer, p.id).transpose(0, 1) for h in ("q", "k", "v"))  # [head, pos, d]
            k, v = k.repeat_interleave(2, 0), v.repeat_interleave(2, 0)
            s = q @ k.transpose(-1, -2) * 0.25
            s = s.masked_fill(torch.ones(len(p), len(p), dtype=torch.bool).triu(1), float("-inf"))
            z = (torch.softmax(s, -1) @ v).transpose(0, 1)
            assert torch.allclose(store.get("z", layer, p.id), z, atol=1e-4)
    ds = store.dataset("resid_post", 1)
    assert len(ds) == sum(LENGTHS)
    first = sum(LENGTHS[:2])
    assert torch.equal(ds[first + 3], store.get("resid_post", 1, prompts[2].id)[3])
    loader = torch.utils.data.DataLoader(ds, batch_size=16)
    assert torch.equal(torch.cat(list(loader)), torch.cat([store.get("resid_post", 1, p.id) for p in prompts]))


# A float16 store rounds q and k to 11 significant bits. Measured drift of the continuous metrics
# against the float32 live run: <= 6e-5 on the tiny Llama, <= 3.2e-4 on SmolLM2-135M (entropy;
# sink_mass 9e-5, the rest <= 8e-5). Threshold counts (sink_rate) are left out: a prompt whose
# alpha_0 lies within that drift of epsilon may flip, moving the rate by 1 / n_prompts.
F16_TOL, F16_SKIP = 2e-3, ("sink_rate",)


def test_float16_store_drift(tiny_models, tmp_path):
    model = tiny_models["llama"]
    prompts = random_prompts(model.vocab_size, LENGTHS, seed=3)
    cache_activations(model, prompts, tmp_path / "s16", hooks=["q", "k"], dtype="float16", log=lambda *_: None)
    live = run_probes(model, prompts, pattern_probes(), progress=False).table
    replayed = run_probes_from_store(tmp_path / "s16", pattern_probes()).table
    worst = assert_same_rows(live, replayed, F16_TOL, F16_SKIP)
    assert worst > 0  # float16 really is stored (an exact match would mean float32 crept in)


def test_cli_cache_then_probe_from_store(tiny_dirs, tmp_path, capsys):
    out = tmp_path / "store"
    argv = [
        "cache",
        "--model",
        str(tiny_dirs["llama"]),
        "--dataset",
        "prose",
        "--n-prompts",
        "5",
        "--hooks",
        "q,k,resid_post",
        "--layers",
        "1-2",
        "--shard-mb",
        "0.02",
        "--no-progress",
        "--out",
        str(out),
    ]
    assert main(argv) == 0
    assert "shards" in capsys.readouterr().out
    store = open_store(out)
    assert store.layers == [1, 2] and store.index["command"].startswith("workbench cache --model")
    assert (
        main(
            [
                "probe",
                "entropy,sink",
                "--from-store",
                str(out),
                "--model",
                str(tiny_dirs["llama"]),
                "--out",
                str(tmp_path / "e.parquet"),
            ]
        )
        == 0
    )
    from workbench.runs.parquet import read_parquet

    table, meta = read_parquet(tmp_path / "e.parquet")
    assert set(table.layer) == {1, 2} and meta["config"]["store"] == str(out)
    live = tmp_path / "live.parquet"
    assert (
        main(
            [
                "probe",
                "entropy,sink",
                "--model",
                str(tiny_dirs["llama"]),
                "--dataset",
                "prose",
                "--n-prompts",
                "5",
                "--out",
                str(live),
            ]
        )
        == 0
    )
    want, _ = read_parquet(live)
    assert_same_rows(want[want.layer >= 1], table, 1e-4)


def _cache_argv(model_dir, out, n_prompts=40):
    return [
        "cache",
        "--model",
        str(model_dir),
        "--dataset",
        "prose",
        "--n-prompts",
        str(n_prompts),
        "--hooks",
        ",".join(ALL_HOOKS),
        "--shard-mb",
        "0.3",
        "--batch-size",
        "4",
        "--no-progress",
        "--out",
        str(out),
    ]


def test_sigkill_mid_cache_then_resume_equals_an_uninterrupted_store(tiny_dirs, tmp_path, capsys):
    clean, crashed = tmp_path / "clean", tmp_path / "crashed"
    assert main(_cache_argv(tiny_dirs["llama"], clean)) == 0
    total = len(json.loads((clean / "manifest.json").read_text())["shards"])
    assert total >= 6
    env = {
        **os.environ,
        "PYTHONPATH": str(Path(__file__).resolve().parents[1]) + os.pathsep + os.environ.get("PYTHONPATH", ""),
    }
    proc = subprocess.Popen(
        [sys.executable, "-m", "workbench", *_cache_argv(tiny_dirs["llama"], crashed)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    manifest = crashed / "manifest.json"
    deadline = time.time() + 180
    while time.time() < deadline:
        try:
            if json.loads(manifest.read_text())["shards"]:
                break
        except (OSError, ValueError, KeyError):
            pass
        time.sleep(0.005)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    written = json.loads(manifest.read_text())
    assert written["complete"] is False and 0 < len(written["shards"]) < total, (
        f"kill landed after {len(written['shards'])} of {total} shards"
    )
    # an interrupted store is visibly incomplete, and probes refuse it with the command that resumes it
    capsys.readouterr()
    assert main(["probe", "entropy", "--from-store", str(crashed), "--out", str(tmp_path / "x.parquet")]) == 2
    err = capsys.readouterr().err
    assert "incomplete" in err and "fix: resume it: workbench cache --model" in err and str(crashed) in err
    assert not (tmp_path / "x.parquet").exists()
    assert main(_cache_argv(tiny_dirs["llama"], crashed)) == 0
    assert "resuming" in capsys.readouterr().err
    a, b = (json.loads((d / "manifest.json").read_text()) for d in (clean, crashed))
    assert b["complete"] is True
    assert {k: v["sha256"] for k, v in a["shards"].items()} == {k: v["sha256"] for k, v in b["shards"].items()}
    ia, ib = (json.loads((d / "index.json").read_text()) for d in (clean, crashed))
    for key in ("created", "command"):
        ia.pop(key), ib.pop(key)
    assert ia == ib
    assert sorted(p.name for p in (crashed / "shards").iterdir()) == sorted(
        p.name for p in (clean / "shards").iterdir()
    )


def test_a_damaged_shard_is_rewritten_on_resume(tiny_dirs, tmp_path):
    from workbench.models.loading import load_model

    model = load_model(str(tiny_dirs["llama"]), device="cpu")
    prompts = random_prompts(model.vocab_size, LENGTHS, seed=4)
    cache_activations(model, prompts, tmp_path / "s", hooks=["q", "k"], shard_bytes=20_000, log=lambda *_: None)
    shard = sorted((tmp_path / "s" / "shards").iterdir())[1]
    good = shard.read_bytes()
    shard.write_bytes(good[:-8] + b"\0" * 8)
    assert open_store(tmp_path / "s").verify() == [shard.name]
    cache_activations(model, prompts, tmp_path / "s", hooks=["q", "k"], shard_bytes=20_000, log=lambda *_: None)
    assert shard.read_bytes() == good and open_store(tmp_path / "s").verify() == []


# -- bad input: one clear error each, nothing half-written passed off as complete ------------------
def run_cli(capsys, argv):
    capsys.readouterr()
    rc = main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("error:") and "fix:" in err and "Traceback" not in err, err
    return err


def test_a_disk_too_small_stops_before_writing(tiny_dirs, tmp_path, capsys, monkeypatch):
    import shutil as shutil_module

    real = shutil_module.disk_usage
    monkeypatch.setattr(shutil_module, "disk_usage", lambda p: real(p)._replace(free=1000))
    out = tmp_path / "store"
    err = run_cli(capsys, _cache_argv(tiny_dirs["llama"], out, n_prompts=4))
    assert "the store needs about" in err and "free" in err and "--dtype float16" in err
    assert not out.exists() or not any(out.iterdir())


def test_stores_that_cannot_serve_the_probes(llama_store, tiny_dirs, tmp_path, capsys):
    model, prompts, out = llama_store
    err = run_cli(capsys, ["probe", "entropy,retrieval", "--from-store", out, "--out", tmp_path / "o.parquet"])
    assert "retrieval needs the model" in err
    err = run_cli(capsys, ["probe", "context", "--from-store", out, "--out", tmp_path / "o.parquet"])
    assert "context needs the model" in err
    # a store without the queries and keys
    cache_activations(model, prompts[:2], tmp_path / "resid", hooks=["resid_post"], log=lambda *_: None)
    err = run_cli(capsys, ["probe", "entropy", "--from-store", tmp_path / "resid", "--out", tmp_path / "o.parquet"])
    assert "need the post-rotary queries and keys (q, k)" in err and "--hooks q,k" in err
    # a store of another model (same tokenizer), and of another tokenizer
    err = run_cli(
        capsys, ["probe", "entropy", "--from-store", out, "--model", tiny_dirs["gpt2"], "--out", tmp_path / "o.parquet"]
    )
    assert "was cached from" in err
    other = tmp_path / "other-tok"
    shutil.copytree(tiny_dirs["llama"], other)
    from workbench.models.tiny import _tiny_tokenizer

    _tiny_tokenizer(300).save_pretrained(other)
    err = run_cli(capsys, ["probe", "entropy", "--from-store", out, "--model", other, "--out", tmp_path / "o.parquet"])
    assert "different tokenizer" in err
    # not a store at all; inputs that cannot apply to a store
    err = run_cli(capsys, ["probe", "entropy", "--from-store", tmp_path, "--out", tmp_path / "o.parquet"])
    assert "is not an activation store" in err
    err = run_cli(
        capsys, ["probe", "entropy", "--from-store", out, "--dataset", "prose", "--out", tmp_path / "o.parquet"]
    )
    assert "--dataset cannot apply" in err
    assert not (tmp_path / "o.parquet").exists()


def test_a_store_is_resumed_only_with_its_own_settings(llama_store, tmp_path):
    model, prompts, out = llama_store
    with pytest.raises(WorkbenchError, match="different hooks"):
        cache_activations(model, prompts, out, hooks=["q"], batch_size=3, shard_bytes=40_000, log=lambda *_: None)
    with pytest.raises(WorkbenchError, match="different prompts"):
        cache_activations(
            model, prompts[:3], out, hooks=ALL_HOOKS, batch_size=3, shard_bytes=40_000, log=lambda *_: None
        )
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "x.txt").write_text("x")
    with pytest.raises(WorkbenchError, match="holds no store"):
        cache_activations(model, prompts, tmp_path / "junk", log=lambda *_: None)
    with pytest.raises(WorkbenchError, match="appears twice"):
        cache_activations(model, prompts[:2] + prompts[:1], tmp_path / "dup", log=lambda *_: None)
    with pytest.raises(WorkbenchError, match="outside 0-2"):
        cache_activations(model, prompts, tmp_path / "L", layers=[3], log=lambda *_: None)
    assert not (tmp_path / "dup").exists() and not (tmp_path / "L").exists()


@pytest.mark.smollm2
def test_smollm2_pattern_probes_from_a_store_equal_the_live_run(smollm2, tmp_path):
    """The real model (GQA 9:3, rotary): float32 store replay equals the live run to 1e-4; a
    float16 store stays within F16_TOL on the continuous metrics."""
    from workbench.datasets import make_dataset
    from workbench.inputs.prompts import tokenize_prompts

    prompts = tokenize_prompts(
        make_dataset("prose", n_prompts=3, seed=7, min_words=5, max_words=40),
        smollm2.tokenizer,
        smollm2.n_ctx,
        smollm2.vocab_size,
    )
    assert len({len(p) for p in prompts}) > 1
    live = run_probes(smollm2, prompts, pattern_probes(), batch_size=4, progress=False).table
    for dtype, tol, skip in (("float32", 1e-4, ()), ("float16", F16_TOL, F16_SKIP)):
        cache_activations(
            smollm2, prompts, tmp_path / dtype, hooks=["q", "k"], dtype=dtype, batch_size=2, log=lambda *_: None
        )
        assert_same_rows(live, run_probes_from_store(tmp_path / dtype, pattern_probes(), batch_size=3).table, tol, skip)


def test_resume_removes_the_temp_file_of_a_shard_killed_mid_write(tiny_dirs, tmp_path):
    """A kill between a shard's temp file and its rename leaves `.shard-N...tmp`; resuming
    rewrites that shard and leaves only what an uninterrupted store has."""
    clean, crashed = tmp_path / "clean", tmp_path / "crashed"
    assert main(_cache_argv(tiny_dirs["llama"], clean, n_prompts=8)) == 0
    assert main(_cache_argv(tiny_dirs["llama"], crashed, n_prompts=8)) == 0
    manifest = json.loads((crashed / "manifest.json").read_text())
    name = sorted(manifest["shards"])[-1]
    (crashed / "shards" / name).unlink()
    (crashed / "shards" / f".{name}.k1ll3d.tmp").write_bytes(b"half a shard")
    del manifest["shards"][name]
    manifest["complete"] = False
    (crashed / "manifest.json").write_text(json.dumps(manifest))
    assert main(_cache_argv(tiny_dirs["llama"], crashed, n_prompts=8)) == 0
    assert sorted(p.name for p in (crashed / "shards").iterdir()) == sorted(
        p.name for p in (clean / "shards").iterdir()
    )


def _cli_store(tiny_dirs, out: Path) -> None:
    argv = ["cache", "--model", str(tiny_dirs["llama"]), "--dataset", "prose", "--n-prompts", "5", "--hooks", "q,k"]
    assert main([*argv, "--shard-mb", "0.02", "--no-progress", "--out", str(out)]) == 0


def test_a_shard_changed_in_place_is_refused_before_its_numbers_are_used(tiny_dirs, tmp_path, capsys):
    """Issue 30, bug 3: the manifest's SHA-256 is checked by every reader, not only by verify(): a
    shard whose bytes changed with its size kept gives no numbers, and the fix names the command
    that rewrites it with --out where the store is now (it was moved)."""
    _cli_store(tiny_dirs, tmp_path / "first")
    moved = tmp_path / "moved"
    (tmp_path / "first").rename(moved)
    shard = sorted((moved / "shards").iterdir())[0]
    data = bytearray(shard.read_bytes())
    data[-4:] = b"\x7f\x7f\x7f\x7f"  # the last float of the last tensor: same size, other numbers
    shard.write_bytes(bytes(data))
    err = run_cli(capsys, ["probe", "entropy,sink", "--from-store", moved, "--out", tmp_path / "e.parquet"])
    assert f"shard {shard.name} of {moved} fails its recorded SHA-256" in err
    assert f"--out {moved}" in err and "first" not in err.split("fix:")[1], err
    assert not (tmp_path / "e.parquet").exists()


def test_a_deleted_shard_is_called_missing_not_interrupted(tiny_dirs, tmp_path, capsys):
    _cli_store(tiny_dirs, tmp_path / "s")
    shard = sorted((tmp_path / "s" / "shards").iterdir())[0]
    shard.unlink()
    err = run_cli(capsys, ["probe", "entropy", "--from-store", tmp_path / "s", "--out", tmp_path / "e.parquet"])
    assert "is missing: the manifest records it, but the file is gone" in err and "interrupted" not in err


def test_from_store_refuses_a_dtype_other_than_the_stored_one(tiny_dirs, tmp_path, capsys):
    """Issue 30, bug 8: --dtype bfloat16 on a float32 store was silently ignored."""
    _cli_store(tiny_dirs, tmp_path / "s")
    base = ["probe", "entropy", "--from-store", tmp_path / "s", "--out", tmp_path / "e.parquet"]
    err = run_cli(capsys, [*base, "--dtype", "bfloat16"])
    assert "holds float32 activations, read as stored" in err and "workbench cache --dtype bfloat16" in err
    assert main([str(a) for a in base + ["--dtype", "float32"]]) == 0  # the stored dtype itself is fine


def test_one_writer_per_store(tiny_dirs, tmp_path, capsys):
    """Issue 30: a second `workbench cache` into a store being written stops at once and changes
    nothing (the first writer stood in for by its lock, held from a second open file)."""
    from workbench.files.atomic import WRITER_LOCK, file_lock

    _cli_store(tiny_dirs, tmp_path / "s")
    before = {p: p.read_bytes() for p in (tmp_path / "s").rglob("*") if p.is_file()}
    with file_lock(tmp_path / "s" / WRITER_LOCK):
        argv = ["cache", "--model", tiny_dirs["llama"], "--dataset", "prose", "--n-prompts", "5", "--hooks", "q,k"]
        err = run_cli(capsys, [*argv, "--shard-mb", "0.02", "--no-progress", "--out", tmp_path / "s"])
    assert f"activation store {tmp_path / 's'} is being written by another `workbench cache` right now" in err
    assert {p: p.read_bytes() for p in (tmp_path / "s").rglob("*") if p.is_file()} == before
