"""Reading a checkpoint: manifest first, then only the chunks a caller asks for."""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from ckptfmt._pool import io_pool, pool
from ckptfmt.errors import CheckpointNotFoundError, FormatError, IntegrityError, TensorNotFoundError
from ckptfmt.format.dtypes import numpy_dtype
from ckptfmt.format.hashing import get_hash
from ckptfmt.format.manifest import Manifest, TensorEntry, decode_manifest, parent_depth
from ckptfmt.format.spec import LIMITS, MANIFEST_NAME
from ckptfmt.format.tree import TensorRef
from ckptfmt.storage.base import ReadHandle, Storage

#: load(): one-chunk tensors up to this size are read in runs of neighbours (one read per
#: run of about _RUN_BYTES, bridging gaps up to _RUN_GAP), when there are at least
#: _SMALL_MIN_COUNT of them; each is still checked against its own chunk hash.
_SMALL_TENSOR = 64 << 10
_SMALL_MIN_COUNT = 16
_RUN_BYTES = 8 << 20
_RUN_GAP = 64 << 10
#: get(): read-ahead for small tensors read in file order (see _from_window).
_WINDOW = 256 << 10
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


def symlink_message(fpath: str) -> str:
    """Why a data file that is a symbolic link is refused (its target is never looked at)."""
    return (
        f"data file {fpath} is a symbolic link; ckptfmt does not follow links out of a checkpoint "
        "(spec section 'Files'): replace the link with the file itself"
    )


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
        self._dtypes: dict[int, np.dtype] = {}
        self._digest = self._hash.function
        self._window: tuple[int, int, memoryview] | None = None
        self._last: tuple[int, int] | None = None

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

    @property
    def content_digest(self) -> str:
        """The checkpoint's content identity, as hex: same tensors and tree, same value.

        Unlike :attr:`digest` (which covers the save time, producer and data file names),
        this covers only the tree, each tensor's name, dtype and shape, its chunk hashes,
        and the shard table (where each piece sits in a sharded tensor), all taken from the manifest (no data is read). Two saves of the same state
        with the same ``chunk_size`` and hash algorithm (the defaults) have the same
        content digest, whenever and wherever they were written, incremental or not.
        Compare across formats with ``ckptfmt hash``.
        """
        import msgpack

        m = self.manifest
        h = get_hash("blake3")
        parts = [b"ckptfmt-content-1", m.hash_alg.encode(), m.chunk_size.to_bytes(8, "little"), h.digest(m.tree_blob)]
        for i in range(m.num_tensors):
            e = m.tensor(i)
            head = msgpack.packb([e.name, e.dtype, list(e.shape)], use_bin_type=True)
            hashes = b"".join(m.chunk_hash(e.first_chunk + k) for k in range(e.num_chunks))
            parts.append(h.digest(head + hashes))
        if m.shards is not None:  # which piece sits where in a sharded tensor is content too
            table = [[g.name, g.dtype, list(g.shape), list(g.pieces), [list(o) for o in g.offsets]] for g in m.shards.tensors]
            parts.append(h.digest(b"shards" + msgpack.packb(table, use_bin_type=True)))
        return h.digest(b"".join(parts)).hex()

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
        return {"parent": parent.get("name"), "depth": parent_depth(parent),
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

    # -- sharded tensors (1.3) ---------------------------------------------------------
    def sharded_keys(self) -> list[str]:
        """Names of the sharded (global) tensors of a checkpoint saved by many processes.

        Their pieces are ordinary tensors (:meth:`keys`); :meth:`get` with a sharded name
        returns the assembled global tensor.
        """
        shards = self.manifest.shards
        return [t.name for t in shards.tensors] if shards is not None else []

    def _global_tasks(self, j: int) -> tuple[np.ndarray, list[_Task], list[tuple[TensorEntry, tuple]]]:
        """Allocate sharded tensor ``j``; tasks that read pieces straight into it, and the
        pieces (with their destination slices) that have to be read and copied in."""
        m = self.manifest
        g = m.shards.tensors[j]
        out = np.empty(g.shape, numpy_dtype(m.dtype_table[g.dtype]))
        flat = memoryview(out.reshape(-1).view(np.uint8))
        tasks: list[_Task] = []
        copies: list[tuple[TensorEntry, tuple]] = []
        cs = m.chunk_size
        for p, off in zip(g.pieces, g.offsets):
            entry = m.tensor(p)
            if entry.nbytes == 0:
                continue
            dest = tuple(slice(o, o + n) for o, n in zip(off, entry.shape))
            if all(o == 0 and n == s for o, n, s in zip(off[1:], entry.shape[1:], g.shape[1:])):
                # Split along the first axis only: the piece is one contiguous run of out.
                start = (off[0] * (out.nbytes // g.shape[0])) if g.shape else 0
                view = flat[start : start + entry.nbytes]
                tasks.extend(_Task(entry, k, view[k * cs : k * cs + m.chunk_length(entry, k)]) for k in range(entry.num_chunks))
            else:
                copies.append((entry, dest))
        return out, tasks, copies

    def _assemble(self, j: int, verify: bool) -> np.ndarray:
        out, tasks, copies = self._global_tasks(j)
        self._run(tasks, verify)
        for entry, dest in copies:
            flat, t = self._alloc(entry)
            self._run(t, verify)
            out[dest] = self._shape(entry, flat)
        return out

    def _opaque(self, i: int, path: str):
        raise FormatError(
            f"{self.path}: {path!r} is a Python object that torch.distributed.checkpoint serialized with "
            f"torch.save (stored as tensor {self.manifest.names[i]!r}); ckptfmt does not unpickle it. "
            "Load this checkpoint with torch.distributed.checkpoint.load(..., storage_reader=ckptfmt.dcp.Reader(path))"
        )

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
                if self.storage.islink(fpath):
                    raise FormatError(symlink_message(fpath))
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
        f, off = self.manifest.chunk_location(entry.first_chunk + k)
        return f, off, self.manifest.chunk_length(entry, k)

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
        verify = self.verify_default if verify is None else verify
        if self.manifest.shards is not None and name not in self:
            try:
                j = self.manifest.shards.index_of(name)
            except KeyError:
                pass
            else:
                return self._assemble(j, verify)
        if not mmap:
            arr = self._get_small(name, verify)
            if arr is not None:
                return arr
        entry = self.info(name)
        if mmap:
            arr = self._mapped(entry, verify)
            if arr is not None:
                return arr
        flat, tasks = self._alloc(entry)
        self._run(tasks, verify)
        return self._shape(entry, flat)

    __getitem__ = get

    def _get_small(self, name: str, verify: bool) -> np.ndarray | None:
        """A one-chunk tensor straight from the manifest's columns, or None for the general path.

        Reading a model's many small tensors one by one is dominated by per-call Python, so
        this path builds no entry or task objects: one read, one hash check, one array.
        """
        m = self.manifest
        cols = m.columns()
        if cols is None:
            return None
        try:
            i = m.index_of(name)
        except (KeyError, TypeError):
            return None  # the general path raises TensorNotFoundError
        nbytes, first, dtypes, ranks, starts, dims = cols
        nb = nbytes[i]
        if not 0 < nb <= m.chunk_size:
            return None
        c = first[i]
        f, off = m.chunk_location(c)
        code = dtypes[i]
        dt = self._dtypes.get(code)
        if dt is None:
            dt = self._dtypes[code] = numpy_dtype(m.dtype_table[code])
        s = starts[i]
        out = np.empty(tuple(dims[s : s + ranks[i]]), dt)
        try:
            buf = memoryview(out).cast("B")
        except ValueError:  # ml_dtypes types have no buffer format
            buf = memoryview(out.reshape(-1).view(np.uint8))
        if not self._from_window(f, off, nb, buf) and self._handle(f).readinto(off, buf) != nb:
            self._read_chunk(_Task(m.tensor(i), 0, buf), verify)  # raises: the file is short
        if verify and self._digest(buf) != m.chunk_hash(c):
            self._read_chunk(_Task(m.tensor(i), 0, buf), verify)  # re-reads; raises, naming the chunk
        return out

    def _from_window(self, f: int, off: int, nb: int, buf: memoryview) -> bool:
        """Copy a small tensor out of the read-ahead window; True if it was there.

        Reading small tensors one by one in file order (a loop over ``keys()``) would cost a
        system call each; once two come in order, the next _WINDOW bytes are read at once and
        the following tensors copied from memory. Random access never triggers it.
        """
        win = self._window  # (file, start, bytes); replaced whole, so threads see one value
        if win is not None and win[0] == f and win[1] <= off and off + nb - win[1] <= len(win[2]):
            o = off - win[1]
            buf[:] = win[2][o : o + nb]
            self._last = (f, off + nb)
            return True
        last = self._last
        self._last = (f, off + nb)
        if last is None or last[0] != f or not 0 <= off - last[1] <= _RUN_GAP or nb > _WINDOW // 4:
            return False
        h = self._handle(f)
        data = np.empty(min(_WINDOW, h.size() - off), np.uint8)
        view = memoryview(data)
        if h.readinto(off, view) != len(data):
            return False
        self._window = (f, off, view)
        buf[:] = view[:nb]
        return True

    def slice(self, name: str) -> TensorSlicer:
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
        if not mmap:
            self._load_small(arrays, verify)
        tasks: list[_Task] = []
        globals_: list[np.ndarray] = []
        copies: list[tuple[np.ndarray, TensorEntry, tuple]] = []
        is_piece = np.zeros(m.num_tensors, bool)
        if m.shards is not None:
            for j, g in enumerate(m.shards.tensors):
                is_piece[list(g.pieces)] = True
                out, t, c = self._global_tasks(j)
                globals_.append(out)
                tasks.extend(t)
                copies.extend((out, e, d) for e, d in c)
        for i in range(m.num_tensors):
            if is_piece[i] or arrays[i] is not None:
                continue
            entry = m.tensor(i)
            if mmap:
                arrays[i] = self._mapped(entry, verify)
                if arrays[i] is not None:
                    continue
            flat, t = self._alloc(entry)
            arrays[i] = self._shape(entry, flat)
            tasks.extend(t)
        self._run(tasks, verify)
        for out, entry, dest in copies:
            flat, t = self._alloc(entry)
            self._run(t, verify)
            out[dest] = self._shape(entry, flat)
        if m.shards is None:
            return m.decode_tree(lambda i: arrays[i])

        def leaf(i: int) -> np.ndarray:
            if arrays[i] is None:  # a piece named directly by the tree: read it on its own
                arrays[i] = self.get(m.names[i], verify=verify)
            return arrays[i]

        return m.decode_tree(leaf, make_shard=lambda j: globals_[j], make_opaque=self._opaque)

    def _load_small(self, arrays: list[np.ndarray | None], verify: bool) -> None:
        """Read every small one-chunk tensor, neighbours in a file with one read per run.

        A checkpoint of 100,000 tiny tensors spends its time on per-tensor Python, not I/O,
        so these are located with whole-column numpy operations over the manifest, read in
        runs of up to _RUN_BYTES, and each is then checked against its own chunk hash (the
        format's guarantee is unchanged) and copied into its own array.
        """
        m = self.manifest
        if not m.num_tensors:
            return
        nbytes = m.nbytes
        small = np.nonzero(nbytes <= min(_SMALL_TENSOR, m.chunk_size))[0]
        if len(small) < _SMALL_MIN_COUNT:
            return
        dim_starts = self._dim_starts_list()
        dims = m.dims.tolist()
        ranks = m.ranks.tolist()
        dtypes = [numpy_dtype(d) if _in_use else None for d, _in_use in zip(m.dtype_table, np.bincount(m.dtypes, minlength=len(m.dtype_table)) > 0)]
        codes = m.dtypes.tolist()
        empty = small[nbytes[small] == 0]
        for i in empty.tolist():
            s = dim_starts[i]
            arrays[i] = np.empty(tuple(dims[s : s + ranks[i]]), dtypes[codes[i]])
        idx = small[nbytes[small] > 0]
        if not len(idx):
            return
        c = m.first_chunk[idx]
        f = m.chunk_file[c].astype(np.int64)
        off = m.chunk_offset[c]
        n = nbytes[idx]
        order = np.lexsort((off, f))
        idx, c, f, off, n = idx[order], c[order], f[order], off[order], n[order]
        end = off + n
        # A run breaks at a file change, at a gap wider than _RUN_GAP, and every _RUN_BYTES.
        brk = np.ones(len(idx), bool)
        brk[1:] = (f[1:] != f[:-1]) | (off[1:] - np.maximum.accumulate(end)[:-1] > _RUN_GAP)
        seg = np.cumsum(brk) - 1
        seg_start = off[np.nonzero(brk)[0]][seg]
        key = seg * (1 << 40) + (off - seg_start) // _RUN_BYTES
        starts = np.nonzero(np.r_[True, key[1:] != key[:-1]])[0].tolist()
        starts.append(len(idx))
        hsize = self._hash.digest_size
        hashes = m.chunk_hashes
        digest = self._hash.function
        idx_l, c_l, off_l, n_l, f_l, end_l = idx.tolist(), c.tolist(), off.tolist(), n.tolist(), f.tolist(), end.tolist()
        for a, b in zip(starts[:-1], starts[1:]):
            lo, hi = off_l[a], max(end_l[a:b])
            run = memoryview(np.empty(hi - lo, np.uint8))
            got = self._handle(f_l[a]).readinto(lo, run)
            if got != hi - lo:
                continue  # a short file: the per-chunk path below reports the first tensor it cuts
            for j in range(a, b):
                i = idx_l[j]
                o = off_l[j] - lo
                piece = run[o : o + n_l[j]]
                if verify:
                    cj = c_l[j]
                    if digest(piece) != hashes[cj * hsize : (cj + 1) * hsize]:
                        self._check(m.tensor(i), 0, piece)  # raises, naming it
                s = dim_starts[i]
                out = np.empty(tuple(dims[s : s + ranks[i]]), dtypes[codes[i]])
                try:
                    memoryview(out).cast("B")[:] = piece
                except ValueError:  # ml_dtypes types have no buffer format
                    out.reshape(-1).view(np.uint8)[:] = piece
                arrays[i] = out

    def _dim_starts_list(self) -> list[int]:
        m = self.manifest
        starts = np.zeros(m.num_tensors, np.int64)
        np.cumsum(m.ranks[:-1], out=starts[1:])
        return starts.tolist()

    def close(self) -> None:
        """Close the data files (arrays already returned stay valid)."""
        with self._lock:
            for h in self._handles.values():
                h.close()
            self._handles.clear()

    def __enter__(self) -> CheckpointReader:
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
