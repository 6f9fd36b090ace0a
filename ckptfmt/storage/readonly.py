"""A read-only view of another storage backend: every write raises ``EROFS``.

Used to open run directories one may not write (a shared results volume, a read-only
mount): restore, verify, inspect and ``gc --dry-run`` work through it, and anything that
would change the directory fails with a :class:`~ckptfmt.errors.StorageError`.

Example:
    >>> import tempfile
    >>> ReadOnlyStorage().makedirs(tempfile.mkdtemp() + "/x")
    Traceback (most recent call last):
    ...
    ckptfmt.errors.StorageError: [Errno 30] creating directory ... failed: the storage is read-only
"""

from __future__ import annotations

__all__ = ["ReadOnlyStorage"]

import errno

from ckptfmt.errors import StorageError
from ckptfmt.storage.base import Entry, ReadHandle, Storage, StorageLock, WriteHandle


class ReadOnlyStorage(Storage):
    """Reads go to ``inner`` (default: the local filesystem); writes raise ``EROFS``."""

    def __init__(self, inner: Storage | None = None) -> None:
        if inner is None:
            from ckptfmt.storage.local import LocalStorage

            inner = LocalStorage()
        self.inner = inner

    @staticmethod
    def _refuse(doing: str, path: str) -> StorageError:
        err = StorageError(errno.EROFS, f"{doing} {path} failed: the storage is read-only")
        err.filename = path
        return err

    def join(self, *parts: str) -> str:
        return self.inner.join(*parts)

    def exists(self, path: str) -> bool:
        return self.inner.exists(path)

    def isdir(self, path: str) -> bool:
        return self.inner.isdir(path)

    def size(self, path: str) -> int:
        return self.inner.size(path)

    def listdir(self, path: str) -> list[str]:
        return self.inner.listdir(path)

    def scan(self, path: str) -> list[Entry]:
        return self.inner.scan(path)

    def read_file(self, path: str, *, max_size: int | None = None) -> bytes:
        return self.inner.read_file(path, max_size=max_size)

    def open_read(self, path: str) -> ReadHandle:
        return self.inner.open_read(path)

    def lock(self, path: str, *, shared: bool = False, timeout: float = 0.0) -> StorageLock:
        raise self._refuse("locking", path)

    def makedirs(self, path: str) -> None:
        raise self._refuse("creating directory", path)

    def open_write(self, path: str, *, durable: bool = True) -> WriteHandle:
        raise self._refuse("creating", path)

    def write_atomic(self, path: str, data: bytes, *, sync: bool = True, exclusive: bool = False) -> None:
        raise self._refuse("writing", path)

    def delete(self, path: str, *, sync: bool = False) -> None:
        raise self._refuse("deleting", path)

    def rmdir(self, path: str) -> None:
        raise self._refuse("removing directory", path)
