"""CheckpointManager: when to save, what to keep, and recovery after a crash.

Example:
    >>> import numpy as np, tempfile
    >>> from ckptfmt.manager import CheckpointManager
    >>> with CheckpointManager(tempfile.mkdtemp(), max_to_keep=2, save_interval_steps=10) as mgr:
    ...     for step in range(1, 41):
    ...         saved = mgr.save(step, {"w": np.full(3, float(step))})  # saves only every 10 steps
    ...     mgr.all_steps(), float(mgr.restore()["w"][0])
    ([30, 40], 40.0)
"""

from __future__ import annotations

__all__ = ["CheckpointManager", "HistoryEntry", "history"]

import errno
import os
import re
import threading
import time
import warnings
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np

from ckptfmt._gc import DEFAULT_GRACE_SECONDS, GcReport, remove_locked, warn_refused
from ckptfmt._layout import STORE_PREFIX, Sweep, sweep_dirs, sweep_store, view
from ckptfmt._lock import run_lock
from ckptfmt._reader import read_manifest
from ckptfmt._writer import is_tensor_leaf, write_checkpoint
from ckptfmt.api import load
from ckptfmt.errors import CheckpointLockedError, CheckpointNotFoundError, CkptFmtError, FormatError, StorageError
from ckptfmt.format.spec import DEFAULT_CHUNK_SIZE, MANIFEST_NAME, STORE_FILE_RE, STORE_NAME
from ckptfmt.storage.base import Storage
from ckptfmt.storage.local import LocalStorage
from ckptfmt.storage.urls import resolve

#: The clock the time trigger reads (tests replace it).
_clock = time.monotonic
#: A manager's checkpoints are ``step-N`` with N in canonical decimal (``step-007`` is not one).
_STEP_RE = re.compile(r"^step-(0|[1-9][0-9]*)$")
_READ_ONLY = (errno.EROFS, errno.EACCES, errno.EPERM)


def _step_dirs(directory: str, storage: Storage, *, own: bool = False) -> dict[int, str]:
    """Complete checkpoints under ``directory``, by step.

    Listed (for restore and ``log``): ``step-N`` directories with a MANIFEST, including a
    ``step-N`` that is a symbolic link (a step moved to another disk and linked back) or
    whose MANIFEST is one. With ``own``, only the manager's own: real directories holding a
    real MANIFEST file; retention counts and deletes only those, and builds only on those,
    so nothing is ever deleted through a link.
    """
    out: dict[int, str] = {}
    for e in storage.scan(directory):
        m = _STEP_RE.match(e.name)
        if not m or e.kind not in (("dir",) if own else ("dir", "link")):
            continue
        path = storage.join(directory, e.name)
        if e.kind == "dir":
            inside = {x.name: x for x in storage.scan(path)}.get(MANIFEST_NAME)
            ok = inside is not None and (inside.kind == "file" or (not own and storage.exists(storage.join(path, MANIFEST_NAME))))
        else:
            ok = storage.exists(storage.join(path, MANIFEST_NAME))
        if ok:
            out[int(m.group(1))] = path
    return dict(sorted(out.items()))


