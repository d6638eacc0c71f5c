"""seqvae against the public PyTorch implementations, side by side in one process (issue 12).

A training step = forward + backward of the 1-sample ELBO, float32, default settings; the
optimiser is not timed. The implementations run in turn (interleaved rounds), and the
report gives each one's median and the ratio of medians:

  * DRAW, T = 64, batch 64, 28x28, LSTM 256, z 100, read and write filterbanks with N = 5,
    against kamenbliznashki/generative_models `draw.py` (its DRAW and loss_fn);
  * VRNN, batch 128, hidden 100, z 16, GRU, Bernoulli output, at T = 28 (x 28) and T = 500
    (x 88), against emited/VariationalRecurrentNeuralNetwork `model.py` (its VRNN; loss
    kld + nll).

The public code is not part of this repository: clone it yourself and point to it,

    git clone https://github.com/kamenbliznashki/generative_models
    git clone https://github.com/emited/VariationalRecurrentNeuralNetwork
    python benchmarks/bench_peers.py --draw generative_models/draw.py \
        --vrnn VariationalRecurrentNeuralNetwork/model.py [--rounds 15] [--threads 2]

The benchmark takes the named top-level definitions (classes and functions) out of each
file with `ast` and runs them as written; the files' own imports (torchvision, tqdm,
matplotlib, their data loaders) are not needed and not run. Random binary data stand in
for MNIST and piano rolls (the cost does not depend on the values). With --memory, each
implementation also runs alone in a fresh process for five steps: its peak resident memory
above what it held before (VmHWM - VmRSS, Linux) and its page faults per step over the last
three (after two warm-up steps).
"""

from __future__ import annotations

import argparse
import ast
import math
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.distributions as D
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _timing import flop_report, gemm_peak, machine, step_flops  # noqa: E402

import seqvae  # noqa: E402


def load_definitions(path: str, names: list[str], extra: dict | None = None) -> dict:
    """Execute only the top-level definitions `names` of a Python file, in a namespace with
    torch, nn, F, D and math (plus `extra`); return that namespace."""
    source = Path(path).read_text()
    tree = ast.parse(source, filename=path)
    wanted = [node for node in tree.body if isinstance(node, (ast.ClassDef, ast.FunctionDef)) and node.name in names]
    missing = set(names) - {node.name for node in wanted}
    if missing:
        raise SystemExit(f"bench_peers: {path} has no top-level {', '.join(sorted(missing))}; is it the right file?")
    namespace = {"torch": torch, "nn": nn, "F": F, "D": D, "math": math, **(extra or {})}
    exec(compile(ast.Module(body=wanted, type_ignores=[]), path, "exec"), namespace)
    return namespace


# ---------------------------------------------------------------------------- the cases
def draw_case(peer_path: str, steps: int = 64):
    torch.manual_seed(0)
    x = (torch.rand(64, 1, 28, 28) > 0.5).float()
    ours = seqvae.DRAW(steps=steps, hidden_size=256, z_size=100, read="filterbank", write="filterbank",
                       read_size=5, write_size=5)

    def ours_step():
        ours.zero_grad(set_to_none=True)
        (-seqvae.elbo(ours, x).mean()).backward()

    fns = {"seqvae": ours_step}
    if peer_path:
        ns = load_definitions(peer_path, ["DRAW", "compute_filterbank_matrices", "loss_fn"])
        args = argparse.Namespace(image_dims=(1, 28, 28), time_steps=steps, z_size=100, lstm_size=256, read_size=5,
                                  write_size=5, use_read_attn=True, use_write_attn=True)
        peer = ns["DRAW"](args)
        x_flat = x.view(64, -1)

        def peer_step():
            peer.zero_grad(set_to_none=True)
            d, q = peer(x_flat)
            ns["loss_fn"](d, q, x_flat).backward()

        fns["kamenbliznashki draw.py"] = peer_step
    label = f"DRAW T={steps}, batch 64, 28x28, LSTM 256, z 100, read/write filterbank N=5"
    return label, fns


def vrnn_case(peer_path: str, steps: int, x_dim: int):
    torch.manual_seed(0)
    x = (torch.rand(128, steps, x_dim) > 0.5).float()
    ours = seqvae.VRNN(x_dim=x_dim, hidden_size=100, z_size=16, cell="gru", output="bernoulli")

    def ours_step():
        ours.zero_grad(set_to_none=True)
        (-seqvae.elbo(ours, x).sum()).backward()

    fns = {"seqvae": ours_step}
    if peer_path:
        ns = load_definitions(peer_path, ["VRNN"], {"device": torch.device("cpu"), "EPS": torch.finfo(torch.float).eps,
                                                    "Variable": torch.autograd.Variable})
        peer = ns["VRNN"](x_dim, 100, 16, 1)
        x_tb = x.transpose(0, 1).contiguous()  # the peer takes (t, b, x)

        def peer_step():
            peer.zero_grad(set_to_none=True)
            kld, nll, _, _ = peer(x_tb)
            (kld + nll).backward()

        fns["emited model.py"] = peer_step
    return f"VRNN T={steps}, x {x_dim}, batch 128, hidden 100, z 16, GRU, Bernoulli", fns


