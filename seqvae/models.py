"""The model registry: one place that maps a model's name to everything the package needs.

    register_model(name, config=ConfigClass, model=ModelClass, data=("sequences",), ...)

An entry holds the config dataclass (whose fields are the `model.*` keys of a run), the
model class (built as `ModelClass(config)`), the kinds of data it accepts ("images",
"sequences"; data.py), the data set used when none is named, its presets (named lists of
`section.key=value` overrides), whether it has latent variables (latent diagnostics) and
which figures `seqvae viz` can draw of it. The trainer, evaluation and the command line look
models up here and never name one.

A model class follows the recurrent contract (recurrent.py) and, by the kind of data:
images: `sample(n) -> (n, c, h, w)`; sequences: `generate(n, steps) -> .x, .mean (n, t, d)`.
Views: "glimpses" and "canvas" need `reconstruct(x)` / `generate(n)` returning a DrawTrace;
"sequences" needs `reconstruct(x, lengths=...)` returning a SequenceTrace.

A config class may define `fit_data(info) -> dict` (fields that a data set decides, such as
the features per step, set unless the user set them) and `check_data(info)` (raise
ConfigError when the model cannot take those data).

Presets of the built-in models:

    draw  quick      a small DRAW without attention (paper eqs 17-18): recognisable digits
                     after one epoch, about a minute on a 2-core CPU
          attention  a small DRAW with both filterbank heads (T=16, read 3x3, write 5x5):
                     attention learns more slowly; recognisable digits after 5 epochs,
                     about 10 minutes on a 2-core CPU; for looking at glimpses
          paper      Gregor et al. 2015, MNIST with attention: T=64, LSTM 256, z 100, read 2x2, write 5x5
    vrnn  quick      a small VRNN for JSB chorales: up to 500 epochs, stopping early after 40 epochs
                     without a better validation bound (JSB is small and overfits) or within 14 minutes
                     of training (train.time_limit), so that any objective fits ~15 minutes on a 2-core CPU
          long       a wider VRNN regularised by dropout (hidden 128, dropout 0.5, lr 1e-3), stopping
                     after 60 epochs without a better bound or within 55 minutes: the best JSB model here
          paper      a larger VRNN, for a GPU
    rnn   quick / paper   the matching RNN baselines
    srnn  quick      a small SRNN (smoothing posterior) on JSB chorales, the VRNN's quick schedule, dropout 0.3
          long       a wider SRNN (hidden 256, z 32, dropout 0.5, lr 1e-3), up to 55 minutes of training
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from .draw import DRAW, DrawConfig
from .srnn import SRNN, SRNNConfig
from .vrnn import RNN, VRNN, RNNConfig, VRNNConfig

__all__ = ["ModelSpec", "MODELS", "register_model", "get_model", "VIEWS"]

VIEWS = ("glimpses", "canvas", "sequences", "latents")  # figures beyond training curves, which every run has


@dataclass(frozen=True)
class ModelSpec:
    name: str
    config: type
    model: type
    data: tuple[str, ...]  # kinds of data accepted: "images", "sequences"
    default_data: str  # the data set trained on when none is named
    presets: dict[str, list[str]] = field(default_factory=dict)
    latents: bool = True  # has latent variables (active units, KL per unit)
    views: tuple[str, ...] = ()  # figures `seqvae viz` draws (see VIEWS); "latents" when latents
    description: str = ""

    def build(self, config) -> nn.Module:
        """The (untrained) model a config describes."""
        return self.model(config)


MODELS: dict[str, ModelSpec] = {}


def register_model(
    name: str,
    *,
    config: type,
    model: type,
    data: tuple[str, ...] | list[str],
    default_data: str,
    presets: dict[str, list[str]] | None = None,
    latents: bool = True,
    views: tuple[str, ...] | list[str] = (),
    description: str = "",
) -> ModelSpec:
    """Make `name` trainable, evaluable and drawable through `seqvae train NAME` and the Python API."""
    from .data import KINDS

    bad = [k for k in data if k not in KINDS]
    if bad or not data:
        raise ValueError(f"data kinds must be some of {', '.join(KINDS)}, got {list(data)}")
    unknown = [v for v in views if v not in VIEWS]
    if unknown:
        raise ValueError(f"unknown view(s) {', '.join(unknown)}: expected some of {', '.join(VIEWS)}")
    views = tuple(v for v in views if v != "latents") + (("latents",) if latents else ())
    spec = ModelSpec(name, config, model, tuple(data), default_data, dict(presets or {}), latents, views, description)
    MODELS[name] = spec
    return spec


def get_model(name: str) -> ModelSpec:
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}: expected one of {', '.join(MODELS)}")
    return MODELS[name]


# The RNN baseline and the VRNN train on the same data with the same schedule, so that the
# comparison in the README measures the latent variables and nothing else.
_JSB_QUICK = ["data.name=jsb_chorales", "data.batch_size=16", "train.epochs=500", "train.time_limit=14", "train.patience=40",
              "train.samples_every=50", "train.lr=0.003", "train.clip_grad=10", "train.samples=4"]
_JSB_PAPER = ["data.name=jsb_chorales", "data.batch_size=16", "train.epochs=500", "train.lr=0.0003", "train.clip_grad=10",
              "train.samples=4"]

register_model(
    "draw", config=DrawConfig, model=DRAW, data=("images",), default_data="binarized_mnist", views=("glimpses", "canvas"),
    description="DRAW (Gregor et al. 2015) with 'none' or 'filterbank' read and write heads",
    presets={
        "quick": ["data.name=binarized_mnist", "model.steps=8", "model.hidden_size=128", "model.z_size=16", "model.read=none",
                  "model.write=none", "data.batch_size=64", "data.limit=40000", "data.valid_limit=1000", "train.epochs=1",
                  "train.lr=0.002", "train.clip_grad=10", "train.samples=64"],
        "attention": ["data.name=binarized_mnist", "model.steps=16", "model.hidden_size=128", "model.z_size=16",
                      "model.read=filterbank", "model.write=filterbank", "model.read_size=3", "model.write_size=5",
                      "data.batch_size=64", "data.valid_limit=1000", "train.epochs=5", "train.lr=0.002", "train.clip_grad=10",
                      "train.samples=64"],
        "paper": ["data.name=binarized_mnist", "model.steps=64", "model.hidden_size=256", "model.z_size=100",
                  "model.read=filterbank", "model.write=filterbank", "model.read_size=2", "model.write_size=5",
                  "data.batch_size=64", "train.epochs=100", "train.lr=0.001", "train.clip_grad=10"],
    },
)
register_model(
    "vrnn", config=VRNNConfig, model=VRNN, data=("sequences",), default_data="jsb_chorales", views=("sequences",),
    description="the variational RNN (Chung et al. 2015); model.prior=standard gives VRNN-I",
    presets={
        "quick": ["model.hidden_size=64", "model.z_size=16", "model.cell=gru", *_JSB_QUICK],
        "long": ["model.hidden_size=128", "model.z_size=16", "model.cell=gru", "model.dropout=0.5", *_JSB_QUICK,
                 "train.lr=0.001", "train.patience=60", "train.time_limit=55"],
        "paper": ["model.hidden_size=256", "model.z_size=64", "model.cell=lstm", *_JSB_PAPER],
    },
)
register_model(
    "rnn", config=RNNConfig, model=RNN, data=("sequences",), default_data="jsb_chorales", latents=False, views=("sequences",),
    description="an RNN baseline with the VRNN's output heads and no latent variables",
    presets={
        "quick": ["model.hidden_size=64", "model.cell=gru", *_JSB_QUICK],
        "paper": ["model.hidden_size=256", "model.cell=lstm", *_JSB_PAPER],
    },
)
register_model(
    "srnn", config=SRNNConfig, model=SRNN, data=("sequences",), default_data="jsb_chorales", views=("sequences",),
    description="the stochastic recurrent network (Fraccaro et al. 2016), smoothing or filtering posterior",
    presets={
        "quick": ["model.hidden_size=64", "model.z_size=16", "model.cell=gru", "model.output_bias_from_data=true",
                  "model.dropout=0.3", *_JSB_QUICK],
        "long": ["model.hidden_size=256", "model.z_size=32", "model.cell=gru", "model.output_bias_from_data=true",
                 "model.dropout=0.5", *_JSB_QUICK, "train.time_limit=55", "train.patience=60", "train.lr=0.001"],
    },
)
