"""Reading a checkpoint: manifest first, then only the chunks a caller asks for."""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np

from ckptfmt._pool import io_pool, pool
from ckptfmt.errors import CheckpointNotFoundError, IntegrityError, TensorNotFoundError
from ckptfmt.format.hashing import get_hash
from ckptfmt.format.manifest import Manifest, TensorEntry, decode_manifest
from ckptfmt.format.spec import LIMITS, MANIFEST_NAME
from ckptfmt.format.tree import TensorRef
from ckptfmt.storage.base import ReadHandle, Storage

#: Chunks are handed to the pool in batches of about this many bytes (fewer round trips).
_BATCH_BYTES = 16 << 20
_BATCH_CHUNKS = 512
#: On object stores, adjacent chunks are fetched together up to this many bytes a GET.
_REMOTE_RUN = 16 << 20


def read_manifest(path: str, storage: Storage, *, check_hash: bool = True) -> Manifest:
    """Read and validate the manifest of the checkpoint at ``path``."""
    mpath = storage.join(path, MANIFEST_NAME)
    try:
        data = storage.read_file(mpath, max_size=LIMITS.max_manifest_bytes)
    except FileNotFoundError:
        if storage.isdir(path) and storage.listdir(path):
            raise CheckpointNotFoundError(
                f"{path} is not a complete checkpoint: it has no {MANIFEST_NAME} "
                "(a save into it was interrupted, or it is not a ckptfmt checkpoint)"
            ) from None
        raise CheckpointNotFoundError(f"no checkpoint at {path}") from None
    except NotADirectoryError:
        raise CheckpointNotFoundError(f"{path} is a file, not a ckptfmt checkpoint directory") from None
    return decode_manifest(data, where=mpath, check_hash=check_hash)


@dataclass(frozen=True, slots=True)
class _Task:
    entry: TensorEntry
    k: int  # chunk number within the tensor
    dest: memoryview