def interleaved(fns: dict, rounds: int, warmup: int) -> dict[str, list[float]]:
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return times


def in_child(child: str, case: str, name: str, argv: list[str]) -> list[str]:
    """The last line of what child(case, name) (memory_child or flops_child) prints, split, run in
    a fresh process: what it measures leaves nothing behind in the process that times the steps."""
    code = "import sys; sys.argv = ['bench_peers'] + %r; import bench_peers as b; b.%s(%r, %r)" % (argv, child, case, name)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=str(Path(__file__).resolve().parent))
    return out.stdout.splitlines()[-1].split()


def memory(case: str, name: str, argv: list[str]) -> tuple[float, int]:
    """(peak resident-memory growth over a step in MB, page faults per step) of one
    implementation, measured in a fresh process (memory_child)."""
    peak, faults = in_child("memory_child", case, name, argv)
    return float(peak), int(faults)


def build_cases(args) -> dict:
    cases = {}
    if "draw" in args.cases:
        cases["draw"] = draw_case(args.draw)
    if "vrnn28" in args.cases:
        cases["vrnn28"] = vrnn_case(args.vrnn, 28, 28)
    if "vrnn500" in args.cases:
        cases["vrnn500"] = vrnn_case(args.vrnn, 500, 88)
    return cases


def _status_mb(field: str) -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":")) / 1024


FAULT_STEPS = 3


def memory_child(case: str, name: str) -> None:
    """In a fresh process: resident memory before the steps, the peak over all of them (VmHWM, which
    a fresh process image starts afresh; ru_maxrss would carry the parent's peak), and the page
    faults per step over FAULT_STEPS steps after two warm-up steps."""
    args = parse(sys.argv[1:])
    torch.set_num_threads(args.threads)
    _, fns = build_cases(args)[case]
    fn = fns[name]
    before = _status_mb("VmRSS")
    fn()
    fn()  # a second warm-up step: allocators (and seqvae's workspaces) approach their steady state
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(FAULT_STEPS):
        fn()
    faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults) // FAULT_STEPS
    print(_status_mb("VmHWM") - before, faults)


def flops_child(case: str, name: str) -> None:
    """In a fresh process: the FLOP of one step's matrix products (_timing.step_flops, which runs
    the step under a Python dispatch mode with seqvae's kernels forced to ATen's; in the timing
    process, steps timed after it were seen up to 20% slower, not reproducibly)."""
    args = parse(sys.argv[1:])
    torch.set_num_threads(args.threads)
    _, fns = build_cases(args)[case]
    print(step_flops(fns[name]))


def parse(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--draw", default="", help="path to kamenbliznashki/generative_models/draw.py")
    p.add_argument("--vrnn", default="", help="path to emited/VariationalRecurrentNeuralNetwork/model.py")
    p.add_argument("--cases", nargs="+", default=["draw", "vrnn28", "vrnn500"], choices=["draw", "vrnn28", "vrnn500"])
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--memory", action="store_true", help="also measure each step's peak memory (fresh processes)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse(sys.argv[1:] if argv is None else argv)
    torch.set_num_threads(args.threads)
    print(f"device: {machine(torch.device('cpu'))}")
    print("training step = forward + backward of the 1-sample ELBO, float32; medians of interleaved rounds")
    peak = gemm_peak(torch.device("cpu"))
    for key, (label, fns) in build_cases(args).items():
        rounds = args.rounds if key != "vrnn500" else max(3, args.rounds // 2)
        times = interleaved(fns, rounds, args.warmup)
        medians = {name: statistics.median(ts) * 1e3 for name, ts in times.items()}
        print(label)
        for name, ms in medians.items():
            line = f"  {name:<26s} median {ms:8.1f} ms  (min {min(times[name]) * 1e3:.1f}, n={len(times[name])})"
            if args.memory:
                rss, faults = memory(key, name, sys.argv[1:] if argv is None else argv)
                line += f"  peak memory +{rss:.0f} MB, {faults} page faults per step"
            print(line)
            flops = float(in_child("flops_child", key, name, sys.argv[1:] if argv is None else argv)[0])
            print(f"    {flop_report(flops, ms / 1e3, peak)}")
        names = list(medians)
        for other in names[1:]:
            print(f"  speed-up of seqvae over {other}: {medians[other] / medians['seqvae']:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
