"""How items are grouped into batches, the same way for every engine.

``batch_size`` is a whole number (items per forward) or ``"auto"``, which means one thing
everywhere: fill each forward with items, longest first, up to a budget of *padded tokens*
(prompt plus any tokens the engine will generate), :data:`DEFAULT_BATCH_TOKENS` per device
unless given. The extraction engine, the decoding engine and the divergence engine all plan
with :func:`plan_batches`; an out-of-memory batch is then halved by
:func:`workbench.models.device.run_halving_on_oom`.
"""

from __future__ import annotations

from typing import Literal, Sequence, Union

import torch

from workbench.errors import WorkbenchError

BatchSize = Union[int, Literal["auto"]]
DEFAULT_BATCH_TOKENS: dict[str, int] = {"cpu": 4096, "cuda": 32768}


def parse_batch_size(raw: object, what: str = "--batch-size") -> BatchSize:
    """A batch size from the command line or a config: ``"auto"`` or a whole number >= 1."""
    if raw == "auto":
        return "auto"
    if isinstance(raw, bool):
        raise WorkbenchError(f"{what} must be a whole number or auto, got {raw!r}", f"e.g. {what} 8")
    try:
        value = int(raw) if not isinstance(raw, float) or float(raw).is_integer() else None
    except (TypeError, ValueError):
        value = None
    if value is None:
        raise WorkbenchError(f"{what} must be a whole number or auto, got {raw!r}", f"e.g. {what} 8")
    if value < 1:
        raise WorkbenchError(f"{what} must be at least 1, got {value}", f"e.g. {what} 8")
    return value


def batch_token_budget(device: torch.device | str, max_tokens: int | None = None) -> int:
    """The padded-token budget of an ``"auto"`` batch on ``device``."""
    if max_tokens is not None:
        if int(max_tokens) < 1:
            raise WorkbenchError(
                f"the batch token budget must be at least 1, got {max_tokens}", "give a positive number of tokens"
            )
        return int(max_tokens)
    return DEFAULT_BATCH_TOKENS.get(torch.device(device).type, DEFAULT_BATCH_TOKENS["cpu"])


def plan_batches(lengths: Sequence[int], batch_size: BatchSize, max_tokens: int) -> list[list[int]]:
    """Group item indices, longest first; ``"auto"`` fills batches up to ``max_tokens`` padded
    tokens (an item longer than the budget gets a batch of its own)."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    batches: list[list[int]] = []
    if batch_size == "auto":
        for i in order:
            if batches and (len(batches[-1]) + 1) * lengths[batches[-1][0]] <= max_tokens:
                batches[-1].append(i)
            else:
                batches.append([i])
        return batches
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise WorkbenchError(
            f"batch size must be a whole number of at least 1 or 'auto', got {batch_size!r}",
            "use --batch-size N or auto",
        )
    return [order[j : j + batch_size] for j in range(0, len(order), batch_size)]
