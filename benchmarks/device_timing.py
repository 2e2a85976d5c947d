"""Timing helpers shared by the benchmarks: the median time of a callable, and the copy bandwidths
that roofline figures are measured against in the same run."""

from __future__ import annotations

import statistics
import time
from typing import Any, Callable

import torch


def median_time_s(fn: Callable[[], Any], device: torch.device, reps: int, warmup: int = 2) -> float:
    """Median seconds of fn: CUDA events on a GPU, perf_counter on the CPU."""
    for _ in range(warmup):
        fn()
    times = []
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        for _ in range(reps):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
    else:
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def device_copy_Bps(device: torch.device, num_bytes: int, reps: int) -> float:
    """A device-to-device copy of num_bytes: (bytes read + bytes written) / median time."""
    src = torch.empty(num_bytes, dtype=torch.uint8, device=device).random_(0, 255)
    dst = torch.empty_like(src)
    return 2 * num_bytes / median_time_s(lambda: dst.copy_(src), device, reps)


def host_to_device_Bps(device: torch.device, num_bytes: int, reps: int) -> float:
    """A pinned host to device copy of num_bytes (CUDA): bytes / median time."""
    dst = torch.empty(num_bytes, dtype=torch.uint8, device=device)
    host = torch.empty(num_bytes, dtype=torch.uint8, pin_memory=True).random_(0, 255)
    return num_bytes / median_time_s(lambda: dst.copy_(host, non_blocking=True), device, reps)
