"""Matrix products whose kernel is chosen per machine, by measurement.

Dimensions: m rows (batch, or time x batch), k inputs, n outputs.

`affine(x, weight, bias)` = x W^T + b for x (m, k) and W (n, k), with no autograd (the
callers, `linear` below and linear.py's per-step maps, write their own backward). On a CPU
in float32 several kernels compute it, and which is fastest depends on the machine and the
shape: on the 2-core AMD EPYC (Zen 5) development VM, MKL's sgemm (ATen's default) does not
use AVX-512 and runs DRAW's per-step products (64 x 562 x 1024) at 137 GFLOP/s where oneDNN
reaches 177, while for a VRNN's sequence-long products (64000 x 100 x 100) writing the result
in row blocks of 4096 is 2.3x faster than one MKL call, and for small products MKL wins. So:

  * "aten": torch.addmm / torch.mm (MKL or OpenBLAS on CPUs, cuBLAS on GPUs);
  * "onednn": torch.ops.mkldnn._linear_pointwise, where this PyTorch build has it;
  * "rows": ATen's product in blocks of ROWS rows written into one output.

For products of at least MEASURE_MIN multiply-adds on a CPU in float32, the first call with a
new shape times each kernel (interleaved, best of REPEATS) and keeps the fastest for that
shape (rows rounded up to a power of two), memory layout, number of threads and CPU. Choices are
stored in a JSON file (`cache_path()`: $SEQVAE_CACHE_DIR or ~/.cache/seqvae), so that every
process on a machine uses the same kernels and results stay reproducible from one process to
the next (different kernels add in different orders: results differ in the last bits). Below
MEASURE_MIN, off the CPU, for other dtypes or under autocast, ATen's kernel is used and
nothing is measured.
`SEQVAE_GEMM=aten` (or onednn, rows) forces one kernel wherever it applies.
`linear(x, weight, bias)` is the autograd-aware form, for inputs with leading dimensions.

`Repeated(rows, weight, bias)`: a product applied with one weight to many inputs of `rows` rows
(a recurrent loop's per-step products, fused.py). Besides ATen's kernel there is "packed":
oneDNN with the weight reordered once (`torch.ops.mkldnn._reorder_linear_weight`) into the
layout its kernel reads, which on the development VM ran DRAW's per-step products 1.3-1.7x
faster than MKL (64 x 256 x 2083: 465 vs 684 us; 64 x 1024 x 306 with a transposed weight:
283 vs 466 us) and small ones slower (64 x 256 x 200: 95 vs 77 us). Which one runs is
measured per shape as above (from STEP_MIN multiply-adds; below, ATen's) and stored in the
same file; SEQVAE_GEMM=aten or packed forces one (for any size).
"""

from __future__ import annotations

import json
import os
import platform
import tempfile
import time
from pathlib import Path

import torch
from torch import Tensor
from torch.autograd import Function

__all__ = ["affine", "linear", "choose", "Repeated", "KERNELS", "STEP_KERNELS", "MEASURE_MIN", "STEP_MIN",
           "cache_path", "cpu_name"]

KERNELS = ("aten", "onednn", "rows")
STEP_KERNELS = ("aten", "packed")  # for Repeated
MEASURE_MIN = 1 << 24  # multiply-adds (m k n): smaller products always use ATen's kernel
STEP_MIN = 1 << 20  # the same for Repeated (whose measurement is paid once for many calls)
STEP_REPEATS = 7
ROWS = 4096
REPEATS = 3
SLOW = 20  # a kernel whose first call takes SLOW x ATen's is dropped without more timing

_choices: dict[str, str] | None = None  # key -> kernel, loaded from the cache file on first use


def _onednn_ok() -> bool:
    op = getattr(torch.ops.mkldnn, "_linear_pointwise", None)
    return op is not None and torch.backends.mkldnn.is_available()


