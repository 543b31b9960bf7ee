"""A run lock: an advisory `fcntl` lock on <run_dir>/.lock, held for the life of a training or search run.

The file names its holder (PID and host). The kernel drops the lock when the holder dies, so a lock file left
by a killed process is stale by construction and is simply taken over.
"""

from __future__ import annotations

import fcntl
import os
import socket
from pathlib import Path

from distillab.errors import DistillabError

LOCK_FILE = ".lock"


class RunLockedError(DistillabError):
    """Another live process holds the run directory's lock."""


class RunLock:
    def __init__(self, run_dir: Path) -> None:
        self.path = Path(run_dir) / LOCK_FILE
        self._fd: int | None = None

    def holder(self) -> str | None:
        """Who holds the lock now ('pid N on HOST'), or None when nobody does (or the file is stale)."""
        if self._fd is not None or not self.path.is_file():
            return None
        try:
            fd = os.open(self.path, os.O_RDONLY)  # flock needs no write access: a read-only run can be judged
        except OSError:
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return self.path.read_text().strip() or "another process"
        finally:
            os.close(fd)  # closing drops a lock just taken for the test
        return None

    def acquire(self) -> RunLock:
        """Take the lock or raise RunLockedError naming its holder; the run directory must exist."""
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise DistillabError(f"cannot take the run lock {self.path}: {(exc.strerror or str(exc)).lower()} "
                                 "(a read-only or full file system?)") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            holder = self.path.read_text().strip() or "another process"
            raise RunLockedError(f"{self.path.parent} is in use by {holder}: wait for it to finish, or stop it "
                                 "and --resume") from None
        try:
            os.ftruncate(fd, 0)
            os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode())
        except OSError:
            pass  # a full disk: the lock holds all the same, only its holder goes unnamed
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> RunLock:
        return self if self._fd is not None else self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()