class _Snapshotter:
    """Copies a tree's arrays into host buffers that are reused from one save to the next.

    Fresh memory is slow to fault in (seconds per GiB on some machines); copying into the
    buffers of the previous snapshot, once its save has committed, avoids paying that on
    every async save.

    A reused buffer still holds the previous snapshot, so the copy first compares each
    chunk with it (a memory compare, several times faster than hashing) and copies only
    the chunks that differ. ``same`` then tells, per buffer, which chunks are unchanged
    since the previous snapshot: an incremental save whose parent was written from that
    snapshot records them without hashing them again. A buffer is compared only when it
    sits at the same tree position (the same keys from the root) as before, so the tensor
    it holds has the same name in both saves.
    """

    def __init__(self, chunk_size: int) -> None:
        self.chunk_size = chunk_size
        self._buffers: list[np.ndarray] = []
        self._paths: list[tuple] = []
        #: id(buffer) -> per-chunk bool (unchanged since the previous snapshot), for the last copy.
        self.same: dict[int, np.ndarray] = {}

    def copy(self, tree: Any) -> Any:
        memo: dict[int, Any] = {}
        fresh: list[np.ndarray] = []
        paths: list[tuple] = []
        same: dict[int, np.ndarray] = {}

        def leaf(x: Any, path: tuple) -> np.ndarray:
            src = np.asarray(x)
            i = len(fresh)
            buf = self._buffers[i] if i < len(self._buffers) else None
            if buf is None or buf.shape != src.shape or buf.dtype != src.dtype:
                buf = np.empty_like(src, order="C")
                np.copyto(buf, src)
            elif self._paths[i] == path and src.flags.c_contiguous:
                same[id(buf)] = _compare_copy(buf, src, self.chunk_size)
            else:
                np.copyto(buf, src)
            fresh.append(buf)
            paths.append(path)
            return buf

        def walk(node: Any, path: tuple) -> Any:
            if is_tensor_leaf(node):
                got = memo.get(id(node))
                if got is None:
                    got = memo[id(node)] = leaf(node, path)
                return got
            if isinstance(node, dict):
                return {k: walk(v, (*path, k)) for k, v in node.items()}
            if isinstance(node, list):
                return [walk(v, (*path, i)) for i, v in enumerate(node)]
            if isinstance(node, tuple):
                return tuple(walk(v, (*path, i)) for i, v in enumerate(node))
            return node

        out = walk(tree, ())
        self._buffers, self._paths, self.same = fresh, paths, same
        return out


