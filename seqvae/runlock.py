"""One trainer per run folder: an advisory lock on RUN/.lock, held while the trainer lives.

The lock is flock(2) on an open file: the kernel drops it when the holder exits for any
reason (a crash or SIGKILL included), so a stale lock is taken over by the next trainer
without any clean-up. The file itself stays and says who held it last (pid, host, time).
Under torchrun only rank 0 takes the lock; the trainer tells the other ranks the outcome.
flock works between processes of one machine and on local file systems; on a network file
system that does not support it, taking the lock fails with a message saying so.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import time
from pathlib import Path

__all__ = ["RunLock", "RunBusy", "LOCK_NAME"]

LOCK_NAME = ".lock"


class RunBusy(Exception):
    """Another live process holds the run folder."""


class RunLock:
    """flock on run_dir/.lock; `acquire()` raises RunBusy naming the holder."""

    def __init__(self, run_dir: str | os.PathLike):
        self.path = Path(run_dir) / LOCK_NAME
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> "RunLock":
        if self._fd is not None:
            return self
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            os.close(fd)
            if err.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                holder = self.holder()
                if holder.startswith(f"pid {os.getpid()} on {socket.gethostname()},"):
                    raise RunBusy(f"run folder {self.path.parent} is held by another Trainer of this process ({holder}); "
                                  "call that trainer's close() (fit() closes it when it ends)") from None
                raise RunBusy(f"run folder {self.path.parent} is in use by another trainer ({holder}); wait for it "
                              "to finish or stop it first") from None
            raise RunBusy(f"cannot lock run folder {self.path.parent} ({err.strerror}); its file system may not support "
                          "flock: use a local runs folder") from None
        try:
            same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
        except FileNotFoundError:
            same = False
        if not same:  # the file was removed (by a trainer that failed to start) after we opened it: start again
            os.close(fd)
            return self.acquire()
        record = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%d %H:%M:%S")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(record) + "\n").encode(), 0)
        self._fd = fd
        return self

    def holder(self) -> str:
        """Who holds (or last held) the lock, in words."""
        try:
            record = json.loads(self.path.read_text())
            return f"pid {record['pid']} on {record['host']}, since {record['since']}"
        except (OSError, ValueError, KeyError, TypeError):
            return "holder unknown"

    def release(self) -> None:
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        try:
            fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()

    def __del__(self):
        self.release()
