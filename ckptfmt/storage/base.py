"""The storage ABC: bytes at paths. Knows nothing of tensors.

Paths are strings; a backend decides what they mean. The call order a writer follows is:
``makedirs(dir)`` → ``open_write(file)`` → ``write``... → ``close(sync=True)`` for every
data file → ``write_atomic(manifest)`` (write a temporary, sync it, rename it into place,
sync the directory). A reader calls ``read_file`` for the manifest and ``open_read`` +
``readinto`` for data. ``mmap`` is optional and returns None where a backend cannot map.
"""

from __future__ import annotations

__all__ = ["Storage", "ReadHandle", "WriteHandle", "storage_error"]

import abc
import errno
import posixpath
from typing import Iterable

from ckptfmt.errors import CkptFmtError, StorageError


def storage_error(e: OSError, path: str, doing: str) -> OSError:
    """Turn an OSError into our StorageError naming the path (FileNotFoundError passes through)."""
    if isinstance(e, (FileNotFoundError, FileExistsError, NotADirectoryError, CkptFmtError)):
        return e
    hint = ""
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        hint = "; the disk is full: free space and save again (nothing already saved was changed)"
    err = StorageError(e.errno, f"{doing} {path} failed: {e.strerror or e}{hint}")
    err.filename = path
    return err


class ReadHandle(abc.ABC):
    """An open file for positional reads; safe to share between threads."""

    path: str

    @abc.abstractmethod
    def size(self) -> int:
        """The file's size in bytes."""

    @abc.abstractmethod
    def readinto(self, offset: int, buf: memoryview) -> int:
        """Fill ``buf`` from ``offset``; returns the bytes read (short only at end of file)."""

    def read(self, offset: int, length: int) -> bytes:
        """Read ``length`` bytes from ``offset`` (fewer at end of file)."""
        buf = bytearray(length)
        n = self.readinto(offset, memoryview(buf))
        return bytes(buf[:n])

    def mmap(self):  # pragma: no cover - backends override when they can map
        """A read-only memory map of the whole file, or None if this backend cannot map."""
        return None

    @abc.abstractmethod
    def close(self) -> None:
        """Release the handle."""

    def __enter__(self) -> "ReadHandle":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class WriteHandle(abc.ABC):
    """A file being written sequentially."""

    path: str

    @abc.abstractmethod
    def write(self, data: memoryview | bytes) -> None:
        """Append all of ``data``."""

    @abc.abstractmethod
    def tell(self) -> int:
        """Bytes written so far."""

    @abc.abstractmethod
    def close(self, *, sync: bool = True) -> None:
        """Close the file, first making its content durable when ``sync`` is true."""


class Storage(abc.ABC):
    """Bytes at paths: ranged reads, sequential and atomic writes, listing, deletion."""

    #: True for object stores: no rename, no directories, whole-object writes.
    is_object_store: bool = False
    #: Writers cut data files at this size, splitting a tensor's chunks if need be (None: no limit).
    max_file_size: int | None = None
    #: Threads for reads and verification; 0 uses the CPU-sized pool (local disks).
    io_concurrency: int = 0
    #: Data files a writer may have closing (uploading) at once in the background; 0: close inline.
    write_concurrency: int = 0

    def dirname(self, path: str) -> str:
        """The directory holding ``path``."""
        return posixpath.dirname(path.rstrip("/"))

    def basename(self, path: str) -> str:
        """The last component of ``path``."""
        return posixpath.basename(path.rstrip("/"))

    def normpath(self, path: str) -> str:
        """``path`` with ``.``/``..`` components resolved (absolute for local paths)."""
        return posixpath.normpath(path)

    def mtime(self, path: str) -> float | None:
        """When the file was last written (seconds since the epoch), or None if unknown."""
        return None

    @abc.abstractmethod
    def join(self, *parts: str) -> str:
        """Join path components."""

    @abc.abstractmethod
    def exists(self, path: str) -> bool: ...

    @abc.abstractmethod
    def isdir(self, path: str) -> bool: ...

    @abc.abstractmethod
    def size(self, path: str) -> int:
        """Size of a file; raises FileNotFoundError when absent."""

    @abc.abstractmethod
    def listdir(self, path: str) -> list[str]:
        """Names in a directory (not recursive)."""

    @abc.abstractmethod
    def makedirs(self, path: str) -> None:
        """Create a directory and its parents; no error if it exists."""

    @abc.abstractmethod
    def read_file(self, path: str, *, max_size: int | None = None) -> bytes:
        """Read a whole file, refusing one larger than ``max_size`` before reading it."""

    @abc.abstractmethod
    def open_read(self, path: str) -> ReadHandle: ...

    @abc.abstractmethod
    def open_write(self, path: str, *, durable: bool = True) -> WriteHandle:
        """Create (or truncate) a file for sequential writing.

        ``durable`` says the file will be synced at close: a backend may start moving data
        to stable storage early so that the final sync is short.
        """

    @abc.abstractmethod
    def write_atomic(self, path: str, data: bytes, *, sync: bool = True, exclusive: bool = False) -> None:
        """Make ``path`` hold exactly ``data``, all at once: readers see old or new, never a mix.

        With ``exclusive`` the write fails with FileExistsError if ``path`` exists, decided
        atomically by the backend (two writers racing: exactly one succeeds).
        """

    @abc.abstractmethod
    def delete(self, path: str) -> None:
        """Delete a file; no error if it is already gone."""

    @abc.abstractmethod
    def rmdir(self, path: str) -> None:
        """Remove an empty directory; no error if it is gone."""

    def delete_many(self, paths: Iterable[str]) -> None:
        for p in paths:
            self.delete(p)
