"""seqvae's C++ extension (csrc/fused.cpp): built on first use by torch.utils.cpp_extension for the
machine's CPU and cached; what uses it (fused.py's passes, nets._Chain, terms._NormalKL) asks
`load()` or `helpers_for(...)` and falls back to Python or ATen's operations where it is None.
This module imports nothing from seqvae, so that any of them may import it."""

from __future__ import annotations

import hashlib
import os
import platform
import sys
import warnings
from pathlib import Path

import torch
from torch import Tensor

_NATIVE: list = []  # [the built extension, or None once a build failed]


def _cpu_id() -> str:
    """What identifies the CPU a -march=native build is for: /proc/cpuinfo's lines naming the model
    and its instruction sets (x86: model name, flags; ARM: CPU implementer, part, Features)."""
    keys = ("model name", "flags", "cpu family", "model\t", "Features", "CPU implementer", "CPU architecture",
            "CPU variant", "CPU part")
    try:
        with open("/proc/cpuinfo") as f:
            lines = {line.strip() for line in f if line.startswith(keys)}
    except OSError:
        lines = set()
    return "\n".join(sorted(lines)) + f"\n{platform.machine()} {platform.processor()}"


# OpenMP: ATen's parallel_for is inline. -fno-trapping-math: the compiler may compute both sides
# of a selection (log1p_'s division, softplus_), so that such loops vectorize; no value changes
CFLAGS = ["-O3", "-march=native", "-fopenmp", "-ffp-contract=off", "-fno-trapping-math"]


def _build(cpp_extension, source: Path):
    """Build (or load the cached build of) csrc/fused.cpp: with OpenMP, so that its blocks of rows
    run in parallel; where the compiler has no OpenMP, without (the blocks then run one after another)."""
    error = None
    for flags, ldflags in ((CFLAGS, ["-fopenmp"]), ([f for f in CFLAGS if f != "-fopenmp"] + ["-fopenmp-simd"], [])):
        # Built for this machine's CPU (-march=native), so named after it, after the source, the
        # flags and torch: a cache shared by different CPUs, seqvae versions or torch builds keeps
        # one build of each. No contraction of a * b + c into fused multiply-adds: the
        # filterbank's x * x - min(x * x) must be exactly 0 at the minimum.
        key = "\n".join([_cpu_id(), source.read_text(), " ".join(flags), torch.__version__])
        name = f"seqvae_fused_{hashlib.sha256(key.encode()).hexdigest()[:16]}"
        built = Path(cpp_extension._get_build_directory(name, verbose=False)) / f"{name}.so"
        if not built.exists():
            print(f"seqvae: building the C++ time loops for this machine (once, about 40 s): {built.parent}",
                  file=sys.stderr, flush=True)
        try:
            return cpp_extension.load(name=name, sources=[str(source)], extra_cflags=flags, extra_ldflags=ldflags,
                                      verbose=False)
        except Exception as failed:  # noqa: BLE001 - retried without OpenMP, then reported by load
            error = failed
    raise error


def load():
    """The C++ loops (csrc/fused.cpp), built by torch.utils.cpp_extension on first use and cached
    by it (~40 s once); None with SEQVAE_NATIVE=0 or where they cannot be built (the Python loops
    then run, with one warning per process, and nets._Chain and Terms.kl use ATen's operations)."""
    if os.environ.get("SEQVAE_NATIVE", "1") == "0":
        return None
    if not _NATIVE:
        try:
            from torch.utils import cpp_extension

            source = Path(__file__).with_name("csrc") / "fused.cpp"
            _NATIVE.append(_build(cpp_extension, source))
        except Exception as error:  # no compiler, no ninja, a failed build: the Python loops run instead
            warnings.warn(f"seqvae: the C++ time loops could not be built, running them in Python ({error})", stacklevel=2)
            _NATIVE.append(None)
    return _NATIVE[0]


def hand_written_ok() -> bool:
    """Whether autograd Functions with hand-written backwards and no forward-mode rule (the fused
    passes, nets._Chain, the KL's and the Bernoulli log-likelihood's) may run: not while
    torch.compile traces (it fuses the operations itself), under a torch.func transform (vmap,
    grad, jvp) or with forward-mode AD's dual tensors (torch.autograd.forward_ad), where the plain
    operations run."""
    return (not torch.compiler.is_compiling() and not torch._C._are_functorch_transforms_active()
            and getattr(torch.autograd.forward_ad, "_current_level", -1) < 0)


def helpers_for(*tensors: Tensor):
    """The C++ build (its one-pass helpers) for plain float CPU tensors of one dtype, or None (then
    ATen's operations: other devices and dtypes, tensor subclasses such as FakeTensor, or no build)."""
    t = tensors[0]
    if t.dtype not in (torch.float32, torch.float64) or any(
            type(u) is not torch.Tensor or u.device.type != "cpu" or u.dtype != t.dtype for u in tensors):
        return None
    return load()
