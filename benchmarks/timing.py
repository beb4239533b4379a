"""What every child process of the benchmarks measures the same way: the median wall time of
``repeats`` calls (after an optional warm-up call) and the process's peak RSS so far."""
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
