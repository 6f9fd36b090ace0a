"""Deleting checkpoints safely: ``gc``, ``remove`` and ``compact``, all through Storage.

Incremental checkpoints (1.2) keep their data in the run's shared store, referenced by the
manifests that use it; older runs (1.1) may refer to sibling checkpoint directories. Nothing
is deleted while any complete checkpoint refers to it, and nothing is deleted that the
format does not positively identify as its own (see ``_layout``).
"""

from __future__ import annotations

import contextlib
import os
import re
import warnings
from dataclasses import dataclass, field

from ckptfmt._layout import Sweep, free_unpublished, read_checkpoint, read_marker, split, sweep_dirs, sweep_store, unpublish, view
from ckptfmt._lock import DEFAULT_LOCK_TIMEOUT, run_lock
from ckptfmt._reader import open_reader
from ckptfmt._writer import DeferredTensor, write_checkpoint
from ckptfmt.errors import CheckpointNotFoundError, CkptFmtError, FormatError, UnsafePathError
from ckptfmt.format.spec import LOCK_NAME, MANIFEST_NAME, STORE_FILE_RE, STORE_NAME
from ckptfmt.format.tree import TensorRef
from ckptfmt.storage.base import Storage
from ckptfmt.storage.urls import is_url, resolve

#: Files outside the store younger than this may belong to a save still in progress elsewhere
#: (saves of self-contained checkpoints take no lock).
DEFAULT_GRACE_SECONDS = 600.0


@dataclass(frozen=True, slots=True)
class GcReport:
    """What :func:`gc` deleted (or would delete, with ``dry_run``) and what it kept."""

    directory: str
    deleted: tuple[str, ...] = ()
    freed_bytes: int = 0
    kept_young: tuple[str, ...] = ()
    unreadable: tuple[str, ...] = field(default_factory=tuple)
    dry_run: bool = False
    #: why nothing was deleted (e.g. a manifest refers to data through a symbolic link)
    refused: tuple[str, ...] = ()


def _report(directory: str, out: Sweep, v, dry_run: bool) -> GcReport:
    return GcReport(directory, tuple(out.deleted), out.freed, tuple(out.young), tuple(v.unreadable), dry_run, tuple(v.problems))


def collect(storage: Storage, directory: str, *, dry_run: bool = False, grace_seconds: float = DEFAULT_GRACE_SECONDS,
            locked: bool = True) -> GcReport:
    """Delete what no complete checkpoint of ``directory`` uses. The caller holds the lock
    exclusively when ``locked`` (then the store needs no grace: its writers hold it shared)."""
    v = view(storage, directory)
    out = Sweep()
    sweep_store(storage, v, grace=0.0 if locked else grace_seconds, dry_run=dry_run, out=out)
    sweep_dirs(storage, v, grace=grace_seconds, dry_run=dry_run, out=out)
    return _report(directory, out, v, dry_run)


def gc(directory: str | os.PathLike, *, dry_run: bool = False, grace_seconds: float = DEFAULT_GRACE_SECONDS,
       storage: Storage | None = None, timeout: float = DEFAULT_LOCK_TIMEOUT,
       storage_options: dict | None = None) -> GcReport:
    """Free the data no complete checkpoint in ``directory`` refers to.

    Deletes unreferenced files of the run's shared store, unreferenced data files in
    checkpoint directories and the leftovers of interrupted saves, and nothing else: no
    file the format did not name, nothing behind a symbolic link, nothing outside
    ``directory``. If any manifest cannot be read, nothing is deleted.

    Args:
        directory: the run directory holding checkpoint directories (e.g. a manager's).
        dry_run: report what would be deleted, delete nothing (works without write access).
        grace_seconds: keep unreferenced files outside the store modified more recently than
            this (a save of a self-contained checkpoint may still be writing them).
        storage: a storage backend (default: the local filesystem).
        timeout: seconds to wait for a CheckpointManager or save using the directory.

    Raises:
        CheckpointNotFoundError: ``directory`` does not exist.
        CheckpointLockedError: the directory stayed in use for ``timeout`` seconds.

    Example:
        >>> import ckptfmt, tempfile
        >>> ckptfmt.gc(tempfile.mkdtemp()).deleted
        ()
    """
    storage, directory = resolve(directory, storage, storage_options)
    if not storage.isdir(directory):
        raise CheckpointNotFoundError(f"no directory {directory}")
    if dry_run:  # deletes nothing: a reader, which never locks (and needs no write access)
        return collect(storage, directory, dry_run=True, grace_seconds=grace_seconds)
    with run_lock(storage, directory, timeout=timeout):
        return collect(storage, directory, dry_run=dry_run, grace_seconds=grace_seconds)


@dataclass(frozen=True, slots=True)
class RunInfo:
    """A run directory at a glance: its checkpoints and its shared store (see :func:`run_info`)."""

    directory: str
    checkpoints: tuple[str, ...]
    store_files: int = 0
    store_bytes: int = 0
    unreferenced_bytes: int = 0
    is_store: bool = False
    #: directories with a MANIFEST that cannot be read (or is a symbolic link): damaged checkpoints
    unreadable: tuple[str, ...] = ()


