"""The command line end to end on tiny settings: train, eval, sample, resume, and errors."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def seqvae(*args, cwd, data_dir, check=True):
    env = {**os.environ, "SEQVAE_DATA": str(data_dir), "PYTHONPATH": str(REPO)}
    result = subprocess.run([sys.executable, "-m", "seqvae", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    if check and result.returncode != 0:
        raise AssertionError(f"seqvae {' '.join(args)} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    return result


def test_draw_quick_train_eval_sample(tmp_path, data_dir):
    seqvae("train", "draw", "--preset", "quick", "--name", "q", "--data.limit=640", "--data.valid_limit=128", "--train.epochs=2", "--train.samples=16", cwd=tmp_path, data_dir=data_dir)
    run = tmp_path / "runs" / "q"
    assert {"config.json", "metrics.jsonl", "checkpoint.pt", "best.pt"} <= {p.name for p in run.iterdir()}
    assert sorted(p.name for p in (run / "samples").iterdir()) == ["epoch_001.png", "epoch_002.png"]
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    valid = [r for r in records if r["kind"] == "valid"]
    assert [r["epoch"] for r in valid] == [1, 2] and all(r["valid_elbo"] < 0 for r in valid)
    config = json.loads((run / "config.json").read_text())
    assert config["model_kind"] == "draw" and config["model"]["steps"] == 8

    out = seqvae("eval", "runs/q", "--k", "20", "--limit", "40", cwd=tmp_path, data_dir=data_dir).stdout
    assert "NLL" in out and "bits/dim" in out
    result = json.loads((run / "eval_test_ll_k20.json").read_text())
    assert result["examples"] == 40 and result["nats"] < 0 and result["bits_per_dim"] > 0

    seqvae("sample", "q", "--n", "9", cwd=tmp_path, data_dir=data_dir)
    assert (run / "samples.png").stat().st_size > 1000 and (run / "samples.gif").read_bytes()[:6] == b"GIF89a"

    # resume with more epochs continues from the checkpoint
    seqvae("train", "draw", "--name", "q", "--resume", "--train.epochs=3", cwd=tmp_path, data_dir=data_dir)
    valid = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if '"valid"' in line]
    assert [r["epoch"] for r in valid] == [1, 2, 3]


def test_vrnn_quick_with_tbptt_and_fivo(tmp_path, data_dir):
    seqvae("train", "vrnn", "--data", "jsb_chorales", "--preset", "quick", "--name", "v", "--data.limit=32", "--data.valid_limit=8",
           "--train.epochs=1", "--objective.name=fivo", "--objective.k=2", "--train.tbptt=40", cwd=tmp_path, data_dir=data_dir)
    run = tmp_path / "runs" / "v"
    valid = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if '"valid"' in line]
    assert "valid_fivo_per_step" in valid[0] and "valid_elbo_per_step" in valid[0]
    out = seqvae("eval", "v", "--k", "4", "--limit", "5", cwd=tmp_path, data_dir=data_dir).stdout
    assert "per time step" in out
    seqvae("sample", "v", "--n", "2", "--steps", "30", cwd=tmp_path, data_dir=data_dir)
    assert (run / "samples.png").exists()


def test_eval_of_a_model_without_latents_computes_its_exact_likelihood_once(tmp_path, data_dir):
    seqvae("train", "rnn", "--data", "jsb_chorales", "--preset", "quick", "--name", "r", "--data.limit=16", "--data.valid_limit=4",
           "--train.epochs=1", cwd=tmp_path, data_dir=data_dir)
    out = seqvae("eval", "r", "--limit", "5", cwd=tmp_path, data_dir=data_dir).stdout  # the default k for ll is 5000
    assert "its ll equals its exact likelihood and is computed once (k=1, not 5000)" in out
    ll = json.loads((tmp_path / "runs" / "r" / "eval_test_ll_k1.json").read_text())
    seqvae("eval", "r", "--bound", "elbo", "--limit", "5", cwd=tmp_path, data_dir=data_dir)
    exact = json.loads((tmp_path / "runs" / "r" / "eval_test_elbo_k1.json").read_text())  # no latents: the ELBO is log p(x)
    assert ll["k"] == 1 and abs(ll["nats"] - exact["nats"]) < 1e-9 * abs(exact["nats"])


@pytest.mark.parametrize("objective", ["elbo", "iwae", "fivo"])
def test_srnn_quick_trains_with_each_objective_and_writes_midi(tmp_path, data_dir, objective):
    from seqvae.music import read_midi_notes

    k = "1" if objective == "elbo" else "2"
    seqvae("train", "srnn", "--data", "jsb_chorales", "--preset", "quick", "--name", "s", "--data.limit=32", "--data.valid_limit=8",
           "--train.epochs=1", f"--objective.name={objective}", f"--objective.k={k}", cwd=tmp_path, data_dir=data_dir)
    run = tmp_path / "runs" / "s"
    out = seqvae("eval", "s", "--k", "4", "--limit", "5", cwd=tmp_path, data_dir=data_dir).stdout
    assert "srnn on jsb_chorales/test (5 examples)" in out and "per time step" in out
    if objective != "elbo":
        return
    seqvae("sample", "s", "--n", "2", "--steps", "24", "--midi", "s.mid", cwd=tmp_path, data_dir=data_dir)
    notes = read_midi_notes(tmp_path / "s.mid")
    assert notes and all(21 <= note <= 108 for _, _, note in notes) and max(end for _, end, _ in notes) <= 24 + 4 + 24
    seqvae("viz", "s", "--what", "sequences", "--out", "r.png", "--n", "2", "--midi", "r.mid", cwd=tmp_path, data_dir=data_dir)
    assert (tmp_path / "r.png").exists() and all(21 <= note <= 108 for _, _, note in read_midi_notes(tmp_path / "r.mid"))
    err = seqvae("sample", "s", "--midi", "s.txt", cwd=tmp_path, data_dir=data_dir, check=False)
    assert err.returncode == 2 and "--midi must name a .mid file" in err.stderr


@pytest.mark.parametrize(
    "args,message",
    [
        (["train", "draw", "--model.stepz=3"], "unknown config key 'model.stepz'"),
        (["train", "draw", "--model.steps=0"], "model.steps (T) must be at least 1"),
        (["train", "draw", "--preset", "huge"], "unknown preset 'huge'"),
        (["train", "draw", "--data", "cifar"], "data.name must be one of"),
        (["train", "gan"], "unknown model 'gan'"),
        (["train", "draw", "--model.steps"], "has no value"),
        (["eval", "nowhere"], "no run 'nowhere'"),
        (["eval", "nowhere", "--k", "-5"], "--k must be a positive number"),
        (["eval", "nowhere", "--device", "bogus"], "device must be auto, cpu, cuda or cuda:N, got 'bogus'"),
        (["train", "srnn", "--train.tbptt=10"], "its posterior reads the whole sequence"),
        (["train", "vrnn", "--model.posterior=filtering"], "unknown config key 'model.posterior'"),
        (["train", "draw", "--name", "../../escape"], "run name '../../escape' must be 1-100 ASCII letters"),
        (["train", "draw", "--name", "/tmp/elsewhere"], "must be 1-100 ASCII letters"),
        (["train", "draw", "--name", "x" * 300], "must be 1-100 ASCII letters"),
        (["train", "draw", "--resume", "--name", "../up"], "must be 1-100 ASCII letters"),
        (["train", "draw", "--train.epochs=1000000000"], "train.epochs must lie in 1..100000"),
        (["viz", "nowhere", "--what", "latents", "--out", "x.png", "--n", "100000"], "--n must lie in 1..64"),
        (["viz", "nowhere", "--what", "canvas", "--out", "x.png", "--steps", "-3"], "--steps must lie in 1..1000"),
        (["sample", "nowhere", "--n", "0"], "--n must lie in 1..4096"),
    ],
)
def test_errors_are_one_line_and_exit_2(tmp_path, data_dir, args, message):
    result = seqvae(*args, cwd=tmp_path, data_dir=data_dir, check=False)
    assert result.returncode == 2, result.stderr
    assert message in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


def test_existing_run_is_never_overwritten(tmp_path, data_dir):
    run = tmp_path / "runs" / "keep"
    run.mkdir(parents=True)
    (run / "notes.txt").write_text("mine")
    result = seqvae("train", "draw", "--name", "keep", cwd=tmp_path, data_dir=data_dir, check=False)
    assert result.returncode == 2 and "already exists" in result.stderr
    assert (run / "notes.txt").read_text() == "mine" and len(list(run.iterdir())) == 1


def test_missing_data_offline_is_a_clear_error(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    result = seqvae("train", "draw", "--preset", "quick", "--data.download=false", cwd=tmp_path, data_dir=empty, check=False)
    assert result.returncode == 2
    assert "binarized_mnist_train.amat" in result.stderr and str(empty.resolve()) in result.stderr
    assert "Traceback" not in result.stderr


def test_version_and_dry_run(tmp_path, data_dir):
    import seqvae as package

    assert seqvae("--version", cwd=tmp_path, data_dir=data_dir).stdout.strip() == f"seqvae {package.__version__}"
    out = seqvae("train", "srnn", "--preset", "quick", "--dry-run", "--train.lr=0.01", cwd=tmp_path, data_dir=data_dir).stdout
    config = json.loads(out)
    assert config["model_kind"] == "srnn" and config["model"]["x_dim"] == 88 and config["train"]["lr"] == 0.01
    assert config["data"]["name"] == "jsb_chorales" and not (tmp_path / "runs").exists()  # nothing written


def test_a_relative_data_root_is_found_from_the_repository_root(tmp_path, monkeypatch):
    from seqvae.datafiles import data_root

    inside = REPO / "data"  # exists in a checkout (git-ignored, holds only a README)
    monkeypatch.chdir(tmp_path)  # a relative path that does not exist from here
    monkeypatch.setenv("SEQVAE_DATA", "data")
    assert data_root() == inside
    monkeypatch.setenv("SEQVAE_DATA", "no-such-folder")
    assert data_root() == Path("no-such-folder")  # left as given: the error will name it