def _run(kernel: str, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    if kernel == "onednn":
        return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")
    if kernel == "rows" and x.shape[0] > ROWS:
        out = x.new_empty(x.shape[0], weight.shape[0])
        wt = weight.t()
        for start in range(0, x.shape[0], ROWS):
            rows = slice(start, start + ROWS)
            if bias is None:
                torch.mm(x[rows], wt, out=out[rows])
            else:
                torch.addmm(bias, x[rows], wt, out=out[rows])
        return out
    return torch.mm(x, weight.t()) if bias is None else torch.addmm(bias, x, weight.t())


def cache_path() -> Path:
    root = os.environ.get("SEQVAE_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "seqvae"
    )
    return Path(root) / "gemm.json"


def cpu_name() -> str:
    """The CPU's model name (from /proc/cpuinfo on Linux)."""
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def _machine() -> str:
    return f"{cpu_name()}|{os.cpu_count()}|torch {torch.__version__}"


def _load() -> dict[str, str]:
    global _choices
    if _choices is None:
        _choices = {}
        try:
            stored = json.loads(cache_path().read_text())
            if isinstance(stored, dict) and stored.get("machine") == _machine():
                _choices = {k: v for k, v in stored.get("choices", {}).items() if v in KERNELS + STEP_KERNELS}
        except (OSError, ValueError):
            pass
    return _choices


def _save(choices: dict[str, str]) -> None:
    """Merge into the cache file (atomically; a machine without a writable cache just re-measures)."""
    path = cache_path()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            stored = json.loads(path.read_text())
            merged = stored.get("choices", {}) if stored.get("machine") == _machine() else {}
        except (OSError, ValueError, AttributeError):
            merged = {}
        merged.update(choices)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".gemm.", suffix=".tmp")
        with os.fdopen(fd, "w") as f:
            json.dump({"machine": _machine(), "choices": merged}, f, indent=0, sort_keys=True)
        os.replace(tmp, path)
    except OSError:
        pass


def _measure(x: Tensor, weight: Tensor, bias: Tensor | None) -> str:
    # oneDNN only for a contiguous weight: with a transposed or sliced one it took ~14 s per call
    # here (3200x256 times a 256x1024 slice), which made a first training step take minutes
    kernels = [k for k in KERNELS if k != "onednn" or (_onednn_ok() and weight.is_contiguous())]
    best = {k: float("inf") for k in kernels}
    with torch.no_grad():
        for k in kernels:  # warm-up (and a check that the kernel runs here at all); "aten" comes first
            start = time.perf_counter()
            try:
                _run(k, x, weight, bias)
            except RuntimeError:
                best.pop(k)
                continue
            if k != "aten" and time.perf_counter() - start > SLOW * best["aten"]:
                best.pop(k)  # far slower than ATen on its first call: not worth timing again
            elif k == "aten":
                best[k] = time.perf_counter() - start
        for _ in range(REPEATS):
            for k in best:
                start = time.perf_counter()
                _run(k, x, weight, bias)
                best[k] = min(best[k], time.perf_counter() - start)
    return min(best, key=best.get)


