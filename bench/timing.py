"""The timing every benchmark uses, on CUDA or CPU, and the device's roofline figures.

Times are wall clock around synchronised calls (``time_ms`` on CUDA: events on the current
stream); figures are medians, so a stray slow call from other load does not move them.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Mapping

import torch


def synchronize(device: str) -> None:
    """Waits for the device's queued work (nothing to wait for on CPU)."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def call_seconds(fn: Callable[[], object], device: str) -> float:
    """Seconds of one call of ``fn``, from an idle device to its work done (e.g. a first call)."""
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - start


def sample_ms(
    steps: Mapping[str, Callable[[], object]],
    device: str,
    reps: int,
    warmup: int = 1,
    calls: int | Mapping[str, int] = 1,
    before_call: Callable[[], object] | None = None,
) -> dict[str, list[float]]:
    """Milliseconds per call of each step in ``reps`` interleaved rounds after ``warmup`` rounds.

    Each round calls every step in turn, so a slow stretch of a shared machine hits them alike.
    Each sample is ``calls`` calls between two synchronisations, divided by ``calls`` (several
    calls keep short CUDA calls from being timed by their launch latency; a mapping gives each
    step its own count, see ``calls_lasting``). ``before_call`` runs
    before each sample, outside the time (e.g. a barrier between processes).
    """
    for _ in range(warmup):
        for fn in steps.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(reps):
        for name, fn in steps.items():
            if before_call is not None:
                before_call()
            synchronize(device)
            count = calls[name] if isinstance(calls, Mapping) else calls
            start = time.perf_counter()
            for _ in range(count):
                fn()
            synchronize(device)
            times[name].append((time.perf_counter() - start) * 1e3 / count)
    return times


def calls_lasting(
    steps: Mapping[str, Callable[[], object]], device: str, min_ms: float
) -> dict[str, int]:
    """Calls per sample that make each step's sample last at least ``min_ms``, from one timed call
    of each (which also warms it up): short steps are otherwise timed at the clock's and the
    scheduler's grain on a shared machine."""
    return {
        name: max(1, math.ceil(min_ms / (call_seconds(fn, device) * 1e3)))
        for name, fn in steps.items()
    }


def summarize(samples_ms: list[float]) -> dict:
    """Median, min and max of samples in milliseconds, and their count."""
    return {
        "ms": statistics.median(samples_ms),
        "min_ms": min(samples_ms),
        "max_ms": max(samples_ms),
        "reps": len(samples_ms),
    }


def time_interleaved_ms(
    steps: Mapping[str, Callable[[], object]],
    device: str,
    reps: int,
    warmup: int = 1,
    calls: int = 1,
) -> dict[str, dict]:
    """``summarize`` of each step's ``sample_ms``: peers timed side by side."""
    samples = sample_ms(steps, device, reps, warmup, calls)
    return {name: summarize(times) for name, times in samples.items()}


def time_ms(fn: Callable[[], object], device: str, reps: int, warmup: int) -> dict:
    """Median, min and max milliseconds of ``fn`` over ``reps`` calls after ``warmup`` calls.

    On CUDA each call is timed by events around it on the current stream, with no
    synchronisation between calls, so the GPU stays busy as in a training loop.
    """
    if torch.device(device).type != "cuda":
        return summarize(sample_ms({"fn": fn}, device, reps, warmup)["fn"])
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    for start, end in zip(starts, ends, strict=True):
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize()
    return summarize([s.elapsed_time(e) for s, e in zip(starts, ends, strict=True)])


def median_ms(fn: Callable[[], object], reps: int, device: str = "cpu") -> float:
    """Median milliseconds of ``fn`` over ``reps`` calls after one warm-up call."""
    return time_ms(fn, device, reps, warmup=1)["ms"]


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
