"""Local filesystem storage: pread/pwrite, fsync, rename-into-place, mmap."""

from __future__ import annotations

__all__ = ["LocalStorage", "open_regular_file"]

import errno
import fcntl
import mmap
import os
import secrets
import stat
import time
import weakref

from ckptfmt.errors import CheckpointLockedError, StorageError
from ckptfmt.storage.base import Entry, ReadHandle, Storage, StorageLock, WriteHandle
from ckptfmt.storage.base import storage_error as _wrap

#: Writes smaller than this are gathered in memory and issued together.
_SMALL_WRITE = 1 << 20
#: A durable file starts write-back to disk every this many bytes, so the fsync at close
#: finds little left to flush instead of the whole file (benchmarks/profile_save.py).
_WRITEBACK_EVERY = 64 << 20


def _load_sync_file_range():
    """Linux's sync_file_range(2) through ctypes (os has no binding), or None."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.sync_file_range
        fn.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
        fn.restype = ctypes.c_int
        return fn
    except (OSError, AttributeError):
        return None


_sync_file_range = _load_sync_file_range()
_SYNC_FILE_RANGE_WRITE = 2  # start write-back of dirty pages; do not wait


def open_regular_file(path: str) -> int:
    """Open a regular file for reading; anything else (a FIFO, a device) is refused, not waited on."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except OSError as e:
        raise _wrap(e, path, "opening") from None
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        raise StorageError(errno.EINVAL, f"{path} is not a regular file; refusing to read it")
    return fd


class _LocalRead(ReadHandle):
    def __init__(self, path: str) -> None:
        self.path = path
        self._fd = open_regular_file(path)
        self._size = os.fstat(self._fd).st_size
        self._mmap = None

    def size(self) -> int:
        return self._size

    def readinto(self, offset: int, buf: memoryview) -> int:
        total, n = 0, len(buf)
        if n:
            try:  # one call is the usual case; loop only after a short read
                total = os.preadv(self._fd, [buf], offset)
            except OSError as e:
                raise _wrap(e, self.path, "reading") from None
            if total in (0, n):
                return total
        while total < n:
            try:
                got = os.preadv(self._fd, [buf[total:]], offset + total)
            except OSError as e:
                raise _wrap(e, self.path, "reading") from None
            if got == 0:
                break
            total += got
        return total

    def mmap(self):
        if self._mmap is None and self._size:
            self._mmap = mmap.mmap(self._fd, 0, access=mmap.ACCESS_READ)
        return self._mmap

    def close(self) -> None:
        if self._fd >= 0:
            # A mapping stays valid after its descriptor is closed; arrays viewing it keep it alive.
            os.close(self._fd)
            self._fd = -1


class _LocalWrite(WriteHandle):
    def __init__(self, path: str, durable: bool = True) -> None:
        self.path = path
        try:
            self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_CLOEXEC", 0), 0o644)
        except OSError as e:
            raise _wrap(e, path, "creating") from None
        self._pos = 0  # bytes accepted (some may still be gathered in _buf)
        self._issued = 0  # bytes handed to the kernel
        self._writeback_from = 0
        self._durable = durable and _sync_file_range is not None
        self._buf = bytearray()

    def write(self, data) -> None:
        view = memoryview(data).cast("B")
        if len(view) < _SMALL_WRITE:
            # Many small tensors: gather them instead of one syscall each.
            self._buf += view
            self._pos += len(view)
            if len(self._buf) >= _SMALL_WRITE:
                self._flush()
            return
        self._flush()
        self._write_all(view)
        self._pos += len(view)

    def _flush(self) -> None:
        if self._buf:
            buf, self._buf = self._buf, bytearray()
            self._write_all(memoryview(buf))

    def _write_all(self, view: memoryview) -> None:
        while len(view):
            try:
                n = os.write(self._fd, view)
            except OSError as e:
                raise _wrap(e, self.path, "writing") from None
            view = view[n:]
            self._issued += n
        pending = self._issued - self._writeback_from
        if self._durable and pending >= _WRITEBACK_EVERY:
            # Start writing these pages to disk now, while we go on producing the next ones.
            _sync_file_range(self._fd, self._writeback_from, pending, _SYNC_FILE_RANGE_WRITE)
            self._writeback_from = self._issued

    def tell(self) -> int:
        return self._pos

    def close(self, *, sync: bool = True) -> None:
        if self._fd < 0:
            return
        try:
            self._flush()
            if sync:
                os.fsync(self._fd)
        except OSError as e:
            raise _wrap(e, self.path, "syncing") from None
        finally:
            os.close(self._fd)
            self._fd = -1