def choose(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> str:
    """The kernel for x (m, k) @ weight (n, k)^T (+ bias): measured once per shape and machine."""
    forced = os.environ.get("SEQVAE_GEMM", "")
    m, k = x.shape
    n = weight.shape[0]
    if (x.device.type != "cpu" or x.dtype != torch.float32 or weight.dtype != torch.float32 or m * k * n < MEASURE_MIN
            or torch.is_autocast_enabled("cpu")):  # under autocast ATen's product runs in bfloat16
        return "aten"
    if forced in KERNELS:
        return "aten" if forced == "onednn" and not _onednn_ok() else forced
    layout = ("c" if x.is_contiguous() else "s") + ("c" if weight.is_contiguous() else "t" if weight.t().is_contiguous() else "s")
    key = f"{1 << (m - 1).bit_length()}x{k}x{n}|{'b' if bias is not None else '-'}|{layout}|{torch.get_num_threads()}"
    choices = _load()
    if key not in choices:
        choices[key] = _measure(x, weight, bias)
        _save({key: choices[key]})
    return choices[key]


def _packed_ok() -> bool:
    return _onednn_ok() and getattr(torch.ops.mkldnn, "_reorder_linear_weight", None) is not None


def _measure_step(x: Tensor, weight: Tensor, bias: Tensor | None) -> str:
    """The faster of ATen's product and oneDNN's with the weight packed (packing not timed)."""
    try:
        packed = torch.ops.mkldnn._reorder_linear_weight(weight.contiguous(), x.shape[0])
        _packed_run(x, packed, bias)
    except RuntimeError:
        return "aten"
    runs = {"aten": lambda: _run("aten", x, weight, bias), "packed": lambda: _packed_run(x, packed, bias)}
    best = {k: float("inf") for k in runs}
    with torch.no_grad():
        for _ in range(STEP_REPEATS):
            for k, f in runs.items():
                start = time.perf_counter()
                f()
                best[k] = min(best[k], time.perf_counter() - start)
    return min(best, key=best.get)


def _packed_run(x: Tensor, packed: Tensor, bias: Tensor | None) -> Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")


def choose_step(rows: int, weight: Tensor, bias: Tensor | None = None, threads: int | None = None) -> str:
    """The kernel ("aten" or "packed") for many products x (rows, k) @ weight (n, k)^T (+ bias),
    each on `threads` threads (default: torch's number; fused.py's blocks of rows run theirs on one)."""
    forced = os.environ.get("SEQVAE_GEMM", "")
    n, k = weight.shape
    if weight.device.type != "cpu" or weight.dtype != torch.float32 or torch.is_autocast_enabled("cpu") or not _packed_ok():
        return "aten"
    if forced in STEP_KERNELS:  # whatever the size
        return forced
    if rows * k * n < STEP_MIN:
        return "aten"
    threads = threads or torch.get_num_threads()
    layout = "c" if weight.is_contiguous() else "t" if weight.t().is_contiguous() else "s"
    key = f"step|{rows}x{k}x{n}|{'b' if bias is not None else '-'}|{layout}|{threads}"
    choices = _load()
    if key not in choices:
        probe = torch.randn(rows, k, generator=torch.Generator().manual_seed(0))
        before = torch.get_num_threads()
        if threads != before:  # measured on the threads it will run on (fused.py's blocks: one)
            torch.set_num_threads(threads)
        try:
            choices[key] = _measure_step(probe, weight, bias)
        finally:
            if threads != before:
                torch.set_num_threads(before)
        _save({key: choices[key]})
    return choices[key]


class Repeated:
    """y = x W^T (+ b) for one weight (n, k) and many x of `rows` rows on `threads` threads, with
    the kernel `choose_step` measured fastest; `packed` is the reordered weight, or None for ATen's."""

    def __init__(self, rows: int, weight: Tensor, bias: Tensor | None = None, threads: int | None = None):
        self.weight, self.bias = weight, bias
        self.kernel = choose_step(rows, weight, bias, threads)
        self.packed = None
        if self.kernel == "packed":
            self.packed = torch.ops.mkldnn._reorder_linear_weight(weight.contiguous(), rows)

    def __call__(self, x: Tensor, extra: Tensor | None = None, out: Tensor | None = None) -> Tensor:
        """x W^T + b (+ extra), into out if given."""
        if self.packed is not None:
            y = _packed_run(x, self.packed, self.bias)
            if extra is not None:
                return torch.add(y, extra, out=out)
            return y if out is None else out.copy_(y)
        bias = self.bias if extra is None else (extra if self.bias is None else extra + self.bias)
        if bias is None:
            return torch.mm(x, self.weight.t(), out=out)
        return torch.addmm(bias, x, self.weight.t(), out=out)

    def native(self) -> list:
        """[weight, bias, packed] as csrc/fused.cpp takes a product (None where absent)."""
        return [self.weight, self.bias, self.packed]


def affine(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """x (m, k) W^T + b, W (n, k), with the kernel `choose` picks (no autograd)."""
    return _run(choose(x, weight, bias), x, weight, bias)


class _Linear(Function):
    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        x2 = x.reshape(-1, x.shape[-1])
        ctx.save_for_backward(x2, weight)
        ctx.has_bias = bias is not None
        ctx.in_shape = x.shape
        return affine(x2, weight, bias).view(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, g: Tensor):
        x2, weight = ctx.saved_tensors
        g2 = g.reshape(-1, g.shape[-1])
        gx = affine(g2, weight.t()).view(ctx.in_shape) if ctx.needs_input_grad[0] else None
        gw = g2.t() @ x2 if ctx.needs_input_grad[1] else None
        gb = g2.sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return gx, gw, gb


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """torch.nn.functional.linear(x, weight, bias) for x (..., k), with measured kernels for the
    large float32 CPU products (forward and the input's gradient); ATen's elsewhere."""
    rows = x.numel() // max(x.shape[-1], 1)
    large = rows * weight.shape[0] * weight.shape[1] >= MEASURE_MIN
    if (not large or x.device.type != "cpu" or x.dtype != torch.float32 or torch.compiler.is_compiling()
            or torch.is_autocast_enabled("cpu")):
        return torch.nn.functional.linear(x, weight, bias)
    return _Linear.apply(x, weight, bias)
