"""The attention-head workbench: what does each attention head do?

The data path, top to bottom::

    model = load_model("smollm2-135m")                        # workbench.models
    prompts = make_dataset("prose", n_prompts=32)              # workbench.datasets / prompts
    result = run_probes(model, prompts, [get_probe("entropy"), get_probe("retrieval")])  # workbench.runner
    write_parquet(tidy(result.table, ...), "out.parquet", meta)  # workbench.results

Probes (``probes/``, registered as entry points, :mod:`workbench.registry`) follow one protocol
(``probes/base.py``). Pattern probes reduce attention inside the forward pass, chunk by chunk
(``workbench.patterns``), through one attention-function hook (``workbench.attention``); the
runner fuses them into one forward and runs the others (decoding, item probes) beside them.
"""
from __future__ import annotations

__version__ = "0.1.0"

from workbench.errors import WorkbenchError  # noqa: E402

__all__ = ["WorkbenchError", "atlas", "get_probe", "load_model", "load_results", "run_probes", "store", "__version__"]


def __getattr__(name: str):
    # Lazy: importing torch/transformers takes seconds; `workbench probes` should not pay it.
    if name == "load_model":
        from workbench.models import load_model

        return load_model
    if name == "run_probes":
        from workbench.runner import run_probes

        return run_probes
    if name == "get_probe":
        from workbench.registry import get_probe

        return get_probe
    if name == "load_results":
        from workbench.results import load_results

        return load_results
    if name == "atlas":
        # the module is callable: workbench.atlas(table, thresholds=...) is workbench.atlas.atlas(...)
        import importlib

        return importlib.import_module("workbench.atlas")
    if name == "store":  # workbench.store.open(path): an activation store written by `workbench cache`
        import importlib

        return importlib.import_module("workbench.store")
    raise AttributeError(name)
