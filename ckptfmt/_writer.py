"""Writing a checkpoint: stream tensors in chunks, hash them in parallel, commit atomically."""

from __future__ import annotations

import os
import platform
import secrets
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from ckptfmt._layout import STORE_PREFIX, ensure_store, free_stale, read_checkpoint, split_checkpoint
from ckptfmt._lock import DEFAULT_LOCK_TIMEOUT, run_lock
from ckptfmt._pool import io_pool, pool, workers
from ckptfmt._progress import progress_bar
from ckptfmt._reader import read_manifest
from ckptfmt.errors import (
    CheckpointExistsError,
    CheckpointNotFoundError,
    CkptFmtError,
    FormatError,
    IntegrityError,
    UnsafePathError,
    UnsupportedDtypeError,
)
from ckptfmt.format.dtypes import dtype_name, needs_byteswap, storage_dtype
from ckptfmt.format.hashing import DEFAULT_FINGERPRINT, DEFAULT_HASH, get_fingerprint
from ckptfmt.format.manifest import ManifestBuilder, decode_manifest, parent_depth
from ckptfmt.format.spec import ALIGNMENT, DATA_SUFFIX, DEFAULT_CHUNK_SIZE, LIMITS, MANIFEST_NAME, STORE_NAME
from ckptfmt.format.tree import encode_tree
from ckptfmt.storage.base import Storage, storage_error

#: A new data file is started before a tensor that would push the current one past this.
DATA_FILE_TARGET = 8 << 30
_ZEROS = bytes(ALIGNMENT)
#: Smaller chunks are hashed on the calling thread: a pool round trip would cost more.
_INLINE_HASH_BYTES = 256 * 1024


def is_tensor_leaf(x: Any) -> bool:
    """numpy arrays and numpy scalars are tensors; numpy str/bytes scalars are plain."""
    return isinstance(x, np.ndarray) or (isinstance(x, np.generic) and not isinstance(x, (str, bytes)))


@dataclass(frozen=True, slots=True)
class DeferredTensor:
    """A tensor leaf whose data is produced only when the writer reaches it.

    The writer knows every tensor's dtype and shape up front (the manifest needs them), but
    it writes one tensor at a time; a deferred leaf calls ``load`` just before its bytes are
    written and drops the array right after, so a state made of deferred leaves is saved with
    about one tensor in memory (converters stream foreign checkpoints this way).

    Attributes:
        shape: the shape ``load()`` returns.
        dtype: its numpy dtype.
        load: returns the array; its shape and dtype are checked against the two above.
    """

    shape: tuple[int, ...]
    dtype: np.dtype
    load: Callable[[], Any]

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def nbytes(self) -> int:
        n = np.dtype(self.dtype).itemsize
        for d in self.shape:
            n *= int(d)
        return n

    def materialize(self, name: str) -> np.ndarray:
        arr = np.asarray(self.load())
        if tuple(arr.shape) != tuple(self.shape) or dtype_name(arr.dtype) != dtype_name(self.dtype):
            raise FormatError(
                f"tensor {name!r}: the deferred value is {arr.dtype}{list(arr.shape)} but was declared "
                f"{np.dtype(self.dtype)}{list(self.shape)}"
            )
        return arr


def _is_leaf(x: Any) -> bool:
    return type(x) is np.ndarray or isinstance(x, DeferredTensor) or is_tensor_leaf(x)


def _producer(extra: dict | None) -> dict:
    from ckptfmt import __version__

    info = {
        "library": "ckptfmt",
        "version": __version__,
        "python": platform.python_version(),
        "numpy": np.__version__,
    }
    if extra:
        info.update(extra)
    return info