def _compare_copy(buf: np.ndarray, src: np.ndarray, chunk_size: int) -> np.ndarray:
    """Copy ``src`` into ``buf`` chunk by chunk, copying only chunks that differ.

    Returns a bool per chunk: True where the chunk was already equal (byte for byte).
    """
    dst = buf.reshape(-1).view(np.uint8)
    new = src.reshape(-1).view(np.uint8)
    n = dst.size
    same = np.zeros(-(-n // chunk_size), bool)
    for k in range(len(same)):
        a, b = k * chunk_size, min(n, (k + 1) * chunk_size)
        x, y = dst[a:b], new[a:b]
        w = (b - a) // 8 * 8  # chunk starts are multiples of 64: compare 8 bytes at a time
        if np.array_equal(x[:w].view(np.uint64), y[:w].view(np.uint64)) and np.array_equal(x[w:], y[w:]):
            same[k] = True
        else:
            x[...] = y
    return same


class CheckpointManager:
    """Owns a directory of ``step-N`` checkpoints: triggers, retention, async saves, recovery.

    Call :meth:`save` every step; it saves only when a trigger fires (``save_interval_steps``,
    ``save_interval_seconds``; with neither, every call saves) or when ``force=True``.

    Args:
        directory: where the ``step-N`` checkpoint directories live (created if needed).
        max_to_keep: keep the newest this many checkpoints (None: keep all).
        keep_every_n_steps: also keep, forever, every checkpoint whose step is a multiple.
        save_interval_steps: save when ``step % save_interval_steps == 0``.
        save_interval_seconds: save when this long has passed since the last save.
        incremental: write only the chunks that changed since the previous checkpoint.
        max_chain: at most this many incremental saves in a row before a full one, so a
            restore never depends on a long history of directories.
        async_save: :meth:`save` returns once the state is copied to host memory; a
            background thread writes, hashes and commits. Its errors are raised by the next
            call to :meth:`save`, :meth:`wait`, :meth:`restore` or :meth:`close`.
        chunk_size: chunk size for full saves.
        sync: fsync each save before it counts as done.
        storage: a storage backend (default: chosen from ``directory``, which may be a URL:
            ``CheckpointManager("s3://bucket/runs/a")``).
        storage_options: options for an object store's filesystem (see :func:`ckptfmt.save`).

    Raises:
        CheckpointLockedError: another manager (in this process or another), a gc or a
            save into the shared store is using ``directory``.

    With ``incremental`` (the default) every save keeps its data in the run's shared store
    ``DIR/ckptfmt-store/`` and its ``step-N`` directory holds only the manifest, so deleting
    any ``step-N`` with ``rm -r`` never breaks another checkpoint (spec section 11).

    On start, leftovers of a killed self-contained save are removed once older than the gc
    grace period; store files no checkpoint uses are kept with a warning (they may be the data
    of a step moved out of the run for a while: ``ckptfmt gc`` frees them). Retention frees
    only what the dropped steps used. A ``step-N`` symbolic link is listed and restored, never
    deleted. :meth:`latest_step` only ever names complete checkpoints. A directory the process may not write is opened read-only:
    restore and the listing work, :meth:`save` raises StorageError.
    """

    def __init__(
        self,
        directory: str | os.PathLike,
        *,
        max_to_keep: int | None = 5,
        keep_every_n_steps: int | None = None,
        save_interval_steps: int | None = None,
        save_interval_seconds: float | None = None,
        incremental: bool = True,
        max_chain: int = 8,
        async_save: bool = False,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
        sync: bool = True,
        storage: Storage | None = None,
        storage_options: dict | None = None,
    ) -> None:
        if max_to_keep is not None and max_to_keep < 1:
            raise ValueError("max_to_keep must be at least 1 (or None to keep everything)")
        from ckptfmt.format.manifest import ManifestBuilder

        ManifestBuilder(chunk_size=chunk_size)  # the save's own check, now and not in the first (background) save
        explicit = storage is not None
        self.storage, self.directory = resolve(directory, storage, storage_options)
        if not explicit and isinstance(self.storage, LocalStorage):
            self.directory = os.path.abspath(self.directory)
        self.max_to_keep = max_to_keep
        self.keep_every_n_steps = keep_every_n_steps
        self.save_interval_steps = save_interval_steps
        self.save_interval_seconds = save_interval_seconds
        self.incremental = incremental
        self.max_chain = max(1, max_chain)
        self.async_save = async_save
        self.chunk_size = chunk_size
        self.sync = sync
        self._lock = None
        self._pid = os.getpid()
        #: path -> (digest, {store file: (size, mtime)}) of checkpoints this manager committed
        self._written: dict[str, tuple[str, dict[str, tuple[int, float]]]] = {}
        self.read_only = False
        try:
            if not self.storage.isdir(self.directory):
                self.storage.makedirs(self.directory)
            self._lock = run_lock(self.storage, self.directory)
        except CheckpointLockedError:
            raise
        except OSError as e:
            if e.errno not in _READ_ONLY or not self.storage.isdir(self.directory):
                raise
            self.read_only = True  # restore and listing only
        self._closed = False
        self._executor: ThreadPoolExecutor | None = None
        self._pending: Future | None = None
        self._last_save_time = _clock()
        self._mutex = threading.Lock()
        self._snapshots = _Snapshotter(chunk_size)
        # (path, digest) of the checkpoint written from the snapshot buffers' current
        # contents, set once that save has committed; the next snapshot's comparison is
        # only used when that checkpoint is the next save's parent.
        self._snapshot_saved: tuple[str, str] | None = None
        if not self.read_only:
            self.recover()

    # -- introspection --------------------------------------------------------------
    def all_steps(self) -> list[int]:
        """Steps of all complete checkpoints, oldest first.

        A ``step-N`` that is a symbolic link is listed (and restored) but never counted or
        deleted by retention, nor built upon by an incremental save.
        """
        return list(_step_dirs(self.directory, self.storage))

    def _own_steps(self) -> list[int]:
        return list(_step_dirs(self.directory, self.storage, own=True))

    def latest_step(self) -> int | None:
        """The newest complete checkpoint's step, or None."""
        steps = self.all_steps()
        return steps[-1] if steps else None

    def step_path(self, step: int) -> str:
        return self.storage.join(self.directory, f"step-{int(step)}")

    def should_save(self, step: int) -> bool:
        """Whether :meth:`save` at ``step`` would save (without ``force``)."""
        latest = self.latest_step()
        if latest is not None and step <= latest:
            return False
        if self.save_interval_steps is None and self.save_interval_seconds is None:
            return True
        if self.save_interval_steps is not None and step % self.save_interval_steps == 0:
            return True
        return self.save_interval_seconds is not None and _clock() - self._last_save_time >= self.save_interval_seconds

    # -- saving ---------------------------------------------------------------------
    def save(self, step: int, state: Any, *, metadata: Any = None, force: bool = False) -> bool:
        """Save ``state`` as step ``step`` if a trigger fires (or ``force``); True if saved.

        Example:
            ``mgr.save(step, ckptfmt.adapters.torch.to_state(model=model, optimizer=opt)[0])``
        """
        self._check_open()
        self._check_process()
        self._raise_pending()
        if self.read_only:
            raise StorageError(errno.EROFS, f"{self.directory} was opened read-only (no write access); cannot save")
        if not force and not self.should_save(step):
            return False
        self._last_save_time = _clock()
        if not self.async_save:
            self._write(step, state, metadata)
            return True
        previous, self._snapshot_saved = self._snapshot_saved, None
        snapshot = self._snapshots.copy(state)  # the caller may change its arrays as soon as we return
        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ckptfmt-save")
        self._pending = self._executor.submit(self._write, step, snapshot, metadata, previous, self._snapshots.same)
        return True

    def _write(self, step: int, state: Any, metadata: Any, previous: tuple[str, str] | None = None,
               same: dict[int, np.ndarray] | None = None) -> None:
        with self._mutex:
            path = self.step_path(step)
            parent = self._parent_for(step)
            replaced = step in self.all_steps()
            hint = None
            if same and previous is not None and parent == previous[0]:
                try:
                    known = read_manifest(parent, self.storage).hexdigest == previous[1]
                except CkptFmtError:
                    known = False
                if known:
                    chunk_size = self._snapshots.chunk_size

                    def hint(name: str, arr: np.ndarray, cs: int) -> np.ndarray | None:
                        return same.get(id(arr)) if cs == chunk_size else None

            old_store = self._store_files_of(path) if replaced else set()
            digest = write_checkpoint(state, path, self.storage, metadata=metadata, overwrite=True, chunk_size=self.chunk_size,
                                      sync=self.sync, parent=parent, shared_store=self.incremental, lock_held=True,
                                      same_as_parent=hint)
            if same is not None:
                self._snapshot_saved = (path, digest)
            self._remember(path, digest)
            self._retain(old_store)

    def _store_files_of(self, path: str) -> set[str]:
        try:
            m = read_manifest(path, self.storage)
        except CkptFmtError:
            return set()
        return {f.path[len(STORE_PREFIX):] for f in m.files if f.path.startswith(STORE_PREFIX)}

    def _store_stat(self, names: set[str]) -> dict[str, tuple[int, float]]:
        there = {e.name: (e.size, e.mtime) for e in self.storage.scan(self.storage.join(self.directory, STORE_NAME))}
        return {n: there.get(n, (-1, 0.0)) for n in names}

    def _remember(self, path: str, digest: str) -> None:
        """Note what this save committed, so the next save may build on it without re-verifying."""
        if not self.incremental:
            return
        self._written = {path: (digest, self._store_stat(self._store_files_of(path)))}

    def _trusted(self, parent: str, digest: str) -> bool:
        """Whether ``parent`` is what this manager committed, its store files untouched since."""
        mine = self._written.get(parent)
        return mine is not None and mine[0] == digest and self._store_stat(set(mine[1])) == mine[1]

    def _parent_for(self, step: int) -> str | None:
        """The checkpoint the next save builds on, or None for a full save.

        Only an intact parent is built upon (spec section 10): one this manager committed
        whose store files are untouched since (same size and modification time), or one that
        passes a full :func:`ckptfmt.verify`. A damaged one gets a full save and a warning.
        """
        if not self.incremental:
            return None
        earlier = [s for s in self._own_steps() if s < step]
        if not earlier:
            return None
        parent = self.step_path(earlier[-1])
        try:
            m = read_manifest(parent, self.storage)
        except CkptFmtError as e:
            warnings.warn(f"{parent} is damaged ({e}); saving step {step} in full", stacklevel=3)
            return None
        p = m.parent
        depth = p.get("depth", 0) if isinstance(p, dict) and isinstance(p.get("depth"), int) else 0
        if depth + 1 >= self.max_chain:
            return None
        if not self._trusted(parent, m.hexdigest):
            from ckptfmt._verify import verify_checkpoint

            rep = verify_checkpoint(parent, self.storage)
            if not rep.ok:
                warnings.warn(f"{parent} is damaged ({rep.errors[0].message}); saving step {step} in full instead of "
                              "sharing its data", stacklevel=3)
                return None
        return parent

    def _retain(self, replaced_store: set[str] | frozenset = frozenset()) -> None:
        steps = self._own_steps()
        keep = set(steps if self.max_to_keep is None else steps[-self.max_to_keep :])
        if self.keep_every_n_steps:
            keep |= {s for s in steps if s % self.keep_every_n_steps == 0}
        dropped = [s for s in steps if s not in keep]
        if dropped:
            self._warn_kept(remove_locked(self.storage, self.directory, [f"step-{s}" for s in dropped]))
        if replaced_store:  # a step saved again (force=True): the data only its old manifest used is free
            v = view(self.storage, self.directory)
            sweep_store(self.storage, v, grace=0.0, dry_run=False, out=Sweep(), only=set(replaced_store))
            self._warn_kept(v)

    def _warn_kept(self, r) -> None:
        """Warn when freeing was refused (``r``: a GcReport or a RunView)."""
        warn_refused(GcReport(self.directory, unreadable=tuple(r.unreadable), refused=tuple(getattr(r, "refused", getattr(r, "problems", ())))),
                     stacklevel=4)

    def recover(self, *, grace_seconds: float = DEFAULT_GRACE_SECONDS) -> None:
        """Remove what interrupted saves left behind (called on start).

        Leftovers of self-contained saves go once older than ``grace_seconds``. Store files
        no manifest lists are kept, with a warning: they may be a killed save's, or the data of
        a checkpoint moved out of the run for a while; ``ckptfmt gc RUN`` frees them. Waits for
        a save of this manager that is running.
        """
        self._check_process()
        with self._mutex:
            v = view(self.storage, self.directory)
            sweep_dirs(self.storage, v, grace=grace_seconds, dry_run=False, out=Sweep())
            now = time.time()
            for name, e in v.entries.items():
                # an empty step-N: a save killed between making its directory and committing
                if (e.kind == "dir" and _STEP_RE.match(name) and now - e.mtime >= grace_seconds
                        and not self.storage.scan(self.storage.join(self.directory, name))):
                    try:
                        self.storage.rmdir(self.storage.join(self.directory, name))
                    except OSError:
                        pass  # something appeared in it meanwhile
            if v.store and v.safe:
                store = self.storage.join(self.directory, STORE_NAME)
                loose = [e for e in self.storage.scan(store)
                         if e.kind == "file" and STORE_FILE_RE.match(e.name) and (STORE_NAME, e.name) not in v.refs]
                if loose:
                    warnings.warn(f"{store} holds {len(loose)} file(s), {sum(e.size for e in loose)} bytes, that no checkpoint "
                                  f"of the run uses (a killed save's, or of a checkpoint moved out of {self.directory}); "
                                  f"`ckptfmt gc {self.directory}` frees them", stacklevel=3)
            self._warn_kept(v)

    def _check_process(self) -> None:
        if os.getpid() != self._pid:
            raise RuntimeError(f"CheckpointManager({self.directory}) was created in process {self._pid}; a forked child "
                               "does not hold its lock: create a new CheckpointManager there (after the parent's is closed)")

    # -- restoring ------------------------------------------------------------------
    def restore(self, step: int | None = None, *, verify: bool = True, mmap: bool = False) -> Any:
        """Load a checkpoint: ``step``, or the newest one that loads intact.

        With ``step=None`` a damaged newest checkpoint is skipped (with a warning) in favour
        of the one before it.

        Raises:
            CheckpointNotFoundError: no (intact) checkpoint exists.
        """
        self.wait()
        if step is not None:
            return load(self.step_path(step), verify=verify, mmap=mmap, storage=self.storage)
        first_error: Exception | None = None
        for s in reversed(self.all_steps()):
            try:
                return load(self.step_path(s), verify=verify, mmap=mmap, storage=self.storage)
            except FormatError as e:
                first_error = first_error or e
                warnings.warn(f"checkpoint step {s} is damaged ({e}); trying the one before", stacklevel=2)
        if first_error is not None:
            raise CheckpointNotFoundError(f"no intact checkpoint in {self.directory}: {first_error}")
        raise CheckpointNotFoundError(f"no checkpoint in {self.directory}")

    def metadata(self, step: int) -> Any:
        """The metadata saved with ``step``."""
        return read_manifest(self.step_path(step), self.storage).metadata

    # -- lifecycle ------------------------------------------------------------------
    def wait(self) -> None:
        """Block until an async save has committed; raise its error if it failed."""
        self._raise_pending(block=True)

    def _raise_pending(self, block: bool = True) -> None:
        fut = self._pending
        if fut is None:
            return
        if not block and not fut.done():
            return
        self._pending = None
        fut.result()  # re-raises the background error, never swallowed

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError(f"CheckpointManager({self.directory}) is closed")

    def close(self) -> None:
        """Wait for pending saves, then release the directory."""
        if self._closed:
            return
        try:
            self.wait()
        finally:
            self._closed = True
            if self._executor is not None:
                self._executor.shutdown(wait=True)
            if self._lock is not None:
                self._lock.release()

    def __enter__(self) -> CheckpointManager:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:  # pragma: no cover - best effort
        if not getattr(self, "_closed", True):
            try:
                if self._lock is not None:
                    self._lock.release()
            except Exception:
                pass


@dataclass(frozen=True, slots=True)
class HistoryEntry:
    """One checkpoint of a manager directory, for ``ckptfmt log``."""

    step: int
    path: str
    created: float
    digest: str
    tensors: int
    state_bytes: int
    written_bytes: int
    parent: str | None
    depth: int


def history(directory: str | os.PathLike, *, storage: Storage | None = None, storage_options: dict | None = None) -> list[HistoryEntry]:
    """The checkpoints of a manager directory, oldest first.

    ``written_bytes`` is what that save actually wrote (its own data files); the rest of its
    ``state_bytes`` is shared with earlier checkpoints.

    Example:
        >>> import tempfile
        >>> history(tempfile.mkdtemp())
        []
    """
    storage, directory = resolve(directory, storage, storage_options)
    out = []
    for step, path in _step_dirs(directory, storage).items():
        m = read_manifest(path, storage)
        own = sum(m.files[i].size for i in m.own_files())
        p = m.parent if isinstance(m.parent, dict) else {}
        out.append(
            HistoryEntry(step, path, m.created, m.hexdigest, m.num_tensors, int(m.nbytes.sum()), own,
                         p.get("name"), int(p.get("depth", 0)) if isinstance(p.get("depth", 0), int) else 0)
        )
    return out
