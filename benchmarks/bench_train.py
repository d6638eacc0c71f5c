"""The whole training step as the trainer runs it (bound, backward, clipping, optimiser), per mode.

Cases: DRAW's paper preset (T=64, LSTM 256, z 100, read 2, write 5) at batch 64 and 256, and
the VRNN's paper preset on JSB chorales (LSTM 256, z 64, batch 16) with TBPTT (train.tbptt=50)
and with FIVO (k=4). Modes: eager; CUDA graphs (train.cuda_graphs, CUDA only); bf16 autocast;
torch.compile (train.compile; opt in with --compile: its first call compiles for minutes).
Each case trains on real batches ($SEQVAE_DATA, else data/; nothing is downloaded); a step is one batch (all its
TBPTT chunks). Prints the median ms per step, the epoch time that implies (full training
split, whole batches), the first call (warm-up, capture or compile) and peak memory (CUDA:
torch.cuda.max_memory_allocated; CPU: the process's peak resident memory so far).

    python benchmarks/bench_train.py [--device cpu|cuda] [--repeats 10] [--cases draw64 draw256 jsb-tbptt jsb-fivo]
                                     [--modes eager graphs bf16] [--compile] [--threads 2]
"""

from __future__ import annotations

import argparse
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _timing import machine  # noqa: E402

from seqvae.data import batches  # noqa: E402
from seqvae.run import build_config  # noqa: E402
from seqvae.train import Trainer  # noqa: E402

CASES = {
    "draw64": ("draw", "paper", None, []),
    "draw256": ("draw", "paper", None, ["data.batch_size=256"]),
    "jsb-tbptt": ("vrnn", "paper", "jsb_chorales", ["train.tbptt=50"]),
    "jsb-fivo": ("vrnn", "paper", "jsb_chorales", ["train.tbptt=50", "objective.name=fivo", "objective.k=4"]),
}
MODES = {"eager": ["train.cuda_graphs=false"], "graphs": ["train.cuda_graphs=true"],
         "bf16": ["train.cuda_graphs=false", "train.amp=bf16"], "compile": ["train.compile=true"]}


def peak_memory(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.max_memory_allocated(device) / 2**20:.0f} MiB (CUDA, max allocated)"
    return f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB (process peak RSS so far)"


def run_case(case: str, mode: str, device: torch.device, repeats: int, folder: Path) -> None:
    kind, preset, data, extra = CASES[case]
    cfg = build_config(kind, preset, [*extra, *MODES[mode], f"train.device={device}", "train.progress=false", "data.download=false"],
                       data, None)  # the data root by the package's rule: $SEQVAE_DATA, else data/
    torch.manual_seed(0)
    trainer = Trainer(cfg, folder / f"{case}-{mode}", log=lambda m: None)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    order = batches(trainer.train_data, trainer.local_batch, seed=0)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    first = time.perf_counter()
    for _ in range(3 if mode == "graphs" else 1):  # graphs: warm-up, capture, first replay (and the first chunk's)
        trainer.train_batch(next(order)[1])
    sync()
    first = time.perf_counter() - first
    times = []
    for _ in range(repeats):
        batch = next(order, None)
        if batch is None:
            order = batches(trainer.train_data, trainer.local_batch, seed=0, epoch=1)
            batch = next(order)
        start = time.perf_counter()
        trainer.train_batch(batch[1])
        sync()
        times.append(time.perf_counter() - start)
    replays = trainer.graphed.replays if trainer.graphed is not None else 0
    trainer.close()
    ms = statistics.median(times) * 1e3
    epoch = ms / 1e3 * trainer.batches_per_epoch
    print(f"  {case:9s} {mode:7s} median {ms:8.1f} ms/step  epoch {epoch:7.1f} s ({trainer.batches_per_epoch} steps)  "
          f"first calls {first:6.1f} s  peak {peak_memory(device)}" + (f"  replays {replays}" if mode == "graphs" else ""),
          flush=True)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    p.add_argument("--modes", nargs="+", default=["eager", "graphs", "bf16"], choices=["eager", "graphs", "bf16"])
    p.add_argument("--compile", action="store_true", help="also time train.compile=true (compiles for minutes first)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    modes = [m for m in args.modes if m != "graphs" or device.type == "cuda"] + (["compile"] if args.compile else [])
    print(f"training step (bound, backward, clipping, Adam); device: {machine(device)}; {args.repeats} timed steps per row")
    with tempfile.TemporaryDirectory() as folder:
        for case in args.cases:
            for mode in modes:
                run_case(case, mode, device, args.repeats, Path(folder))
    return 0


if __name__ == "__main__":
    sys.exit(main())
