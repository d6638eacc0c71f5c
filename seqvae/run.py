"""The run layer: a run's config, built from a model name, a preset and overrides; loading a run.

    RunConfig          model_kind + the model's config + objective, data and train sections
    build_config(...)  defaults -> the model's default data -> preset -> --data/--data-dir ->
                       the user's overrides -> fields the data decide (model.x_dim, image_shape)
                       unless set explicitly; every step checked against the dataclasses
    load_run(run)      (config, model, checkpoint) from a run folder or a checkpoint file
    train(kind, ...)   train from Python as `seqvae train` does

Models, objectives and data sets are looked up in their registries (models.py,
objectives.py, data.py); nothing here names one. The command line and the notebooks both
come through this module; the trainer does not import it (no import cycle).
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import configs
from .checkpoint import CheckpointError, load_checkpoint
from .configs import ConfigError, apply_override, check
from .data import DATASETS, DataConfig, dataset_info
from .models import MODELS, get_model
from .objectives import OBJECTIVES, ObjectiveConfig
from .train import TrainConfig, Trainer, TrainingError

__all__ = ["RunConfig", "build_config", "build_model", "load_run", "load_run_config", "train", "run_folder", "MAX_NAME"]

MAX_NAME = 100  # characters in a run name


@dataclass
class RunConfig:
    """A whole run: which model and its config, the objective, the data, the optimiser."""

    model_kind: str
    model: Any
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def validate(self) -> "RunConfig":
        check(self.model_kind in MODELS, f"unknown model {self.model_kind!r}: expected one of {', '.join(MODELS)}")
        spec = MODELS[self.model_kind]
        check(isinstance(self.model, spec.config), f"the model section of {self.model_kind} must be a {spec.config.__name__}")
        self.model.validate()
        self.objective.validate()
        self.data.validate()
        self.train.validate()
        _check_pairing(self)
        check_data = getattr(self.model, "check_data", None)
        if check_data is not None and DATASETS[self.data.name].shape is not None:
            check_data(dataset_info(self.data))  # known without reading files; others are checked on loading
        return self

    def to_dict(self) -> dict[str, Any]:
        return configs.to_dict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "RunConfig":
        if not isinstance(data, dict) or data.get("model_kind") not in MODELS:
            raise ConfigError(f"not a seqvae run config (model_kind must be one of {', '.join(MODELS)})")
        model_cls = MODELS[data["model_kind"]].config
        rest = {k: v for k, v in data.items() if k not in ("model_kind", "model")}
        cfg = configs.from_dict(_RunSections, rest)
        model = configs.from_dict(model_cls, data.get("model", {}), prefix="model.")
        return cls(data["model_kind"], model, cfg.objective, cfg.data, cfg.train)


@dataclass
class _RunSections:  # the sections of RunConfig that do not depend on the model
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


def _check_pairing(config: RunConfig) -> None:
    """The model, the data and the objective fit together (from what their registries say)."""
    spec, data, objective = MODELS[config.model_kind], DATASETS[config.data.name], OBJECTIVES[config.objective.name]
    takes = [n for n, d in DATASETS.items() if d.kind in spec.data]
    check(
        data.kind in spec.data,
        f"model {spec.name} cannot train on data {data.name}: {spec.name} takes {' or '.join(spec.data)} "
        f"({', '.join(takes)}), {data.name} holds {data.kind}",
    )
    sequential = getattr(spec.model, "sequential", True)
    check(not objective.stepwise or sequential,
          f"objective.name={objective.name} needs a sequence model that scores each step; {spec.name} does not")
    check(config.train.tbptt == 0 or sequential, "train.tbptt applies to sequence models only")
    chunks = getattr(config.model, "continues_chunks", getattr(spec.model, "continues_chunks", True))
    check(config.train.tbptt == 0 or chunks,
          f"train.tbptt cannot be used with this {spec.name}: its posterior reads the whole sequence, so a chunk "
          "cannot be scored without the steps after it; train on whole sequences (train.tbptt=0)"
          + getattr(config.model, "chunks_hint", ""))


def run_folder(runs_dir: str | os.PathLike, name: str) -> Path:
    """runs_dir/name for a run name of letters, digits, '.', '_' and '-' (at most MAX_NAME
    characters, not starting with '.'): a name can never reach outside the runs folder."""
    if not name or len(name) > MAX_NAME or name.startswith(".") or not all(c.isalnum() or c in "._-" for c in name) \
            or not name.isascii():
        raise ConfigError(
            f"run name {name[:40]!r}{'...' if len(name) > 40 else ''} must be 1-{MAX_NAME} ASCII letters, digits, "
            "'.', '_' or '-', not starting with '.' (it names a folder under --runs-dir)"
        )
    return Path(runs_dir) / name


def build_model(config: RunConfig) -> nn.Module:
    """The model a run config describes (untrained)."""
    return get_model(config.model_kind).build(config.model)


def build_config(
    kind: str,
    preset: str | None = None,
    overrides: list[str] | tuple[str, ...] = (),
    data: str | None = None,
    data_dir: str | None = None,
) -> RunConfig:
    """A validated RunConfig for model `kind` (see the module docstring for the order)."""
    if kind not in MODELS:
        raise ConfigError(f"unknown model {kind!r}: expected one of {', '.join(MODELS)}")
    spec = MODELS[kind]
    if preset is not None and preset not in spec.presets:
        raise ConfigError(f"unknown preset {preset!r} for {kind}: expected one of {', '.join(sorted(spec.presets)) or '(none)'}")
    config = RunConfig(kind, spec.config(), data=DataConfig(name=spec.default_data))
    settings = list(spec.presets[preset]) if preset else []
    if data:
        settings.append(f"data.name={data}")
    if data_dir:
        settings.append(f"data.data_dir={data_dir}")
    overrides = list(overrides)
    for assignment in settings + overrides:
        config = apply_override(config, assignment)
    config.data.validate()
    _check_pairing(config)
    fit = getattr(config.model, "fit_data", None)
    if fit is not None:
        info = dataset_info(config.data)  # (reads the training split where the registry does not know its shape)
        user_keys = {o.split("=", 1)[0].strip().lstrip("-") for o in overrides}
        decided = {k: v for k, v in fit(info).items() if f"model.{k}" not in user_keys}
        config = dataclasses.replace(config, model=dataclasses.replace(config.model, **decided))
        config.model.validate()
        check_data = getattr(config.model, "check_data", None)
        if check_data is not None:
            check_data(info)
    return config.validate()


def load_run_config(run_dir: str | os.PathLike) -> RunConfig:
    """The config a run folder was trained with (its config.json)."""
    path = Path(run_dir) / "config.json"
    if not path.exists():
        raise ConfigError(f"cannot resume: {path} does not exist")
    try:
        return RunConfig.from_dict(json.loads(path.read_text()))
    except json.JSONDecodeError as err:
        raise ConfigError(f"{path} is not valid JSON ({err})") from None


def load_run(run: str | os.PathLike, *, which: str = "best", map_location: str | torch.device = "cpu"):
    """(RunConfig, model in eval mode, checkpoint payload) from a run folder or checkpoint file.

    which: "best" (best.pt if present, else checkpoint.pt) or "last" (checkpoint.pt).
    """
    path = Path(run)
    if path.is_dir():
        candidates = (["best.pt"] if which == "best" else []) + ["checkpoint.pt"]
        found = [path / c for c in candidates if (path / c).exists()]
        if not found:
            raise CheckpointError(f"{path} holds no checkpoint (expected best.pt or checkpoint.pt)")
        path = found[0]
    payload = load_checkpoint(path, map_location=map_location)
    try:
        config = RunConfig.from_dict(json.loads(payload["config"])).validate()
        model = build_model(config)
        model.load_state_dict(payload["model"])
    except (KeyError, TypeError, json.JSONDecodeError, ConfigError, RuntimeError) as err:
        raise CheckpointError(f"{path} is not a usable seqvae checkpoint ({type(err).__name__}: {err})") from None
    model.to(map_location).eval()
    return config, model, payload


def train(
    kind: str,
    *,
    preset: str | None = None,
    overrides: list[str] | tuple[str, ...] = (),
    name: str | None = None,
    runs_dir: str | os.PathLike = "runs",
    data: str | None = None,
    data_dir: str | None = None,
    reuse: bool = False,
    log=print,
):
    """Train a run from Python, as `seqvae train` does; returns (RunConfig, model, run folder).

    overrides are "section.key=value" strings, checked like the command line's. With
    reuse=True an existing run of that name is loaded (and trained further only if its
    train.epochs has not been reached) instead of being an error.
    """
    run_dir = run_folder(runs_dir, name or f"{kind}-{time.strftime('%Y%m%d-%H%M%S')}")
    resume = reuse and (run_dir / "checkpoint.pt").exists()
    if resume:  # continue the run as it was configured
        config = load_run_config(run_dir)
        if config.model_kind != kind:
            raise TrainingError(f"{run_dir} holds a {config.model_kind} run, not {kind}")
        if data_dir:
            config = apply_override(config, f"data.data_dir={data_dir}")
    else:
        config = build_config(kind, preset, list(overrides), data, data_dir)
    trainer = Trainer(config.validate(), run_dir, resume=resume, log=log)
    trainer.fit()
    _, model, _ = load_run(run_dir, map_location=trainer.device)
    return config, model, run_dir
