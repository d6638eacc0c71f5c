"""Median time of one DRAW training step (forward + backward of the ELBO), as in the issue:

batch 64, 1x28x28 binary images, LSTM 256, z 100, filterbank read and write with N = 5,
T = 10 and T = 64; 2 threads on the CPU, and on CUDA when a GPU is present.

    python benchmarks/bench_draw.py [--repeats 20] [--threads 2] [--device cpu|cuda|all]

Random binary images stand in for MNIST (the cost does not depend on the pixel values).
The optimiser step is not timed.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _timing import flop_report, gemm_peak, machine, memory, step_flops, summary, time_calls  # noqa: E402

import seqvae  # noqa: E402


def step_fn(model, x):
    def step():
        model.zero_grad(set_to_none=True)
        loss = -seqvae.elbo(model, x).mean()
        loss.backward()

    return step


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--steps", type=int, nargs="+", default=[10, 64], help="values of T")
    p.add_argument("--device", default="all", choices=["cpu", "cuda", "all"])
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    devices = [torch.device("cpu")] if args.device in ("cpu", "all") else []
    if args.device in ("cuda", "all") and torch.cuda.is_available():
        devices.append(torch.device("cuda"))
    print("DRAW training step (forward + backward, ELBO): batch 64, 28x28, LSTM 256, z 100, read/write filterbank N=5")
    for device in devices:
        print(f"device: {machine(device)}")
        peak = gemm_peak(device)
        for steps in args.steps:
            torch.manual_seed(0)
            model = seqvae.DRAW(steps=steps, hidden_size=256, z_size=100, read="filterbank", write="filterbank", read_size=5, write_size=5).to(device)
            x = (torch.rand(64, 1, 28, 28, device=device) > 0.5).float()
            fn = step_fn(model, x)
            times = time_calls(fn, device=device, warmup=args.warmup, repeats=args.repeats)
            print(f"  T={steps:<3d} {summary(times)}{memory(device)}")
            print(f"        {flop_report(step_flops(fn), sorted(times)[len(times) // 2], peak)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
