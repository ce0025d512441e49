"""How the benchmarks time a call: the median of timed repetitions after one that compiles."""

from __future__ import annotations

import statistics
import time

import jax


def median_seconds(fn, reps: int, sync=jax.block_until_ready) -> float:
    sync(fn())  # compiles and warms up
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        sync(fn())
        times.append(time.perf_counter() - start)
    return statistics.median(times)
