"""The models shipped with the package: present, checked, loadable offline, and as good as their manifest says."""

from __future__ import annotations

import hashlib
import json
import shutil

import pytest
import torch

import seqvae
from seqvae import zoo
from seqvae.checkpoint import CheckpointError
from seqvae.cli import main
from seqvae.data import load_dataset
from seqvae.evaluate import evaluate

SHIPPED = ["draw-attention", "draw", "vrnn-jsb"]


def test_the_three_models_are_shipped_small_and_documented():
    models = zoo.available()
    assert sorted(models) == sorted(SHIPPED)
    for name, entry in models.items():
        path = zoo.WEIGHTS / entry["file"]
        assert path.stat().st_size <= 2 * 2**20, f"{name} is over 2 MB"
        assert hashlib.sha256(path.read_bytes()).hexdigest() == entry["sha256"]
        assert entry["command"].startswith("seqvae train ") and entry["scores"]


@pytest.mark.parametrize("name", SHIPPED)
def test_each_model_loads_offline_and_scores_what_its_manifest_says(name, data_dir, no_network):
    config, model, payload = zoo.load(name)
    assert not model.training and payload["metrics"], "the training records travel with the model"
    entry = zoo.available()[name]
    check = entry["check"]  # a quick, fixed-seed score recorded when the model was exported
    data = load_dataset(config.data.name, check["split"], data_dir=data_dir, download=False).subset(check["examples"])
    torch.manual_seed(0)
    result = evaluate(model, data, name="elbo", batch_size=100)
    key = "nats_per_step" if "nats_per_step" in result else "nats"
    assert result[key] == pytest.approx(check["elbo"], abs=check["tolerance"])


def test_pretrained_returns_the_model_and_the_cli_takes_pretrained_names(data_dir, capsys):
    model = seqvae.pretrained("vrnn-jsb")
    assert isinstance(model, seqvae.VRNN)
    assert main(["eval", "pretrained:vrnn-jsb", "--bound", "elbo", "--limit", "4", "--data-dir", str(data_dir)]) == 0
    assert "vrnn on jsb_chorales/test (4 examples)" in capsys.readouterr().out


def test_viz_draws_the_glimpses_of_the_shipped_attention_model(tmp_path, data_dir):
    out = tmp_path / "glimpses.png"
    assert main(["viz", "pretrained:draw-attention", "--what", "glimpses", "--out", str(out), "--data-dir", str(data_dir)]) == 0
    from PIL import Image

    assert Image.open(out).size[0] > 400
    assert main(["viz", "pretrained:draw-attention", "--what", "curves", "--out", str(tmp_path / "curves.png")]) == 0


def test_unknown_or_damaged_models_are_refused(tmp_path, monkeypatch, capsys):
    with pytest.raises(CheckpointError, match="no pretrained model 'nope': expected one of"):
        seqvae.pretrained("nope")
    fake = tmp_path / "weights"
    shutil.copytree(zoo.WEIGHTS, fake)
    data = bytearray((fake / "vrnn-jsb.pt").read_bytes())
    data[-100] ^= 1
    (fake / "vrnn-jsb.pt").write_bytes(bytes(data))
    monkeypatch.setattr(zoo, "WEIGHTS", fake)
    with pytest.raises(CheckpointError, match="does not match its sha256"):
        seqvae.pretrained("vrnn-jsb")
    assert main(["sample", "pretrained:vrnn-jsb", "--n", "1", "--out-dir", str(tmp_path)]) == 2
    assert "does not match its sha256" in capsys.readouterr().err
