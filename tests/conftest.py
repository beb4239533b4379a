"""Shared fixtures: tiny models built from configs (fast), and the real SmolLM2 and Gemma-3-270M
(marked ``smollm2`` / ``gemma3``).

The tiny models (``tiny_model_dir``, ``tiny_dirs``, ``tiny_models``) come from
:mod:`workbench.testing.fixtures`, the fixtures plugin authors' test suites load the same way.
"""

from __future__ import annotations

import os

import pytest

# Under pytest-xdist (``make test`` runs ``-n 2`` on 2 cores) each worker gets its share of the
# cores, and so does every process it starts (notebook kernels, the CLI, Ray workers): two
# workers whose OpenMP pools each want both cores spin against each other (a notebook took 5x
# longer). Set before torch is imported, so this process and its children start with it.
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
_THREADS = max(1, min(2, (os.cpu_count() or 1) // _WORKERS))
if _WORKERS > 1:
    os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = str(_THREADS)

import torch  # noqa: E402

torch.set_num_threads(_THREADS)

# after the thread settings above: the plugin is imported once this module has run
pytest_plugins = ["workbench.testing.fixtures"]


@pytest.fixture(scope="session")
def smollm2():
    from workbench.models.loading import load_model

    return load_model("smollm2-135m", device="cpu")


@pytest.fixture(scope="session")
def tiny_gemma3(tmp_path_factory):
    """The tiny Gemma-3 of tests/tiny_gemma.py (layer 0 slides over 6 tokens, layer 1 global; GQA
    4:2), built once per session."""
    from tests.tiny_gemma import gemma_config, save_tiny
    from workbench.models.loading import load_model

    return load_model(
        str(save_tiny(tmp_path_factory.mktemp("tiny-gemma3") / "g", gemma_config("gemma3"))), device="cpu"
    )


@pytest.fixture(scope="session")
def gemma3():
    from workbench.models.loading import load_model

    return load_model("gemma3-270m", device="cpu")


@pytest.fixture(scope="session")
def gemma3_eager(gemma3):
    """A separate plain transformers copy of Gemma-3-270M (eager attention), for the slow references."""
    from workbench.testing import eager_model

    return eager_model(gemma3.source)


def pytest_collection_modifyitems(config, items):
    """Under pytest-xdist, keep each test module on one worker (its module-scoped fixtures, a Ray
    cluster or a built wheel, are made once), except the notebook runs, which are independent and
    the longest tests: those spread over the workers one by one."""
    for item in items:
        module = item.module.__name__ if item.module else item.nodeid.split("::")[0]
        if not module.endswith("test_notebooks"):
            item.add_marker(pytest.mark.xdist_group(module))
