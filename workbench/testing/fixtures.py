"""pytest fixtures for probe tests: tiny random models built from a config, once per session.

Load them in a test suite's top-level ``conftest.py``::

    pytest_plugins = ["workbench.testing.fixtures"]

- ``tiny_model_dir``: a tiny Llama (3 layers, 4 query heads sharing 2 KV heads, rotary) written
  as an ordinary Hugging Face folder (:func:`workbench.models.tiny.make_tiny_model`), the model
  :func:`workbench.testing.assert_probe_matches` takes;
- ``tiny_dirs``: ``{"llama": folder, "gpt2": folder}``, the same Llama and a GPT-2 (learned
  positions, fused QKV);
- ``tiny_models``: those two loaded (:func:`workbench.load_model`, on the CPU).

The models are random (seed 1), with query and key weights scaled up so attention is far from
uniform; building one takes about a second. This module is the only part of
:mod:`workbench.testing` that needs pytest, which is not a dependency of the workbench.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

SEED = 1


def _make(root: Path, arch: str) -> Path:
    from workbench.models.tiny import make_tiny_model

    return make_tiny_model(root / arch, arch, seed=SEED)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Llama model folder (built once per session)."""
    return _make(tmp_path_factory.mktemp("tiny-llama"), "llama")


@pytest.fixture(scope="session")
def tiny_dirs(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Tiny model folders by architecture: ``llama`` (the ``tiny_model_dir``) and ``gpt2``."""
    return {"llama": tiny_model_dir, "gpt2": _make(tmp_path_factory.mktemp("tiny-gpt2"), "gpt2")}


@pytest.fixture(scope="session")
def tiny_models(tiny_dirs: dict[str, Path]) -> dict[str, Any]:
    """The ``tiny_dirs`` models loaded on the CPU, by architecture."""
    from workbench.models.loading import load_model

    return {arch: load_model(str(path), device="cpu") for arch, path in tiny_dirs.items()}
