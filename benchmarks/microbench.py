"""Timing loops for the benchmarks' per-operation sections (one thread, medians)."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable


def time_us(fn: Callable[[int], None], count: int, repeat: int) -> float:
    """Median over ``repeat`` runs of the time per operation of ``fn(count)``, in us."""
    runs = []
    for _ in range(repeat):
        t0 = time.perf_counter_ns()
        fn(count)
        runs.append((time.perf_counter_ns() - t0) / count / 1000)
    return statistics.median(runs)
