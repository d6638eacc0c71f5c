"""The fault suite: what a hostile or careless user does, and what they get back.

Each test provokes one failure and checks the outcome stated in the README's "When things
go wrong": a one-line error (exit status 2, no traceback) or the documented handling, and
nothing the user had lost or half-overwritten. The signal and kill cases are in
test_resume.py; the slow soak test (three kills, each resumed) is at the end.
"""

from __future__ import annotations

import errno
import gzip
import io
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
import tracemalloc
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from seqvae import checkpoint as C
from seqvae.attention import Filterbanks, filterbank
from seqvae.cli import main
from seqvae.configs import ConfigError
from seqvae.data import DataError, ImageData, load_dataset, save_sequences
from seqvae.draw import DRAW
from seqvae.evaluate import evaluate
from seqvae.run import build_config
from seqvae.runlock import RunLock
from seqvae.train import RESUMABLE, Trainer, TrainingError

REPO = Path(__file__).resolve().parents[1]
RNN = ["rnn", "quick", ["data.limit=16", "data.valid_limit=4", "train.epochs=1", "train.progress=false"], "jsb_chorales"]


def rnn_config(data_dir, *more):
    kind, preset, overrides, data = RNN
    return build_config(kind, preset, [*overrides, *more], data, str(data_dir))


def quiet(message):
    pass


def one_line_error(capsys, argv) -> str:
    """Run the CLI in this process; it must fail with status 2 and one line on stderr."""
    code = main(argv)
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert err.startswith("seqvae: error: ") and "\n" not in err and "Traceback" not in err, err
    return err


# ---------------------------------------------------------------------- the run-folder lock


def test_a_second_trainer_on_a_live_run_is_refused_naming_the_holder(tmp_path, data_dir):
    first = Trainer(rnn_config(data_dir), tmp_path / "r", log=quiet)  # alive, holding the run
    with pytest.raises(TrainingError, match=rf"held by another Trainer of this process \(pid {os.getpid()} on .*close\(\)"):
        Trainer(rnn_config(data_dir), tmp_path / "r", resume=True, log=quiet)
    with pytest.raises(TrainingError, match="held by another Trainer"):
        Trainer(rnn_config(data_dir), tmp_path / "r", log=quiet)  # nor as a new run of that name
    first.fit()  # releases the folder when it ends
    again = Trainer(rnn_config(data_dir, "train.epochs=2"), tmp_path / "r", resume=True, log=quiet)
    again.fit()
    assert again.epoch == 2


