"""Object-store storage (S3, GCS, Azure, fsspec's ``memory://``) through fsspec.

Object stores have no rename, no directory fsync and no appends, so this backend keeps the
commit protocol of the format (data first, manifest last) with different means:

* a data file is buffered in memory and uploaded as **one object** when it is closed (one
  PUT: it exists completely or not at all). Files are kept small (:attr:`max_file_size`) so
  that several uploads run at once while the writer goes on hashing; the writer cuts a large
  tensor's chunks across files to stay under it (the format allows chunks in any file);
* the manifest is created with a **conditional write** that fails if it already exists
  (S3 ``If-None-Match: *``, GCS ``ifGenerationMatch=0``, Azure ``overwrite=False``), so two
  writers can never both commit the same path, and a replace (``overwrite=True``) is a
  single unconditional PUT, which readers see whole or not at all;
* reads are ranged GETs of exactly the bytes asked for;
* directories do not exist: a "directory" is the prefix of the objects under it.

Paths are the URLs the user gave (``s3://bucket/runs/ck/MANIFEST``), so every message names
the object as the user knows it.
"""

from __future__ import annotations

__all__ = ["FsspecStorage"]

import errno
import json
import os
import posixpath
import secrets
import socket
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any

from ckptfmt.errors import CheckpointLockedError, CkptFmtError, StorageError
from ckptfmt.storage.base import Entry, ReadHandle, Storage, StorageLock, WriteHandle, storage_error

#: Above this many bytes a data file is closed and uploaded, and the next chunk starts a new one.
DEFAULT_MAX_FILE_SIZE = 32 << 20
#: Ranged GETs (and verification) run on this many threads: object stores reward concurrency.
DEFAULT_IO_CONCURRENCY = 16
#: At most this many data files are being uploaded at once (each holds its bytes in memory).
DEFAULT_WRITE_CONCURRENCY = 8
#: s3fs switches to an unconditional multipart upload above 2 × chunksize; our objects stay single PUTs.
_S3_SINGLE_PUT = 1 << 31

#: fsspec's memory filesystem checks and creates in two steps; this makes its exclusive create atomic.
_MEMORY_CREATE_LOCK = threading.Lock()


def _fail(e: BaseException, path: str, doing: str) -> BaseException:
    """Our error for whatever an fsspec backend raised (botocore and aiohttp errors included)."""
    if isinstance(e, (FileNotFoundError, FileExistsError, CkptFmtError)):
        return e
    if isinstance(e, OSError):
        return storage_error(e, path, doing)
    name = type(e).__name__
    hint = ""
    if "Credential" in name:
        hint = (
            "; set credentials the usual way (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, AWS_PROFILE, "
            "~/.aws/credentials) or pass storage_options={'key': ..., 'secret': ...}"
        )
    elif "Endpoint" in name or "Connect" in name:
        hint = "; check the endpoint (AWS_ENDPOINT_URL or storage_options={'endpoint_url': ...}) and the network"
    err = StorageError(errno.EIO, f"{doing} {path} failed: {name}: {e}{hint}")
    err.filename = path
    return err


class _FsspecRead(ReadHandle):
    def __init__(self, storage: FsspecStorage, path: str) -> None:
        self.path = path
        self._storage = storage
        self._key = storage._key(path)
        self._size = storage._call("opening", path, storage.fs.size, self._key)
        if self._size is None:  # a "directory" prefix
            raise FileNotFoundError(errno.ENOENT, f"{path} is not an object", path)

    def size(self) -> int:
        return self._size

    def readinto(self, offset: int, buf: memoryview) -> int:
        end = min(offset + len(buf), self._size)
        if end <= offset:
            return 0
        data = self._storage._call("reading", self.path, self._storage.fs.cat_file, self._key, start=offset, end=end)
        n = len(data)
        buf[:n] = data
        return n

    def close(self) -> None:
        pass


class _FsspecWrite(WriteHandle):
    """Gathers a whole object in memory; ``close`` uploads it in one PUT."""

    def __init__(self, storage: FsspecStorage, path: str) -> None:
        self.path = path
        self._storage = storage
        self._buf: bytearray | None = bytearray()

    def write(self, data) -> None:
        if self._buf is None:
            raise StorageError(errno.EBADF, f"{self.path} is already closed")
        self._buf += memoryview(data).cast("B")

    def tell(self) -> int:
        return len(self._buf) if self._buf is not None else 0

    def close(self, *, sync: bool = True) -> None:
        buf, self._buf = self._buf, None
        if buf is None:
            return
        # An object store has nothing to sync: a PUT that returned is durable. ``sync=False``
        # is used to abandon a file after a failed save, so nothing is uploaded then.
        if sync:
            self._storage._put(self.path, buf, exclusive=False)


