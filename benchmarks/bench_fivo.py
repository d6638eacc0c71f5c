"""FIVO against IWAE at the same k: median time of one training step (forward + backward), interleaved.

VRNN (LSTM 256, z 64, Bernoulli output), batch 16, T = 160, x 88 (JSB-sized piano rolls), k = 4
by default, as in the GPU issue; also the SRNN. Random binary sequences stand in for data.

    python benchmarks/bench_fivo.py [--repeats 6] [--threads 2] [--device cpu|cuda] [--k 4] [--steps 160]

FIVO scores each step as it goes (the particles are resampled between steps) where IWAE
scores all steps at once after the loop, so FIVO does the decoder's work step by step.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _timing import machine, summary, time_calls  # noqa: E402

import seqvae  # noqa: E402
from seqvae.objectives import bound  # noqa: E402


def step_fn(model, x, name, k):
    def step():
        model.zero_grad(set_to_none=True)
        (-bound(model, x, name=name, k=k)[0].sum()).backward()

    return step


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=6)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--k", type=int, default=4)
    p.add_argument("--steps", type=int, default=160)
    p.add_argument("--batch", type=int, default=16)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    print(f"FIVO vs IWAE, k={args.k}, batch {args.batch}, T={args.steps}, x 88 (forward + backward); device: {machine(device)}")
    for label, make in (
        ("VRNN LSTM 256, z 64", lambda: seqvae.VRNN(x_dim=88, hidden_size=256, z_size=64, cell="lstm")),
        ("SRNN GRU 256, z 64", lambda: seqvae.SRNN(x_dim=88, hidden_size=256, z_size=64, cell="gru")),
    ):
        torch.manual_seed(0)
        model = make().to(device)
        x = (torch.rand(args.batch, args.steps, 88, device=device) > 0.9).float()
        times = {"iwae": [], "fivo": []}
        for _ in range(args.repeats):  # interleaved, so that drifts of the machine hit both alike
            for name in times:
                times[name] += time_calls(step_fn(model, x, name, args.k), device=device, warmup=args.warmup, repeats=1)
        print(f"{label}:")
        for name, ts in times.items():
            print(f"  {name}  {summary(ts)}")
        print(f"  FIVO / IWAE = {statistics.median(times['fivo']) / statistics.median(times['iwae']):.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
