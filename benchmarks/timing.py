"""What every child process of the benchmarks measures the same way: the median wall time of
``repeats`` calls (after an optional warm-up call) and the process's peak RSS so far; or the
times of several methods alternating in one process, for ratios a shared machine's drift
cancels out of."""

from __future__ import annotations

import resource
import statistics
import time
from typing import Callable


def median_time_and_peak(run: Callable[[], object], repeats: int, warmup: bool = True) -> tuple[float, float]:
    """(median seconds per call, peak RSS in GB since the process started)."""
    if warmup:
        run()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        run()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def alternating_times(
    runs: dict[str, Callable[[], object]], cycles: int, warmup: bool = True
) -> dict[str, list[float]]:
    """Wall times of every run in one process, alternating: cycle c runs each once, the order
    rotated every cycle, so a drift of the shared machine hits all runs of a cycle alike and a
    ratio between two runs of the same cycle cancels it. Times only: peak memory needs a
    process per run (:func:`median_time_and_peak`)."""
    names = list(runs)
    if warmup:
        for run in runs.values():
            run()
    times: dict[str, list[float]] = {m: [] for m in names}
    for c in range(cycles):
        for m in names[c % len(names) :] + names[: c % len(names)]:
            t0 = time.perf_counter()
            runs[m]()
            times[m].append(time.perf_counter() - t0)
    return times