def _mtime_of(info: dict) -> float | None:
    for k in ("LastModified", "mtime", "updated", "last_modified", "created"):
        v = info.get(k)
        if v is None:
            continue
        if hasattr(v, "timestamp"):
            return float(v.timestamp())
        try:
            return float(v)
        except (TypeError, ValueError):
            continue
    return None


class _ObjectLock(StorageLock):
    """An advisory lock on an object store: an object created with a conditional write.

    Exclusive: create ``PATH`` only if absent, then make sure no ``PATH.shared-*`` exists.
    Shared: create ``PATH.shared-TOKEN``, then make sure ``PATH`` does not exist. Each side
    announces itself before looking for the other, so of two racing lockers at least one
    sees the other and backs off. Unlike ``flock`` the lock does **not** end when its holder
    dies: the error names the object to delete once no process holds it.
    """

    def __init__(self, storage: FsspecStorage, obj: str) -> None:
        self._storage = storage
        self._obj: str | None = obj

    @classmethod
    def acquire(cls, storage: FsspecStorage, path: str, *, shared: bool, timeout: float) -> _ObjectLock:
        deadline = time.monotonic() + max(0.0, timeout)
        while True:
            try:
                return cls._try(storage, path, shared)
            except CheckpointLockedError:
                if time.monotonic() >= deadline:
                    raise
                time.sleep(min(0.2, max(0.0, deadline - time.monotonic())))

    @staticmethod
    def _owner() -> bytes:
        return json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "time": time.time()}).encode()

    @staticmethod
    def _holder(storage: FsspecStorage, obj: str) -> str:
        try:
            info = json.loads(storage.read_file(obj, max_size=4096))
            return f"pid {info.get('pid')} on {info.get('host')} since {time.ctime(info.get('time', 0))}"
        except Exception:  # noqa: BLE001 - the holder is only named when we can
            return "unknown"

    @classmethod
    def _locked(cls, storage: FsspecStorage, path: str, obj: str) -> CheckpointLockedError:
        return CheckpointLockedError(
            f"{storage.dirname(path)} is in use by another writer ({cls._holder(storage, obj)}; lock object {obj}). "
            "Wait for it to finish. An object store cannot tell that a holder died: if no process "
            f"holds it any more, delete {obj}"
        )

    @classmethod
    def _try(cls, storage: FsspecStorage, path: str, shared: bool) -> _ObjectLock:
        prefix = storage.basename(path) + ".shared-"
        if shared:
            mine = f"{path}.shared-{secrets.token_hex(8)}"
            storage._put(mine, cls._owner(), exclusive=True)
            if storage.exists(path):
                storage.delete(mine)
                raise cls._locked(storage, path, path)
            return cls(storage, mine)
        try:
            storage._put(path, cls._owner(), exclusive=True)
        except FileExistsError:
            raise cls._locked(storage, path, path) from None
        others = [n for n in storage.listdir(storage.dirname(path)) if n.startswith(prefix)]
        if others:
            storage.delete(path)
            raise cls._locked(storage, path, storage.join(storage.dirname(path), others[0]))
        return cls(storage, path)

    def release(self) -> None:
        obj, self._obj = self._obj, None
        if obj is not None:
            self._storage.delete(obj)


