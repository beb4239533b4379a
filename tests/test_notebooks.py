"""Every notebook runs end to end (stored without outputs), on a tiny model and on SmolLM2."""

from __future__ import annotations

from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOKS = sorted((Path(__file__).resolve().parents[1] / "notebooks").glob("*.ipynb"))


def execute(path: Path, model: str, monkeypatch) -> None:
    monkeypatch.setenv("WORKBENCH_NOTEBOOK_MODEL", model)
    monkeypatch.setenv("WORKBENCH_NOTEBOOK_TOKENS", "2048")  # notebook 12's needle prompt: 4096 by default
    nb = nbformat.read(path, as_version=4)
    assert all(not c.get("outputs") for c in nb.cells if c.cell_type == "code"), "notebooks are stored without outputs"
    NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(path.parent)}}).execute()


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs_on_a_tiny_model(path, monkeypatch):
    execute(path, "tiny-llama", monkeypatch)


@pytest.mark.smollm2
@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs_on_smollm2(path, monkeypatch):
    execute(path, "smollm2-135m", monkeypatch)
