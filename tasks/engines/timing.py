"""Side-by-side latency: warm every engine up, then time them interleaved so drift hits all alike."""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import time
from collections.abc import Callable, Hashable, Iterator
from typing import TypeVar

log = logging.getLogger(__name__)
K = TypeVar("K", bound=Hashable)

# Read by TVM's thread pool, OpenMP and MKL when they start: set before the first run of a library.
THREAD_ENV_VARS = ("TVM_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")


def thread_env(n: int) -> dict[str, str]:
    """Environment for a benchmark process pinned to n threads; apply it before importing torch.

    OMP_WAIT_POLICY=PASSIVE matters when engines are interleaved: with libgomp's default, torch's
    OpenMP workers spin after each call and fight TVM's workers for the cores (measured here on
    2 cores: torch eager median 1.5 ms -> 280 ms at batch 1, 12 ms -> 435 ms at batch 32).
    libgomp reads it once, when torch loads. TVM_BIND_THREADS=0 stops TVM pinning threads (with a
    one-thread pool it pins the calling thread, and every thread torch starts later, to one core).
    """
    env = {k: str(n) for k in THREAD_ENV_VARS}
    env.update({"OMP_WAIT_POLICY": "PASSIVE", "TVM_BIND_THREADS": "0"})
    return env


def _summary(ns: list[int]) -> dict[str, float | int]:
    ms = sorted(t / 1e6 for t in ns)
    n = len(ms)
    # p90 by nearest rank (always an observed call); the median is the usual midpoint.
    return {
        "median_ms": (ms[(n - 1) // 2] + ms[n // 2]) / 2,
        "p90_ms": ms[min(n - 1, max(0, -(-9 * n // 10) - 1))],
        "mean_ms": sum(ms) / n,
        "min_ms": ms[0],
        "n": n,
    }


def time_interleaved(
    fns: dict[K, Callable[[], object]], warmup: int = 20, repeat: int = 100
) -> dict[K, dict]:
    """Median/p90/mean/min latency in ms of each callable (by its key), timed round-robin in rotating order."""
    if not fns:
        raise ValueError("time_interleaved needs at least one function to time")
    if repeat < 1 or warmup < 0:
        raise ValueError(f"need repeat >= 1 and warmup >= 0, got repeat={repeat}, warmup={warmup}")
    names = list(fns)
    for name in names:
        for _ in range(warmup):
            fns[name]()
    times: dict[K, list[int]] = {name: [] for name in names}
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
    """Pin torch intra-op threads and the thread env vars (thread_env) to n; restore them on exit.

    Env vars only reach libraries that have not started yet: TVM sizes its thread pool at its first
    parallel kernel (default here: half the cores, i.e. 1) and libgomp reads OMP_WAIT_POLICY when
    torch loads, so a benchmark process should apply thread_env(n) at its very start. ONNX Runtime
    takes its count per session (load_onnx(path, threads)).
    """
    if n < 1:
        raise ValueError(f"threads must be >= 1, got {n}")
    torch_loaded = "torch" in sys.modules
    if torch_loaded and os.environ.get("OMP_WAIT_POLICY", "").upper() != "PASSIVE":
        log.warning(
            "torch was loaded without OMP_WAIT_POLICY=PASSIVE: its spinning OpenMP threads can slow the "
            "engine timed after it many times over; set tasks.engines.timing.thread_env(n) before "
            "importing torch"
        )
    import torch

    old_torch = torch.get_num_threads()
    env = thread_env(n)
    old_env = {k: os.environ.get(k) for k in env}
    torch.set_num_threads(n)
    os.environ.update(env)
    if "tvm" in sys.modules:
        import tvm

        # Creates the pool with the env above if no TVM kernel has run yet; otherwise reports its size.
        if tvm.runtime.num_threads() != n:
            log.warning(
                "TVM's thread pool already runs %d threads, not %d: time TVM in a process started "
                "with thread_env(%d)",
                tvm.runtime.num_threads(),
                n,
                n,
            )
    try:
        yield
    finally:
        torch.set_num_threads(old_torch)
        for k, v in old_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
