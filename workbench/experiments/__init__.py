"""Named causal tests, one module each: what happens to a behaviour when chosen heads change.

- :mod:`~workbench.experiments.retrieval_heads`: mask the top retrieval heads and needle
  retrieval breaks; mask as many random heads and it does not (Wu et al.);
- :mod:`~workbench.experiments.vhr`: scale the heads whose output depends most on the
  condition and see whether the answers change (VHR).

``from workbench.experiments import retrieval_ablation, needle_accuracy, reinforce`` keeps working
(the functions of the one-module ``workbench.experiments`` of 0.1).
"""

from __future__ import annotations

import importlib
from typing import Any

_FUNCTIONS = {
    "needle_accuracy": "retrieval_heads",
    "retrieval_ablation": "retrieval_heads",
    "reinforce": "vhr",
    "vhr_heads": "vhr",
}


def __getattr__(name: str) -> Any:
    if name in _FUNCTIONS:
        return getattr(importlib.import_module(f"workbench.experiments.{_FUNCTIONS[name]}"), name)
    raise AttributeError(f"module 'workbench.experiments' has no attribute {name!r}")
