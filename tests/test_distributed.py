"""torch.distributed: 2 processes (gloo, CPU) on B/2 examples each take the same step as one
process on B examples."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_take_the_same_step_as_one(tmp_path, data_dir):
    env = {**os.environ, "SEQVAE_DATA": str(data_dir), "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    # the RNN baseline draws no random numbers, so both runs see identical computations; plain SGD makes the
    # step proportional to the gradient (Adam would hide a wrongly scaled one); sequences of unequal length
    # give the two ranks unequal numbers of time steps, which the normaliser must account for
    args = ["train", "rnn", "--data", "jsb_chorales", "--preset", "quick", "--data.limit=16", "--data.batch_size=16",
            "--data.valid_limit=6", "--train.epochs=1", "--train.device=cpu", "--train.threads=1", "--train.optimizer=sgd",
            "--train.lr=0.5", "--train.log_every=1", "--train.clip_grad=0", "--train.progress=false"]
    subprocess.run([sys.executable, "-m", "seqvae", *args, "--name", "one"], cwd=tmp_path, env=env, check=True, capture_output=True, timeout=600)
    two = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}", "--master_addr=127.0.0.1",
         "-m", "seqvae", *args, "--name", "two"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600,
    )
    assert two.returncode == 0, two.stderr[-3000:]
    one_run, two_run = tmp_path / "runs" / "one", tmp_path / "runs" / "two"
    a = torch.load(one_run / "checkpoint.pt", weights_only=True)
    b = torch.load(two_run / "checkpoint.pt", weights_only=True)
    assert a["step"] == b["step"] == 1 and b["world_size"] == 2 and len(b["rng"]) == 2
    # the step really moved the parameters away from their (seeded) initial values
    from seqvae.checkpoint import seed_everything as _seed_everything
    from seqvae.run import RunConfig, build_model

    _seed_everything(0)
    start = build_model(RunConfig.from_dict(json.loads((one_run / "config.json").read_text()))).state_dict()
    assert max(float((a["model"][k] - start[k]).abs().max()) for k in start) > 1e-3
    for k in a["model"]:
        torch.testing.assert_close(b["model"][k], a["model"][k], rtol=1e-5, atol=1e-6)
    ra = [json.loads(l) for l in (one_run / "metrics.jsonl").read_text().splitlines()]
    rb = [json.loads(l) for l in (two_run / "metrics.jsonl").read_text().splitlines()]
    assert abs(ra[0]["loss"] - rb[0]["loss"]) < 1e-4  # the logged loss is the global one
    assert abs(ra[1]["valid_elbo"] - rb[1]["valid_elbo"]) < 1e-3  # evaluation reduced across ranks
    # only rank 0 wrote: one metrics file, one line per record
    assert len(rb) == len(ra)
