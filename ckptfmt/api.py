"""The public verbs: ``save``, ``load``, ``open``, ``verify``.

This module (with its private helpers ``_writer``, ``_reader`` and ``_verify``) is where
the format, the storage and the adapters meet.
"""

from __future__ import annotations

__all__ = ["save", "load", "open", "verify", "CheckpointReader", "TensorSlicer", "VerifyReport", "Problem"]

import os
from typing import Any

from ckptfmt._reader import CheckpointReader, TensorSlicer, open_reader
from ckptfmt._verify import Problem, VerifyReport, verify_checkpoint
from ckptfmt._writer import write_checkpoint
from ckptfmt.format.hashing import DEFAULT_HASH
from ckptfmt.format.spec import DEFAULT_CHUNK_SIZE
from ckptfmt.storage.base import Storage
from ckptfmt.storage.urls import is_url, resolve

PathLike = str | os.PathLike


def _resolve(path: PathLike, storage: Storage | None, storage_options: dict | None) -> tuple[Storage, str]:
    return resolve(path, storage, storage_options)


def save(
    state: Any,
    path: PathLike,
    *,
    metadata: Any = None,
    overwrite: bool = False,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    hash_alg: str = DEFAULT_HASH,
    sync: bool = True,
    progress: bool | None = None,
    producer: dict | None = None,
    parent: PathLike | None = None,
    shared_store: bool | None = None,
    storage: Storage | None = None,
    storage_options: dict | None = None,
) -> str:
    """Save a state tree as a checkpoint directory.

    The data is streamed chunk by chunk (peak memory stays near one chunk per worker
    beyond the state itself), every chunk is hashed, and the manifest is written last and
    renamed into place: a save that dies halfway leaves no checkpoint (and any previous
    checkpoint at ``path`` intact).

    Args:
        state: nested dicts (str or int keys), lists and tuples whose leaves are numpy
            arrays/scalars or plain values (int, float, bool, str, bytes, None). The same
            array object appearing twice is stored once and loaded back as one array.
        path: the checkpoint directory to create: a local path or an object-store URL
            (``s3://bucket/runs/ck``, ``gs://``, ``az://``, ``memory://``; see
            :func:`ckptfmt.storage.urls.resolve`).
        metadata: any msgpack-serialisable value, returned by ``open(path).metadata``.
        overwrite: replace an existing checkpoint at ``path`` (atomically).
        chunk_size: bytes per chunk (a multiple of 64 between 4 KiB and 1 GiB).
        hash_alg: ``"blake3"`` (default) or ``"sha256"``.
        sync: fsync data and manifest before returning (turn off only for scratch data).
        progress: show a progress bar (default: on a terminal, for large states).
        producer: extra producer information (e.g. framework versions) for the manifest.
        parent: an earlier checkpoint in the same directory as ``path`` (an *incremental*
            save). Chunks equal to those the parent keeps in the run's shared store are not
            written again. The result is still complete to every reader, and ``rm -r`` of
            any checkpoint directory never breaks another one.
        shared_store: keep the data in the run's shared store ``ckptfmt-store/`` beside
            ``path`` (default: when ``parent`` is given), so that later incremental saves can
            share it. The checkpoint directory then holds only its manifest: copy it with
            ``ckptfmt compact SRC --to DST``, not ``cp -r``.
        storage: a storage backend (default: chosen from ``path``).
        storage_options: options for an object store's fsspec filesystem (credentials,
            ``endpoint_url``); by default the usual environment (``AWS_ENDPOINT_URL``...).

    Returns:
        The checkpoint's identity: the hex hash of its manifest.

    Raises:
        CheckpointExistsError: a checkpoint exists at ``path`` and ``overwrite`` is false.
        CheckpointLockedError: a shared-store save waited 10 s for a gc or manager.
        UnsupportedDtypeError: a leaf cannot be stored. StorageError: an I/O error.

    Example:
        >>> import numpy as np, ckptfmt, tempfile, os
        >>> p = os.path.join(tempfile.mkdtemp(), "ck")
        >>> _ = ckptfmt.save({"w": np.zeros((4, 4), np.float32), "step": 3}, p, metadata={"run": "a"})
    """
    explicit = storage is not None
    storage, path = _resolve(path, storage, storage_options)
    if parent is not None:
        if explicit:
            parent = os.fspath(parent)
        else:
            # Resolved on its own, so an unsupported URL is refused as such.
            p_storage, parent = _resolve(parent, None, storage_options if is_url(path) else None)
            if type(p_storage) is not type(storage) or getattr(p_storage, "protocol", None) != getattr(storage, "protocol", None):
                raise ValueError(f"the parent {parent} and the new checkpoint {path} must be on the same storage")
    return write_checkpoint(
        state,
        path,
        storage,
        metadata=metadata,
        overwrite=overwrite,
        chunk_size=chunk_size,
        hash_alg=hash_alg,
        sync=sync,
        progress=progress,
        producer=producer,
        parent=parent,
        shared_store=shared_store,
    )