class _FlockLock(StorageLock):
    def __init__(self, fd: int) -> None:
        self._fd = fd
        _HELD.add(self)

    def release(self) -> None:
        if self._fd >= 0:
            try:  # unlock explicitly: a forked child may still share this open file description
                fcntl.flock(self._fd, fcntl.LOCK_UN)
            except OSError:
                pass
            os.close(self._fd)
            self._fd = -1

    def __del__(self) -> None:  # pragma: no cover - best effort
        self.release()


#: Locks held by this process. A forked child shares the parent's open file description, so
#: it would hold the flock too (and keep the run locked after the parent released it): the
#: child closes its copies at fork, and the lock stays the parent's alone.
_HELD: weakref.WeakSet[_FlockLock] = weakref.WeakSet()


def _drop_locks_in_child() -> None:
    for lk in list(_HELD):
        if lk._fd >= 0:
            try:
                os.close(lk._fd)
            except OSError:
                pass
            lk._fd = -1


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_drop_locks_in_child)


def _kind(mode: int) -> str:
    if stat.S_ISLNK(mode):
        return "link"
    if stat.S_ISDIR(mode):
        return "dir"
    return "file" if stat.S_ISREG(mode) else "other"


class LocalStorage(Storage):
    """Storage on the local filesystem.

    Example:
        >>> import tempfile, os
        >>> s = LocalStorage(); d = tempfile.mkdtemp()
        >>> s.write_atomic(os.path.join(d, "x"), b"hi"); s.read_file(os.path.join(d, "x"))
        b'hi'
    """

    def join(self, *parts: str) -> str:
        return os.path.join(*parts)

    def exists(self, path: str) -> bool:
        return os.path.exists(path)

    def isdir(self, path: str) -> bool:
        return os.path.isdir(path)

    def islink(self, path: str) -> bool:
        return os.path.islink(path)

    def size(self, path: str) -> int:
        return os.stat(path).st_size

    def listdir(self, path: str) -> list[str]:
        try:
            return sorted(os.listdir(path))
        except FileNotFoundError:
            return []

    def scan(self, path: str) -> list[Entry]:
        out = []
        try:
            it = os.scandir(path)
        except (FileNotFoundError, NotADirectoryError):
            return []
        except OSError as e:
            raise _wrap(e, path, "listing") from None
        with it:
            for de in it:
                try:
                    st = de.stat(follow_symlinks=False)
                except FileNotFoundError:
                    continue
                kind = _kind(st.st_mode)
                out.append(Entry(de.name, kind, st.st_size if kind == "file" else 0, st.st_mtime))
        return sorted(out, key=lambda e: e.name)

    def lock(self, path: str, *, shared: bool = False, timeout: float = 0.0) -> StorageLock:
        flags = getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NOFOLLOW", 0)
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | flags, 0o666)  # umask decides; a team may share it
        except OSError as e:
            if e.errno not in (errno.EROFS, errno.EACCES, errno.EPERM):
                raise _wrap(e, path, "creating lock file") from None
            # A lock file we may not write (a colleague's, read-only storage): flock needs only
            # a descriptor, so an existing one still locks; only its holder's pid goes unwritten.
            try:
                fd = os.open(path, os.O_RDONLY | flags)
            except OSError:
                raise _wrap(e, path, "creating lock file") from None
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(fd, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
                break
            except OSError as e:
                if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    os.close(fd)
                    raise _wrap(e, path, "locking") from None
                if time.monotonic() >= deadline:
                    try:
                        owner = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
                    except OSError:
                        owner = "unknown"
                    os.close(fd)
                    raise CheckpointLockedError(
                        f"{os.path.dirname(path) or '.'} is in use by another writer (pid {owner}); "
                        "wait for it to finish, or use a different directory"
                    ) from None
                time.sleep(min(0.05, max(0.0, deadline - time.monotonic())))
        if not shared:
            try:
                os.ftruncate(fd, 0)
                os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
            except OSError:
                pass
        return _FlockLock(fd)

    def makedirs(self, path: str) -> None:
        try:
            os.makedirs(path, exist_ok=True)
        except OSError as e:
            raise _wrap(e, path, "creating directory") from None

    def read_file(self, path: str, *, max_size: int | None = None) -> bytes:
        try:
            with os.fdopen(open_regular_file(path), "rb") as f:
                size = os.fstat(f.fileno()).st_size
                if max_size is not None and size > max_size:
                    raise StorageError(errno.EFBIG, f"{path} is {size} bytes, more than the {max_size} allowed")
                return f.read(size + 1 if max_size is None else min(size + 1, max_size + 1))
        except (FileNotFoundError, NotADirectoryError, StorageError):
            raise
        except OSError as e:
            raise _wrap(e, path, "reading") from None

    def open_read(self, path: str) -> ReadHandle:
        return _LocalRead(path)

    def open_write(self, path: str, *, durable: bool = True) -> WriteHandle:
        return _LocalWrite(path, durable)

    def dirname(self, path: str) -> str:
        return os.path.dirname(os.path.abspath(path))

    def basename(self, path: str) -> str:
        return os.path.basename(os.path.abspath(path))

    def normpath(self, path: str) -> str:
        return os.path.normpath(os.path.abspath(path))

    def mtime(self, path: str) -> float | None:
        return os.stat(path).st_mtime

    def write_atomic(self, path: str, data: bytes, *, sync: bool = True, exclusive: bool = False) -> None:
        directory, name = os.path.split(path)
        tmp = os.path.join(directory, f".{name}.tmp-{secrets.token_hex(4)}")
        try:
            w = _LocalWrite(tmp)
            try:
                w.write(data)
            finally:
                w.close(sync=sync)
            if exclusive:
                # link(2) fails if the name exists: the check and the creation are one step.
                try:
                    os.link(tmp, path)
                except OSError as e:
                    if e.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EMLINK):
                        raise
                    # No hard links here (some FUSE and FAT filesystems): check, then rename.
                    if os.path.lexists(path):
                        raise FileExistsError(errno.EEXIST, "exists", path) from None
                    os.replace(tmp, path)
                else:
                    os.unlink(tmp)
            else:
                os.replace(tmp, path)
            if sync:
                self.sync_dir(directory or ".")
        except OSError as e:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            if isinstance(e, FileExistsError):
                raise FileExistsError(errno.EEXIST, f"{path} already exists", path) from None
            raise _wrap(e, path, "writing") from None

    def sync_dir(self, path: str) -> None:
        """Make renames and creations inside ``path`` durable."""
        try:
            fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
        except OSError:
            return
        try:
            os.fsync(fd)
        except OSError:
            pass  # some filesystems cannot fsync a directory; the rename is still atomic
        finally:
            os.close(fd)

    def delete(self, path: str, *, sync: bool = False) -> None:
        try:
            os.unlink(path)
        except FileNotFoundError:
            return
        except OSError as e:
            raise _wrap(e, path, "deleting") from None
        if sync:
            self.sync_dir(os.path.dirname(path) or ".")

    def rmdir(self, path: str) -> None:
        try:
            os.rmdir(path)
        except FileNotFoundError:
            pass
        except OSError as e:
            raise _wrap(e, path, "removing directory") from None
