"""Timing on CUDA (events) or CPU (wall clock), and the device's roofline figures."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def time_ms(fn: Callable[[], object], device: str, reps: int, warmup: int) -> dict:
    """Median, min and max milliseconds of ``fn`` over ``reps`` calls after ``warmup`` calls.

    Each call is timed on its own (CUDA events around it on the current stream), so the
    median ignores stray slow calls.
    """
    for _ in range(warmup):
        fn()
    synchronize(device)
    times = []
    if device == "cuda":
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
        for start, end in zip(starts, ends, strict=True):
            start.record()
            fn()
            end.record()
        torch.cuda.synchronize()
        times = [s.elapsed_time(e) for s, e in zip(starts, ends, strict=True)]
    else:
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return {
        "ms": statistics.median(times),
        "min_ms": min(times),
        "max_ms": max(times),
        "reps": reps,
    }


def matmul_tflops(device: str, size: int, reps: int, warmup: int) -> dict:
    """bf16 (size×size)·(size×size) matmul throughput on random data."""
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    timing = time_ms(lambda: a @ b, device, reps, warmup)
    return {"size": size, "dtype": str(dtype), **timing, "tflops": 2 * size**3 / timing["ms"] / 1e9}


def copy_bandwidth(device: str, nbytes: int, reps: int, warmup: int) -> dict:
    """Device-to-device copy bandwidth, counting bytes read plus bytes written."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=device).random_()
    dst = torch.empty_like(src)
    timing = time_ms(lambda: dst.copy_(src), device, reps, warmup)
    return {"bytes": nbytes, **timing, "gb_per_s": 2 * nbytes / timing["ms"] / 1e6}
