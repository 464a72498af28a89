"""Timing helpers shared by the benchmark scripts (run as `python benchmarks/NAME.py`, so this imports as `timing`)."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch


def cuda_median_time(fn: Callable[[], object], repeats: int = 3, *, warmup: bool = True) -> float:
    """Median wall time of `fn` on the GPU, synchronising around each call so queued kernels are counted."""
    if warmup:
        fn()
        torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)
