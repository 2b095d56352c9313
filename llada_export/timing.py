"""Timers for the benchmarks: CUDA events on a GPU (median), the wall clock with a sync elsewhere."""

from __future__ import annotations

import statistics
import time


def sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def median_seconds(fn, repeat: int = 10, warmup: int = 3) -> float:
    """Median seconds of ``fn()``: CUDA events when a GPU is there, else the wall clock."""
    import torch

    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(repeat):
        if torch.cuda.is_available():
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def wall_seconds(fn, repeat: int = 3, warmup: int = 1) -> float:
    """Median wall-clock seconds of ``fn()`` with a device sync after each call (host work included)."""
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def matmul_peak(n: int = 8192) -> float:
    """Measured bf16 matmul FLOP/s on the GPU (fp32 n=1024 on a CPU, for smoke runs)."""
    import torch

    cuda = torch.cuda.is_available()
    n, dtype, dev = (n, torch.bfloat16, "cuda") if cuda else (1024, torch.float32, "cpu")
    a, b = torch.randn(n, n, device=dev, dtype=dtype), torch.randn(n, n, device=dev, dtype=dtype)
    return 2 * n**3 / median_seconds(lambda: a @ b)