def _natural(name: str) -> list:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def run_info(directory: str | os.PathLike, *, storage: Storage | None = None, storage_options: dict | None = None) -> RunInfo:
    """The checkpoints of a run directory and what its shared store holds (read-only).

    ``is_store`` is true when ``directory`` is itself a run's ``ckptfmt-store``.

    Example:
        >>> import numpy as np, ckptfmt, tempfile, os
        >>> d = tempfile.mkdtemp(); _ = ckptfmt.save({"a": np.ones(2)}, os.path.join(d, "s1"), shared_store=True)
        >>> info = ckptfmt.run_info(d); [os.path.basename(c) for c in info.checkpoints], info.store_files
        (['s1'], 1)
    """
    storage, directory = resolve(directory, storage, storage_options)
    parent, name = split(directory)
    if name == STORE_NAME and read_marker(storage, parent):
        return RunInfo(directory, (), is_store=True)
    v = view(storage, directory)
    names = sorted(v.manifests, key=_natural)
    files = [e for e in storage.scan(storage.join(directory, STORE_NAME)) if e.kind == "file" and STORE_FILE_RE.match(e.name)] if v.store else []
    unref = sum(e.size for e in files if (STORE_NAME, e.name) not in v.refs)
    return RunInfo(directory, tuple(storage.join(directory, n) for n in names), len(files), sum(e.size for e in files), unref,
                   unreadable=tuple(v.unreadable))


def _checkpoint_entry(storage: Storage, path: str) -> tuple[str, str]:
    directory, name = split(path)
    e = {x.name: x for x in storage.scan(directory)}.get(name)
    if e is None:
        raise CheckpointNotFoundError(f"no checkpoint at {path}")
    if e.kind == "link":
        raise UnsafePathError(
            f"{path} is a symbolic link; ckptfmt never deletes through links: delete the link itself "
            f"(rm {path}) or remove the checkpoint it points to by its real path"
        )
    if e.kind != "dir" or name == STORE_NAME:
        raise CheckpointNotFoundError(f"{path} is not a checkpoint directory")
    return directory, name


def remove_locked(storage: Storage, directory: str, names: list[str], *,
                  grace_seconds: float = DEFAULT_GRACE_SECONDS) -> GcReport:
    """Delete the checkpoints ``names`` of ``directory`` (lock held exclusively) and free their data.

    Frees the files the removed manifests listed that no other manifest lists (the store's at
    once), and files of their own directories the format names that are older than
    ``grace_seconds``; never other unreferenced store files (they may belong to a checkpoint
    moved out of the run for a while: ``gc`` frees those).
    """
    used: set[tuple[str, str]] = set()
    for name in names:
        used |= unpublish(storage, directory, name, grace=grace_seconds)
    v, out = free_unpublished(storage, directory, used)
    for name in names:
        ck = storage.join(directory, name)
        if not storage.scan(ck):
            storage.rmdir(ck)
    return _report(directory, out, v, False)


def remove(path: str | os.PathLike, *, storage: Storage | None = None, timeout: float = DEFAULT_LOCK_TIMEOUT,
           storage_options: dict | None = None) -> GcReport:
    """Delete a checkpoint without breaking others that share its data.

    The manifest goes first (durably: the checkpoint stops existing), then every file of
    its own and every shared data file that no other checkpoint beside it refers to. A
    symbolic link is refused (delete the link itself, or name the real directory).

    Args:
        path: the checkpoint directory.
        storage: a storage backend (default: the local filesystem).
        timeout: seconds to wait while a gc, manager or save uses the run directory.

    Raises:
        CheckpointNotFoundError: there is no checkpoint at ``path``.
        UnsafePathError: ``path`` is a symbolic link.
        CheckpointLockedError: the run directory stayed in use for ``timeout`` seconds.

    Example:
        >>> import numpy as np, ckptfmt, tempfile, os
        >>> p = os.path.join(tempfile.mkdtemp(), "ck"); _ = ckptfmt.save({"a": np.ones(2)}, p)
        >>> _ = ckptfmt.remove(p); os.path.exists(p)
        False
    """
    storage, path = resolve(path, storage, storage_options)
    directory, name = _checkpoint_entry(storage, path)
    with _removal_lock(storage, directory, path, timeout):
        if not any(e.name == MANIFEST_NAME and e.kind == "file" for e in storage.scan(path)):
            raise CheckpointNotFoundError(f"no complete checkpoint at {path} (it has no {MANIFEST_NAME})")
        report = remove_locked(storage, directory, [name])
    warn_refused(report, stacklevel=3)
    return report


