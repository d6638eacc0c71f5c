"""Checkpoints: written atomically, loaded safely, on any device.

A checkpoint is a dict of tensors and plain Python values (numbers, strings, lists, dicts)
saved with torch.save and loaded with torch.load(weights_only=True), which refuses any
pickled object that is not one of those: loading never runs code from the file. The run
config is stored as a JSON string, so that a model rebuilds from the checkpoint alone.

A checkpoint also holds every random generator's state (`rng_state` / `set_rng_state`:
Python, NumPy, torch on the CPU and on every GPU), as tensors and plain values, so that a
resumed run draws the same numbers as one that never stopped.

Reading is bounded: before anything is unpickled, the file's size (at most `max_bytes`,
default MAX_CHECKPOINT_BYTES) and its zip directory are checked (torch.save's format: every
entry stored uncompressed, the pickle of plain values at most MAX_PICKLE_BYTES), so a file
crafted to allocate gigabytes is refused after reading its directory only.

Writing: to a temporary file in the same folder, flushed and fsync'ed, then renamed over
the old file with os.replace (atomic on POSIX), then the folder is fsync'ed. A kill or a
full disk during the write leaves the previous checkpoint as it was.
"""

from __future__ import annotations

import io
import os
import pickle
import random
import struct
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = ["CheckpointError", "MAX_CHECKPOINT_BYTES", "atomic_write_bytes", "save_checkpoint", "load_checkpoint", "rng_state", "set_rng_state",
           "seed_everything"]


MAX_CHECKPOINT_BYTES = 2 << 30  # 2 GiB: a paper-sized DRAW with its Adam state is about 25 MB
MAX_PICKLE_BYTES = 16 << 20  # the pickled structure (names, numbers, config) of a checkpoint, tensors apart
MAX_ENTRIES = 50_000  # zip entries (one per tensor storage): a paper-sized DRAW with Adam state has under 200


class CheckpointError(Exception):
    """A checkpoint that cannot be read: missing, truncated, corrupt or unsafe."""


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write data to path so that readers see either the old file or the whole new one."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as err:  # read-only file system, no permission, no space for a new file
        raise OSError(err.errno, f"cannot write {path} ({err.strerror}); nothing was changed") from None
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp creates 0600; give the file the usual mode
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as err:
        Path(tmp).unlink(missing_ok=True)
        kept = f"the previous {path.name} is intact" if path.exists() else "nothing was written"
        raise OSError(err.errno, f"cannot write {path} ({err.strerror}); {kept}") from None
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


def _check_layout(path: Path, max_bytes: int) -> None:
    """Refuse, before unpickling, a file too large or not laid out as torch.save writes."""
    size = path.stat().st_size
    if size > max_bytes:
        raise CheckpointError(f"{path} holds {size:,} bytes, more than the {max_bytes:,} a checkpoint may have; refused unread")
    entries = _entry_count(path, size)
    if entries > MAX_ENTRIES:
        raise CheckpointError(f"{path} lists {entries:,} zip entries, more than the {MAX_ENTRIES:,} a checkpoint may have; "
                              "refused unread")
    try:
        with zipfile.ZipFile(path) as archive:
            infos = archive.infolist()
    except (zipfile.BadZipFile, OSError, ValueError) as err:
        raise CheckpointError(f"{path} is truncated or corrupt, or not a checkpoint (expected the zip file torch.save writes: {err})") from None
    for entry in infos:
        if entry.compress_type != zipfile.ZIP_STORED:
            raise CheckpointError(f"{path} is not a seqvae checkpoint: its entry {entry.filename!r} is compressed, which "
                                  "torch.save never does; refused unread")
        if entry.filename.endswith(".pkl") and entry.file_size > MAX_PICKLE_BYTES:
            raise CheckpointError(f"{path} carries {entry.file_size:,} bytes of pickled values (at most {MAX_PICKLE_BYTES:,} "
                                  "expected besides its tensors); refused unread")
    if sum(entry.file_size for entry in infos) > size:  # entries that overlap (or claim bytes the file lacks)
        raise CheckpointError(f"{path} is not a seqvae checkpoint: its zip entries claim more bytes than the file holds; "
                              "refused unread")


def _entry_count(path: Path, size: int) -> int:
    """The number of entries a zip file's end record declares, read from its last 64 KiB only
    (so that a directory of millions of entries is refused before it is parsed)."""
    with open(path, "rb") as f:
        f.seek(max(0, size - (1 << 16) - 22))
        tail = f.read()
        at = tail.rfind(b"PK\x05\x06")
        if at < 0 or len(tail) < at + 22:
            return 0  # not a zip: zipfile says so below
        entries = struct.unpack("<H", tail[at + 10 : at + 12])[0]
        locator = tail.rfind(b"PK\x06\x07", 0, at)
        if entries == 0xFFFF and locator >= 0:  # zip64: the count is in the zip64 end record
            (offset,) = struct.unpack("<Q", tail[locator + 8 : locator + 16])
            f.seek(offset)
            record = f.read(56)
            if len(record) == 56 and record[:4] == b"PK\x06\x06":
                entries = struct.unpack("<Q", record[32:40])[0]
        return entries


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu", *,
                    max_bytes: int = MAX_CHECKPOINT_BYTES) -> dict[str, Any]:
    """Load a checkpoint safely (weights_only=True, sizes checked first) onto map_location."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}" if not path.exists() else f"{path} is not a checkpoint file")
    _check_layout(path, max_bytes)
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
