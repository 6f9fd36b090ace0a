"""Deleting checkpoints safely when incremental saves share data between them.

A checkpoint directory's data files may be referenced by other checkpoints in the same
parent directory (``../NAME/file`` paths). Nothing is deleted while any complete checkpoint
refers to it.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field

from ckptfmt._lock import DirectoryLock
from ckptfmt._reader import read_manifest
from ckptfmt.errors import CkptFmtError
from ckptfmt.format.spec import DATA_SUFFIX, MANIFEST_NAME, MANIFEST_TMP_PREFIX
from ckptfmt.storage.local import LocalStorage
from ckptfmt.storage.urls import check_local

#: Files younger than this may belong to a save still in progress elsewhere.
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


def _references(directory: str) -> tuple[set[str], list[str]]:
    """Absolute paths of every data file some complete checkpoint in ``directory`` uses."""
    storage = LocalStorage()
    refs: set[str] = set()
    unreadable: list[str] = []
    for name in sorted(os.listdir(directory)):
        ck = os.path.join(directory, name)
        if not os.path.isfile(os.path.join(ck, MANIFEST_NAME)):
            continue
        try:
            m = read_manifest(ck, storage)
        except CkptFmtError:
            unreadable.append(ck)
            continue
        for fe in m.files:
            refs.add(os.path.normpath(os.path.join(ck, fe.path)))
    return refs, unreadable


def collect(directory: str, *, dry_run: bool = False, grace_seconds: float = DEFAULT_GRACE_SECONDS,
            only: set[str] | None = None) -> GcReport:
    """Delete unreferenced data files and leftovers in the checkpoints under ``directory``.

    The caller must hold the directory lock (or accept the grace period as protection).
    ``only`` restricts deletion to these absolute paths.
    """
    directory = os.path.abspath(directory)
    refs, unreadable = _references(directory)
    if unreadable:
        # A manifest we cannot read may refer to anything: delete nothing.
        return GcReport(directory, unreadable=tuple(unreadable), dry_run=dry_run)
    now = time.time()
    deleted: list[str] = []
    young: list[str] = []
    freed = 0
    for name in sorted(os.listdir(directory)):
        ck = os.path.join(directory, name)
        if not os.path.isdir(ck):
            continue
        for fname in sorted(os.listdir(ck)):
            fpath = os.path.join(ck, fname)
            if not (fname.endswith(DATA_SUFFIX) or fname.startswith(MANIFEST_TMP_PREFIX)) or fpath in refs:
                continue
            if only is not None and fpath not in only:
                continue
            try:
                st = os.stat(fpath)
            except FileNotFoundError:
                continue
            if now - st.st_mtime < grace_seconds:
                young.append(fpath)
                continue
            if not dry_run:
                try:
                    os.unlink(fpath)
                except FileNotFoundError:
                    continue
            deleted.append(fpath)
            freed += st.st_size
        if not dry_run and not os.path.exists(os.path.join(ck, MANIFEST_NAME)):
            try:
                os.rmdir(ck)  # only succeeds once nothing (still referenced) is left
            except OSError:
                pass
    return GcReport(directory, tuple(deleted), freed, tuple(young), (), dry_run)


def gc(directory: str | os.PathLike, *, dry_run: bool = False, grace_seconds: float = DEFAULT_GRACE_SECONDS) -> GcReport:
    """Free the data no complete checkpoint in ``directory`` refers to.

    Incremental checkpoints share data files; deleting a checkpoint (:func:`remove`) only
    unpublishes its manifest, and ``gc`` then frees what nobody needs any more, plus the
    leftovers of interrupted saves. Files younger than ``grace_seconds`` are kept, since a
    save may still be writing them.

    Args:
        directory: the directory holding checkpoint directories (e.g. a manager's).
        dry_run: report what would be deleted, delete nothing.
        grace_seconds: keep unreferenced files modified more recently than this.

    Raises:
        CheckpointLockedError: a CheckpointManager is using the directory.

    Example:
        >>> import ckptfmt, tempfile
        >>> ckptfmt.gc(tempfile.mkdtemp()).deleted
        ()
    """
    directory = check_local(directory, "ckptfmt.gc")
    with DirectoryLock(directory):
        return collect(directory, dry_run=dry_run, grace_seconds=grace_seconds)


def free_files(directory: str, candidates: set[str]) -> None:
    """Delete the given files of ``directory``'s checkpoints unless some checkpoint uses them."""
    collect(directory, grace_seconds=0.0, only={os.path.normpath(os.path.abspath(c)) for c in candidates})


def remove(path: str | os.PathLike, *, grace_seconds: float = 0.0) -> GcReport:
    """Delete a checkpoint without breaking others that share its data.

    The manifest goes first (atomically: the checkpoint stops existing), then every data
    file that no other checkpoint beside it refers to.

    Raises:
        CheckpointNotFoundError: there is no checkpoint at ``path``.

    Example:
        >>> import numpy as np, ckptfmt, tempfile, os
        >>> p = os.path.join(tempfile.mkdtemp(), "ck"); _ = ckptfmt.save({"a": np.ones(2)}, p)
        >>> _ = ckptfmt.remove(p); os.path.exists(p)
        False
    """
    from ckptfmt.errors import CheckpointNotFoundError

    path = os.path.abspath(check_local(path, "ckptfmt.remove"))
    directory = os.path.dirname(path)
    with DirectoryLock(directory):
        mpath = os.path.join(path, MANIFEST_NAME)
        if not os.path.isfile(mpath):
            raise CheckpointNotFoundError(f"no checkpoint at {path}")
        os.unlink(mpath)
        LocalStorage().sync_dir(path)
        own = {os.path.join(path, f) for f in os.listdir(path)}
        return collect(directory, grace_seconds=grace_seconds, only=own)


def compact(path: str | os.PathLike) -> str:
    """Rewrite an incremental checkpoint as a self-contained one, atomically.

    Returns the new digest. Data it no longer needs from its ancestors is freed by
    :func:`gc` (their other dependants keep it alive).

    Example:
        >>> import numpy as np, ckptfmt, tempfile, os
        >>> d = tempfile.mkdtemp(); a, b = os.path.join(d, "a"), os.path.join(d, "b")
        >>> _ = ckptfmt.save({"w": np.ones(4)}, a); _ = ckptfmt.save({"w": np.ones(4)}, b, parent=a)
        >>> _ = ckptfmt.compact(b); ckptfmt.open(b).manifest.parent is None
        True
    """
    from ckptfmt.api import open as open_checkpoint
    from ckptfmt.api import save

    path = os.fspath(path)
    with open_checkpoint(path) as reader:
        state = reader.load()
        m = reader.manifest
        return save(state, path, metadata=m.metadata, overwrite=True, chunk_size=m.chunk_size, hash_alg=m.hash_alg)