class CheckpointReader:
    """A lazy view of a checkpoint: the manifest is read at once, tensor data on demand.

    Use :func:`ckptfmt.open` to make one. Reading is thread-safe.

    Example:
        >>> import numpy as np, ckptfmt, tempfile, os
        >>> p = os.path.join(tempfile.mkdtemp(), "ck")
        >>> _ = ckptfmt.save({"w": np.arange(10.0)}, p)
        >>> with ckptfmt.open(p) as r:
        ...     r.keys(), r.slice("w")[2:4]
        (['w'], array([2., 3.]))
    """

    def __init__(self, path: str, storage: Storage, *, verify: bool = True) -> None:
        self.path = path
        self.storage = storage
        self.verify_default = verify
        self.manifest = read_manifest(path, storage)
        self._hash = get_hash(self.manifest.hash_alg)
        self._handles: dict[int, ReadHandle] = {}
        self._lock = threading.Lock()
        self._tree: Any = None

    # -- metadata -------------------------------------------------------------------
    @property
    def metadata(self) -> Any:
        """The user metadata saved with the checkpoint."""
        return self.manifest.metadata

    @property
    def version(self) -> tuple[int, int]:
        return self.manifest.version

    @property
    def digest(self) -> str:
        """The checkpoint's identity: the hash of its manifest body, as hex."""
        return self.manifest.hexdigest

    def sharing(self) -> dict[str, Any]:
        """Where this checkpoint's data lies: its parent, chain depth, own and shared bytes.

        ``shared_bytes`` is tensor data stored in other checkpoints' files (incremental saves).
        """
        m = self.manifest
        parent = m.parent if isinstance(m.parent, dict) else {}
        lengths = np.full(m.num_chunks, m.chunk_size, np.int64)
        if m.num_chunks:
            nch = -(-m.nbytes // m.chunk_size)
            has = nch > 0
            lengths[m.first_chunk[has] + nch[has] - 1] = m.nbytes[has] - (nch[has] - 1) * m.chunk_size
        own = set(m.own_files())
        foreign = np.array([i not in own for i in range(len(m.files))] or [False], bool)
        shared = int(lengths[foreign[m.chunk_file]].sum()) if m.num_chunks else 0
        total = int(m.nbytes.sum())
        return {"parent": parent.get("name"), "depth": int(parent.get("depth", 0) or 0),
                "own_bytes": total - shared, "shared_bytes": shared, "total_bytes": total}

    def keys(self) -> list[str]:
        """Names of all tensors, in save order."""
        return list(self.manifest.names)

    def __iter__(self) -> Iterator[str]:
        return iter(self.manifest.names)

    def __len__(self) -> int:
        return self.manifest.num_tensors

    def __contains__(self, name: object) -> bool:
        try:
            self.manifest.index_of(name)  # type: ignore[arg-type]
            return True
        except (KeyError, TypeError):
            return False

    def info(self, name: str) -> TensorEntry:
        """dtype, shape, size and chunk range of one tensor."""
        try:
            return self.manifest.tensor(self.manifest.index_of(name))
        except KeyError:
            raise TensorNotFoundError(f"no tensor {name!r} in checkpoint {self.path}") from None

    @property
    def tree(self) -> Any:
        """The saved tree with :class:`~ckptfmt.format.tree.TensorRef` at tensor leaves."""
        if self._tree is None:
            names = self.manifest.names
            self._tree = self.manifest.decode_tree(lambda i: TensorRef(i, names[i]))
        return self._tree

    # -- data ------------------------------------------------------------------------
    def _handle(self, file_index: int) -> ReadHandle:
        h = self._handles.get(file_index)
        if h is not None:
            return h
        with self._lock:
            h = self._handles.get(file_index)
            if h is None:
                fe = self.manifest.files[file_index]
                fpath = self.storage.join(self.path, fe.path)
                try:
                    h = self.storage.open_read(fpath)
                except FileNotFoundError:
                    raise IntegrityError(f"data file {fpath} is missing (checkpoint {self.path})") from None
                if h.size() != fe.size:
                    h.close()
                    what = "truncated" if h.size() < fe.size else "longer than recorded"
                    raise IntegrityError(
                        f"data file {fpath} is {what}: {h.size()} bytes, the manifest records {fe.size}"
                    )
                self._handles[file_index] = h
        return h

    def _chunk_location(self, entry: TensorEntry, k: int) -> tuple[int, int, int]:
        c = entry.first_chunk + k
        return int(self.manifest.chunk_file[c]), int(self.manifest.chunk_offset[c]), self.manifest.chunk_length(entry, k)

    def _check(self, entry: TensorEntry, k: int, data: memoryview) -> None:
        c = entry.first_chunk + k
        if self._hash.digest(data) != self.manifest.chunk_hash(c):
            f, off, _ = self._chunk_location(entry, k)
            raise IntegrityError(
                f"hash mismatch in tensor {entry.name!r}, chunk {k} "
                f"({self.storage.join(self.path, self.manifest.files[f].path)} at byte offset {off}): "
                "the data is corrupted; restore this checkpoint from a good copy"
            )

    def _read_chunk(self, task: _Task, verify: bool) -> None:
        f, off, length = self._chunk_location(task.entry, task.k)
        got = self._handle(f).readinto(off, task.dest)
        if got != length:
            raise IntegrityError(
                f"tensor {task.entry.name!r}, chunk {task.k}: expected {length} bytes at offset {off} of "
                f"{self.manifest.files[f].path}, got {got} (file truncated)"
            )
        if verify:
            self._check(task.entry, task.k, task.dest)

    def _read_run(self, run: list, verify: bool) -> None:
        f, off, length, tasks = run
        if len(tasks) == 1:
            self._read_chunk(tasks[0], verify)
            return
        buf = bytearray(length)
        got = self._handle(f).readinto(off, memoryview(buf))
        pos = 0
        for t in tasks:
            n = len(t.dest)
            if pos + n > got:
                raise IntegrityError(
                    f"tensor {t.entry.name!r}, chunk {t.k}: expected {n} bytes at offset {off + pos} of "
                    f"{self.manifest.files[f].path}, got {max(0, got - pos)} (file truncated)"
                )
            t.dest[:] = memoryview(buf)[pos : pos + n]
            pos += n
            if verify:
                self._check(t.entry, t.k, t.dest)

    def _run(self, tasks: list[_Task], verify: bool) -> None:
        """Read (and verify) chunks, in parallel when there is enough to share."""
        if not tasks:
            return
        if self.storage.io_concurrency and len(tasks) > 1:
            # Object stores: neighbouring chunks of one tensor in one file are fetched with one
            # ranged GET (up to _REMOTE_RUN bytes), many GETs in flight; each chunk is hashed
            # by the thread that fetched it, as soon as it arrives.
            runs: list[list] = []  # [file, offset, length, tasks]
            for t in tasks:
                f, off, length = self._chunk_location(t.entry, t.k)
                last = runs[-1] if runs else None
                if (last is not None and last[0] == f and last[1] + last[2] == off and last[2] + length <= _REMOTE_RUN
                        and last[3][-1].entry is t.entry and last[3][-1].k + 1 == t.k):
                    last[2] += length
                    last[3].append(t)
                else:
                    runs.append([f, off, length, [t]])
            futures = [io_pool().submit(self._read_run, r, verify) for r in runs]
            try:
                for fut in futures:
                    fut.result()
            finally:
                for fut in futures:
                    fut.cancel()
            return
        total = sum(len(t.dest) for t in tasks)
        if total < 2 * _BATCH_BYTES or len(tasks) == 1:
            for t in tasks:
                self._read_chunk(t, verify)
            return
        batches: list[list[_Task]] = [[]]
        size = 0
        for t in tasks:
            if size >= _BATCH_BYTES or len(batches[-1]) >= _BATCH_CHUNKS:
                batches.append([])
                size = 0
            batches[-1].append(t)
            size += len(t.dest)

        def work(batch: list[_Task]) -> None:
            for t in batch:
                self._read_chunk(t, verify)

        futures = [pool().submit(work, b) for b in batches]
        for fut in futures:
            fut.result()

    def _alloc(self, entry: TensorEntry) -> tuple[np.ndarray, list[_Task]]:
        flat = np.empty(entry.nbytes, np.uint8)
        view = memoryview(flat)
        cs = self.manifest.chunk_size
        tasks = [_Task(entry, k, view[k * cs : k * cs + self.manifest.chunk_length(entry, k)]) for k in range(entry.num_chunks)]
        return flat, tasks

    @staticmethod
    def _shape(entry: TensorEntry, flat: np.ndarray) -> np.ndarray:
        return flat.view(entry.numpy_dtype).reshape(entry.shape)

    def _mapped(self, entry: TensorEntry, verify: bool) -> np.ndarray | None:
        """The tensor as a read-only view of the mapped file, if it lies in one aligned run."""
        if entry.num_chunks == 0:
            return None
        m = self.manifest
        c0, n = entry.first_chunk, entry.num_chunks
        files = m.chunk_file[c0 : c0 + n]
        offs = m.chunk_offset[c0 : c0 + n]
        if (files != files[0]).any() or (n > 1 and (np.diff(offs) != m.chunk_size).any()):
            return None
        if int(offs[0]) % entry.numpy_dtype.itemsize:
            return None
        mm = self._handle(int(files[0])).mmap()
        if mm is None:
            return None
        flat = np.frombuffer(mm, dtype=np.uint8, count=entry.nbytes, offset=int(offs[0]))
        if verify:
            view = memoryview(flat)
            cs = m.chunk_size
            for k in range(n):
                self._check(entry, k, view[k * cs : k * cs + m.chunk_length(entry, k)])
        return self._shape(entry, flat)

    def get(self, name: str, *, verify: bool | None = None, mmap: bool = False) -> np.ndarray:
        """Read one tensor.

        Args:
            name: the tensor's name (see :meth:`keys`).
            verify: check every chunk's hash (default: the reader's setting, normally True).
            mmap: return a read-only view of the memory-mapped data file instead of a copy,
                when the tensor lies in one run of one file (it always does for checkpoints
                written by ckptfmt.save); otherwise a copy is returned.

        Raises:
            TensorNotFoundError: no such tensor. IntegrityError: the data is corrupted.
        """
        entry = self.info(name)
        verify = self.verify_default if verify is None else verify
        if mmap:
            arr = self._mapped(entry, verify)
            if arr is not None:
                return arr
        flat, tasks = self._alloc(entry)
        self._run(tasks, verify)
        return self._shape(entry, flat)

    __getitem__ = get

    def slice(self, name: str) -> "TensorSlicer":
        """A handle whose ``[...]`` reads only the chunks that a basic index touches.

        Example: ``reader.slice("embedding")[1000:1010]`` reads one or two chunks.
        """
        return TensorSlicer(self, self.info(name))

    def read_rows(self, entry: TensorEntry, lo: int, hi: int, verify: bool) -> np.ndarray:
        """Rows ``lo:hi`` of the first axis, reading only the chunks they overlap."""
        row_bytes = entry.nbytes // entry.shape[0] if entry.shape[0] else 0
        b0, b1 = lo * row_bytes, hi * row_bytes
        out = np.empty(b1 - b0, np.uint8)
        if b1 > b0:
            cs = self.manifest.chunk_size
            k0, k1 = b0 // cs, (b1 - 1) // cs
            scratch = np.empty((k1 - k0 + 1) * cs, np.uint8)
            sview = memoryview(scratch)
            tasks = [
                _Task(entry, k, sview[(k - k0) * cs : (k - k0) * cs + self.manifest.chunk_length(entry, k)])
                for k in range(k0, k1 + 1)
            ]
            self._run(tasks, verify)
            out[:] = scratch[b0 - k0 * cs : b1 - k0 * cs]
        return out.view(entry.numpy_dtype).reshape((hi - lo,) + entry.shape[1:])

    def load(self, *, verify: bool | None = None, mmap: bool = False) -> Any:
        """Read the whole tree, with every tensor as a numpy array."""
        verify = self.verify_default if verify is None else verify
        m = self.manifest
        arrays: list[np.ndarray | None] = [None] * m.num_tensors
        tasks: list[_Task] = []
        for i in range(m.num_tensors):
            entry = m.tensor(i)
            if mmap:
                arrays[i] = self._mapped(entry, verify)
                if arrays[i] is not None:
                    continue
            flat, t = self._alloc(entry)
            arrays[i] = self._shape(entry, flat)
            tasks.extend(t)
        self._run(tasks, verify)
        return m.decode_tree(lambda i: arrays[i])

    def close(self) -> None:
        """Close the data files (arrays already returned stay valid)."""
        with self._lock:
            for h in self._handles.values():
                h.close()
            self._handles.clear()

    def __enter__(self) -> "CheckpointReader":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"CheckpointReader({self.path!r}, tensors={len(self)}, version={self.version[0]}.{self.version[1]})"


class TensorSlicer:
    """``reader.slice(name)[index]``: reads only the chunks the index touches."""

    def __init__(self, reader: CheckpointReader, entry: TensorEntry) -> None:
        self.reader = reader
        self.entry = entry

    @property
    def shape(self) -> tuple[int, ...]:
        return self.entry.shape

    @property
    def dtype(self) -> np.dtype:
        return self.entry.numpy_dtype

    def __getitem__(self, index: Any) -> np.ndarray:
        e, r = self.entry, self.reader
        verify = r.verify_default
        idx = index if isinstance(index, tuple) else (index,)
        if not e.shape or e.nbytes == 0 or not idx:
            return r.get(e.name)[index]
        first, rest = idx[0], idx[1:]
        n0 = e.shape[0]
        if isinstance(first, (int, np.integer)) and not isinstance(first, bool):
            i = int(first)
            if not -n0 <= i < n0:
                raise IndexError(f"index {i} is out of bounds for axis 0 of tensor {e.name!r} with size {n0}")
            i %= n0
            return r.read_rows(e, i, i + 1, verify)[(0,) + rest]
        if isinstance(first, slice):
            start, stop, step = first.indices(n0)
            sel = range(start, stop, step)
            if not sel:
                return r.read_rows(e, 0, 0, verify)[(slice(None),) + rest]
            lo, hi = min(sel[0], sel[-1]), max(sel[0], sel[-1]) + 1
            new_stop = stop - lo
            local = slice(start - lo, new_stop if new_stop >= 0 else None, step)
            return r.read_rows(e, lo, hi, verify)[(local,) + rest]
        # Ellipsis, newaxis, fancy indexing: read it all, index in memory.
        return r.get(e.name)[index]


def open_reader(path: str | os.PathLike, storage: Storage, *, verify: bool = True) -> CheckpointReader:
    return CheckpointReader(os.fspath(path), storage, verify=verify)