def _pieces(arr: np.ndarray, piece_bytes: int) -> Iterator[memoryview]:
    """Yield the bytes of ``arr`` in C order and little-endian, as contiguous pieces.

    Works for any strides and byte order without ever copying more than about
    ``piece_bytes`` at a time.
    """
    swap = needs_byteswap(arr.dtype)
    if arr.flags.c_contiguous and not swap:
        flat = arr.reshape(-1).view(np.uint8)
        for s in range(0, len(flat), piece_bytes):
            yield memoryview(flat[s : s + piece_bytes])
        return
    if arr.ndim == 0:
        arr = arr.reshape(1)
    row_bytes = arr[0].nbytes if arr.shape[0] else 0
    if row_bytes == 0:
        return
    if row_bytes > piece_bytes and arr.ndim > 1:
        for r in range(arr.shape[0]):
            yield from _pieces(arr[r], piece_bytes)
        return
    rows = max(1, piece_bytes // row_bytes)
    target = storage_dtype(arr.dtype)
    for r in range(0, arr.shape[0], rows):
        block = np.ascontiguousarray(arr[r : r + rows])
        if swap:
            block = block.astype(target)
        yield memoryview(block.reshape(-1).view(np.uint8))


def _chunks(arr: np.ndarray, chunk_size: int) -> Iterator[memoryview]:
    """Yield exactly-``chunk_size`` chunks (the last shorter) of the array's stored bytes."""
    if arr.flags.c_contiguous and not needs_byteswap(arr.dtype):
        yield from _pieces(arr, chunk_size)  # already cut at chunk boundaries: no copy
        return
    buf: bytearray | None = None
    fill = 0
    for piece in _pieces(arr, chunk_size):
        if buf is None and len(piece) == chunk_size:
            yield piece
            continue
        while len(piece):
            if buf is None:
                buf, fill = bytearray(chunk_size), 0
            take = min(chunk_size - fill, len(piece))
            buf[fill : fill + take] = piece[:take]
            fill += take
            piece = piece[take:]
            if fill == chunk_size:
                yield memoryview(buf)
                buf = None  # the consumer may still hold the old buffer (hashing)
    if buf is not None and fill:
        yield memoryview(buf)[:fill]


class _DataFiles:
    """The data files of one save: which one is being written, rolling over, closing.

    Object stores close (upload) files in the background, a few at once; the manifest is
    written only after :meth:`drain` has seen every upload succeed.
    """

    def __init__(self, storage: Storage, data_dir: str, builder: ManifestBuilder, sync: bool, total: int,
                 *, shared_store: bool, token: str) -> None:
        self.storage, self.data_dir, self.builder, self.sync = storage, data_dir, builder, sync
        self.shared_store, self.token = shared_store, token
        self.handle = None
        self.index = -1
        self.written: list[str] = []
        self.own: list[int] = []  # manifest file indices of the files this save wrote
        self._pending: deque = deque()
        self._parallel = max(0, int(storage.max_file_size and storage.write_concurrency or 0))
        split_at = storage.max_file_size
        if split_at:
            # Stay within the format's limit on data files however large the state is.
            split_at = max(int(split_at), -(-total // (LIMITS.max_files // 2)))
        self.split = split_at
        self.target = split_at or DATA_FILE_TARGET

    def start(self) -> None:
        self.finish()
        n = len(self.written)
        fname = f"pack-{self.token}-{n:05d}{DATA_SUFFIX}" if self.shared_store else f"data-{n:05d}-{self.token}{DATA_SUFFIX}"
        target = self.storage.join(self.data_dir, fname)
        try:
            self.handle = self.storage.open_write(target, durable=self.sync)
        except FileNotFoundError:
            self.storage.makedirs(self.data_dir)  # a gc emptied and removed a directory we just made
            self.handle = self.storage.open_write(target, durable=self.sync)
        self.written.append(fname)
        self.index = self.builder.add_file(STORE_PREFIX + fname if self.shared_store else fname)
        self.own.append(self.index)

    def before_tensor(self, nbytes: int) -> None:
        h = self.handle
        if h is None or (h.tell() and h.tell() + nbytes > self.target and (self.split is None or nbytes <= self.split)):
            self.start()
        pad = -self.handle.tell() % ALIGNMENT
        if pad:
            self.handle.write(_ZEROS[:pad])

    def before_chunk(self, nbytes: int) -> None:
        """Start a new file if this chunk would push the current one past the split size."""
        if self.split is not None and self.handle.tell() and self.handle.tell() + nbytes > self.split:
            self.start()

    def finish(self) -> None:
        h, self.handle = self.handle, None
        if h is None:
            return
        self.builder.set_file_size(self.index, h.tell())
        if not self._parallel:
            h.close(sync=self.sync)
            return
        self._pending.append(io_pool().submit(h.close, sync=self.sync))
        while len(self._pending) > self._parallel:
            self._pending.popleft().result()

    def drain(self) -> None:
        self.finish()
        while self._pending:
            self._pending.popleft().result()

    def abort(self) -> None:
        """After a failure: stop, wait for uploads in flight, delete every file of this save."""
        if self.handle is not None:
            try:
                self.handle.close(sync=False)
            except OSError:
                pass
            self.handle = None
        while self._pending:
            try:
                self._pending.popleft().result()
            except BaseException:  # noqa: BLE001 - the first error is already being raised
                pass
        paths = [self.storage.join(self.data_dir, f) for f in self.written]
        try:
            self.storage.delete_many(paths)
        except OSError:
            pass


class _Sums:
    """What a save computes over each chunk: its hash and, into a run's store, its fingerprint.

    ``probe(chunk, expect)`` (run on the pool) returns ``(hash, fingerprint)``; when the
    fingerprint equals ``expect`` (the parent's, section 10.1) the chunk is taken as the
    parent's and not hashed: the hash is None.
    """

    __slots__ = ("hash", "fp")

    def __init__(self, builder: ManifestBuilder) -> None:
        self.hash = builder.hash.function
        fp = builder.fingerprint
        self.fp = fp.digest if fp is not None else None

    def both(self, chunk) -> tuple[bytes, bytes | None]:
        return self.hash(chunk), (self.fp(chunk) if self.fp is not None else None)

    def probe(self, chunk, expect: bytes | None) -> tuple[bytes | None, bytes | None]:
        if self.fp is None:
            return self.hash(chunk), None
        fp = self.fp(chunk)
        return (None if fp == expect else self.hash(chunk)), fp


def _write_tensor(arr, chunk_size, sums, files, builder, bar, window) -> None:
    """Write every chunk; hash on the pool while this thread writes (both release the GIL)."""
    pending: deque = deque()
    for chunk in _chunks(arr, chunk_size):
        files.before_chunk(len(chunk))
        handle = files.handle
        offset = handle.tell()
        if len(chunk) < _INLINE_HASH_BYTES and not pending:
            builder.add_chunk(files.index, offset, *sums.both(chunk))
            handle.write(chunk)
            bar.update(len(chunk))
            continue
        pending.append((pool().submit(sums.both, chunk), files.index, offset))
        handle.write(chunk)
        bar.update(len(chunk))
        while len(pending) > window:
            fut, f, off = pending.popleft()
            builder.add_chunk(f, off, *fut.result())
    while pending:
        fut, f, off = pending.popleft()
        builder.add_chunk(f, off, *fut.result())


def _write_delta(arr, chunk_size, sums, files, builder, bar, window, parent_ref, base, same=None) -> None:
    """Find the chunks that differ from the parent's (ahead, on the pool); write only those.

    Into a store whose parent recorded fingerprints (section 10.1), each chunk is
    fingerprinted and only those whose fingerprint differs from the parent's are hashed
    and written; otherwise each chunk is hashed and compared with the parent's hash.
    ``same[k]`` true means chunk k is already known to be byte-identical to the parent's
    chunk k (the manager compared it with the snapshot the parent was written from): it
    is neither hashed nor written, and the parent's location and hash are recorded.
    """
    pending: deque = deque()
    submit = pool().submit
    expect = parent_ref.fingerprint if sums.fp is not None else None

    def settle(k: int, chunk: memoryview, digest: bytes | None, fp: bytes | None) -> None:
        if digest is None:  # known or fingerprinted equal to the parent's chunk k
            ref = parent_ref.same_chunk(base, k)
            if ref is not None:
                builder.add_chunk(*ref, fp)
                bar.update(len(chunk))
                return
            digest = sums.hash(chunk)  # the parent's chunk is not in the store: written again
        ref = parent_ref.chunk(base, k, digest)
        if ref is not None:
            builder.add_chunk(ref[0], ref[1], digest, fp)
        else:
            pad = -files.handle.tell() % ALIGNMENT
            files.before_chunk(pad + len(chunk))
            handle = files.handle
            pad = -handle.tell() % ALIGNMENT
            if pad:
                handle.write(_ZEROS[:pad])
            builder.add_chunk(files.index, handle.tell(), digest, fp)
            handle.write(chunk)
        bar.update(len(chunk))

    for k, chunk in enumerate(_chunks(arr, chunk_size)):
        want = expect(base, k) if expect is not None else None
        if same is not None and k < len(same) and bool(same[k]):
            # The parent's fingerprint is this chunk's; without one, compute it (cheap).
            work = (None, want) if want is not None or sums.fp is None else submit(sums.fp, chunk)
        else:
            # The manager compared bytes and found this chunk changed: no fingerprint can
            # overrule that, it is hashed (and compared by hash) as before.
            work = submit(sums.probe, chunk, want if same is None else None)
        pending.append((k, chunk, work))
        while len(pending) > window:
            kk, c, w = pending.popleft()
            settle(kk, c, *_outcome(w))
    while pending:
        kk, c, w = pending.popleft()
        settle(kk, c, *_outcome(w))


def _outcome(work) -> tuple[bytes | None, bytes | None]:
    """(hash or None, fingerprint or None) of a chunk of ``_write_delta``'s queue."""
    if isinstance(work, tuple):
        return work
    got = work.result()
    return got if isinstance(got, tuple) else (None, got)


class _ParentRef:
    """The parent of an incremental save: which of its chunks can be shared, and how to name them.

    Only chunks that lie in the run's shared store are shared (1.2): a chunk in the parent's
    own directory would make the new checkpoint depend on a directory users delete.
    """

    def __init__(self, parent: str, child: str, storage: Storage) -> None:
        (p_dir, p_name), (c_dir, c_name) = split_checkpoint(parent), split_checkpoint(child)
        if storage.normpath(p_dir) != storage.normpath(c_dir) or p_name == c_name:
            raise ValueError(
                f"the parent of an incremental save must be a sibling checkpoint directory: "
                f"{parent} is not beside {child}"
            )
        e = {x.name: x for x in storage.scan(p_dir)}.get(p_name)
        if e is not None and e.kind == "link":
            raise UnsafePathError(f"the parent {parent} is a symbolic link; name the checkpoint directory it points to")
        m = read_checkpoint(storage, p_dir, p_name) if e is not None and e.kind == "dir" else None
        if m is None:
            read_manifest(parent, storage)  # raises the usual CheckpointNotFoundError
            raise CheckpointNotFoundError(f"no checkpoint at {parent}")
        self.name = p_name
        self.manifest = m
        #: ``fingerprint(entry, k)``: the parent's recorded fingerprint of chunk k (section
        #: 10.1), when it recorded them with the function this save uses; else None.
        self.fingerprint = None
        # A parent whose store file is gone or has another size cannot be built upon: say so
        # now, not as a failure of every later save (spec section 10).
        there = {x.name: x for x in storage.scan(storage.join(p_dir, STORE_NAME))}
        for fe in m.files:
            if fe.path.startswith(STORE_PREFIX):
                x = there.get(fe.path[len(STORE_PREFIX):])
                if x is None or x.kind != "file" or x.size != fe.size:
                    raise IntegrityError(
                        f"the parent {parent} is damaged: its store file {storage.join(p_dir, STORE_NAME, fe.path[len(STORE_PREFIX):])} "
                        f"is {'missing' if x is None else 'not the size its manifest records'}; nothing was saved: save without "
                        f"parent= (a full save), and run `ckptfmt verify {parent}`"
                    )
        self.builder: ManifestBuilder | None = None
        self._files: dict[int, int] = {}
        self.shared_bytes = 0
        self.store_files: dict[str, int] = {}  # store file name -> recorded size, for the final check

    def describe(self) -> dict:
        depth = parent_depth(self.manifest.parent) + 1
        return {"name": self.name, "digest": self.manifest.hexdigest, "depth": depth}

    def match(self, name: str, arr: np.ndarray):
        m = self.manifest
        try:
            entry = m.tensor(m.index_of(name))
        except KeyError:
            return None
        if entry.dtype != dtype_name(arr.dtype) or entry.shape != tuple(arr.shape):
            return None
        return entry

    def chunk(self, entry, k: int, digest: bytes) -> tuple[int, int] | None:
        """(child file index, offset) of the parent's identical chunk in the store, or None."""
        if self.manifest.chunk_hash(entry.first_chunk + k) != digest:
            return None
        return self._locate(entry, k)

    def use_fingerprints(self, name: str | None) -> None:
        """Compare chunks by fingerprint when the parent recorded them with ``name``."""
        m = self.manifest
        if name is None or m.fp_alg != name or m.chunk_fps is None:
            return
        size = get_fingerprint(name).digest_size
        fps = m.chunk_fps

        def fingerprint(entry, k: int) -> bytes:
            c = entry.first_chunk + k
            return fps[c * size : (c + 1) * size]

        self.fingerprint = fingerprint

    def same_chunk(self, entry, k: int) -> tuple[int, int, bytes] | None:
        """(child file index, offset, hash) of the parent's chunk k, known equal to ours; None
        when that chunk is not in the store (then it is written again)."""
        loc = self._locate(entry, k)
        return None if loc is None else (*loc, self.manifest.chunk_hash(entry.first_chunk + k))

    def _locate(self, entry, k: int) -> tuple[int, int] | None:
        m = self.manifest
        c = entry.first_chunk + k
        f = int(m.chunk_file[c])
        idx = self._files.get(f)
        if idx is None:
            fe = m.files[f]
            if not fe.path.startswith(STORE_PREFIX) or "/" in fe.path[len(STORE_PREFIX):]:
                self._files[f] = -1
                return None
            idx = self.builder.add_file(fe.path)
            self.builder.set_file_size(idx, fe.size)
            self._files[f] = idx
            self.store_files[fe.path[len(STORE_PREFIX):]] = fe.size
        if idx < 0:
            return None
        self.shared_bytes += m.chunk_length(entry, k)
        return idx, int(m.chunk_offset[c])


def collect_tensors(state: Any) -> tuple[Any, list[tuple[str, np.ndarray | DeferredTensor]]]:
    """Encode the tree and list its tensors (each distinct array object once, in tree order).

    :class:`DeferredTensor` leaves are listed as they are, to be loaded when written.
    """
    tensors: list[tuple[str, np.ndarray | DeferredTensor]] = []
    by_id: dict[int, int] = {}
    keep_alive: list[Any] = []

    def on_tensor(x: Any, name: str) -> int:
        idx = by_id.get(id(x))
        if idx is not None:
            return idx  # the same array object twice (tied weights): stored once
        arr = x if type(x) is np.ndarray or isinstance(x, DeferredTensor) else np.asarray(x)
        try:
            dtype_name(arr.dtype)  # refuse unsupported dtypes before anything is written
        except UnsupportedDtypeError as e:
            raise UnsupportedDtypeError(f"tensor {name!r}: {e}") from None
        if len(arr.shape) > LIMITS.max_rank:
            raise FormatError(f"tensor {name!r} has rank {arr.ndim}, over the limit of {LIMITS.max_rank}")
        keep_alive.append(x)
        by_id[id(x)] = len(tensors)
        tensors.append((name, arr))
        return len(tensors) - 1

    tree = encode_tree(state, on_tensor, _is_leaf)
    names = [n for n, _ in tensors]
    if len(set(names)) != len(names):
        seen: set[str] = set()
        dup = next(n for n in names if n in seen or seen.add(n))
        raise FormatError(f"two tensors would both be named {dup!r} (e.g. keys 0 and '0' in one dict); rename one")
    return tree, tensors


def write_checkpoint(
    state: Any,
    path: str,
    storage: Storage,
    *,
    metadata: Any = None,
    overwrite: bool = False,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    hash_alg: str = DEFAULT_HASH,
    sync: bool = True,
    progress: bool | None = None,
    producer: dict | None = None,
    parent: str | None = None,
    shared_store: bool | None = None,
    same_as_parent: Callable[[str, np.ndarray, int], Any] | None = None,
    lock_held: bool = False,
    lock_timeout: float | None = None,
) -> str:
    """Write ``state`` as a checkpoint directory at ``path``; returns the manifest hash (hex).

    With ``shared_store`` (implied by ``parent``) the data goes into the run's shared store
    ``ckptfmt-store/`` beside ``path`` and the checkpoint directory holds only its manifest;
    with ``parent`` too, chunks whose hash equals the parent's chunk at the same place of a
    tensor of the same name, dtype and shape are not written again. Such a save holds the
    run's lock shared (unless the caller holds it: ``lock_held``), so no gc or remove can
    delete what it refers to before it commits.

    ``same_as_parent(name, array, chunk_size)`` (CheckpointManager only) may return, for a
    tensor matching the parent's, a per-chunk boolean sequence: true where the chunk is
    known byte-identical to the parent's, because the parent was written from a snapshot
    the caller still holds and compared. Those chunks are not hashed again. A caller that
    cannot guarantee this must not pass it: it would record the parent's data.
    """
    if shared_store is None:
        shared_store = parent is not None
    if parent is not None and not shared_store:
        raise ValueError("an incremental save (parent=...) keeps its data in the run's shared store; do not pass shared_store=False")
    tree, tensors = collect_tensors(state)  # refuse bad input before anything touches storage
    lock = None
    if shared_store and not lock_held:
        directory = split_checkpoint(path)[0]
        if not storage.isdir(directory):
            storage.makedirs(directory)
        lock = run_lock(storage, directory, shared=True, timeout=DEFAULT_LOCK_TIMEOUT if lock_timeout is None else lock_timeout)
    try:
        return _write(tree, tensors, path, storage, metadata=metadata, overwrite=overwrite, chunk_size=chunk_size,
                      hash_alg=hash_alg, sync=sync, progress=progress, producer=producer, parent=parent,
                      shared_store=shared_store, same_as_parent=same_as_parent)
    finally:
        if lock is not None:
            lock.release()


def destination_entry(storage: Storage, directory: str, name: str, path: str) -> Any:
    """What is at a checkpoint's destination ``directory/name`` (None: nothing), refusing what no
    save may write into: the run's shared store, a symbolic link, anything but a directory.

    Raises:
        UnsafePathError: the store's name, or a symbolic link. CheckpointExistsError: a file.
    """
    if name == STORE_NAME:
        raise UnsafePathError(f"{path}: {STORE_NAME} is the name of a run's shared store; save the checkpoint under another name")
    entry = {e.name: e for e in storage.scan(directory)}.get(name)
    if entry is not None and entry.kind == "link":
        raise UnsafePathError(f"{path} is a symbolic link; save to the directory it points to, or to another path")
    if entry is not None and entry.kind != "dir":
        raise CheckpointExistsError(f"{path} exists and is not a directory; choose another path")
    return entry


def _write(tree, tensors, path: str, storage: Storage, *, metadata, overwrite, chunk_size, hash_alg, sync, progress,
           producer, parent, shared_store, same_as_parent=None) -> str:
    directory, name = split_checkpoint(path)
    path = storage.join(directory, name)  # "ck/." names ck: its run directory is ck's parent
    manifest_path = storage.join(path, MANIFEST_NAME)
    entry = destination_entry(storage, directory, name, path)
    old_files: list[str] = []
    if entry is not None and storage.exists(manifest_path):
        if not overwrite:
            raise CheckpointExistsError(f"a checkpoint already exists at {path}; pass overwrite=True to replace it")
        try:
            old = decode_manifest(storage.read_file(manifest_path, max_size=LIMITS.max_manifest_bytes), where=manifest_path, check_hash=False)
            old_files = [f.path for f in old.files if "/" not in f.path]
        except CkptFmtError:
            old_files = []  # an unreadable old manifest: leave its files for `verify` to report

    parent_ref = None
    extra: dict = {}
    if parent is not None:
        parent_ref = _ParentRef(os.fspath(parent), path, storage)
        chunk_size = parent_ref.manifest.chunk_size  # chunks must line up to be shared
        hash_alg = parent_ref.manifest.hash_alg
        extra["parent"] = parent_ref.describe()
    # Fingerprints only into a store: only its chunks are ever shared with a child save.
    builder = ManifestBuilder(chunk_size=chunk_size, hash_alg=hash_alg,
                              fingerprint=DEFAULT_FINGERPRINT if shared_store else None)
    if parent_ref is not None:
        parent_ref.builder = builder
        parent_ref.use_fingerprints(DEFAULT_FINGERPRINT if shared_store else None)
    sums = _Sums(builder)
    created = entry is None
    if shared_store:
        ensure_store(storage, directory)
        data_dir = storage.join(directory, STORE_NAME)
        token = secrets.token_hex(8)
    else:
        storage.makedirs(path)
        data_dir = path
        token = secrets.token_hex(4)
    total = sum(int(a.nbytes) for _, a in tensors)
    files = _DataFiles(storage, data_dir, builder, sync, total, shared_store=shared_store, token=token)
    bar = progress_bar(total, f"saving {name}", progress)
    window = 2 * workers()
    small_max = min(chunk_size, _INLINE_HASH_BYTES)
    digest, fingerprint = sums.hash, sums.fp
    try:
        for tname, arr in tensors:
            builder.add_tensor(tname, dtype_name(arr.dtype), arr.shape if type(arr) is np.ndarray else tuple(int(d) for d in arr.shape))
            nbytes = int(arr.nbytes)
            files.before_tensor(nbytes)
            if isinstance(arr, DeferredTensor):
                arr = arr.materialize(tname)  # rebound: dropped once written
            base = parent_ref.match(tname, arr) if parent_ref is not None else None
            if base is None and nbytes <= small_max and arr.flags.c_contiguous and not needs_byteswap(arr.dtype):
                # One chunk, no copy: hashed and gathered here (a tensor of a model with
                # thousands of parameters would spend more on the general path's layers).
                if nbytes:
                    try:
                        data = memoryview(arr).cast("B")
                    except (ValueError, TypeError):  # ml_dtypes types have no buffer format
                        data = memoryview(arr.reshape(-1).view(np.uint8))
                    files.before_chunk(nbytes)
                    builder.add_chunk(files.index, files.handle.tell(), digest(data),
                                      None if fingerprint is None else fingerprint(data))
                    files.handle.write(data)
                    bar.update(nbytes)
            elif base is None:
                _write_tensor(arr, chunk_size, sums, files, builder, bar, window)
            else:
                same = same_as_parent(tname, arr, chunk_size) if same_as_parent is not None else None
                _write_delta(arr, chunk_size, sums, files, builder, bar, window, parent_ref, base, same)
        files.drain()  # every data file durable (uploaded) before the manifest names it
        if shared_store:
            extra["wrote"] = files.own
        storage.makedirs(path)  # a concurrent remove may have emptied and removed it
        # Belt and braces (spec section 11): every file the manifest will list, ours and the
        # parent's, is still there at its size (a remove, a gc or a user's rm may have run).
        there = {e.name: e.size for e in storage.scan(data_dir) if e.kind == "file"}
        expect = {f: builder.files[i][1] for f, i in zip(files.written, files.own)}
        for fname, size in expect.items():
            if there.get(fname) != size:
                raise IntegrityError(f"{storage.join(data_dir, fname)}, written by this save, was deleted or changed "
                                     "while it ran (a concurrent remove or gc?); nothing was saved: save again")
        if parent_ref is not None:
            for fname, size in parent_ref.store_files.items():
                if there.get(fname) != size:
                    raise IntegrityError(
                        f"{storage.join(data_dir, fname)}, shared with the parent {parent}, was deleted or changed "
                        f"while this save ran; nothing was saved: save again, or without parent= if `ckptfmt verify {parent}` fails"
                    )
        data = builder.encode(tree=tree, metadata=metadata, producer=_producer(producer), created=time.time(), extra=extra)
        try:
            # Without overwrite the manifest must not exist: the backend decides atomically,
            # so of two writers racing for one path exactly one commits.
            storage.write_atomic(manifest_path, data, sync=sync, exclusive=not overwrite)
        except FileExistsError:
            raise CheckpointExistsError(
                f"a checkpoint already exists at {path} (another writer committed it first); "
                "pass overwrite=True to replace it"
            ) from None
    except BaseException as exc:
        bar.close()
        files.abort()
        if created:
            try:
                storage.rmdir(path)  # only if empty: nothing of anyone else's is touched
            except OSError:
                pass
        if isinstance(exc, OSError) and not isinstance(exc, CkptFmtError):
            raise storage_error(exc, path, "saving checkpoint") from exc
        raise
    bar.close()
    stale = set(old_files) - (set() if shared_store else set(files.written))
    if stale:
        free_stale(storage, directory, name, stale)
    return builder.digest.hex()
