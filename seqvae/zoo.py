"""Pretrained models shipped inside the package, loaded offline.

    seqvae.pretrained("draw-attention")        the model, in eval mode, on the CPU
    seqvae.zoo.available()                    name -> what it is, how it was trained, its scores
    seqvae eval pretrained:draw-attention     the CLI takes pretrained:NAME wherever it takes a run

Each model is a slim checkpoint (the run config as JSON and the model's weights in float16:
no optimiser state) in seqvae/weights/, listed in seqvae/weights/manifest.json with its sha256,
which is checked before the file is loaded (with torch.load(weights_only=True), like every
checkpoint). `export(run, path)` writes such a file from a run's best.pt.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from .checkpoint import CheckpointError, load_checkpoint, save_checkpoint

__all__ = ["pretrained", "load", "available", "pretrained_path", "export", "WEIGHTS", "PREFIX"]

WEIGHTS = Path(__file__).resolve().parent / "weights"
PREFIX = "pretrained:"


def available() -> dict[str, dict[str, Any]]:
    """The shipped models: name -> {file, sha256, description, command, scores}."""
    manifest = WEIGHTS / "manifest.json"
    if not manifest.exists():
        return {}
    return json.loads(manifest.read_text())


def pretrained_path(name: str) -> Path:
    """The checked file of a shipped model (its sha256 must match the manifest)."""
    name = name[len(PREFIX):] if name.startswith(PREFIX) else name
    models = available()
    if name not in models:
        raise CheckpointError(f"no pretrained model {name!r}: expected one of {', '.join(models) or '(none shipped)'}")
    entry = models[name]
    path = WEIGHTS / entry["file"]
    if not path.is_file():
        raise CheckpointError(f"the pretrained model {name!r} is missing from this installation ({path})")
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    if digest != entry["sha256"]:
        raise CheckpointError(f"{path} does not match its sha256 in the manifest (expected {entry['sha256']}, got {digest}): "
                              "the installation is damaged; reinstall seqvae")
    return path


def pretrained(name: str, map_location: str = "cpu"):
    """A shipped model by name, in eval mode (see `available()` for the names)."""
    return load(name, map_location)[1]


def load(name: str, map_location: str = "cpu"):
    """(run config, model in eval mode, payload) of a shipped model; payload["metrics"] holds
    the records of the run that trained it (its metrics.jsonl), for training curves."""
    from .run import load_run

    return load_run(pretrained_path(name), map_location=map_location)


def export(run: str | os.PathLike, path: str | os.PathLike) -> str:
    """Write a run folder's best model (config and weights, no optimiser state) and its metric
    records to path; returns the file's sha256. Floating-point weights are stored in float16
    (half the bytes; loading casts them back to the model's dtype), so the scores of a shipped
    model are those of its float16-rounded weights, measured after export."""
    from .logs import read_metrics

    run = Path(run)
    payload = load_checkpoint(run / "best.pt")
    weights = {k: v.half() if v.is_floating_point() else v for k, v in payload["model"].items()}
    slim = {"format": 1, "config": payload["config"], "model": weights, "epoch": payload.get("epoch"),
            "step": payload.get("step"), "metrics": read_metrics(run), "weights_dtype": "float16"}
    save_checkpoint(path, slim)
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()
