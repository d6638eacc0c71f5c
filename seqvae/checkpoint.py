"""Checkpoints: written atomically, loaded safely, on any device.

A checkpoint is a dict of tensors and plain Python values (numbers, strings, lists, dicts)
saved with torch.save and loaded with torch.load(weights_only=True), which refuses any
pickled object that is not one of those: loading never runs code from the file. The run
config is stored as a JSON string, so that a model rebuilds from the checkpoint alone.

A checkpoint also holds every random generator's state (`rng_state` / `set_rng_state`:
Python, NumPy, torch on the CPU and on every GPU), as tensors and plain values, so that a
resumed run draws the same numbers as one that never stopped.

Writing: to a temporary file in the same folder, flushed and fsync'ed, then renamed over
the old file with os.replace (atomic on POSIX), then the folder is fsync'ed. A kill or a
full disk during the write leaves the previous checkpoint as it was.
"""

from __future__ import annotations

import io
import os
import pickle
import random
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = ["CheckpointError", "atomic_write_bytes", "save_checkpoint", "load_checkpoint", "rng_state", "set_rng_state",
           "seed_everything"]


class CheckpointError(Exception):
    """A checkpoint that cannot be read: missing, truncated, corrupt or unsafe."""


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write data to path so that readers see either the old file or the whole new one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp creates 0600; give the file the usual mode
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    try:  # make the rename itself durable
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError:
        pass


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def save_checkpoint(path: str | os.PathLike, payload: dict[str, Any]) -> None:
    """torch.save payload to path atomically (serialised in memory first, then written)."""
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    atomic_write_bytes(path, buffer.getvalue())


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint safely (weights_only=True) onto map_location (CPU by default)."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"no checkpoint at {path}")
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(
            f"{path} was refused: it holds objects other than tensors and plain values, which "
            f"could run code when loaded ({first})"
        ) from None
    except Exception as err:  # arbitrary bytes raise many kinds of error inside the unpickler
        raise CheckpointError(f"{path} is truncated or corrupt and cannot be loaded ({type(err).__name__}: {err})") from None
    if not isinstance(payload, dict):
        raise CheckpointError(f"{path} is not a seqvae checkpoint (expected a dict, got {type(payload).__name__})")
    return payload


def rng_state() -> dict[str, Any]:
    """Every random generator's state, as tensors and plain values (safe to torch.load)."""
    np_state = np.random.get_state()
    py = random.getstate()
    return {
        "python": [py[0], list(py[1]), py[2]],
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), int(np_state[2]), int(np_state[3]), float(np_state[4])],
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        cuda = state["cuda"][: torch.cuda.device_count()]
        torch.cuda.set_rng_state_all(cuda + [cuda[-1]] * (torch.cuda.device_count() - len(cuda)))


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
