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

import os
import re
import threading
import time
import warnings
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np

from ckptfmt._gc import collect
from ckptfmt._lock import DirectoryLock
from ckptfmt._reader import read_manifest
from ckptfmt._writer import is_tensor_leaf
from ckptfmt.api import load, save
from ckptfmt.errors import CheckpointNotFoundError, CkptFmtError, FormatError
from ckptfmt.format.spec import DEFAULT_CHUNK_SIZE, MANIFEST_NAME, MANIFEST_TMP_PREFIX
from ckptfmt.storage.local import LocalStorage
from ckptfmt.storage.urls import check_local

#: The clock the time trigger reads (tests replace it).
_clock = time.monotonic
_STEP_RE = re.compile(r"^step-(\d+)$")


def _step_dirs(directory: str) -> dict[int, str]:
    """Complete checkpoints (those with a MANIFEST) under ``directory``, by step."""
    out: dict[int, str] = {}
    try:
        names = os.listdir(directory)
    except FileNotFoundError:
        return out
    for name in names:
        m = _STEP_RE.match(name)
        if m and os.path.isfile(os.path.join(directory, name, MANIFEST_NAME)):
            out[int(m.group(1))] = os.path.join(directory, name)
    return dict(sorted(out.items()))


class _Snapshotter:
    """Copies a tree's arrays into host buffers that are reused from one save to the next.

    Fresh memory is slow to fault in (seconds per GiB on some machines); copying into the
    buffers of the previous snapshot, once its save has committed, avoids paying that on
    every async save.
    """

    def __init__(self) -> None:
        self._buffers: list[np.ndarray] = []

    def copy(self, tree: Any) -> Any:
        memo: dict[int, Any] = {}
        fresh: list[np.ndarray] = []

        def leaf(x: Any) -> np.ndarray:
            src = np.asarray(x)
            i = len(fresh)
            buf = self._buffers[i] if i < len(self._buffers) else None
            if buf is None or buf.shape != src.shape or buf.dtype != src.dtype:
                buf = np.empty_like(src, order="C")
            np.copyto(buf, src)
            fresh.append(buf)
            return buf

        def walk(node: Any) -> Any:
            if is_tensor_leaf(node):
                got = memo.get(id(node))
                if got is None:
                    got = memo[id(node)] = leaf(node)
                return got
            if isinstance(node, dict):
                return {k: walk(v) for k, v in node.items()}
            if isinstance(node, list):
                return [walk(v) for v in node]
            if isinstance(node, tuple):
                return tuple(walk(v) for v in node)
            return node

        out = walk(tree)
        self._buffers = fresh
        return out


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

    Raises:
        CheckpointLockedError: another process (or manager) is using ``directory``.

    On start, leftovers of a save that was killed (data without a manifest, temporary
    manifests) are removed; :meth:`latest_step` only ever names complete checkpoints.
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
    ) -> None:
        if max_to_keep is not None and max_to_keep < 1:
            raise ValueError("max_to_keep must be at least 1 (or None to keep everything)")
        self.directory = os.path.abspath(check_local(directory, "CheckpointManager"))
        self.max_to_keep = max_to_keep
        self.keep_every_n_steps = keep_every_n_steps
        self.save_interval_steps = save_interval_steps
        self.save_interval_seconds = save_interval_seconds
        self.incremental = incremental
        self.max_chain = max(1, max_chain)
        self.async_save = async_save
        self.chunk_size = chunk_size
        self.sync = sync
        self._lock = DirectoryLock(self.directory).acquire()
        self._closed = False
        self._executor: ThreadPoolExecutor | None = None
        self._pending: Future | None = None
        self._last_save_time = _clock()
        self._mutex = threading.Lock()
        self._snapshots = _Snapshotter()
        self.recover()

    # -- introspection --------------------------------------------------------------
    def all_steps(self) -> list[int]:
        """Steps of all complete checkpoints, oldest first."""
        return list(_step_dirs(self.directory))

    def latest_step(self) -> int | None:
        """The newest complete checkpoint's step, or None."""
        steps = self.all_steps()
        return steps[-1] if steps else None

    def step_path(self, step: int) -> str:
        return os.path.join(self.directory, f"step-{int(step)}")

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
        self._raise_pending()
        if not force and not self.should_save(step):
            return False
        self._last_save_time = _clock()
        if not self.async_save:
            self._write(step, state, metadata)
            return True
        snapshot = self._snapshots.copy(state)  # the caller may change its arrays as soon as we return
        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ckptfmt-save")
        self._pending = self._executor.submit(self._write, step, snapshot, metadata)
        return True

    def _write(self, step: int, state: Any, metadata: Any) -> None:
        with self._mutex:
            path = self.step_path(step)
            parent = self._parent_for(step)
            save(state, path, metadata=metadata, overwrite=True, chunk_size=self.chunk_size, sync=self.sync, parent=parent)
            self._retain()

    def _parent_for(self, step: int) -> str | None:
        if not self.incremental:
            return None
        earlier = [s for s in self.all_steps() if s < step]
        if not earlier:
            return None
        parent = self.step_path(earlier[-1])
        try:
            p = read_manifest(parent, LocalStorage()).parent
        except CkptFmtError:
            return None  # a damaged parent is never built upon
        depth = p.get("depth", 0) if isinstance(p, dict) and isinstance(p.get("depth"), int) else 0
        return parent if depth + 1 < self.max_chain else None

    def _retain(self) -> None:
        steps = self.all_steps()
        keep = set(steps if self.max_to_keep is None else steps[-self.max_to_keep :])
        if self.keep_every_n_steps:
            keep |= {s for s in steps if s % self.keep_every_n_steps == 0}
        dropped = [s for s in steps if s not in keep]
        for s in dropped:
            os.unlink(os.path.join(self.step_path(s), MANIFEST_NAME))
        if dropped:
            LocalStorage().sync_dir(self.directory)
            collect(self.directory, grace_seconds=0.0)

    def recover(self) -> None:
        """Remove what interrupted saves left behind (called on start)."""
        for name in os.listdir(self.directory):
            ck = os.path.join(self.directory, name)
            if os.path.isdir(ck):
                for f in os.listdir(ck):
                    if f.startswith(MANIFEST_TMP_PREFIX):
                        os.unlink(os.path.join(ck, f))
        collect(self.directory, grace_seconds=0.0)

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
            return load(self.step_path(step), verify=verify, mmap=mmap)
        first_error: Exception | None = None
        for s in reversed(self.all_steps()):
            try:
                return load(self.step_path(s), verify=verify, mmap=mmap)
            except FormatError as e:
                first_error = first_error or e
                warnings.warn(f"checkpoint step {s} is damaged ({e}); trying the one before", stacklevel=2)
        if first_error is not None:
            raise CheckpointNotFoundError(f"no intact checkpoint in {self.directory}: {first_error}")
        raise CheckpointNotFoundError(f"no checkpoint in {self.directory}")

    def metadata(self, step: int) -> Any:
        """The metadata saved with ``step``."""
        return read_manifest(self.step_path(step), LocalStorage()).metadata

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
            self._lock.release()

    def __enter__(self) -> "CheckpointManager":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:  # pragma: no cover - best effort
        if not getattr(self, "_closed", True):
            try:
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


def history(directory: str | os.PathLike) -> list[HistoryEntry]:
    """The checkpoints of a manager directory, oldest first.

    ``written_bytes`` is what that save actually wrote (its own data files); the rest of its
    ``state_bytes`` is shared with earlier checkpoints.

    Example:
        >>> import tempfile
        >>> history(tempfile.mkdtemp())
        []
    """
    storage = LocalStorage()
    out = []
    for step, path in _step_dirs(check_local(directory, "ckptfmt log")).items():
        m = read_manifest(path, storage)
        own = sum(f.size for f in m.files if not f.path.startswith("../"))
        p = m.parent if isinstance(m.parent, dict) else {}
        out.append(
            HistoryEntry(step, path, m.created, m.hexdigest, m.num_tensors, int(m.nbytes.sum()), own,
                         p.get("name"), int(p.get("depth", 0)) if isinstance(p.get("depth", 0), int) else 0)
        )
    return out
