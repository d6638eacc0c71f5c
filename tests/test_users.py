"""What users see: help texts, logs a spreadsheet or TensorBoard reads, their own images, progress."""

from __future__ import annotations

import csv
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from seqvae.cli import main
from seqvae.configs import describe_fields
from seqvae.data import DataError, load_dataset
from seqvae.datafiles import FILES
from seqvae.evaluate import evaluate
from seqvae.logs import COLUMNS, read_metrics
from seqvae.models import MODELS
from seqvae.run import build_config
from seqvae.train import TrainConfig, Trainer

REPO = Path(__file__).resolve().parents[1]


def quiet(message):
    pass


# ---------------------------------------------------------------------- help


def test_train_help_lists_every_config_key_with_type_default_and_help(capsys):
    with pytest.raises(SystemExit) as exit:
        main(["train", "draw", "--help"])
    assert exit.value.code == 0
    out = capsys.readouterr().out
    for name, kind, default, text in describe_fields(MODELS["draw"].config) + describe_fields(TrainConfig):
        assert text, f"{name} has no help"
    assert "--model.read_size    int                   default 2: N of the read filterbank" in out
    assert "--train.lr_decay" in out and "multiply the learning rate by this after every epoch" in out
    assert "draw attention: data.name=binarized_mnist model.steps=16" in out  # presets, in full
    assert "--model.z_size" in out and "vrnn quick" not in out  # one model's keys when a model is named
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    every = capsys.readouterr().out
    assert all(f"model section of {name}" in every for name in MODELS) and "srnn long:" in every


def test_every_config_key_has_one_line_of_help():
    from seqvae.data import DataConfig
    from seqvae.objectives import ObjectiveConfig

    for cls in {DataConfig, ObjectiveConfig, TrainConfig, *(spec.config for spec in MODELS.values())}:
        for name, kind, default, text in describe_fields(cls):
            assert text and "\n" not in text, f"{cls.__name__}.{name}"


# ---------------------------------------------------------------------- logs


