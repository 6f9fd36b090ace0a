"""An in-memory storage backend, written only against the :class:`Storage` interface.

It is the second implementation that keeps the seam honest (every layer above runs on it in
the tests) and a fast scratch backend. Paths are ``/``-separated strings; directories exist
explicitly (``makedirs``) as on a filesystem. Locks are local to one ``MemoryStorage``.

Example:
    >>> s = MemoryStorage()
    >>> s.makedirs("/r"); s.write_atomic("/r/x", b"hi"); s.read_file("/r/x"), s.listdir("/r")
    (b'hi', ['x'])
"""

from __future__ import annotations

__all__ = ["MemoryStorage"]

import errno
import threading
import time

from ckptfmt.errors import CheckpointLockedError, StorageError
from ckptfmt.storage.base import Entry, ReadHandle, Storage, StorageLock, WriteHandle


def _norm(path: str) -> str:
    parts: list[str] = []
    for p in path.split("/"):
        if p in ("", "."):
            continue
        if p == "..":
            if parts:
                parts.pop()
            continue
        parts.append(p)
    return "/" + "/".join(parts)


def _parent(path: str) -> str:
    return path.rsplit("/", 1)[0] or "/"


class _Read(ReadHandle):
    def __init__(self, path: str, data: bytes) -> None:
        self.path, self._data = path, data

    def size(self) -> int:
        return len(self._data)

    def readinto(self, offset: int, buf: memoryview) -> int:
        chunk = self._data[offset : offset + len(buf)]
        buf[: len(chunk)] = chunk
        return len(chunk)

    def close(self) -> None:
        pass


class _Write(WriteHandle):
    def __init__(self, store: MemoryStorage, path: str) -> None:
        self.path, self._store, self._buf = path, store, bytearray()
        store._put(path, b"")

    def write(self, data) -> None:
        self._buf += memoryview(data).cast("B")

    def tell(self) -> int:
        return len(self._buf)

    def close(self, *, sync: bool = True) -> None:
        if self._buf is not None:
            self._store._put(self.path, bytes(self._buf))
            self._buf = None


class _Lock(StorageLock):
    def __init__(self, store: MemoryStorage, path: str, shared: bool) -> None:
        self._store, self._path, self._shared, self._held = store, path, shared, True

    def release(self) -> None:
        if self._held:
            self._held = False
            with self._store._mutex:
                ex, sh = self._store._locks[self._path]
                self._store._locks[self._path] = (ex and self._shared, sh - 1 if self._shared else sh)


class MemoryStorage(Storage):
    """Files and directories in a dict; thread-safe; nothing survives the process."""

    def __init__(self) -> None:
        self._files: dict[str, tuple[bytes, float]] = {}
        self._dirs: set[str] = {"/"}
        self._locks: dict[str, tuple[bool, int]] = {}
        self._mutex = threading.Lock()

    def _put(self, path: str, data: bytes, exclusive: bool = False) -> None:
        path = _norm(path)
        with self._mutex:
            if _parent(path) not in self._dirs:
                raise FileNotFoundError(errno.ENOENT, f"no directory {_parent(path)}", path)
            if path in self._dirs:
                raise StorageError(errno.EISDIR, f"{path} is a directory")
            if exclusive and path in self._files:
                raise FileExistsError(errno.EEXIST, f"{path} already exists", path)
            self._files[path] = (data, time.time())

    def join(self, *parts: str) -> str:
        return "/".join(p.rstrip("/") for p in parts[:-1]) + "/" + parts[-1] if len(parts) > 1 else parts[0]

    def exists(self, path: str) -> bool:
        path = _norm(path)
        return path in self._files or path in self._dirs

    def isdir(self, path: str) -> bool:
        return _norm(path) in self._dirs

    def size(self, path: str) -> int:
        try:
            return len(self._files[_norm(path)][0])
        except KeyError:
            raise FileNotFoundError(errno.ENOENT, "no such file", path) from None

    def scan(self, path: str) -> list[Entry]:
        path = _norm(path)
        prefix = path.rstrip("/") + "/"
        with self._mutex:
            out = [Entry(p[len(prefix):], "file", len(d), t) for p, (d, t) in self._files.items() if _parent(p) == path]
            out += [Entry(p[len(prefix):], "dir") for p in self._dirs if p != "/" and _parent(p) == path]
        return sorted(out, key=lambda e: e.name)

    def listdir(self, path: str) -> list[str]:
        return [e.name for e in self.scan(path)]

    def makedirs(self, path: str) -> None:
        path = _norm(path)
        with self._mutex:
            while path not in self._dirs:
                if path in self._files:
                    raise StorageError(errno.ENOTDIR, f"{path} is a file")
                self._dirs.add(path)
                path = _parent(path)

    def read_file(self, path: str, *, max_size: int | None = None) -> bytes:
        try:
            data = self._files[_norm(path)][0]
        except KeyError:
            raise FileNotFoundError(errno.ENOENT, "no such file", path) from None
        if max_size is not None and len(data) > max_size:
            raise StorageError(errno.EFBIG, f"{path} is {len(data)} bytes, more than the {max_size} allowed")
        return data

    def open_read(self, path: str) -> ReadHandle:
        return _Read(path, self.read_file(path))

    def open_write(self, path: str, *, durable: bool = True) -> WriteHandle:
        return _Write(self, path)

    def write_atomic(self, path: str, data: bytes, *, sync: bool = True, exclusive: bool = False) -> None:
        self._put(path, bytes(data), exclusive)

    def delete(self, path: str, *, sync: bool = False) -> None:
        with self._mutex:
            self._files.pop(_norm(path), None)

    def rmdir(self, path: str) -> None:
        path = _norm(path)
        with self._mutex:
            if path not in self._dirs:
                return
            if any(_parent(p) == path for p in [*self._files, *self._dirs] if p != "/"):
                raise StorageError(errno.ENOTEMPTY, f"{path} is not empty")
            self._dirs.discard(path)

    def lock(self, path: str, *, shared: bool = False, timeout: float = 0.0) -> StorageLock:
        path = _norm(path)
        if _parent(path) not in self._dirs:
            self.makedirs(_parent(path))
        deadline = time.monotonic() + timeout
        while True:
            with self._mutex:
                ex, sh = self._locks.get(path, (False, 0))
                if not ex and (shared or sh == 0):
                    self._locks[path] = (not shared, sh + 1 if shared else sh)
                    if path not in self._files:
                        self._files[path] = (b"", time.time())
                    return _Lock(self, path, shared)
            if time.monotonic() >= deadline:
                raise CheckpointLockedError(f"{_parent(path)} is in use by another writer; wait for it to finish")
            time.sleep(0.01)
