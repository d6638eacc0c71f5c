"""Checkpoints: written atomically, loaded safely, on any device.

A checkpoint is a dict of tensors and plain Python values (numbers, strings, lists, dicts)
saved with torch.save and loaded with torch.load(weights_only=True), which refuses any
pickled object that is not one of those: loading never runs code from the file. The run
config is stored as a JSON string, so that a model rebuilds from the checkpoint alone.

Writing: to a temporary file in the same folder, flushed and fsync'ed, then renamed over
the old file with os.replace (atomic on POSIX), then the folder is fsync'ed. A kill or a
full disk during the write leaves the previous checkpoint as it was.
"""

from __future__ import annotations

import io
import os
import pickle
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import torch

__all__ = ["CheckpointError", "atomic_write_bytes", "save_checkpoint", "load_checkpoint"]


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
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError) as err:
        raise CheckpointError(f"{path} is truncated or corrupt and cannot be loaded ({type(err).__name__}: {err})") from None
    if not isinstance(payload, dict):
        raise CheckpointError(f"{path} is not a seqvae checkpoint (expected a dict, got {type(payload).__name__})")
    return payload