def test_runs_write_metrics_csv_that_matches_the_jsonl_and_curves_read_either(tmp_path, data_dir):
    cfg = build_config("rnn", "quick", ["data.limit=32", "data.valid_limit=8", "train.epochs=2", "train.log_every=1",
                                        "train.progress=false"], "jsb_chorales", str(data_dir))
    Trainer(cfg, tmp_path / "r", log=quiet).fit()
    with open(tmp_path / "r" / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    records = [json.loads(l) for l in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    assert list(rows[0])[: len(COLUMNS)] == COLUMNS and "valid_elbo_per_step" in rows[0]
    assert len(rows) == len(records) == 6  # 2 steps and a validation record per epoch
    for row, record in zip(rows, records):
        assert row["kind"] == record["kind"] and int(row["step"]) == record["step"]
        for key in ("loss", "valid_elbo_per_step"):
            if key in record:
                assert float(row[key]) == pytest.approx(record[key], rel=1e-12)
    (tmp_path / "r" / "metrics.jsonl").unlink()
    from_csv = read_metrics(tmp_path / "r")
    assert [r["step"] for r in from_csv] == [r["step"] for r in records]
    assert main(["viz", str(tmp_path / "r"), "--what", "curves", "--out", str(tmp_path / "curves.png")]) == 0


def test_tensorboard_events_are_written_when_the_extra_is_installed(tmp_path, data_dir):
    pytest.importorskip("tensorboard", reason="the tensorboard extra is not installed")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = build_config("rnn", "quick", ["data.limit=32", "data.valid_limit=8", "train.epochs=2", "train.log_every=1",
                                        "train.progress=false"], "jsb_chorales", str(data_dir))
    Trainer(cfg, tmp_path / "r", log=quiet).fit()
    events = EventAccumulator(str(tmp_path / "r" / "tensorboard"))
    events.Reload()
    valid = [json.loads(l) for l in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines() if '"valid"' in l]
    got = events.Scalars("valid/valid_elbo_per_step")
    assert [e.step for e in got] == [r["step"] for r in valid]
    assert [e.value for e in got] == pytest.approx([r["valid_elbo_per_step"] for r in valid], rel=1e-6)


# ---------------------------------------------------------------------- your own images


def colour_images(n, rng):
    """Coloured squares on a noisy background: (n, 16, 16, 3) uint8."""
    x = rng.integers(0, 40, (n, 16, 16, 3)).astype(np.uint8)
    for i in range(n):
        r, c = rng.integers(0, 10, 2)
        x[i, r : r + 6, c : c + 6, rng.integers(0, 3)] = 255
    return x


def test_draw_trains_on_your_own_colour_images_from_an_npz_through_the_cli(tmp_path):
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "mine.npz", train=colour_images(128, rng), valid=colour_images(32, rng), test=colour_images(32, rng))
    code = main(["train", "draw", "--preset", "quick", "--data", "images", f"--data.data_path={tmp_path / 'mine.npz'}",
                 "--data.limit=128", "--data.valid_limit=32", "--train.samples=4", "--train.progress=false",
                 "--runs-dir", str(tmp_path / "runs"), "--name", "mine"])
    assert code == 0
    config = json.loads((tmp_path / "runs" / "mine" / "config.json").read_text())
    assert config["model"]["image_shape"] == [3, 16, 16]  # decided by the data
    assert (tmp_path / "runs" / "mine" / "samples" / "epoch_001.png").exists()
    data = load_dataset("images", "test", data_path=tmp_path / "mine.npz")
    assert data.binarize == "dynamic" and data.image_shape == (3, 16, 16)  # grey levels: Bernoulli draws per pixel
    assert main(["eval", str(tmp_path / "runs" / "mine"), "--k", "4", "--limit", "8"]) == 0


def test_a_folder_of_pngs_is_a_data_set_and_binary_images_are_kept_as_they_are(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(1)
    for split, n in (("train", 6), ("valid", 3)):
        (tmp_path / "pngs" / split).mkdir(parents=True)
        for i in range(n):
            Image.fromarray((rng.random((10, 8)) > 0.5).astype(np.uint8) * 255).save(tmp_path / "pngs" / split / f"{i:02d}.png")
    data = load_dataset("images", "train", data_path=tmp_path / "pngs")
    assert data.image_shape == (1, 10, 8) and data.binarize == "fixed" and set(data.images.unique().tolist()) == {0, 1}
    first = np.asarray(Image.open(tmp_path / "pngs" / "train" / "00.png")) // 255
    assert torch.equal(data.images[0, 0], torch.from_numpy(first))
    code = main(["train", "draw", "--preset", "quick", "--data", "images", f"--data.data_path={tmp_path / 'pngs'}",
                 "--data.batch_size=3", "--train.samples=2", "--train.progress=false", "--runs-dir", str(tmp_path / "runs"),
                 "--name", "pngs"])
    assert code == 0


def test_bad_image_sets_are_one_line_errors(tmp_path, capsys):
    from PIL import Image

    (tmp_path / "mixed" / "train").mkdir(parents=True)
    Image.fromarray(np.zeros((4, 4), np.uint8)).save(tmp_path / "mixed" / "train" / "a.png")
    Image.fromarray(np.zeros((5, 4), np.uint8)).save(tmp_path / "mixed" / "train" / "b.png")
    with pytest.raises(DataError, match="b.png is 4x5 with 1 channel but a.png is 4x4 with 1 channel"):
        load_dataset("images", "train", data_path=tmp_path / "mixed")
    np.savez(tmp_path / "floats.npz", train=np.random.rand(4, 5, 5), valid=np.random.rand(2, 5, 5))
    with pytest.raises(DataError, match="must be uint8 pixels"):
        load_dataset("images", "train", data_path=tmp_path / "floats.npz")
    with pytest.raises(DataError, match="has no array 'valid'"):
        np.savez(tmp_path / "train_only.npz", train=np.zeros((4, 5, 5), np.uint8))
        load_dataset("images", "valid", data_path=tmp_path / "train_only.npz")


def test_fashion_mnist_is_a_named_set_with_its_checksums(tmp_path):
    system = Path("/usr/share/datasets/fashion-mnist")
    if not (system / "t10k-images-idx3-ubyte.gz").exists():
        pytest.skip("Fashion-MNIST is not installed here (apt-get install dataset-fashion-mnist)")
    data = load_dataset("fashion_mnist", "test", data_dir=tmp_path, download=False)  # found in the system folder
    assert len(data) == 10000 and data.image_shape == (1, 28, 28) and data.binarize == "dynamic"
    assert float(data.images.float().mean()) / 255 == pytest.approx(0.2868, abs=1e-4)  # the test set's published mean
    copy = tmp_path / "fashion_mnist"
    copy.mkdir()
    (copy / "t10k-images-idx3-ubyte.gz").write_bytes(b"\x1f\x8b" + b"corrupt")
    with pytest.raises(DataError, match="corrupt or truncated"):
        load_dataset("fashion_mnist", "test", data_dir=tmp_path, download=False)  # the data root comes first


def test_draw_trains_on_fashion_mnist_through_the_cli(tmp_path):
    if not Path("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz").exists():
        pytest.skip("Fashion-MNIST is not installed here (apt-get install dataset-fashion-mnist)")
    code = main(["train", "draw", "--preset", "quick", "--data", "fashion_mnist", "--data.limit=640", "--data.valid_limit=64",
                 "--train.samples=4", "--train.progress=false", "--data-dir", str(tmp_path / "nothing-here"),
                 "--data.download=false", "--runs-dir", str(tmp_path / "runs"), "--name", "fashion"])
    assert code == 0
    records = [json.loads(l) for l in (tmp_path / "runs" / "fashion" / "metrics.jsonl").read_text().splitlines()]
    assert math.isfinite(records[-1]["valid_elbo"]) and records[-1]["valid_elbo"] < 0


def test_fashion_mnist_files_are_registered_like_mnist():
    for part in ("train-images", "train-labels", "test-images", "test-labels"):
        spec, mnist = FILES[("fashion_mnist", part)], FILES[("mnist", part)]
        assert spec.name == mnist.name and spec.size == mnist.size and len(spec.digest) == 32


# ---------------------------------------------------------------------- progress


def test_eval_shows_progress_with_a_rate_and_time_left_on_a_terminal(tmp_path, data_dir):
    cfg = build_config("vrnn", "quick", ["data.limit=16", "data.valid_limit=4", "train.epochs=1", "train.progress=false"],
                       "jsb_chorales", str(data_dir))
    Trainer(cfg, tmp_path / "r", log=quiet).fit()
    env = {**os.environ, "SEQVAE_DATA": str(data_dir), "PYTHONPATH": str(REPO), "COLUMNS": "120"}
    command = f"stty cols 120 rows 40; {sys.executable} -m seqvae eval {tmp_path / 'r'} --bound iwae --k 20 --limit 8 --batch-size 2"
    result = subprocess.run(["script", "-qec", command, "/dev/null"], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout
    frames = result.stdout.replace("\r", "\n")
    assert "iwae k=20:" in frames and "sample/s" in frames and "160/160" in frames and "nats/step" in frames


def test_training_shows_progress_on_a_terminal_with_examples_per_second_and_the_loss(tmp_path, data_dir):
    env = {**os.environ, "SEQVAE_DATA": str(data_dir), "PYTHONPATH": str(REPO)}
    command = (f"stty cols 150 rows 40; {sys.executable} -m seqvae train draw --preset quick --data.limit=256 "
               f"--data.valid_limit=64 --train.threads=1 --runs-dir {tmp_path} --name bar")
    result = subprocess.run(["script", "-qec", command, "/dev/null"], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-2000:]
    frames = result.stdout.replace("\r", "\n")
    assert "ex/s" in frames and "bits/dim)" in frames and "/256 [" in frames and "Traceback" not in frames
