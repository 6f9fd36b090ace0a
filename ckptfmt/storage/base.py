"""The storage ABC: bytes at paths. Knows nothing of tensors.

Paths are ``/``-separated strings; a backend decides what they mean. The call order a writer
follows is: ``lock(RUN/.ckptfmt.lock, shared=True)`` when it writes into a run's shared
store → ``open_write(file)`` → ``write``... → ``close(sync=True)`` for every data file →
``makedirs(dir)`` → ``write_atomic(manifest)`` (the commit: readers see the whole new
manifest or none) → release the lock. A reader calls ``read_file`` for the manifest and
``open_read`` + ``readinto`` for data; it never locks. ``mmap`` is optional and returns None
where a backend cannot map. Deletion (gc, remove, retention) lists with ``scan``, which never
follows symbolic links, and holds ``lock(..., shared=False)``.

Nothing here needs a rename or a hard link: ``write_atomic`` may be a single PUT on an
object store, and directories may be implicit (``makedirs`` a no-op, ``rmdir`` a no-op).
"""

from __future__ import annotations

__all__ = ["Storage", "ReadHandle", "WriteHandle", "Entry", "StorageLock", "storage_error"]

import abc
import errno
import posixpath
from collections.abc import Iterable
from dataclasses import dataclass

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


@dataclass(frozen=True, slots=True)
class Entry:
    """One name in a directory, as :meth:`Storage.scan` sees it, without following links.

    Attributes:
        name: the name inside the directory.
        kind: ``"file"``, ``"dir"``, ``"link"`` (a symbolic link, whatever it points to) or
            ``"other"`` (a FIFO, a device...).
        size: bytes for a file, 0 otherwise.
        mtime: last modification, Unix seconds.
    """

    name: str
    kind: str
    size: int = 0
    mtime: float = 0.0


class StorageLock(abc.ABC):
    """A held lock (see :meth:`Storage.lock`); released by :meth:`release` or process death."""

    @abc.abstractmethod
    def release(self) -> None:
        """Release the lock; a second call does nothing."""

    def __enter__(self) -> StorageLock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


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

    def __enter__(self) -> ReadHandle:
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
    def exists(self, path: str) -> bool:
        """Whether a file or directory is at ``path`` (following links)."""

    @abc.abstractmethod
    def isdir(self, path: str) -> bool:
        """Whether ``path`` is a directory (following links)."""

    @abc.abstractmethod
    def size(self, path: str) -> int:
        """Size of a file; raises FileNotFoundError when absent."""

    @abc.abstractmethod
    def listdir(self, path: str) -> list[str]:
        """Sorted names in a directory (not recursive); ``[]`` when it does not exist."""

    @abc.abstractmethod
    def scan(self, path: str) -> list[Entry]:
        """The entries of a directory, sorted by name, **never following symbolic links**.

        A link is reported as ``kind="link"`` whatever it points to, so a caller that only
        descends into ``"dir"`` entries never leaves the tree it was given. ``[]`` when the
        directory does not exist. Backends without links never report ``"link"``.
        """

    @abc.abstractmethod
    def lock(self, path: str, *, shared: bool = False, timeout: float = 0.0) -> StorageLock:
        """Take an advisory lock named by the file ``path`` (created if needed).

        An exclusive lock excludes every other lock on ``path``; a shared one excludes only
        exclusive ones. Acquisitions are **not re-entrant**: a second exclusive lock on the
        same path conflicts even in the same process. The lock ends with
        :meth:`StorageLock.release` or when the holding process dies. Waits up to ``timeout``
        seconds, then raises ``CheckpointLockedError`` naming the holder if known.

        Raises:
            CheckpointLockedError: held by someone else after ``timeout``.
            OSError: the lock cannot be created (e.g. ``EROFS`` on read-only storage); a
                caller that only reads may go on without it.
        """

    @abc.abstractmethod
    def makedirs(self, path: str) -> None:
        """Create a directory and its parents; no error if it exists."""

    @abc.abstractmethod
    def read_file(self, path: str, *, max_size: int | None = None) -> bytes:
        """Read a whole file, refusing one larger than ``max_size`` before reading it."""

    @abc.abstractmethod
    def open_read(self, path: str) -> ReadHandle:
        """Open a regular file for positional reads; FileNotFoundError when absent."""

    @abc.abstractmethod
    def open_write(self, path: str, *, durable: bool = True) -> WriteHandle:
        """Create (or truncate) a file for sequential writing.

        ``durable`` says the file will be synced at close: a backend may start moving data
        to stable storage early so that the final sync is short.
        """

    @abc.abstractmethod
    def write_atomic(self, path: str, data: bytes, *, sync: bool = True, exclusive: bool = False) -> None:
        """Make ``path`` hold exactly ``data``, all at once: readers see old or new, never a mix.

        With ``sync`` the new content is durable when this returns. A temporary, if the
        backend needs one, is named ``.NAME.tmp-*`` beside ``path`` (so ``.MANIFEST.tmp-*``
        for a manifest, which ``verify`` and recovery recognise as leftovers).

        With ``exclusive`` the write fails with FileExistsError if ``path`` exists, decided
        atomically by the backend (two writers racing: exactly one succeeds).
        """

    @abc.abstractmethod
    def delete(self, path: str, *, sync: bool = False) -> None:
        """Delete a file (never a directory, never through a link); no error if it is gone.

        With ``sync`` the deletion is durable when this returns (a manifest's deletion must
        be, before the data it listed is deleted).
        """

    @abc.abstractmethod
    def rmdir(self, path: str) -> None:
        """Remove an empty directory; no error if it is gone; an error if it is not empty."""

    def islink(self, path: str) -> bool:
        """Whether ``path`` is a symbolic link (backends without links: never).

        Readers refuse data files that are links, so a checkpoint cannot be made to read
        (and return, or report the size of) a file outside its tree.
        """
        return False

    def delete_many(self, paths: Iterable[str]) -> None:
        """Delete several files (a backend may batch them)."""
        for p in paths:
            self.delete(p)
