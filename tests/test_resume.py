"""Checkpoints that lose nothing: a run killed with SIGKILL mid-epoch and resumed follows the
uninterrupted run exactly; writes are atomic; non-finite steps are skipped and counted."""

import errno
import json
import math
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from seqvae import checkpoint as C
from seqvae.data import batches
from seqvae.run import build_config
from seqvae.train import Trainer, TrainingError

REPO = Path(__file__).resolve().parents[1]

# a small DRAW, one thread (deterministic), a record and a checkpoint every few steps
COMMON = ["train", "draw", "--preset", "quick", "--data.limit=2560", "--data.valid_limit=64", "--train.epochs=2",
          "--train.threads=1", "--train.log_every=1", "--train.checkpoint_every=7", "--train.samples=4", "--train.progress=false"]


def env(data_dir):
    return {**os.environ, "SEQVAE_DATA": str(data_dir), "PYTHONPATH": str(REPO)}


def train_records(run):
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [json.loads(l) for l in lines if l.strip()]


def params(run):
    return torch.load(run / "checkpoint.pt", weights_only=True)["model"]


def test_sigkill_mid_epoch_then_resume_matches_an_uninterrupted_run(tmp_path, data_dir):
    subprocess.run([sys.executable, "-m", "seqvae", *COMMON, "--name", "whole"], cwd=tmp_path, env=env(data_dir), check=True, capture_output=True, timeout=600)
    run = tmp_path / "runs" / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "seqvae", *COMMON, "--name", "killed"], cwd=tmp_path, env=env(data_dir), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    killed_at = None
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        metrics = run / "metrics.jsonl"
        if metrics.exists():
            steps = [json.loads(l)["step"] for l in metrics.read_text().splitlines() if l.strip().endswith("}")]
            if steps and steps[-1] >= 52:  # epoch 2 has begun (40 batches per epoch)
                proc.send_signal(signal.SIGKILL)
                killed_at = steps[-1]
                break
        time.sleep(0.005)
    proc.wait(timeout=60)
    assert killed_at is not None and proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    saved = torch.load(run / "checkpoint.pt", weights_only=True)
    assert saved["epoch"] == 1 and 0 < saved["position"] < 40  # the last checkpoint is mid-epoch
    subprocess.run([sys.executable, "-m", "seqvae", "train", "draw", "--name", "killed", "--resume"], cwd=tmp_path, env=env(data_dir), check=True, capture_output=True, timeout=600)

    whole, resumed = train_records(tmp_path / "runs" / "whole"), train_records(run)
    assert [r["step"] for r in resumed] == [r["step"] for r in whole]  # nothing duplicated, nothing lost
    for a, b in zip(whole, resumed):
        assert a.get("loss") == b.get("loss") and a.get("valid_elbo") == b.get("valid_elbo"), (a, b)
    final_whole, final_resumed = params(tmp_path / "runs" / "whole"), params(run)
    assert all(torch.equal(final_whole[k], final_resumed[k]) for k in final_whole)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_sigterm_or_sigint_checkpoints_the_step_then_resume_matches_an_uninterrupted_run(tmp_path, data_dir, sig):
    args = [a for a in COMMON if not a.startswith("--train.checkpoint_every")]  # no periodic checkpoints: only the signal's
    subprocess.run([sys.executable, "-m", "seqvae", *args, "--name", "whole"], cwd=tmp_path, env=env(data_dir), check=True, capture_output=True, timeout=600)
    run = tmp_path / "runs" / "stopped"
    proc = subprocess.Popen([sys.executable, "-m", "seqvae", *args, "--name", "stopped"], cwd=tmp_path, env=env(data_dir),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline, sent = time.time() + 300, None
    while time.time() < deadline and proc.poll() is None:
        metrics = run / "metrics.jsonl"
        steps = [json.loads(l)["step"] for l in metrics.read_text().splitlines() if l.strip().endswith("}")] if metrics.exists() else []
        if steps and steps[-1] >= 12:  # mid-epoch 1 (40 batches per epoch), before any checkpoint
            proc.send_signal(sig)
            sent = steps[-1]
            break
        time.sleep(0.005)
    _, err = proc.communicate(timeout=120)
    assert sent is not None, "the run finished before the signal"
    assert proc.returncode == 128 + sig, err
    assert f"stopped by {signal.Signals(sig).name} after step" in err and "--resume" in err and "Traceback" not in err
    saved = torch.load(run / "checkpoint.pt", weights_only=True)
    assert saved["epoch"] == 0 and saved["position"] == saved["step"] >= sent  # the step in progress was finished
    subprocess.run([sys.executable, "-m", "seqvae", "train", "draw", "--name", "stopped", "--resume"], cwd=tmp_path, env=env(data_dir), check=True, capture_output=True, timeout=600)
    whole, resumed = train_records(tmp_path / "runs" / "whole"), train_records(run)
    assert [r["step"] for r in resumed] == [r["step"] for r in whole]
    final_whole, final_resumed = params(tmp_path / "runs" / "whole"), params(run)
    assert all(torch.equal(final_whole[k], final_resumed[k]) for k in final_whole)


def test_a_run_stopped_before_its_first_checkpoint_resumes_from_the_start(tmp_path, data_dir):
    cfg = build_config("rnn", "quick", ["data.limit=16", "data.valid_limit=4", "train.epochs=1", "train.progress=false"], "jsb_chorales", str(data_dir))
    Trainer(cfg, tmp_path / "r", log=lambda m: None)  # writes config.json, then (say) the process died
    (tmp_path / "r" / "metrics.jsonl").write_text('{"kind": "train", "step": 1, "loss": 9.0}\n')  # a record of the dead run
    assert not (tmp_path / "r" / "checkpoint.pt").exists()
    log = []
    trainer = Trainer(cfg, tmp_path / "r", resume=True, log=log.append)
    trainer.fit()
    assert any("starting the run from its beginning" in m for m in log) and trainer.epoch == 1
    records = train_records(tmp_path / "r")
    assert records[0].get("loss") != 9.0  # the dead run's records are gone


def test_checkpoint_holds_everything_needed_to_continue(tmp_path, data_dir):
    cfg = build_config("vrnn", "quick", ["data.limit=32", "data.valid_limit=8", "train.epochs=1", "objective.kl_warmup=100", "train.progress=false"], "jsb_chorales", str(data_dir))
    Trainer(cfg, tmp_path / "r", log=lambda m: None).fit()
    state = C.load_checkpoint(tmp_path / "r" / "checkpoint.pt")
    for key in ("model", "optimizer", "scheduler", "scaler", "step", "epoch", "position", "rng", "annealing", "config", "running"):
        assert key in state, key
    assert set(state["rng"][0]) == {"python", "numpy", "torch", "cuda"}
    assert state["annealing"]["beta"] == pytest.approx(state["step"] / 100)
    assert json.loads(state["config"])["model_kind"] == "vrnn"


def test_a_failed_write_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint.pt"
    C.save_checkpoint(path, {"step": 1, "w": torch.ones(3)})
    real_fdopen = os.fdopen

    class FullDisk:
        def __init__(self, f):
            self.f = f

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()
            return False

        def write(self, data):
            self.f.write(data[: len(data) // 2])
            raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fdopen", lambda fd, mode: FullDisk(real_fdopen(fd, mode)))
    with pytest.raises(OSError, match="No space left"):
        C.save_checkpoint(path, {"step": 2, "w": torch.zeros(3)})
    monkeypatch.undo()
    assert C.load_checkpoint(path)["step"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.pt"]  # no temporary file left behind


def test_corrupt_truncated_and_malicious_checkpoints_are_refused(tmp_path):
    good = tmp_path / "good.pt"
    C.save_checkpoint(good, {"model": {"w": torch.ones(2)}})
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(good.read_bytes()[:100])
    with pytest.raises(C.CheckpointError, match="truncated or corrupt"):
        C.load_checkpoint(truncated)
    for seed in range(200):  # random bytes reach many different failures inside the unpickler
        (tmp_path / "noise.pt").write_bytes(random.Random(seed).randbytes(500))
        with pytest.raises(C.CheckpointError):
            C.load_checkpoint(tmp_path / "noise.pt")
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    torch.save({"model": Evil()}, tmp_path / "evil.pt")
    with pytest.raises(C.CheckpointError, match="could run code"):
        C.load_checkpoint(tmp_path / "evil.pt")
    assert not marker.exists()
    with pytest.raises(C.CheckpointError, match="no checkpoint"):
        C.load_checkpoint(tmp_path / "missing.pt")


def test_cli_refuses_a_malicious_checkpoint_with_a_clear_error(tmp_path, data_dir):
    run = tmp_path / "runs" / "evil"
    run.mkdir(parents=True)
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    torch.save({"config": "{}", "model": Evil()}, run / "checkpoint.pt")
    result = subprocess.run([sys.executable, "-m", "seqvae", "eval", "evil"], cwd=tmp_path, env=env(data_dir), capture_output=True, text=True, timeout=300)
    assert result.returncode == 2 and "could run code" in result.stderr and "Traceback" not in result.stderr
    assert not marker.exists()


def test_no_unsafe_loading_anywhere_in_the_package():
    for path in (REPO / "seqvae").glob("*.py"):
        text = path.read_text()
        assert "pickle.load(" not in text and "pickle.loads(" not in text, path
        for line in text.splitlines():
            if "torch.load(" in line:
                assert "weights_only=True" in line, (path, line)


def test_nonfinite_steps_are_skipped_counted_and_stop_the_run(tmp_path, data_dir, monkeypatch):
    import seqvae.train as T

    cfg = build_config("draw", "quick", ["data.limit=640", "data.valid_limit=64", "train.epochs=1", "train.max_nonfinite=3", "train.log_every=1", "train.progress=false", "train.checkpoint_every=2"], None, str(data_dir))
    real = T.bound
    calls = {"n": 0, "bad": {3, 4}}

    def flaky(*args, **kwargs):
        calls["n"] += 1
        value, carry = real(*args, **kwargs)
        return (value * math.nan if calls["n"] in calls["bad"] else value), carry

    monkeypatch.setattr(T, "bound", flaky)
    trainer = Trainer(cfg, tmp_path / "r", log=lambda m: None)
    before = {}

    def snapshot():
        return {k: v.clone() for k, v in trainer.model.state_dict().items()}

    order = iter(batches(trainer.train_data, 64, seed=0, epoch=0))
    for i in range(5):
        before = snapshot()
        stats = trainer.train_batch(next(order)[1])
        unchanged = all(torch.equal(before[k], v) for k, v in trainer.model.state_dict().items())
        assert unchanged == (i + 1 in calls["bad"]), i
        assert math.isnan(stats["loss"]) == (i + 1 in calls["bad"])
    assert trainer.nonfinite_total == 2 and trainer.nonfinite_in_row == 0 and trainer.step == 3

    trainer.save()
    calls["bad"] = set(range(1000))
    with pytest.raises(TrainingError, match="3 optimiser steps in a row had a non-finite"):
        for _, batch in order:
            trainer.train_batch(batch)
    assert C.load_checkpoint(tmp_path / "r" / "checkpoint.pt")["step"] == 3  # the last good checkpoint stays


def _as_if_written_on_a_gpu(path):
    """Rewrite a checkpoint so that every tensor's storage is tagged 'cuda:0', byte for byte
    what torch.save writes for CUDA tensors; no GPU is needed to make (or to load) it."""
    import torch.serialization as S

    payload = torch.load(path, weights_only=True)
    for state in payload.get("rng", []):  # a GPU run also saves its CUDA generators' states
        state["cuda"] = [torch.zeros(16, dtype=torch.uint8)]
    real = S.location_tag
    S.location_tag = lambda storage: "cuda:0"
    try:
        torch.save(payload, path)
    finally:
        S.location_tag = real


@pytest.mark.skipif(torch.cuda.is_available(), reason="shows what a CPU-only machine does with a GPU checkpoint")
def test_a_gpu_checkpoint_loads_and_resumes_on_a_cpu_only_machine(tmp_path, data_dir):
    from seqvae import configs
    from seqvae.run import RunConfig, load_run, train

    overrides = ["data.limit=256", "data.valid_limit=32", "train.epochs=1", "train.progress=false", "train.samples=4"]
    _, model, run = train("draw", preset="quick", overrides=overrides, name="gpu", runs_dir=tmp_path, data_dir=str(data_dir), log=lambda m: None)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    for name in ("checkpoint.pt", "best.pt"):
        _as_if_written_on_a_gpu(run / name)
        with pytest.raises(RuntimeError, match="CUDA"):  # the files really claim CUDA storage
            torch.load(run / name, weights_only=True)
    _, loaded, _ = load_run(run)
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in before.items())
    config = configs.apply_override(RunConfig.from_dict(json.loads((run / "config.json").read_text())), "train.epochs=2")
    Trainer(config, run, resume=True, log=lambda m: None).fit()  # optimiser state and RNGs load onto the CPU too
    assert C.load_checkpoint(run / "checkpoint.pt")["epoch"] == 2