def open(  # noqa: A001
    path: PathLike, *, verify: bool = True, storage: Storage | None = None, storage_options: dict | None = None
) -> CheckpointReader:
    """Open a checkpoint lazily: the manifest now, tensor data when asked for.

    Args:
        path: a checkpoint directory.
        verify: check chunk hashes on every read (default); pass False for trusted data.
        storage: a storage backend (default: chosen from ``path``).
        storage_options: options for an object store's filesystem (see :func:`save`).

    Raises:
        CheckpointNotFoundError: no complete checkpoint at ``path``.
        FormatError: the manifest is malformed. IntegrityError: its hash does not match.

    Example:
        >>> import numpy as np, ckptfmt, tempfile, os
        >>> p = os.path.join(tempfile.mkdtemp(), "ck")
        >>> _ = ckptfmt.save({"a": np.arange(6).reshape(2, 3)}, p)
        >>> r = ckptfmt.open(p); r.keys(), r.get("a").shape
        (['a'], (2, 3))
    """
    storage, path = _resolve(path, storage, storage_options)
    return open_reader(path, storage, verify=verify)


def load(
    path: PathLike,
    *,
    verify: bool = True,
    mmap: bool = False,
    storage: Storage | None = None,
    storage_options: dict | None = None,
) -> Any:
    """Load a whole checkpoint: the saved tree with numpy arrays at tensor leaves.

    Args:
        path: a checkpoint directory.
        verify: check every chunk's hash (default); pass False for trusted data.
        mmap: return read-only memory-mapped arrays instead of copies (zero-copy).
        storage: a storage backend (default: chosen from ``path``).
        storage_options: options for an object store's filesystem (see :func:`save`).

    Raises:
        CheckpointNotFoundError, FormatError, IntegrityError (naming tensor, chunk, file, offset).

    Example:
        >>> import numpy as np, ckptfmt, tempfile, os
        >>> p = os.path.join(tempfile.mkdtemp(), "ck")
        >>> _ = ckptfmt.save({"a": (np.ones(2), None)}, p)
        >>> ckptfmt.load(p)
        {'a': (array([1., 1.]), None)}
    """
    with open(path, verify=verify, storage=storage, storage_options=storage_options) as reader:
        return reader.load(mmap=mmap)


def verify(
    path: PathLike, *, progress: bool | None = None, storage: Storage | None = None, storage_options: dict | None = None
) -> VerifyReport:
    """Check a checkpoint completely without loading it into memory.

    Re-hashes every chunk, checks the manifest's own hash, and finds missing, truncated,
    extended and extra files. Corruption is reported, not raised.

    Args:
        path: a checkpoint directory.
        progress: show a progress bar (default: on a terminal, for large checkpoints).
        storage: a storage backend (default: chosen from ``path``).
        storage_options: options for an object store's filesystem (see :func:`save`).

    Returns:
        A :class:`VerifyReport`; ``report.ok`` is true when no error was found.

    Raises:
        CheckpointNotFoundError: there is no checkpoint at ``path`` at all.

    Example:
        >>> import numpy as np, ckptfmt, tempfile, os
        >>> p = os.path.join(tempfile.mkdtemp(), "ck")
        >>> _ = ckptfmt.save({"a": np.ones(3)}, p)
        >>> ckptfmt.verify(p).ok
        True
    """
    storage, path = _resolve(path, storage, storage_options)
    return verify_checkpoint(path, storage, progress=progress)
