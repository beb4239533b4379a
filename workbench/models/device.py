"""Device and dtype resolution, shared by model loading and extraction.

``auto`` picks CUDA when a GPU is visible, else the CPU. Dtypes are named as on the CLI
(``float32``, ``bfloat16``, ``float16``); head statistics are always reduced in float32
whatever the model's dtype, so lower precision only affects the forward pass itself.
Out-of-memory back-off (:func:`run_halving_on_oom`) is shared by every batched engine.
"""

from __future__ import annotations

from typing import Callable

import torch

from workbench.errors import WorkbenchError

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}


def resolve_device(device: str | torch.device | None = None) -> torch.device:
    """``None``/``"auto"`` -> cuda if available else cpu; otherwise validate the name."""
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise WorkbenchError(f"unknown device {device!r}", "use cpu, cuda, cuda:N or auto") from exc
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise WorkbenchError(
            f"device {device!r} was requested but no CUDA GPU is visible",
            "use --device cpu (or auto)",
        )
    return dev


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """``None``/``"auto"`` -> float32 (exact numbers first); names map through :data:`DTYPES`."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype is None or dtype == "auto":
        return torch.float32
    try:
        return DTYPES[str(dtype).lower()]
    except KeyError:
        raise WorkbenchError(f"unknown dtype {dtype!r}", "use float32, bfloat16 or float16") from None


def is_oom(exc: BaseException) -> bool:
    """True for CUDA (or other device) out-of-memory errors."""
    if isinstance(exc, torch.OutOfMemoryError):
        return True
    return isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()


def run_halving_on_oom(
    batches: list[list[int]],
    run: Callable[[list[int]], None],
    device: torch.device | str,
    too_big: Callable[[int], WorkbenchError],
    on_split: Callable[[], None] | None = None,
) -> None:
    """Call ``run(batch)`` for each batch of item indices, in order. A batch that runs out of
    device memory is split in halves that are run in its place; a single item that does raises
    ``too_big(item)``. ``run`` must record results only once it succeeded (a failed batch is
    retried), and clean up after itself if it fails."""
    queue = [list(b) for b in batches]
    while queue:
        idx = queue.pop(0)
        try:
            run(idx)
        except Exception as exc:
            if not is_oom(exc):
                raise
            if torch.device(device).type == "cuda":
                torch.cuda.empty_cache()
            if len(idx) == 1:
                raise too_big(idx[0]) from exc
            half = len(idx) // 2
            queue[:0] = [idx[:half], idx[half:]]
            if on_split is not None:
                on_split()
