"""Timing helper shared by the benchmarks (run as `python benchmarks/NAME.py`, so this sibling imports)."""
import statistics
import time


def cpu_time(fn, repeats: int) -> float:
    """Median process CPU seconds of `fn()` over `repeats` calls (CPU time: fairer than wall-clock on a
    shared machine)."""
    times = []
    for _ in range(repeats):
        t0 = time.process_time()
        fn()
        times.append(time.process_time() - t0)
    return statistics.median(times)
