"""An exclusive lock on a checkpoint directory, so two writers never interleave."""

from __future__ import annotations

import errno
import fcntl
import os

from ckptfmt.errors import CheckpointLockedError

LOCK_NAME = ".ckptfmt.lock"


class DirectoryLock:
    """``flock`` on ``DIR/.ckptfmt.lock``; released when closed or when the process dies.

    Re-entrant within one process: nested acquisitions of the same directory share it.
    """

    _held: dict[str, list] = {}

    def __init__(self, directory: str) -> None:
        self.directory = os.path.abspath(directory)
        self.path = os.path.join(self.directory, LOCK_NAME)
        self._fd = -1

    def acquire(self) -> "DirectoryLock":
        held = DirectoryLock._held.get(self.path)
        if held is not None:
            held[1] += 1
            return self
        os.makedirs(self.directory, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            try:
                owner = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
            except OSError:
                owner = "unknown"
            os.close(fd)
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise CheckpointLockedError(
                    f"{self.directory} is in use by another writer (pid {owner}); "
                    "wait for it to finish, or use a different directory"
                ) from None
            raise
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        DirectoryLock._held[self.path] = [fd, 1]
        self._fd = fd
        return self

    def release(self) -> None:
        held = DirectoryLock._held.get(self.path)
        if held is None:
            return
        held[1] -= 1
        if held[1] == 0:
            del DirectoryLock._held[self.path]
            os.close(held[0])  # closing drops the flock

    def __enter__(self) -> "DirectoryLock":
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()
