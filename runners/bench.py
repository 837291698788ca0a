"""Latency and peak-memory measurement (DESIGN.md, "Measuring").

GPU: every shape is warmed up first, then ``triton.testing.do_bench`` gives p20/p50/p80;
peak memory is ``max_memory_allocated`` after ``reset_peak_memory_stats`` minus the bytes
allocated before the call. CPU: a fixed thread count, ``time.perf_counter`` over repeats;
peak memory is the growth of the process's resident set (``VmHWM`` after resetting it
through ``/proc/self/clear_refs``), or None where the kernel does not allow that.
"""
from __future__ import annotations

import time
from collections.abc import Callable

import torch

QUANTILES = (0.2, 0.5, 0.8)


def _quantiles(samples: list[float]) -> dict:
    t = torch.tensor(samples, dtype=torch.float64)
    qs = torch.quantile(t, torch.tensor(QUANTILES, dtype=torch.float64)).tolist()
    return {"p20": qs[0], "p50": qs[1], "p80": qs[2], "min": float(t.min()), "median": float(t.median()),
            "max": float(t.max())}


def is_cuda(device) -> bool:
    return torch.device(device).type == "cuda"


def sync(device) -> None:
    if is_cuda(device):
        torch.cuda.synchronize(device)


GPU_WARMUP_MS = 25


def time_ms(fn: Callable[[], object], device, warmup: int = 2, repeats: int = 7, rep_ms: int = 100) -> dict:
    """p20/p50/p80, min, median and max latency of ``fn()`` in milliseconds, and how it was
    timed: the warm-up calls, the timed repetitions (CPU) or the time budget do_bench spends on
    them (GPU: ``rep_ms``, after ``warmup_ms`` of its own warm-up; ``repeats``: the timed calls
    do_bench made in that budget, each of its times kept for the quantiles)."""
    for _ in range(warmup):
        fn()
    sync(device)
    if is_cuda(device):
        import triton.testing

        times = triton.testing.do_bench(fn, warmup=GPU_WARMUP_MS, rep=rep_ms, return_mode="all")
        return {**_quantiles(times), "warmup": warmup, "warmup_ms": GPU_WARMUP_MS, "repeats": len(times),
                "rep_ms": rep_ms, "timer": "triton.do_bench"}
    samples = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - t0) * 1e3)
    return {**_quantiles(samples), "warmup": warmup, "repeats": repeats, "rep_ms": None,
            "timer": "perf_counter"}


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(field)


def _reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _malloc_trim() -> None:
    """Hand freed heap pages back to the OS (glibc ``malloc_trim(0)``), so that a later call
    reusing them shows up as growth of the resident set."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def peak_memory_bytes(fn: Callable[[], object], device) -> tuple[int | None, str]:
    """Peak memory of one call of ``fn`` above what was allocated before it, and how it
    was measured."""
    if is_cuda(device):
        sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        out = fn()
        sync(device)
        peak = torch.cuda.max_memory_allocated(device) - before
        del out
        return int(peak), "cuda.max_memory_allocated"
    _malloc_trim()
    try:
        before = _status_kb("VmRSS")
        if not _reset_hwm():
            return None, "unavailable"
        out = fn()
        peak = _status_kb("VmHWM") - before
        del out
        return max(int(peak), 0), "rss_high_water"
    except (OSError, KeyError):
        return None, "unavailable"


def is_oom(exc: BaseException) -> bool:
    if isinstance(exc, (torch.cuda.OutOfMemoryError, MemoryError)):
        return True
    msg = str(exc)
    return isinstance(exc, RuntimeError) and (
        "out of memory" in msg or "can't allocate memory" in msg or "not enough memory" in msg
    )