def test_a_crashed_holders_lock_is_taken_over_without_clean_up(tmp_path, data_dir):
    run = tmp_path / "r"
    code = f"import os, signal; from seqvae.runlock import RunLock; RunLock({str(run)!r}).acquire(); os.kill(os.getpid(), signal.SIGKILL)"
    proc = subprocess.run([sys.executable, "-c", code], env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == -signal.SIGKILL and (run / ".lock").exists()
    trainer = Trainer(rnn_config(data_dir), run, log=quiet)  # the dead holder's lock went with it
    trainer.fit()
    assert json.loads((run / ".lock").read_text())["pid"] == os.getpid()


def test_cli_resume_of_a_run_still_training_refuses_at_once(tmp_path, data_dir):
    env = {**os.environ, "SEQVAE_DATA": str(data_dir), "PYTHONPATH": str(REPO)}
    args = [sys.executable, "-m", "seqvae", "train", "rnn", "--preset", "quick", "--data.limit=64", "--train.epochs=50",
            "--train.progress=false", "--train.threads=1", "--name", "busy"]
    proc = subprocess.Popen(args, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while not (tmp_path / "runs" / "busy" / "config.json").exists() and time.time() < deadline:
            time.sleep(0.05)
        second = subprocess.run([sys.executable, "-m", "seqvae", "train", "rnn", "--name", "busy", "--resume"], cwd=tmp_path,
                                env=env, capture_output=True, text=True, timeout=120)
        assert proc.poll() is None, "the first trainer ended before the second one started"
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=120)
    assert second.returncode == 2 and f"in use by another trainer (pid {proc.pid}" in second.stderr, second.stderr
    assert proc.returncode == 128 + signal.SIGTERM  # the first trainer was untouched, and stopped cleanly


def test_a_run_that_cannot_start_leaves_no_folder_and_no_lock(tmp_path, data_dir, capsys):
    one_line_error(capsys, ["train", "rnn", "--runs-dir", str(tmp_path), "--name", "x", "--data-dir", str(tmp_path / "nothing"),
                            "--data.download=false"])
    assert not (tmp_path / "x").exists()
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep")
    one_line_error(capsys, ["train", "rnn", "--preset", "quick", "--runs-dir", str(tmp_path), "--name", "mine",
                            "--data-dir", str(data_dir)])
    assert sorted(p.name for p in mine.iterdir()) == ["notes.txt"]


# ---------------------------------------------------------------------- the resume policy


def test_resume_refuses_changes_to_what_the_checkpoint_fixes_naming_each(tmp_path, data_dir, capsys):
    Trainer(rnn_config(data_dir), tmp_path / "r", log=quiet).fit()
    before = (tmp_path / "r" / "checkpoint.pt").read_bytes()
    err = one_line_error(capsys, ["train", "rnn", "--runs-dir", str(tmp_path), "--name", "r", "--resume", "--data.batch_size=4",
                                  "--model.hidden_size=8", "--objective.name=iwae", "--train.epochs=3"])
    for named in ("data.batch_size (16 -> 4)", "model.hidden_size (64 -> 8)", "objective.name ('elbo' -> 'iwae')"):
        assert named in err
    assert "train.epochs" not in err.split("only")[0]  # an allowed change is not named as refused
    assert (tmp_path / "r" / "checkpoint.pt").read_bytes() == before  # nothing written


def test_resume_applies_and_records_the_allowed_changes_and_config_and_checkpoint_agree(tmp_path, data_dir):
    Trainer(rnn_config(data_dir), tmp_path / "r", log=quiet).fit()
    log = []
    trainer = Trainer(rnn_config(data_dir, "train.epochs=2", "train.lr=0.0005", "train.patience=3"), tmp_path / "r",
                      resume=True, log=log.append)
    assert trainer.optimizer.param_groups[0]["lr"] == 0.0005  # applied, not silently ignored
    assert any("train.lr: 0.003 -> 0.0005" in m for m in log)
    config = json.loads((tmp_path / "r" / "config.json").read_text())
    assert config == json.loads(C.load_checkpoint(tmp_path / "r" / "checkpoint.pt")["config"])
    assert config["train"]["lr"] == 0.0005 and config["train"]["epochs"] == 2
    history = [json.loads(l) for l in (tmp_path / "r" / "config_history.jsonl").read_text().splitlines()]
    assert [h["event"] for h in history] == ["start", "resume"]
    assert history[1]["changed"] == {"train.epochs": [1, 2], "train.lr": [0.003, 0.0005], "train.patience": [40, 3]}
    trainer.fit()
    assert trainer.epoch == 2


def test_records_written_after_the_checkpoint_at_its_own_step_are_dropped_on_resume(tmp_path, data_dir):
    Trainer(rnn_config(data_dir), tmp_path / "r", log=quiet).fit()
    kept = (tmp_path / "r" / "metrics.jsonl").read_text()
    step = C.load_checkpoint(tmp_path / "r" / "checkpoint.pt")["step"]
    with open(tmp_path / "r" / "metrics.jsonl", "a") as f:  # what a run killed after a skipped (non-finite) step leaves
        f.write(json.dumps({"kind": "train", "epoch": 1, "step": step, "loss": None, "nonfinite_total": 1}) + "\n")
    trainer = Trainer(rnn_config(data_dir, "train.epochs=2"), tmp_path / "r", resume=True, log=quiet)
    assert (tmp_path / "r" / "metrics.jsonl").read_text() == kept  # cut at the checkpoint's record, not its step
    assert len((tmp_path / "r" / "metrics.csv").read_text().splitlines()) == len(kept.splitlines()) + 1  # + header
    trainer.fit()


def test_the_resumable_keys_are_real_config_keys(data_dir):
    flat = {f"{s}.{k}" for s, v in rnn_config(data_dir).to_dict().items() if isinstance(v, dict) for k in v}
    assert RESUMABLE <= flat  # no typo hides a key the policy meant to allow
    assert not {k for k in RESUMABLE if k.split(".")[0] in ("model", "objective")}
    assert not RESUMABLE & {"data.name", "data.batch_size", "data.limit", "train.seed", "train.optimizer", "train.tbptt"}


def test_a_config_value_of_the_wrong_type_in_config_json_is_one_line(tmp_path, data_dir, capsys):
    Trainer(rnn_config(data_dir), tmp_path / "r", log=quiet).fit()
    config = json.loads((tmp_path / "r" / "config.json").read_text())
    config["train"]["lr"] = "fast"
    (tmp_path / "r" / "config.json").write_text(json.dumps(config))
    err = one_line_error(capsys, ["train", "rnn", "--runs-dir", str(tmp_path), "--name", "r", "--resume"])
    assert "train.lr" in err


def test_a_huge_learning_rate_ends_with_one_line_and_no_nan_reported_as_a_metric(tmp_path, data_dir, capsys):
    err = one_line_error(capsys, ["train", "draw", "--preset", "quick", "--data.limit=640", "--data.valid_limit=64",
                                  "--train.lr=1e8", "--train.clip_grad=0", "--train.progress=false", "--train.threads=1",
                                  "--data-dir", str(data_dir), "--runs-dir", str(tmp_path), "--name", "huge"])
    assert "training diverged" in err or "no optimiser step had a finite loss" in err
    records = [json.loads(l) for l in (tmp_path / "huge" / "metrics.jsonl").read_text().splitlines()]
    valid = [r for r in records if r["kind"] == "valid"]
    assert valid and all(r["valid_elbo"] is None and r["nonfinite"] == ["valid_elbo"] for r in valid)


# ---------------------------------------------------------------------- sizes read from outside


def test_a_checkpoint_carrying_a_huge_object_is_refused_before_it_is_read(tmp_path):
    path = tmp_path / "bomb.pt"
    torch.save({"model": {}, "junk": bytearray(40_000_000)}, path)
    tracemalloc.start()
    try:
        with pytest.raises(C.CheckpointError, match="pickled values .* refused unread"):
            C.load_checkpoint(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 2_000_000  # the 40 MB were never read


def test_checkpoints_over_the_size_limit_or_compressed_are_refused_unread(tmp_path):
    path = tmp_path / "ok.pt"
    C.save_checkpoint(path, {"w": torch.ones(1000)})
    with pytest.raises(C.CheckpointError, match="more than the 1,000 a checkpoint may have"):
        C.load_checkpoint(path, max_bytes=1000)
    packed = tmp_path / "packed.pt"
    with zipfile.ZipFile(path) as src, zipfile.ZipFile(packed, "w", zipfile.ZIP_DEFLATED) as dst:
        for entry in src.infolist():
            dst.writestr(entry.filename, src.read(entry))
    with pytest.raises(C.CheckpointError, match="compressed, which torch.save never does"):
        C.load_checkpoint(packed)
    directory = tmp_path / "adir.pt"
    directory.mkdir()
    with pytest.raises(C.CheckpointError, match="not a checkpoint file"):
        C.load_checkpoint(directory)


def test_zip_directories_that_would_cost_memory_or_overlap_are_refused_unread(tmp_path):
    import struct

    path = tmp_path / "ok.pt"
    C.save_checkpoint(path, {"w": torch.ones(1000), "v": torch.zeros(10)})
    raw = bytearray(path.read_bytes())
    at = raw.rfind(b"PK\x05\x06")
    many = bytearray(raw)
    many[at + 8 : at + 12] = struct.pack("<HH", 60000, 60000)  # a directory declaring 60,000 entries
    (tmp_path / "many.pt").write_bytes(bytes(many))
    with pytest.raises(C.CheckpointError, match="lists 60,000 zip entries"):
        C.load_checkpoint(tmp_path / "many.pt")
    central = raw.find(b"PK\x01\x02")  # the first entry of the central directory claims 10x the file
    big = bytearray(raw)
    big[central + 20 : central + 28] = struct.pack("<II", 10 * len(raw), 10 * len(raw))
    (tmp_path / "big.pt").write_bytes(bytes(big))
    with pytest.raises(C.CheckpointError, match="claim more bytes than the file holds"):
        C.load_checkpoint(tmp_path / "big.pt")


def test_a_gzip_bomb_in_the_data_root_stops_at_the_expected_size(tmp_path):
    folder = tmp_path / "binarized_mnist"
    folder.mkdir()
    bomb = folder / "binarized_mnist_valid.amat.gz"
    with gzip.open(bomb, "wb", compresslevel=9) as f:  # 200 MB of zeros in ~200 KB
        block = b"\0" * (1 << 20)
        for _ in range(200):
            f.write(block)
    assert bomb.stat().st_size < 1_000_000
    tracemalloc.start()
    try:
        with pytest.raises(DataError, match="inflates to more than the expected 15,680,000 bytes"):
            load_dataset("binarized_mnist", "valid", data_dir=tmp_path, download=False)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 40_000_000  # about the expected size, not the 200 MB it would inflate to


def test_a_data_file_far_larger_than_the_published_one_is_refused_unread(tmp_path):
    folder = tmp_path / "mnist"
    folder.mkdir()
    big = folder / "t10k-labels-idx1-ubyte.gz"
    with open(big, "wb") as f:
        f.truncate(50_000_000)  # sparse: no disk used
    (folder / "t10k-images-idx3-ubyte.gz").write_bytes(b"")
    with pytest.raises(DataError, match="holds more than the 14,114 bytes expected"):
        from seqvae.datafiles import FILES, fetch

        fetch(tmp_path, [FILES[("mnist", "test-labels")]], download=False)


def test_cli_counts_have_stated_maxima(tmp_path, data_dir, capsys):
    Trainer(rnn_config(data_dir), tmp_path / "r", log=quiet).fit()
    run = str(tmp_path / "r")
    assert "train.epochs must lie in 1..100000" in one_line_error(capsys, ["train", "rnn", "--preset", "quick", "--train.epochs=1000000000", "--dry-run"])
    assert "--n must lie in 1..4096" in one_line_error(capsys, ["sample", run, "--n", "100000"])
    assert "--n must lie in 1..64" in one_line_error(capsys, ["viz", run, "--what", "sequences", "--n", "100000", "--out", str(tmp_path / "v.png")])
    assert "--steps must lie in" in one_line_error(capsys, ["viz", run, "--what", "sequences", "--steps", "-1", "--out", str(tmp_path / "v.png")])
    assert "--limit must lie in" in one_line_error(capsys, ["viz", run, "--what", "latents", "--limit", "-5", "--out", str(tmp_path / "v.png")])


# ---------------------------------------------------------------------- names, writes, devices


@pytest.mark.parametrize("name", ["../../x", "/tmp/abs", "a" * 300, ".hidden", "sp ace", "naïve"])
def test_run_names_stay_inside_the_runs_folder(tmp_path, capsys, name):
    err = one_line_error(capsys, ["train", "rnn", "--preset", "quick", "--runs-dir", str(tmp_path / "runs"), "--name", name])
    assert "must be 1-100 ASCII letters" in err and not (tmp_path / "x").exists()


def test_a_full_disk_on_save_is_one_line_and_keeps_the_previous_checkpoint(tmp_path, data_dir, capsys, monkeypatch):
    Trainer(rnn_config(data_dir), tmp_path / "r", log=quiet).fit()
    checkpoint = tmp_path / "r" / "checkpoint.pt"
    before = checkpoint.read_bytes()
    real_fsync = os.fsync

    def full(fd):
        if os.path.basename(os.readlink(f"/proc/self/fd/{fd}")).startswith(".checkpoint.pt."):
            raise OSError(errno.ENOSPC, "No space left on device")
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", full)
    err = one_line_error(capsys, ["train", "rnn", "--runs-dir", str(tmp_path), "--name", "r", "--resume", "--train.epochs=2",
                                  "--train.progress=false"])
    assert "No space left on device" in err and "checkpoint.pt" in err and "intact" in err
    assert checkpoint.read_bytes() == before
    assert not list((tmp_path / "r").glob(".*.tmp"))


def test_a_read_only_output_folder_is_one_line(tmp_path, data_dir, capsys, monkeypatch):
    Trainer(rnn_config(data_dir), tmp_path / "r", log=quiet).fit()

    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(tempfile, "mkstemp", read_only)
    err = one_line_error(capsys, ["sample", str(tmp_path / "r"), "--n", "2", "--out-dir", str(tmp_path / "out")])
    assert "Read-only file system" in err and "samples.png" in err


def test_orphaned_temporary_files_are_removed_when_the_run_continues(tmp_path, data_dir):
    Trainer(rnn_config(data_dir), tmp_path / "r", log=quiet).fit()
    orphan = tmp_path / "r" / ".checkpoint.pt.abc123.tmp"  # what a kill in the middle of a save leaves
    orphan.write_bytes(b"half a checkpoint")
    Trainer(rnn_config(data_dir, "train.epochs=2"), tmp_path / "r", resume=True, log=quiet).fit()
    assert not orphan.exists()


def test_bogus_devices_and_text_checkpoints_are_one_line(tmp_path, capsys):
    text = tmp_path / "notes.pt"
    text.write_text("hello")
    assert "not a checkpoint" in one_line_error(capsys, ["eval", str(text)])
    assert "device must be" in one_line_error(capsys, ["train", "rnn", "--preset", "quick", "--train.device=bogus", "--dry-run"])


# ---------------------------------------------------------------------- data checked at load


def test_splits_that_disagree_are_found_before_any_training(tmp_path, capsys):
    path = tmp_path / "mine.npz"
    save_sequences(path, {"train": [np.random.rand(5, 3)] * 4, "valid": [np.random.rand(5, 4)] * 2})
    err = one_line_error(capsys, ["train", "vrnn", "--data", "npz", f"--data.data_path={path}", "--model.output=gaussian",
                                  "--runs-dir", str(tmp_path / "runs"), "--name", "m"])
    assert "the splits disagree" in err and "(3,)" in err and "(4,)" in err
    assert not (tmp_path / "runs" / "m").exists()  # refused before the run began


def test_complex_arrays_are_refused_not_cast(tmp_path):
    path = tmp_path / "c.npz"
    np.savez(path, train=np.ones((4, 2), dtype=np.complex64), train_lengths=np.array([2, 2]))
    with pytest.raises(DataError, match="must hold real numbers .* got dtype complex64"):
        load_dataset("npz", "train", data_path=path)


def test_binary_heads_need_binary_data(tmp_path, capsys):
    path = tmp_path / "real.npz"
    save_sequences(path, {"train": [np.random.rand(5, 3)] * 4, "valid": [np.random.rand(5, 3)] * 2})
    err = one_line_error(capsys, ["train", "vrnn", "--data", "npz", f"--data.data_path={path}", "--model.output=bernoulli", "--dry-run"])
    assert "not binary but model.output=bernoulli" in err


# ---------------------------------------------------------------------- honest likelihoods


@pytest.mark.parametrize("argv, named", [
    (["train", "draw", "--preset", "quick", "--model.likelihood=gaussian", "--dry-run"], "model.likelihood=gaussian is a density"),
    (["train", "vrnn", "--preset", "quick", "--model.output=gaussian", "--dry-run"], "model.output=gaussian is a density"),
    (["train", "srnn", "--preset", "quick", "--model.output=mixture", "--dry-run"], "model.output=mixture is a density"),
])
def test_densities_on_binary_data_are_refused(capsys, argv, named):
    assert named in one_line_error(capsys, argv)


def test_evaluate_refuses_a_density_on_binary_images_and_reports_code_lengths_otherwise():
    images = ImageData((torch.rand(8, 1, 6, 6) > 0.5).to(torch.uint8), binarize="fixed", name="toy")
    kw = dict(image_shape=(1, 6, 6), steps=2, hidden_size=8, z_size=3, read="none", write="none")
    with pytest.raises(ConfigError, match="binary but model.likelihood=gaussian is a density"):
        evaluate(DRAW(likelihood="gaussian", **kw), images)
    result = evaluate(DRAW(likelihood="bernoulli", **kw), images, name="iwae", k=4)
    assert result["bits_per_dim"] > 0  # -log2 of a probability mass: a code length


def test_the_filterbank_is_finite_for_any_finite_input():
    big = torch.finfo(torch.float32).max
    values = [0.0, 3.5, -1e6, 1e30, big, -big]
    for log_sigma2 in (-1000.0, -103.0, -88.8, -20.0, 0.0, 40.0, 88.0, 1000.0):
        for center in values:
            for delta in (1e-30, 1.0, 1e30, big):
                sigma2 = torch.tensor([log_sigma2]).exp()
                f = filterbank(torch.tensor([center]), torch.tensor([delta]), sigma2, 5, 28)
                assert torch.isfinite(f).all(), (log_sigma2, center, delta)
                torch.testing.assert_close(f.sum(-1), torch.ones(1, 5))
    # the heads DRAW runs (both axes at once, square and not): finite filters and gradients
    for height, width in ((28, 28), (12, 20)):
        heads = Filterbanks(height, width, 5)
        for raw in [(0, 0, -95, 0, 0), (0, 0, -110, 0, 0), (1e20, 0, 0, 0, 0), (0, 0, 0, 100, 0), (0, 0, -50, 0, 0),
                    (big, -big, 88, 88, 0), (0, 0, 1000, -1000, 1000), (0.3, -0.2, 1, 0.5, 0)]:
            raw = torch.tensor([raw], dtype=torch.float32, requires_grad=True)
            fy, fx, params = heads(raw)
            assert torch.isfinite(fy).all() and torch.isfinite(fx).all(), raw
            (fy.sum() + (fx * torch.linspace(0, 1, width)).sum() + params.gamma.sum()).backward()
            assert torch.isfinite(raw.grad).all(), raw
    # a variance that underflowed to 0 gives one-hot filters on the nearest pixel, as the limit does
    f = filterbank(torch.tensor([10.2]), torch.tensor([1.0]), torch.tensor([-200.0]).exp(), 2, 28)
    assert f.argmax(-1).tolist() == [[9, 10]] and f.max() == 1  # means 9.7 and 10.7: pixels 10 and 11 (1-based)


# ---------------------------------------------------------------------- the soak test


@pytest.mark.slow
def test_soak_three_kills_at_random_points_each_resumed_end_where_an_uninterrupted_run_ends(tmp_path, data_dir):
    env = {**os.environ, "SEQVAE_DATA": str(data_dir), "PYTHONPATH": str(REPO)}
    common = ["train", "draw", "--preset", "quick", "--data.limit=2560", "--data.valid_limit=64", "--train.epochs=3",
              "--train.threads=1", "--train.log_every=1", "--train.checkpoint_every=5", "--train.samples=4", "--train.progress=false"]
    subprocess.run([sys.executable, "-m", "seqvae", *common, "--name", "whole"], cwd=tmp_path, env=env, check=True,
                   capture_output=True, timeout=900)
    run, rng, kills = tmp_path / "runs" / "soak", random.Random(20261201), 0
    args = common + ["--name", "soak"]
    for target in sorted(rng.sample(range(8, 115), 3)):  # 40 steps per epoch, 120 in all
        proc = subprocess.Popen([sys.executable, "-m", "seqvae", *args], cwd=tmp_path, env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 600
        while time.time() < deadline and proc.poll() is None:
            metrics = run / "metrics.jsonl"
            steps = [json.loads(l)["step"] for l in metrics.read_text().splitlines() if l.strip().endswith("}")] if metrics.exists() else []
            if steps and steps[-1] >= target:
                proc.send_signal(signal.SIGKILL)
                kills += 1
                break
            time.sleep(0.005)
        proc.wait(timeout=60)
        args = ["train", "draw", "--name", "soak", "--resume"]
    subprocess.run([sys.executable, "-m", "seqvae", *args], cwd=tmp_path, env=env, check=True, capture_output=True, timeout=900)
    assert kills == 3
    whole = torch.load(tmp_path / "runs" / "whole" / "checkpoint.pt", weights_only=True)
    soak = torch.load(run / "checkpoint.pt", weights_only=True)
    assert whole["step"] == soak["step"] == 120
    assert all(torch.equal(whole["model"][k], soak["model"][k]) for k in whole["model"])
    records = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [json.loads(l)["step"] for l in (tmp_path / "runs" / "whole" / "metrics.jsonl").read_text().splitlines()]