class FsspecStorage(Storage):
    """Storage on an fsspec filesystem (object stores and ``memory://``).

    Usually made for you from a URL (``ckptfmt.save(state, "s3://bucket/ck")``); build one
    yourself to pass an already-configured filesystem.

    Args:
        fs: an fsspec filesystem instance.
        protocol: its URL scheme (``"s3"``, ``"gs"``, ``"az"``, ``"memory"``).
        max_file_size: data files are cut at this size (see the module docstring).
        io_concurrency: threads for ranged reads and verification.
        write_concurrency: data files uploaded at once.

    Example:
        >>> import fsspec
        >>> s = FsspecStorage(fsspec.filesystem("memory"), "memory")
        >>> s.write_atomic("memory://doc/x", b"hi"); s.read_file("memory://doc/x")
        b'hi'
    """

    is_object_store = True

    def __init__(
        self,
        fs: Any,
        protocol: str,
        *,
        max_file_size: int = DEFAULT_MAX_FILE_SIZE,
        io_concurrency: int = DEFAULT_IO_CONCURRENCY,
        write_concurrency: int = DEFAULT_WRITE_CONCURRENCY,
    ) -> None:
        self.fs = fs
        self.protocol = protocol
        self.max_file_size = max_file_size
        self.io_concurrency = io_concurrency
        self.write_concurrency = write_concurrency

    def __repr__(self) -> str:
        return f"FsspecStorage({type(self.fs).__name__}, {self.protocol!r})"

    # -- helpers ---------------------------------------------------------------------
    def _key(self, path: str) -> str:
        return self.fs._strip_protocol(path)

    def _call(self, doing: str, path: str, fn: Callable, *args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except Exception as e:  # noqa: BLE001 - every backend error becomes ours, naming the path
            raise _fail(e, path, doing) from e

    def _put(self, path: str, data: bytes | bytearray, *, exclusive: bool) -> None:
        key = self._key(path)
        fs, proto = self.fs, self.protocol
        if not exclusive:
            kwargs = {"chunksize": _S3_SINGLE_PUT} if proto == "s3" else {}
            self._call("writing", path, fs.pipe_file, key, data, **kwargs)
            return
        try:
            if proto == "s3":
                fs.pipe_file(key, data, mode="create", chunksize=_S3_SINGLE_PUT)
            elif proto == "memory":
                with _MEMORY_CREATE_LOCK:
                    fs.pipe_file(key, data, mode="create")
            elif proto == "gs":
                fs.pipe_file(key, data, mode="create")  # gcsfs: ifGenerationMatch=0
            elif proto == "az":
                fs.pipe_file(key, data, overwrite=False)  # adlfs: If-None-Match: *
            else:  # pragma: no cover - the registry lists no other object store
                raise StorageError(errno.ENOTSUP, f"{path}: no conditional create for {proto}://")
        except FileExistsError:
            raise FileExistsError(errno.EEXIST, f"{path} already exists", path) from None
        except OSError as e:
            # Some S3 servers (SeaweedFS) answer a refused If-None-Match with an error that
            # s3fs reports as EINVAL. Whether the object exists now decides what it meant.
            if e.errno == errno.EINVAL and self._exists_quietly(key):
                raise FileExistsError(errno.EEXIST, f"{path} already exists", path) from None
            raise _fail(e, path, "creating") from e
        except Exception as e:  # noqa: BLE001
            if "PreconditionFailed" in type(e).__name__ + str(e) and self._exists_quietly(key):
                raise FileExistsError(errno.EEXIST, f"{path} already exists", path) from None
            raise _fail(e, path, "creating") from e

    def _exists_quietly(self, key: str) -> bool:
        try:
            return bool(self.fs.exists(key))
        except Exception:  # noqa: BLE001
            return False

    # -- paths -----------------------------------------------------------------------
    def join(self, *parts: str) -> str:
        out = parts[0].rstrip("/")
        for p in parts[1:]:
            p = p.strip("/")
            if p:
                out = f"{out}/{p}"
        # Keys are literal: "../NAME/file" (shared data of incremental saves) must be resolved here.
        return self.normpath(out) if "/.." in out or "/./" in out else out

    def dirname(self, path: str) -> str:
        head, sep, rest = path.partition("://")
        if not sep:
            return posixpath.dirname(path.rstrip("/"))
        return f"{head}://{posixpath.dirname(rest.rstrip('/'))}"

    def basename(self, path: str) -> str:
        return posixpath.basename(path.rstrip("/"))

    def normpath(self, path: str) -> str:
        head, sep, rest = path.partition("://")
        if not sep:
            return posixpath.normpath(path)
        return f"{head}://{posixpath.normpath(rest)}"

    # -- queries ---------------------------------------------------------------------
    def exists(self, path: str) -> bool:
        return bool(self._call("looking up", path, self.fs.exists, self._key(path)))

    def isdir(self, path: str) -> bool:
        return bool(self._call("looking up", path, self.fs.isdir, self._key(path)))

    def size(self, path: str) -> int:
        info = self._call("looking up", path, self.fs.info, self._key(path))
        if info.get("type") == "directory":
            raise FileNotFoundError(errno.ENOENT, f"{path} is not an object", path)
        return int(info["size"])

    def mtime(self, path: str) -> float | None:
        """When the object was written (seconds since the epoch), or None if unknown."""
        info = self._call("looking up", path, self.fs.info, self._key(path))
        return _mtime_of(info)

    def listdir(self, path: str) -> list[str]:
        key = self._key(path).rstrip("/")
        try:
            entries = self.fs.ls(key, detail=False)
        except FileNotFoundError:
            return []
        except Exception as e:  # noqa: BLE001
            raise _fail(e, path, "listing") from e
        names = set()
        for e in entries:
            e = e.rstrip("/")
            if e == key:
                continue  # s3fs lists a file as itself
            names.add(posixpath.basename(e))
        return sorted(names)

    # -- listing without links, locks (the Storage seam of gc, remove and the manager) ----
    def scan(self, path: str) -> list[Entry]:
        key = self._key(path).rstrip("/")
        try:
            entries = self.fs.ls(key, detail=True)
        except FileNotFoundError:
            return []
        except Exception as e:  # noqa: BLE001
            raise _fail(e, path, "listing") from e
        out: dict[str, Entry] = {}
        for info in entries:
            name = str(info.get("name", "")).rstrip("/")
            if name == key or not name:
                continue
            base = posixpath.basename(name)
            if info.get("type") == "directory":
                out.setdefault(base, Entry(base, "dir"))
            else:
                out[base] = Entry(base, "file", int(info.get("size") or 0), _mtime_of(info) or 0.0)
        return [out[n] for n in sorted(out)]

    def lock(self, path: str, *, shared: bool = False, timeout: float = 0.0) -> StorageLock:
        return _ObjectLock.acquire(self, path, shared=shared, timeout=timeout)

    # -- reading ---------------------------------------------------------------------
    def read_file(self, path: str, *, max_size: int | None = None) -> bytes:
        key = self._key(path)
        if max_size is None:
            return self._call("reading", path, self.fs.cat_file, key)
        # One ranged GET: one byte more than allowed tells us the object is too large.
        try:
            data = self._call("reading", path, self.fs.cat_file, key, start=0, end=max_size + 1)
        except StorageError:
            if self.size(path) == 0:  # S3 refuses any range of an empty object (416)
                return b""
            raise
        if len(data) > max_size:
            raise StorageError(errno.EFBIG, f"{path} is more than the {max_size} bytes allowed")
        return data

    def open_read(self, path: str) -> ReadHandle:
        return _FsspecRead(self, path)

    # -- writing ---------------------------------------------------------------------
    def makedirs(self, path: str) -> None:
        pass  # prefixes need no creating

    def open_write(self, path: str, *, durable: bool = True) -> WriteHandle:
        return _FsspecWrite(self, path)

    def write_atomic(self, path: str, data: bytes, *, sync: bool = True, tmp_prefix: str = "", exclusive: bool = False) -> None:
        self._put(path, data, exclusive=exclusive)

    def delete(self, path: str, *, sync: bool = False) -> None:
        # A DELETE that returned is durable: there is nothing to sync.
        try:
            self.fs.rm_file(self._key(path))
        except FileNotFoundError:
            pass
        except Exception as e:  # noqa: BLE001
            raise _fail(e, path, "deleting") from e

    def delete_many(self, paths: Iterable[str]) -> None:
        paths = list(paths)
        keys = [self._key(p) for p in paths]
        if not keys:
            return
        if self.protocol == "memory":
            for p in paths:
                self.delete(p)
            return
        try:
            self.fs.rm(keys)  # batched (S3 DeleteObjects: 1000 keys a request)
        except FileNotFoundError:
            pass
        except Exception as e:  # noqa: BLE001
            raise _fail(e, keys[0], "deleting") from e

    def rmdir(self, path: str) -> None:
        # On most stores a prefix disappears with its last object. Stores backed by a real
        # file tree (SeaweedFS) keep the empty directory, listed as a common prefix, until
        # its marker object "dir/" is deleted.
        if self.protocol == "memory" or self.listdir(path):
            return
        try:
            self.fs.rm_file(self._key(path).rstrip("/") + "/")
        except FileNotFoundError:
            pass
        except Exception as e:  # noqa: BLE001
            raise _fail(e, path, "removing directory") from e
        self.fs.invalidate_cache(self._key(path))
