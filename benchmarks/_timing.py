"""Shared timing helpers for the benchmarks: warm-up, repeated runs, medians, settings."""

from __future__ import annotations

import statistics
import time

import torch


def machine(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)}, torch {torch.__version__}"
    from seqvae.gemm import cpu_name

    return f"{cpu_name()}, {torch.get_num_threads()} thread(s), torch {torch.__version__}"


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


def step_flops(fn) -> float:
    """Floating-point operations of one call of fn, counted over the matrix products (mm, addmm,
    bmm, ...) of its forward and backward by torch.utils.flop_counter, with ATen's kernels and
    the step loop forced: the counter sees neither oneDNN's products nor the in-place ones of
    seqvae's whole-sequence passes (seqvae/fused.py), whose products are the step loop's."""
    import os

    from torch.utils.flop_counter import FlopCounterMode

    forced = {"SEQVAE_GEMM": "aten", "SEQVAE_FUSED": "0"}
    previous = {key: os.environ.get(key) for key in forced}
    os.environ.update(forced)
    try:
        with FlopCounterMode(display=False) as counter:
            fn()
    finally:
        for key, value in previous.items():
            if value is None:
                os.environ.pop(key)
            else:
                os.environ[key] = value
    return float(counter.get_total_flops())


def gemm_peak(device: torch.device, size: int = 1024, repeats: int = 5) -> tuple[float, str]:
    """The best float32 matrix-product rate (FLOP/s) this machine reaches, measured here on
    size^3 products with each kernel seqvae can choose (gemm.py), and that kernel's name."""
    from seqvae import gemm

    a = torch.randn(size, size, device=device)
    b = torch.randn(size, size, device=device)
    kernels = ["aten"] if device.type != "cpu" else [k for k in gemm.KERNELS if k != "onednn" or gemm._onednn_ok()]
    best = (0.0, "aten")
    for kernel in kernels:
        times = time_calls(lambda: gemm._run(kernel, a, b, None), device=device, warmup=1, repeats=repeats)
        best = max(best, (2 * size**3 / min(times), kernel))
    return best


def flop_report(flops: float, seconds: float, peak: tuple[float, str]) -> str:
    rate = flops / seconds
    return (f"{flops / 1e9:.1f} GFLOP per step in matrix products, {rate / 1e9:.0f} GFLOP/s = "
            f"{100 * rate / peak[0]:.0f}% of the measured peak ({peak[0] / 1e9:.0f} GFLOP/s, {peak[1]}; "
            f"the products alone at that rate: {1e3 * flops / peak[0]:.0f} ms)")


def memory(device: torch.device) -> str:
    """', peak N MB' on CUDA (since the last reset); on a CPU see bench_peers.py --memory, which
    runs each step in a fresh process (a process's peak resident memory cannot be reset here)."""
    if device.type != "cuda":
        return ""
    peak = torch.cuda.max_memory_allocated(device) / 2**20
    torch.cuda.reset_peak_memory_stats(device)
    return f", peak {peak:.0f} MB"
