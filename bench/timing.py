"""Timing shared by the benchmark scripts."""
import statistics
import time

from napari_medrwkv.engine.memory import retain_freed_memory


def memory_setting() -> str:
    """Applies the app's allocator setting (engine/memory.py) and says which one the timings ran with."""
    return "freed memory kept" if retain_freed_memory() else "malloc as the C library sets it"


def median_seconds(fn, repeats: int) -> float:
    """Median wall time of ``fn()`` over ``repeats`` calls, after one untimed warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def interleaved_median_seconds(fns: dict, rounds: int) -> dict:
    """Median wall time of each ``fn()`` in ``fns`` over ``rounds`` rounds that call them in turn.

    On a shared machine whose speed drifts over seconds, calling the candidates in
    turn exposes each to the same drift, so their ratio is the stable number.
    """
    for fn in fns.values():
        fn()
    times = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}
