"""Shared timing helpers for the benchmarks: warm-up, repeated runs, medians, settings."""

from __future__ import annotations

import platform
import statistics
import time

import torch


def machine(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)}, torch {torch.__version__}"
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{cpu}, {torch.get_num_threads()} thread(s), torch {torch.__version__}"


def time_calls(fn, *, device: torch.device, warmup: int, repeats: int) -> list[float]:
    """Seconds per call of fn after `warmup` untimed calls (CUDA synchronised around each call)."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return times


def summary(times: list[float]) -> str:
    ms = sorted(t * 1e3 for t in times)
    q1, q3 = ms[len(ms) // 4], ms[(3 * len(ms)) // 4]
    return f"median {statistics.median(ms):8.1f} ms   (IQR {q1:.1f}-{q3:.1f}, min {ms[0]:.1f}, n={len(ms)})"
