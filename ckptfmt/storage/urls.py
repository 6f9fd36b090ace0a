"""Which storage a path or URL means: local paths, ``file://``, and object-store URLs.

Object-store backends are optional: each URL scheme names the fsspec implementation it needs
and the ckptfmt extra that installs it, and the implementation is imported only when a URL
of that scheme is first used. A scheme nobody registered is refused: ``s3://bucket/ck`` must
never become a local directory named ``s3:/bucket/ck``.
"""

from __future__ import annotations

__all__ = ["resolve", "is_url", "SCHEMES"]

import importlib
import inspect
import os
import re
import threading
from dataclasses import dataclass
from typing import Any

from ckptfmt.errors import FrameworkNotAvailableError, UnsupportedURLError
from ckptfmt.storage.base import Storage
from ckptfmt.storage.local import LocalStorage


@dataclass(frozen=True, slots=True)
class _Scheme:
    protocol: str  # the fsspec protocol and our canonical scheme
    module: str  # what must be importable
    package: str  # the pip package that provides it
    extra: str  # the ckptfmt extra that installs it


#: URL scheme -> backend. Aliases map to one canonical protocol.
SCHEMES: dict[str, _Scheme] = {
    "s3": _Scheme("s3", "s3fs", "s3fs", "s3"),
    "s3a": _Scheme("s3", "s3fs", "s3fs", "s3"),
    "gs": _Scheme("gs", "gcsfs", "gcsfs", "gcs"),
    "gcs": _Scheme("gs", "gcsfs", "gcsfs", "gcs"),
    "az": _Scheme("az", "adlfs", "adlfs", "azure"),
    "abfs": _Scheme("az", "adlfs", "adlfs", "azure"),
    "abfss": _Scheme("az", "adlfs", "adlfs", "azure"),
    "memory": _Scheme("memory", "fsspec", "fsspec", "fsspec"),
}

# Two or more letters before ':' (a one-letter scheme would be a Windows drive).
_URL_RE = re.compile(r"^([A-Za-z][A-Za-z0-9+.\-]+):/")

_cache: dict[tuple, Storage] = {}
_cache_lock = threading.Lock()
_cache_pid = os.getpid()


def is_url(path: Any) -> bool:
    """True for a string that starts like a URL (``scheme:/...``).

    Example:
        >>> is_url("s3://bucket/ck"), is_url("/tmp/ck"), is_url("runs/ck")
        (True, False, False)
    """
    return isinstance(path, str) and _URL_RE.match(path) is not None


def _scheme_of(url: str) -> tuple[str, str]:
    m = _URL_RE.match(url)
    assert m is not None
    scheme = m.group(1).lower()
    rest = url[m.end(1) + 1 :]
    if not rest.startswith("//"):
        raise UnsupportedURLError(
            f"{url!r} looks like a URL with one slash after '{scheme}:'; write {scheme}://... "
            f"(or ./{url} for a local directory of that name)"
        )
    return scheme, rest[2:]


def _fsspec_storage(sch: _Scheme, options: dict) -> Storage:
    try:
        importlib.import_module(sch.module)
        import fsspec
    except ImportError:
        raise FrameworkNotAvailableError(sch.package, sch.extra, feature=f"{sch.protocol}:// URLs") from None
    from ckptfmt.storage.fsspec import FsspecStorage

    opts = dict(options)
    if sch.protocol in ("s3", "gs", "az"):
        # Another process may write at any time: never answer from a cached listing.
        opts.setdefault("use_listings_cache", False)
    fs = fsspec.filesystem(sch.protocol, **opts)
    if sch.protocol == "s3" and "mode" not in inspect.signature(fs._pipe_file).parameters:
        raise FrameworkNotAvailableError(
            "s3fs with conditional writes (2025.2 or newer)", "s3", feature="committing checkpoints atomically on S3"
        )
    return FsspecStorage(fs, sch.protocol)


def resolve(path: Any, storage: Storage | None = None, storage_options: dict | None = None) -> tuple[Storage, str]:
    """The storage backend for ``path`` and the path as that backend names it.

    Args:
        path: a local path (str or ``os.PathLike``), ``file://...``, or an object-store URL
            (``s3://``, ``gs://``, ``az://``/``abfs://``, ``memory://``).
        storage: an explicit backend; ``path`` is then used as it is.
        storage_options: keyword arguments for the fsspec filesystem (credentials,
            ``endpoint_url``...). Without them the backend's usual sources are used (for S3:
            ``AWS_ACCESS_KEY_ID``, ``AWS_ENDPOINT_URL``, ``~/.aws``...).

    Raises:
        UnsupportedURLError: a URL scheme no backend handles.
        FrameworkNotAvailableError: the scheme's backend is not installed (names the extra).

    Example:
        >>> s, p = resolve("memory://doc/ck"); type(s).__name__, p
        ('FsspecStorage', 'memory://doc/ck')
        >>> type(resolve("/tmp/ck")[0]).__name__
        'LocalStorage'
    """
    global _cache_pid
    if storage is not None:
        if storage_options:
            raise ValueError("pass either storage= or storage_options=, not both")
        return storage, os.fspath(path)
    if not isinstance(path, str):
        path = os.fspath(path)
        if isinstance(path, bytes):
            path = os.fsdecode(path)
    if not is_url(path):
        if storage_options:
            raise ValueError(f"storage_options apply to URLs; {path!r} is a local path")
        return LocalStorage(), path
    scheme, rest = _scheme_of(path)
    if scheme == "file":
        if storage_options:
            raise ValueError("storage_options do not apply to file:// URLs")
        if not rest.startswith("/"):
            raise UnsupportedURLError(f"{path!r}: a file:// URL needs an absolute path (file:///dir/ck)")
        return LocalStorage(), rest
    sch = SCHEMES.get(scheme)
    if sch is None:
        known = ", ".join(sorted({f"{s}://" for s in SCHEMES} | {"file://"}))
        raise UnsupportedURLError(
            f"{path!r}: URL scheme '{scheme}://' is not supported (supported: {known}); "
            "for a local directory, give a path without a scheme"
        )
    if not rest.strip("/"):
        raise UnsupportedURLError(f"{path!r} names no bucket or path")
    url = f"{sch.protocol}://{rest}".rstrip("/")
    key = (sch.protocol, tuple(sorted((k, repr(v)) for k, v in (storage_options or {}).items())))
    with _cache_lock:
        if _cache_pid != os.getpid():  # connections do not survive a fork
            _cache.clear()
            _cache_pid = os.getpid()
        st = _cache.get(key)
        if st is None:
            st = _cache[key] = _fsspec_storage(sch, storage_options or {})
    return st, url