def _removal_lock(storage: Storage, directory: str, path: str, timeout: float):
    """The run's lock, unless ``path`` is a lone self-contained checkpoint.

    A checkpoint that refers to nothing outside its directory, in a directory that has no
    store and no lock file (so no manager, store save or gc ever used it), shares data with
    nobody: removing it needs no lock, and no ``.ckptfmt.lock`` is left in a user's folder.
    """
    names = {e.name for e in storage.scan(directory)}
    if LOCK_NAME not in names and STORE_NAME not in names:
        try:
            m = read_checkpoint(storage, directory, split(path)[1])
        except (OSError, CkptFmtError):
            m = None
        if m is not None and not any(f.path.startswith("../") for f in m.files):
            return contextlib.nullcontext()
    return run_lock(storage, directory, timeout=timeout)


def warn_refused(report: GcReport, *, stacklevel: int = 2) -> None:
    """Warn, naming the cause, when a removal freed nothing because deleting was unsafe."""
    why = [*(f"{u} has a MANIFEST that cannot be read (or is a symbolic link)" for u in report.unreadable), *report.refused]
    if why:
        warnings.warn(f"{report.directory}: no data was freed, since {why[0]}; it may refer to any data. Fix it or move "
                      f"it out of the run directory, then run `ckptfmt gc {report.directory}`", stacklevel=stacklevel + 1)


def _deferred_state(reader):
    """The checkpoint's tree with each tensor read only when the writer reaches it."""
    memo: dict[int, DeferredTensor] = {}

    def leaf(ref: TensorRef) -> DeferredTensor:
        d = memo.get(ref.index)
        if d is None:
            e = reader.info(ref.name)
            d = memo[ref.index] = DeferredTensor(e.shape, e.numpy_dtype, lambda n=ref.name: reader.get(n))
        return d

    def walk(node):
        if isinstance(node, TensorRef):
            return leaf(node)
        if isinstance(node, dict):
            return {k: walk(v) for k, v in node.items()}
        if isinstance(node, list):
            return [walk(v) for v in node]
        if isinstance(node, tuple):
            return tuple(walk(v) for v in node)
        return node

    return walk(reader.tree)


def compact(path: str | os.PathLike, *, to: str | os.PathLike | None = None, storage: Storage | None = None,
            storage_options: dict | None = None) -> str:
    """Rewrite a checkpoint as a self-contained one: all its data in its own directory.

    In place (atomically) by default, or as a new checkpoint at ``to`` (a portable copy:
    ``cp -r``/``rsync -a`` of the result is complete). Tensors are streamed one at a time.
    Returns the new digest. Data the original shared becomes free for :func:`gc`. While it
    reads shared data it holds the run's lock shared (so it waits for, or is refused by, a
    CheckpointManager using the run).

    Args:
        path: the checkpoint.
        to: write the self-contained copy there instead of replacing ``path`` (it may be on
            another storage: ``compact("s3://b/run/step-9", to="/tmp/step-9")``).
        storage: a storage backend (default: chosen from ``path``).
        storage_options: options for an object store's filesystem (see :func:`ckptfmt.save`).

    Example:
        >>> import numpy as np, ckptfmt, tempfile, os
        >>> d = tempfile.mkdtemp(); a, b = os.path.join(d, "a"), os.path.join(d, "b")
        >>> _ = ckptfmt.save({"w": np.ones(4)}, a, shared_store=True)
        >>> _ = ckptfmt.save({"w": np.ones(4)}, b, parent=a)
        >>> _ = ckptfmt.compact(b); ckptfmt.open(b).manifest.parent is None
        True
    """
    explicit = storage is not None
    storage, path = resolve(path, storage, storage_options)
    if to is None:
        to_storage, dest = storage, path
    elif explicit:
        to_storage, dest = storage, os.fspath(to)
    else:
        to_storage, dest = resolve(to, None, storage_options if is_url(os.fspath(to)) else None)
    directory, _ = split(path)
    with open_reader(path, storage) as reader:
        m = reader.manifest
        if m.shards is not None:
            # loading would assemble the shards and the rewrite an unsharded checkpoint that
            # torch.distributed.checkpoint could no longer load
            raise FormatError(f"{path}: compacting a sharded checkpoint (written through torch.distributed.checkpoint) "
                              "is not supported; save it again without parent= to make it self-contained")
        shared = any(f.path.startswith("../") for f in m.files)
        # In place, reading shared data: hold the run's lock shared, so nobody deletes it
        # meanwhile. A copy (``to``) only reads the source, like any reader without a lock (so
        # it runs while a manager trains): every chunk is verified as read, and a file deleted
        # meanwhile fails the copy, which is committed only at its end.
        lock = run_lock(storage, directory, shared=True, timeout=DEFAULT_LOCK_TIMEOUT) if shared and to is None else None
        try:
            reader = open_reader(path, storage)  # re-read under the lock
            return write_checkpoint(_deferred_state(reader), dest, to_storage, metadata=m.metadata, overwrite=to is None,
                                    chunk_size=m.chunk_size, hash_alg=m.hash_alg, shared_store=False, lock_held=True)
        finally:
            reader.close()
            if lock is not None:
                lock.release()
