"""Test helpers for probe authors: the reference recomputation the project's own tests use.

A probe is trusted when its numbers equal a slow, obviously correct recomputation from its
definition, on padded batches. The built-in probes are checked that way (``tests/reference.py``,
``tests/conftest.py``); this package gives a plugin's test suite the same tools:

- :mod:`workbench.testing.eager`: a plain transformers model with eager attention
  (:func:`eager_model`), one prompt's per-layer ``[head, query, key]`` patterns in float64
  (:func:`eager_patterns`), each layer's sliding window (:func:`attention_windows`) and the keys a
  query may see (:func:`visible_keys`);
- :mod:`workbench.testing.compare`: prompts of unequal lengths that run as one padded batch
  (:func:`unequal_prompts`) and :func:`assert_probe_matches`, which runs a probe through
  :func:`workbench.runner.run_probes` and compares each ``(metric, layer, head)`` with a reference;
- :mod:`workbench.testing.fixtures`: the pytest fixtures ``tiny_model_dir``, ``tiny_dirs`` and
  ``tiny_models`` (``pytest_plugins = ["workbench.testing.fixtures"]`` in a ``conftest.py``).

Importing ``workbench.testing`` needs torch and transformers (dependencies of the workbench), not
pytest; only the fixtures module imports pytest. ``workbench new-probe NAME`` writes a plugin
package whose test uses all three.
"""

from __future__ import annotations

from workbench.testing.compare import (
    DEFAULT_LENGTHS,
    Expected,
    ReferenceInputs,
    assert_probe_matches,
    differences,
    probe_values,
    unequal_prompts,
)
from workbench.testing.eager import attention_windows, check_visibility, eager_model, eager_patterns, visible_keys

__all__ = [
    "DEFAULT_LENGTHS",
    "Expected",
    "ReferenceInputs",
    "assert_probe_matches",
    "attention_windows",
    "check_visibility",
    "differences",
    "eager_model",
    "eager_patterns",
    "probe_values",
    "unequal_prompts",
    "visible_keys",
]
