"""Named settings for `seqvae train KIND --preset NAME`: lists of config overrides.

A preset is applied before the user's own `--section.key=value` overrides, through the same
checked parser, so that anything a preset sets can be changed on the command line.

    draw  quick      a small DRAW without attention (paper eqs 17-18): recognisable digits
                     after one epoch, about a minute on a 2-core CPU
          attention  a small DRAW with both filterbank heads (T=16, read 3x3, write 5x5):
                     attention learns more slowly; recognisable digits after 5 epochs,
                     about 10 minutes on a 2-core CPU; for looking at glimpses
          paper   Gregor et al. 2015, MNIST with attention: T=64, LSTM 256, z 100, read 2x2, write 5x5
    vrnn  quick   a small VRNN for JSB chorales: up to 500 epochs, stopping early after 40 epochs
                  without a better validation bound (JSB is small and overfits) or within 14 minutes
                  of training (train.time_limit), so that any objective fits ~15 minutes on a 2-core CPU
          paper   a larger VRNN, for a GPU
    rnn   quick / paper   the matching RNN baselines
"""

from __future__ import annotations

# The RNN baseline and the VRNN train on the same data with the same schedule, so that the
# comparison in the README measures the latent variables and nothing else.
_JSB_QUICK = ["data.name=jsb_chorales", "data.batch_size=16", "train.epochs=500", "train.time_limit=14", "train.patience=40",
              "train.samples_every=50", "train.lr=0.003", "train.clip_grad=10", "train.samples=4"]
_JSB_PAPER = ["data.name=jsb_chorales", "data.batch_size=16", "train.epochs=500", "train.lr=0.0003", "train.clip_grad=10",
              "train.samples=4"]

__all__ = ["PRESETS", "preset_overrides"]

PRESETS: dict[tuple[str, str], list[str]] = {
    ("draw", "quick"): [
        "data.name=binarized_mnist",
        "model.steps=8",
        "model.hidden_size=128",
        "model.z_size=16",
        "model.read=none",
        "model.write=none",
        "data.batch_size=64",
        "data.limit=40000",
        "data.valid_limit=1000",
        "train.epochs=1",
        "train.lr=0.002",
        "train.clip_grad=10",
        "train.samples=64",
    ],
    ("draw", "attention"): [
        "data.name=binarized_mnist",
        "model.steps=16",
        "model.hidden_size=128",
        "model.z_size=16",
        "model.read=filterbank",
        "model.write=filterbank",
        "model.read_size=3",
        "model.write_size=5",
        "data.batch_size=64",
        "data.valid_limit=1000",
        "train.epochs=5",
        "train.lr=0.002",
        "train.clip_grad=10",
        "train.samples=64",
    ],
    ("draw", "paper"): [
        "data.name=binarized_mnist",
        "model.steps=64",
        "model.hidden_size=256",
        "model.z_size=100",
        "model.read=filterbank",
        "model.write=filterbank",
        "model.read_size=2",
        "model.write_size=5",
        "data.batch_size=64",
        "train.epochs=100",
        "train.lr=0.001",
        "train.clip_grad=10",
    ],
    ("vrnn", "quick"): ["model.hidden_size=64", "model.z_size=16", "model.cell=gru", *_JSB_QUICK],
    ("vrnn", "paper"): ["model.hidden_size=256", "model.z_size=64", "model.cell=lstm", *_JSB_PAPER],
    ("rnn", "quick"): ["model.hidden_size=64", "model.cell=gru", *_JSB_QUICK],
    ("rnn", "paper"): ["model.hidden_size=256", "model.cell=lstm", *_JSB_PAPER],
}


def preset_overrides(kind: str, name: str) -> list[str]:
    """The overrides of preset `name` for model `kind`; ValueError for an unknown preset."""
    names = sorted({p for k, p in PRESETS if k == kind})
    if (kind, name) not in PRESETS:
        raise ValueError(f"unknown preset {name!r} for {kind}: expected one of {', '.join(names)}")
    return list(PRESETS[(kind, name)])
