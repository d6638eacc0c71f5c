"""Configs: every override is checked against the dataclasses; presets; JSON round trip."""

import pytest

from seqvae.run import build_config
from seqvae.configs import ConfigError, apply_override, from_dict, parse_value
from seqvae.draw import DrawConfig
from seqvae.models import MODELS
from seqvae.run import RunConfig


def draw_config(*overrides, preset=None, data=None):
    return build_config("draw", preset, list(overrides), data, None)


def test_overrides_set_typed_values():
    cfg = draw_config("model.steps=10", "train.lr=3e-4", "train.progress=false", "model.image_shape=1,28,28", "data.limit=none")
    assert cfg.model.steps == 10 and cfg.train.lr == 3e-4 and cfg.train.progress is False
    assert cfg.model.image_shape == (1, 28, 28) and cfg.data.limit is None


@pytest.mark.parametrize(
    "override,message",
    [
        ("model.stepz=10", "unknown config key 'model.stepz'"),
        ("optim.lr=1", "unknown config key 'optim.lr'"),
        ("model.steps=ten", "model.steps: expected an integer, got 'ten'"),
        ("train.lr=fast", "train.lr: expected a number"),
        ("train.lr=nan", "expected a finite number"),
        ("train.progress=maybe", "expected true or false"),
        ("model.steps=0", "model.steps \\(T\\) must be at least 1"),
        ("objective.k=-3", "objective.k must be a positive number"),
        ("model.write_size=29", "write_size \\(N\\) must lie in 1..28"),
        ("model.read=gaussian", "model.read must be one of none, filterbank"),
        ("train.device=tpu", "train.device must be"),
        ("objective.name=fivo", "fivo needs a sequence model"),
        ("model.image_shape=1,28", "expected 3 comma-separated values"),
        ("model", "must look like section.key=value"),
        ("model=3", "is a section"),
    ],
)
def test_bad_overrides_are_clear_errors(override, message):
    with pytest.raises(ConfigError, match=message):
        draw_config(override)


def test_vrnn_config_checks_and_x_dim_from_data():
    cfg = build_config("vrnn", "quick", [], "jsb_chorales", None)
    assert cfg.model.x_dim == 88 and cfg.data.name == "jsb_chorales"
    assert build_config("rnn", None, [], "seq_mnist", None).model.x_dim == 28
    with pytest.raises(ConfigError, match="model.prior must be one of learned, standard"):
        build_config("vrnn", None, ["model.prior=flat"], None, None)
    with pytest.raises(ConfigError, match="cannot train on data binarized_mnist"):
        build_config("vrnn", None, [], "binarized_mnist", None)
    with pytest.raises(ConfigError, match="free_bits applies to the ELBO"):
        build_config("vrnn", None, ["objective.name=iwae", "objective.k=4", "objective.free_bits=0.5"], None, None)


def test_every_preset_builds():
    for kind, spec in MODELS.items():
        for name in spec.presets:
            cfg = build_config(kind, name, [], None, None)
            assert cfg.model_kind == kind
    with pytest.raises(ValueError, match="unknown preset 'huge'"):
        draw_config(preset="huge")
    paper = draw_config(preset="paper")
    m = paper.model
    assert (m.steps, m.hidden_size, m.z_size, m.read_size, m.write_size) == (64, 256, 100, 2, 5)


def test_run_config_json_round_trip():
    cfg = build_config("vrnn", "quick", ["objective.name=fivo", "objective.k=4", "train.tbptt=20"], "jsb_chorales", None)
    again = RunConfig.from_dict(cfg.to_dict())
    assert again == cfg
    with pytest.raises(ConfigError, match="unknown config key"):
        RunConfig.from_dict({**cfg.to_dict(), "surprise": 1})
    with pytest.raises(ConfigError, match="model.hidden_size: expected an integer"):
        RunConfig.from_dict({**cfg.to_dict(), "model": {**cfg.to_dict()["model"], "hidden_size": "big"}})


def test_from_dict_is_strict_about_types():
    with pytest.raises(ConfigError, match="steps: expected an integer, got True"):
        from_dict(DrawConfig, {"steps": True})
    assert from_dict(DrawConfig, {"image_shape": [3, 8, 8]}).image_shape == (3, 8, 8)
    assert parse_value("none", int | None, "k") is None
    assert apply_override(DrawConfig(), "steps=3").steps == 3
