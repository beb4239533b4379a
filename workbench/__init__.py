"""The attention-head workbench: what does each attention head do?

The data path, top to bottom::

    model = load_model("smollm2-135m")                          # workbench.models
    prompts = make_dataset("prose", n_prompts=32)                # workbench.datasets, workbench.inputs
    result = run_probes(model, prompts, [get_probe("entropy"), get_probe("retrieval")])  # workbench.runner
    result.table                                                 # workbench.protocol.table: one tidy table
    write_parquet(tidy(result.table, ...), "out.parquet", meta)  # workbench.runs
    write_report("runs/a", "report.html")                        # workbench.report

The package is laid out by layer, each importing only the layers below it:

- :mod:`workbench.protocol`: what probes, interventions and the runner agree on (probe kinds, the
  views a probe is handed, metric and role declarations, the result table, parameters, the
  registry of installed probes);
- :mod:`workbench.files`, :mod:`workbench.inputs`, :mod:`workbench.models`,
  :mod:`workbench.datasets`: writing files, prompt formats, which model, named prompt sets;
- :mod:`workbench.engine`: the forward pass and what rides on it (the attention hook, kernels,
  masking, statistics, pattern chunks, extraction, decoding, divergence, interventions);
- :mod:`workbench.runner`: :func:`run_probes`, the one door every probe goes through;
- :mod:`workbench.store`, :mod:`workbench.runs`, :mod:`workbench.report`,
  :mod:`workbench.experiments`: activations and results at rest, results for people, named
  causal tests; :mod:`workbench.cli` on top.

Probes (``probes/``) are plugins registered as entry points (:mod:`workbench.protocol.registry`).
Old import paths (``workbench.results``, ``workbench.sweeps``, ...) are aliases until 0.3
(:mod:`workbench.compat`).
"""

from __future__ import annotations

import importlib
from typing import Any

from workbench import compat
from workbench.errors import WorkbenchError

__version__ = "0.1.0"
__all__ = [
    "WorkbenchError",
    "atlas",
    "get_probe",
    "load_model",
    "load_results",
    "plots",
    "run_probes",
    "store",
    "__version__",
]

compat.install()

# Lazy: importing torch/transformers takes seconds; `workbench probes` should not pay it.
_FUNCTIONS = {
    "load_model": "workbench.models.loading",
    "run_probes": "workbench.runner",
    "get_probe": "workbench.protocol.registry",
    "load_results": "workbench.runs.load",
    "atlas": "workbench.report.atlas",  # workbench.atlas(table, thresholds=...)
}
_MODULES = {"store": "workbench.store", "plots": "workbench.report.plots"}


def __getattr__(name: str) -> Any:
    if name in _FUNCTIONS:
        return getattr(importlib.import_module(_FUNCTIONS[name]), name)
    if name in _MODULES:
        return importlib.import_module(_MODULES[name])
    raise AttributeError(f"module 'workbench' has no attribute {name!r}")
