"""Median time of one VRNN training step (forward + backward of the ELBO), as in the issue:

batch 128, hidden 100, z 16, GRU, Bernoulli output, for (T=28, x_dim 28) (rows of MNIST)
and (T=500, x_dim 88) (long piano rolls); 2 threads on the CPU, and on CUDA when present.

    python benchmarks/bench_vrnn.py [--repeats 10] [--threads 2] [--device cpu|cuda|all]

Random binary sequences stand in for data (the cost does not depend on the values).
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
        loss = -seqvae.elbo(model, x).sum()
        loss.backward()

    return step


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="all", choices=["cpu", "cuda", "all"])
    p.add_argument("--cell", default="gru", choices=["gru", "lstm"])
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    devices = [torch.device("cpu")] if args.device in ("cpu", "all") else []
    if args.device in ("cuda", "all") and torch.cuda.is_available():
        devices.append(torch.device("cuda"))
    print(f"VRNN training step (forward + backward, ELBO): batch 128, hidden 100, z 16, {args.cell.upper()}, Bernoulli output")
    for device in devices:
        print(f"device: {machine(device)}")
        peak = gemm_peak(device)
        for steps, x_dim in ((28, 28), (500, 88)):
            torch.manual_seed(0)
            model = seqvae.VRNN(x_dim=x_dim, hidden_size=100, z_size=16, cell=args.cell, output="bernoulli").to(device)
            x = (torch.rand(128, steps, x_dim, device=device) > 0.5).float()
            repeats = args.repeats if steps < 100 or device.type == "cuda" else max(3, args.repeats // 2)
            fn = step_fn(model, x)
            times = time_calls(fn, device=device, warmup=args.warmup, repeats=repeats)
            print(f"  T={steps:<3d} x_dim={x_dim:<3d} {summary(times)}{memory(device)}")
            print(f"        {flop_report(step_flops(fn), sorted(times)[len(times) // 2], peak)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
