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


def write_results(out, res: dict, markdown) -> None:
    """Write a benchmark's results as `out`.json and `out`.md (`markdown(res)`, also printed): the committed
    pair benchmarks/make_readme.py reads."""
    import json

    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(res, indent=1) + "\n")
    out.with_suffix(".md").write_text(markdown(res))
    print(markdown(res))
