"""Side-by-side latency: warm every engine up, then time them interleaved so drift hits all alike."""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable, Iterator

# Read by TVM's thread pool, OpenMP and MKL when they start: set before the first run of a library.
THREAD_ENV_VARS = ("TVM_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")


def _summary(ns: list[int]) -> dict[str, float | int]:
    ms = sorted(t / 1e6 for t in ns)
    n = len(ms)
    # Nearest-rank percentiles: no interpolation, so a figure is always one observed call.
    return {
        "median_ms": (ms[(n - 1) // 2] + ms[n // 2]) / 2,
        "p90_ms": ms[min(n - 1, max(0, -(-9 * n // 10) - 1))],
        "mean_ms": sum(ms) / n,
        "min_ms": ms[0],
        "n": n,
    }


def time_interleaved(
    fns: dict[str, Callable[[], object]], warmup: int = 20, repeat: int = 100
) -> dict[str, dict]:
    """Median/p90/mean/min latency in ms of each callable, timed round-robin in rotating order."""
    if not fns:
        raise ValueError("time_interleaved needs at least one function to time")
    if repeat < 1 or warmup < 0:
        raise ValueError(f"need repeat >= 1 and warmup >= 0, got repeat={repeat}, warmup={warmup}")
    names = list(fns)
    for name in names:
        for _ in range(warmup):
            fns[name]()
    times: dict[str, list[int]] = {name: [] for name in names}
    clock = time.perf_counter_ns
    for r in range(repeat):
        # Rotate the order so no engine always runs right after the same neighbour (cache, clocks).
        k = r % len(names)
        for name in names[k:] + names[:k]:
            fn = fns[name]
            t0 = clock()
            fn()
            times[name].append(clock() - t0)
    return {name: _summary(times[name]) for name in names}


@contextlib.contextmanager
def set_threads(n: int) -> Iterator[None]:
    """Pin torch intra-op threads and the TVM/OpenMP thread env vars to n; restore them on exit."""
    if n < 1:
        raise ValueError(f"threads must be >= 1, got {n}")
    import torch

    old_torch = torch.get_num_threads()
    old_env = {k: os.environ.get(k) for k in THREAD_ENV_VARS}
    torch.set_num_threads(n)
    for k in THREAD_ENV_VARS:
        os.environ[k] = str(n)
    try:
        yield
    finally:
        torch.set_num_threads(old_torch)
        for k, v in old_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
