"""ckptfmt as the storage layer of ``torch.distributed.checkpoint`` (DCP).

DCP's planners decide which rank writes which piece of which tensor, and reshard on load;
:class:`Writer` and :class:`Reader` only decide where the bytes go. Each rank writes its
own data files with a hash on every chunk; the coordinator writes one ckptfmt manifest
(format 1.3, spec/FORMAT.md section 12) that records every piece's place in its global
tensor and DCP's metadata as msgpack (never a pickle), renamed into place last. A rank that
fails or dies before that leaves no checkpoint, and any earlier one untouched.

The result is an ordinary ckptfmt checkpoint: ``ckptfmt verify`` checks it,
``ckptfmt.load(path)`` assembles the full tensors in one process without torch, and
``Writer(path, parent=earlier)`` saves incrementally into the run's shared store (a rank
whose pieces did not change writes nothing new), so that ``rm -r`` of any checkpoint, or
``ckptfmt.remove`` and ``ckptfmt.gc``, never break another (spec sections 11-12).

Example:
    >>> import torch, tempfile, os
    >>> import torch.distributed.checkpoint as dcp
    >>> import ckptfmt, ckptfmt.dcp
    >>> path = os.path.join(tempfile.mkdtemp(), "step-1")
    >>> dcp.save({"w": torch.arange(4.0)}, storage_writer=ckptfmt.dcp.Writer(path))  # doctest: +ELLIPSIS
    Metadata(...)
    >>> ckptfmt.load(path)["w"]
    array([0., 1., 2., 3.], dtype=float32)
    >>> state = {"w": torch.zeros(4)}
    >>> dcp.load(state, storage_reader=ckptfmt.dcp.Reader(path)); state["w"]
    tensor([0., 1., 2., 3.])

Importing this module without torch raises :class:`~ckptfmt.errors.FrameworkNotAvailableError`.
"""

from __future__ import annotations

__all__ = ["Writer", "Reader"]

import dataclasses
import io
import os
import secrets
import uuid
from typing import Any

import numpy as np

from ckptfmt.adapters import torch as _adapter  # raises FrameworkNotAvailableError without torch

# isort: split
import torch
from torch.distributed.checkpoint.metadata import (
    BytesStorageMetadata,
    ChunkStorageMetadata,
    Metadata,
    MetadataIndex,
    StorageMeta,
    TensorProperties,
    TensorStorageMetadata,
)
from torch.distributed.checkpoint.planner import LoadItemType, LoadPlan, LoadPlanner, SavePlan, SavePlanner, WriteItemType
from torch.distributed.checkpoint.storage import StorageReader, StorageWriter, WriteResult
from torch.futures import Future

from ckptfmt._layout import STORE_PREFIX, ensure_store, free_stale, split
from ckptfmt._lock import DEFAULT_LOCK_TIMEOUT, run_lock
from ckptfmt._pool import workers
from ckptfmt._progress import progress_bar
from ckptfmt._reader import CheckpointReader
from ckptfmt._writer import _ZEROS, DATA_FILE_TARGET, _ParentRef, _producer, _Sums, _write_delta, _write_tensor, destination_entry
from ckptfmt.errors import CheckpointExistsError, CkptFmtError, FormatError, IntegrityError, UnsupportedDtypeError
from ckptfmt.format.dtypes import DTYPE_NAMES, dtype_name, numpy_dtype
from ckptfmt.format.hashing import DEFAULT_HASH
from ckptfmt.format.manifest import ManifestBuilder, decode_manifest
from ckptfmt.format.shards import GlobalTensor, encode_shards
from ckptfmt.format.spec import (
    ALIGNMENT,
    DATA_FILE_RE,
    DATA_SUFFIX,
    DEFAULT_CHUNK_SIZE,
    LIMITS,
    MANIFEST_NAME,
    STORE_FILE_RE,
    STORE_NAME,
)
from ckptfmt.format.tree import dense_list_indices, encode_tree
from ckptfmt.storage.base import Storage, StorageLock, storage_error
from ckptfmt.storage.local import LocalStorage

try:  # the version string DCP's own writer records
    from torch.distributed.checkpoint.filesystem import CURRENT_DCP_VERSION as _DCP_VERSION
except ImportError:  # pragma: no cover - older torch
    _DCP_VERSION = "1.0.0"

_MEMORY_FORMATS = {"contiguous": torch.contiguous_format, "channels_last": torch.channels_last, "preserve": torch.preserve_format}
_CODE = {n: i for i, n in enumerate(DTYPE_NAMES)}


def _torch_dtype_name(dt: torch.dtype) -> str:
    return dtype_name(_adapter.tensor_to_numpy(torch.empty(0, dtype=dt)).dtype)


def _piece_name(fqn: str, offsets: Any) -> str:
    """A piece's tensor name: unique, stable across saves with the same sharding."""
    return f"{fqn}@bytes" if offsets is None else f"{fqn}@[{','.join(str(int(o)) for o in offsets)}]"


class _OneFile:
    """The one data file a tensor's chunks go to, in the shape :mod:`ckptfmt._writer` writes
    through (a rank's file is never split by chunk: DCP ranks start a file per tensor run)."""

    __slots__ = ("handle", "index")

    def __init__(self, handle: Any, index: int) -> None:
        self.handle, self.index = handle, index

    def before_chunk(self, nbytes: int) -> None:
        pass


class _LazyFile:
    """A data file opened on its first write, so a rank with nothing new creates no file."""

    def __init__(self, storage: Storage, path: str, ref: str, sync: bool) -> None:
        self.storage, self.path, self.ref, self.sync = storage, path, ref, sync
        self.handle = None
        self.size = 0

    def write(self, data) -> None:
        if self.handle is None:
            self.handle = self.storage.open_write(self.path, durable=self.sync)
        self.handle.write(data)

    def tell(self) -> int:
        return 0 if self.handle is None else self.handle.tell()

    def close(self, *, sync: bool = True) -> None:
        if self.handle is not None:
            self.size = self.handle.tell()
            self.handle.close(sync=sync)


def _plain_node(obj: Any) -> list | None:
    """The tree node of a plain value (numbers, strings, nested containers), or None."""

    def no_tensor(x: Any, name: str) -> int:
        raise UnsupportedDtypeError("tensor inside a non-tensor item")

    try:
        return encode_tree(obj, no_tensor, lambda x: isinstance(x, (torch.Tensor, np.ndarray, np.generic)))
    except CkptFmtError:
        return None


def _file_name(store: bool, token: str, n: int) -> str:
    """The name of a rank's n-th data file: in the run's store, or in the checkpoint's directory."""
    return f"pack-{token}-{n:05d}{DATA_SUFFIX}" if store else f"data-{n:05d}-{token}{DATA_SUFFIX}"


class Writer(StorageWriter):
    """A DCP ``StorageWriter`` that writes a ckptfmt checkpoint directory.

    Use it as ``torch.distributed.checkpoint.save(state, storage_writer=Writer(path))``
    (or ``async_save``) on every rank. All ranks must see the same ``path`` (a shared
    filesystem). DCP calls, in this order: ``reset`` and ``set_up_storage_writer`` (all
    ranks), ``prepare_local_plan`` (all), ``prepare_global_plan`` (coordinator),
    ``write_data`` (all), ``finish`` (coordinator: the commit).

    A full save writes each rank's data files into ``path``. A save with ``parent`` (or
    ``shared_store=True``) writes them into the run's shared store ``ckptfmt-store/``
    beside ``path`` (spec sections 11-12), so ``rm -r`` of any checkpoint never breaks
    another; the coordinator then holds the run's lock shared from before it reads the
    parent until the commit (if the save fails on another rank, until this Writer is reused
    or released: :meth:`close`, or garbage collection).

    Args:
        path: the checkpoint directory (a ``checkpoint_id`` passed to ``dcp.save`` overrides it).
        overwrite: replace an existing checkpoint at ``path`` (atomically, at the commit).
        parent: an earlier checkpoint beside ``path``: chunks equal to the parent's (same
            tensor piece, same place) that lie in the run's store are not written again (an
            incremental save). Save the first checkpoint of a chain with ``shared_store=True``
            so that its data can be shared.
        shared_store: write the data into the run's shared store (default: when ``parent``).
        chunk_size: bytes per hashed chunk (ignored with ``parent``: the parent's is used).
        hash_alg: ``"blake3"`` (default) or ``"sha256"``.
        sync: fsync data files and the manifest.
        storage: a storage backend (default: the local filesystem).
        lock_timeout: seconds to wait for the run's lock (a gc, remove or CheckpointManager
            using the run) before failing with CheckpointLockedError.

    Example:
        >>> import torch, tempfile, os, torch.distributed.checkpoint as dcp, ckptfmt.dcp
        >>> p = os.path.join(tempfile.mkdtemp(), "ck")
        >>> _ = dcp.save({"b": torch.ones(3)}, storage_writer=ckptfmt.dcp.Writer(p))
    """

    def __init__(
        self,
        path: str | os.PathLike,
        *,
        overwrite: bool = False,
        parent: str | os.PathLike | None = None,
        shared_store: bool | None = None,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
        hash_alg: str = DEFAULT_HASH,
        sync: bool = True,
        storage: Storage | None = None,
        lock_timeout: float = DEFAULT_LOCK_TIMEOUT,
    ) -> None:
        super().__init__()
        if shared_store is None:
            shared_store = parent is not None
        if parent is not None and not shared_store:
            raise ValueError("an incremental save (parent=...) keeps its data in the run's shared store; do not pass shared_store=False")
        self.path = os.fspath(path)
        self.overwrite = overwrite
        self.parent = None if parent is None else os.fspath(parent)
        self.shared_store = bool(shared_store)
        self.chunk_size = chunk_size
        self.hash_alg = hash_alg
        self.sync = sync
        self.storage = storage if storage is not None else LocalStorage()
        self.lock_timeout = lock_timeout
        self.is_coordinator = True
        self.rank = 0
        self.save_id = uuid.uuid4().hex
        self.digest: str | None = None
        self._lock: StorageLock | None = None
        self._plan: dict | None = None  # coordinator: what prepare_global_plan decided

    # -- the run's lock (coordinator of a save into the store) ---------------------------
    def close(self) -> None:
        """Release the run's lock if a failed save left this Writer holding it (idempotent)."""
        lock, self._lock = self._lock, None
        if lock is not None:
            lock.release()

    def __del__(self) -> None:  # pragma: no cover - best effort, see close()
        try:
            self.close()
        except Exception:
            pass

    # -- DCP protocol ------------------------------------------------------------------
    def reset(self, checkpoint_id: str | os.PathLike | None = None) -> None:
        self.close()  # a previous save through this Writer that failed on another rank
        if checkpoint_id:
            self.path = os.fspath(checkpoint_id)
        self.save_id = uuid.uuid4().hex
        self.digest = None
        self._plan = None

    def set_up_storage_writer(self, is_coordinator: bool, *args: Any, **kwargs: Any) -> None:
        self.is_coordinator = is_coordinator
        self.rank = int(kwargs.get("rank") or 0)
        if kwargs.get("use_collectives", True) is False:
            raise CkptFmtError(
                "ckptfmt.dcp.Writer needs DCP's collectives (use_collectives=True): one coordinator "
                "writes the manifest that commits the checkpoint"
            )

    def prepare_local_plan(self, plan: SavePlan) -> SavePlan:
        s = self.storage
        directory, name = split(self.path)
        e = destination_entry(s, directory, name, self.path)
        if e is not None and s.exists(s.join(self.path, MANIFEST_NAME)) and not self.overwrite:
            raise CheckpointExistsError(f"a checkpoint already exists at {self.path}; pass overwrite=True to replace it")
        if self.parent is not None:
            _ParentRef(self.parent, self.path, s)  # a missing, broken or misplaced parent fails here
        if self.shared_store:
            if not s.isdir(directory):
                s.makedirs(directory)
        else:
            s.makedirs(self.path)  # a save into the store creates its directory at the commit
        return plan

    def prepare_global_plan(self, plans: list[SavePlan]) -> list[SavePlan]:
        s = self.storage
        self.close()
        directory = split(self.path)[0]
        chunk_size, hash_alg, parent_field, parent_digest = self.chunk_size, self.hash_alg, None, None
        if self.shared_store:
            if len(plans) > 1 << 24:
                raise CkptFmtError(f"{len(plans)} ranks: a save into the store names each rank's files with 6 hex digits")
            # Held until the commit: no gc or remove deletes what the ranks write or share.
            self._lock = run_lock(s, directory, shared=True, timeout=self.lock_timeout)
            try:
                ensure_store(s, directory)
                if self.parent is not None:  # read under the lock; every rank checks it read the same
                    ref = _ParentRef(self.parent, self.path, s)
                    chunk_size, hash_alg = ref.manifest.chunk_size, ref.manifest.hash_alg
                    parent_field, parent_digest = ref.describe(), ref.manifest.hexdigest
                taken = {x.name[5:15] for x in s.scan(s.join(directory, STORE_NAME)) if STORE_FILE_RE.match(x.name)}
                save = secrets.token_hex(5)
                while save in taken:  # pragma: no cover - 40 random bits
                    save = secrets.token_hex(5)
                tokens = [f"{save}{i:06x}" for i in range(len(plans))]  # the rank is in the name
            except BaseException:
                self.close()
                raise
        else:
            # One token per rank and save, none already in the directory: a new file never
            # replaces a committed checkpoint's (writes truncate).
            taken = {x.name[11:19] for x in s.scan(self.path) if DATA_FILE_RE.match(x.name)}
            tokens = []
            while len(tokens) < len(plans):
                t = secrets.token_hex(4)
                if t not in taken:
                    taken.add(t)
                    tokens.append(t)
        self._plan = {"tokens": tokens, "parent": parent_field, "chunk_size": chunk_size, "hash_alg": hash_alg}
        return [
            dataclasses.replace(p, storage_data={"token": t, "store": self.shared_store, "chunk_size": chunk_size,
                                                 "hash_alg": hash_alg, "parent_digest": parent_digest})
            for p, t in zip(plans, tokens)
        ]

    def write_data(self, plan: SavePlan, planner: SavePlanner) -> Future[list[WriteResult]]:
        try:
            return self._write_data(plan, planner)
        except BaseException:
            if self.is_coordinator:
                self.close()  # DCP calls no finish() after a failed write
            raise

    def _write_data(self, plan: SavePlan, planner: SavePlanner) -> Future[list[WriteResult]]:
        sd = plan.storage_data
        chunk_size, hash_alg, store, token = sd["chunk_size"], sd["hash_alg"], sd["store"], sd["token"]
        s = self.storage
        data_dir = s.join(split(self.path)[0], STORE_NAME) if store else self.path
        builder = ManifestBuilder(chunk_size=chunk_size, hash_alg=hash_alg)
        parent_ref = None
        if self.parent is not None:
            parent_ref = _ParentRef(self.parent, self.path, s)
            if parent_ref.manifest.hexdigest != sd["parent_digest"]:
                raise CkptFmtError(f"the parent {self.parent} was replaced while this save was being planned; nothing was saved: save again")
            parent_ref.builder = builder
        handles: list[_LazyFile] = []
        records: list[tuple[Any, tuple]] = []
        bar = progress_bar(0, f"saving {os.path.basename(self.path)} (rank {self.rank})", False)
        window = 2 * workers()
        try:
            for item in plan.items:
                data = planner.resolve_data(item)
                plain = None
                if item.type == WriteItemType.BYTE_IO:
                    arr = np.frombuffer(data.getbuffer(), np.uint8).copy()
                    lookup = getattr(planner, "lookup_object", None)
                    plain = _plain_node(lookup(item.index)) if lookup is not None else None
                    name = _piece_name(item.index.fqn, None)
                else:
                    arr = _adapter.tensor_to_numpy(data, item.index.fqn)
                    name = _piece_name(item.index.fqn, item.index.offset)
                builder.add_tensor(name, dtype_name(arr.dtype), tuple(int(d) for d in arr.shape))
                h = handles[-1] if handles else None
                if h is None or (h.tell() and h.tell() + arr.nbytes > DATA_FILE_TARGET):
                    if h is not None:
                        h.close(sync=self.sync)
                    fname = _file_name(store, token, len(handles))
                    h = _LazyFile(s, s.join(data_dir, fname), STORE_PREFIX + fname if store else fname, self.sync)
                    handles.append(h)
                    builder.add_file(h.ref)
                file_index = self._file_index(builder, h)
                pad = -h.tell() % ALIGNMENT
                if pad:
                    h.write(_ZEROS[:pad])
                base = parent_ref.match(name, arr) if parent_ref is not None else None
                first = len(builder.hashes)
                files = _OneFile(h, file_index)
                if base is None:
                    _write_tensor(arr, chunk_size, _Sums(builder), files, builder, bar, window)
                else:
                    _write_delta(arr, chunk_size, _Sums(builder), files, builder, bar, window, parent_ref, base)
                records.append((item, (name, dtype_name(arr.dtype), tuple(int(d) for d in arr.shape), first, len(builder.hashes), plain)))
                del arr, data
            if handles:
                handles[-1].close(sync=self.sync)
            sizes = {self._file_index(builder, h): h.size for h in handles}
        except BaseException as exc:
            for h in handles:
                try:
                    h.close(sync=False)
                except OSError:
                    pass
                if h.handle is not None:
                    s.delete(h.path)
            if isinstance(exc, OSError) and not isinstance(exc, CkptFmtError):
                raise storage_error(exc, self.path, "saving checkpoint") from exc
            raise
        finally:
            bar.close()
        results = []
        for item, (name, dt, shape, c0, c1, plain) in records:
            chunks = []
            for c in range(c0, c1):
                fi = builder.chunk_file[c]
                path, size = builder.files[fi]
                chunks.append((path, sizes.get(fi, size), builder.chunk_offset[c], builder.hashes[c]))
            results.append(WriteResult(index=item.index, size_in_bytes=_nbytes(dt, shape), storage_data=(name, dt, shape, chunks, plain)))
        fut: Future[list[WriteResult]] = Future()
        fut.set_result(results)
        return fut

    @staticmethod
    def _file_index(builder: ManifestBuilder, h: _LazyFile) -> int:
        for i in range(len(builder.files) - 1, -1, -1):
            if builder.files[i][0] == h.ref:
                return i
        raise AssertionError(h.ref)  # pragma: no cover

    def finish(self, metadata: Metadata, results: list[list[WriteResult]]) -> None:
        try:
            self._finish(metadata, results)
        finally:
            self.close()

    def _finish(self, metadata: Metadata, results: list[list[WriteResult]]) -> None:
        plan = self._plan
        if plan is None:
            raise CkptFmtError("ckptfmt.dcp.Writer.finish without prepare_global_plan: DCP did not call the coordinator's steps")
        chunk_size, hash_alg, store = plan["chunk_size"], plan["hash_alg"], self.shared_store
        s = self.storage
        directory, ck_name = split(self.path)
        builder = ManifestBuilder(chunk_size=chunk_size, hash_alg=hash_alg)
        files: dict[str, int] = {}
        pieces: dict[tuple, tuple[int, Any]] = {}
        for rank_results in results:
            for wr in rank_results:
                name, dt, shape, chunks, plain = wr.storage_data
                key = (wr.index.fqn, None if wr.index.offset is None else tuple(int(o) for o in wr.index.offset))
                if key in pieces:
                    raise FormatError(f"two ranks wrote the same piece of {wr.index.fqn!r} at {key[1]}")
                t = builder.add_tensor(name, dt, shape)
                for path, size, off, digest in chunks:
                    fi = files.get(path)
                    if fi is None:
                        fi = files[path] = builder.add_file(path)
                        builder.set_file_size(fi, size)
                    elif builder.files[fi][1] != size:
                        raise FormatError(f"ranks disagree on the size of {path}: {builder.files[fi][1]} and {size}")
                    builder.add_chunk(fi, off, digest)
                pieces[key] = (t, plain)

        shards: list[GlobalTensor] = []
        leaves: dict[str, list] = {}
        tensors_md: dict[str, list] = {}
        bytes_md: dict[str, int] = {}
        for fqn, md in metadata.state_dict_metadata.items():
            if isinstance(md, TensorStorageMetadata):
                idx, offs = [], []
                for ch in md.chunks:
                    off = tuple(int(o) for o in ch.offsets)
                    got = pieces.get((fqn, off))
                    if got is None:
                        raise FormatError(f"no rank wrote the piece of {fqn!r} at {list(off)}; the checkpoint is not committed")
                    idx.append(got[0])
                    offs.append(off)
                p = md.properties
                if p.layout != torch.strided:
                    raise UnsupportedDtypeError(f"{fqn!r} has layout {p.layout}; only dense (strided) tensors can be saved")
                mem = next((k for k, v in _MEMORY_FORMATS.items() if v == p.memory_format), "contiguous")
                tensors_md[fqn] = [bool(p.requires_grad), mem, bool(p.pin_memory)]
                leaves[fqn] = ["s", len(shards)]
                shards.append(GlobalTensor(fqn, _CODE[_torch_dtype_name(p.dtype)], tuple(int(d) for d in md.size), tuple(idx), tuple(offs)))
            elif isinstance(md, BytesStorageMetadata):
                got = pieces.get((fqn, None))
                if got is None:
                    raise FormatError(f"no rank wrote {fqn!r}; the checkpoint is not committed")
                bytes_md[fqn] = got[0]
                leaves[fqn] = got[1] if got[1] is not None else ["o", got[0]]
            else:
                raise FormatError(f"{fqn!r}: unknown DCP storage metadata {type(md).__name__}")
        mappings = _plain_mappings(metadata.planner_data)
        dcp_field = {
            "version": _DCP_VERSION,
            "planner_data": None if mappings is None else {k: list(v) for k, v in mappings.items()},
            "storage_meta": {"checkpoint_id": str(self.path), "save_id": self.save_id},
            "tensors": tensors_md,
            "bytes": bytes_md,
        }
        extra: dict = {"shards": encode_shards(shards), "dcp": dcp_field}
        if plan["parent"] is not None:
            extra["parent"] = plan["parent"]
        tokens = set(plan["tokens"])
        if store:
            # the files this save wrote (the rest are the parent's, shared)
            extra["wrote"] = [fi for path, fi in files.items() if path.startswith(STORE_PREFIX + "pack-") and path[len(STORE_PREFIX) + 5:len(STORE_PREFIX) + 21] in tokens]
        self._check_files(files, builder)
        data = builder.encode(tree=_nest(leaves, mappings), metadata=None,
                              producer=_producer({"torch": torch.__version__, "writer": "ckptfmt.dcp"}), extra=extra)
        mpath = s.join(self.path, MANIFEST_NAME)
        decode_manifest(data, where=mpath)  # never commit what a reader would refuse
        old_files: list[str] = []
        if s.exists(mpath):
            try:
                old = decode_manifest(s.read_file(mpath, max_size=LIMITS.max_manifest_bytes), where=mpath, check_hash=False)
                old_files = [f.path for f in old.files if "/" not in f.path]
            except CkptFmtError:
                old_files = []  # an unreadable old manifest: leave its files for `verify` to report
        created = not s.isdir(self.path)
        try:
            if created:
                s.makedirs(self.path)  # a save into the store: its directory holds only the MANIFEST
            s.write_atomic(mpath, data, sync=self.sync)
        except OSError as e:
            if created:
                try:
                    s.rmdir(self.path)
                except OSError:
                    pass
            raise storage_error(e, self.path, "committing checkpoint") from e
        self.digest = builder.digest.hex()
        stale = set(old_files) - set(files)
        if stale:
            free_stale(s, directory, ck_name, stale)  # the replaced checkpoint's own files nobody else lists

    def _check_files(self, files: dict[str, int], builder: ManifestBuilder) -> None:
        """Every file the manifest will list exists with the size recorded (checked under the lock
        for the store): a gc or remove that ran anyway, or a rank's lost write, fails the commit."""
        s = self.storage
        store_dir = s.join(split(self.path)[0], STORE_NAME)
        listings: dict[str, dict[str, int]] = {}
        for path, fi in files.items():
            if path.startswith(STORE_PREFIX) and "/" not in path[len(STORE_PREFIX):]:
                where, fname = store_dir, path[len(STORE_PREFIX):]
            elif "/" not in path:
                where, fname = self.path, path
            else:  # pragma: no cover - ranks only name these two kinds
                raise FormatError(f"a rank reported the data file {path!r}, outside the checkpoint and the run's store")
            there = listings.get(where)
            if there is None:
                there = listings[where] = {e.name: e.size for e in s.scan(where) if e.kind == "file"}
            if there.get(fname) != builder.files[fi][1]:
                raise IntegrityError(
                    f"{s.join(where, fname)} is missing or not {builder.files[fi][1]} bytes (deleted or changed while "
                    "this save ran, or a rank's write was lost); nothing was saved: save again"
                )

    def storage_meta(self) -> StorageMeta | None:
        return StorageMeta(checkpoint_id=str(self.path), save_id=self.save_id)

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: str | os.PathLike) -> bool:
        return isinstance(checkpoint_id, (str, os.PathLike))


def _nbytes(dt: str, shape: tuple) -> int:
    n = numpy_dtype(dt).itemsize
    for d in shape:
        n *= int(d)
    return n


def _plain_mappings(planner_data: Any) -> dict[str, tuple] | None:
    """DCP's flattening map (fqn -> path of keys), when it is one."""
    if not isinstance(planner_data, dict):
        return None
    for k, v in planner_data.items():
        if not isinstance(k, str) or not isinstance(v, (tuple, list)) or not v:
            return None
        if not all(isinstance(x, str) or (isinstance(x, int) and not isinstance(x, bool)) for x in v):
            return None
    mappings = {k: tuple(v) for k, v in planner_data.items()}
    # a list index beyond the items there would make _nest build a list of that length
    return None if dense_list_indices(mappings.values()) is not None else mappings


class _Leaf:
    __slots__ = ("node",)

    def __init__(self, node: list) -> None:
        self.node = node


def _nest(leaves: dict[str, list], mappings: dict[str, tuple] | None) -> list:
    """The tree: DCP's flat items put back where they were in the saved state.

    Containers are rebuilt as DCP rebuilds them (a list where the next key is an int); if
    the paths do not form a tree, the flat ``{fqn: value}`` dict is written instead.
    """
    flat = ["d", list(leaves), list(leaves.values())]
    if not mappings:
        return flat
    root: dict = {}
    try:
        for fqn, node in leaves.items():
            path = mappings.get(fqn, (fqn,))
            cur: Any = root
            for key, nxt in zip(path[:-1], path[1:]):
                if isinstance(cur, list):
                    if not isinstance(key, int) or key < 0:
                        return flat
                    while len(cur) <= key:
                        cur.append(None)
                    if cur[key] is None:
                        cur[key] = [] if isinstance(nxt, int) else {}
                    cur = cur[key]
                else:
                    if key not in cur:
                        cur[key] = [] if isinstance(nxt, int) else {}
                    cur = cur[key]
                if isinstance(cur, _Leaf):
                    return flat
            last = path[-1]
            if isinstance(cur, list):
                if not isinstance(last, int) or last < 0:
                    return flat
                while len(cur) <= last:
                    cur.append(None)
                if cur[last] is not None:
                    return flat
                cur[last] = _Leaf(node)
            else:
                if last in cur:
                    return flat
                cur[last] = _Leaf(node)
    except (TypeError, ValueError):
        return flat

    def enc(x: Any) -> list:
        if isinstance(x, _Leaf):
            return x.node
        if isinstance(x, dict):
            return ["d", list(x), [enc(v) for v in x.values()]]
        if isinstance(x, list):
            return ["l", [enc(v) for v in x]]
        return ["v", x]  # None padding of a list

    return enc(root)


class Reader(StorageReader):
    """A DCP ``StorageReader`` for checkpoints written by :class:`Writer`.

    ``torch.distributed.checkpoint.load(state, storage_reader=Reader(path))`` reshards
    through DCP's planner onto any number of ranks. Every chunk read is checked against its
    hash. Non-tensor items are handed to DCP's planner (which unpickles them with
    ``torch.load(weights_only=False)``) only after they pass ``torch.load(weights_only=True)``:
    a payload that needs arbitrary globals is refused unless ``trusted=True``.

    Args:
        path: the checkpoint directory (a ``checkpoint_id`` passed to ``dcp.load`` overrides it).
        verify: check chunk hashes while reading (default).
        trusted: hand non-tensor payloads to DCP without the ``weights_only`` check.
        storage: a storage backend (default: the local filesystem).

    Example:
        >>> import torch, tempfile, os, torch.distributed.checkpoint as dcp, ckptfmt.dcp
        >>> p = os.path.join(tempfile.mkdtemp(), "ck")
        >>> _ = dcp.save({"b": torch.ones(3)}, storage_writer=ckptfmt.dcp.Writer(p))
        >>> st = {"b": torch.zeros(3)}; dcp.load(st, storage_reader=ckptfmt.dcp.Reader(p)); st["b"]
        tensor([1., 1., 1.])
    """

    def __init__(self, path: str | os.PathLike, *, verify: bool = True, trusted: bool = False, storage: Storage | None = None) -> None:
        super().__init__()
        self.path = os.fspath(path)
        self.verify = verify
        self.trusted = trusted
        self.storage = storage if storage is not None else LocalStorage()
        self._reader: CheckpointReader | None = None
        self.storage_data: dict = {}

    def _open(self) -> CheckpointReader:
        if self._reader is None:
            self._reader = CheckpointReader(self.path, self.storage, verify=self.verify)
        return self._reader

    def reset(self, checkpoint_id: str | os.PathLike | None = None) -> None:
        if self._reader is not None:
            self._reader.close()
            self._reader = None
        if checkpoint_id:
            self.path = os.fspath(checkpoint_id)
        self.storage_data = {}

    def read_metadata(self) -> Metadata:  # no **kwargs: DCP must not retry as "rank-local metadata"
        r = self._open()
        return _metadata(r)

    def set_up_storage_reader(self, metadata: Metadata, is_coordinator: bool, *args: Any, **kwargs: Any) -> None:
        self.storage_data = metadata.storage_data
        if not isinstance(self.storage_data, dict):
            raise FormatError(f"{self.path}: the DCP metadata has no ckptfmt storage data")

    def prepare_local_plan(self, plan: LoadPlan) -> LoadPlan:
        return plan

    def prepare_global_plan(self, plans: list[LoadPlan]) -> list[LoadPlan]:
        return plans

    def read_data(self, plan: LoadPlan, planner: LoadPlanner) -> Future[None]:
        r = self._open()
        m = r.manifest
        by_piece: dict[int, list] = {}
        for req in plan.items:
            i = self.storage_data.get(req.storage_index)
            if i is None:
                raise FormatError(f"{self.path}: no stored piece for {req.storage_index.fqn!r} at {list(req.storage_index.offset or ())}")
            by_piece.setdefault(i, []).append(req)
        for i, reqs in by_piece.items():
            arr = r.get(m.names[i])
            for req in reqs:
                if req.type == LoadItemType.BYTE_IO:
                    payload = arr.tobytes()
                    if not self.trusted:
                        try:
                            torch.load(io.BytesIO(payload), weights_only=True)
                        except Exception as e:
                            raise FormatError(
                                f"{self.path}: item {req.storage_index.fqn!r} needs more than plain data to unpickle "
                                f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); refused. "
                                "Pass Reader(path, trusted=True) only for checkpoints you wrote yourself"
                            ) from None
                    planner.load_bytes(req, io.BytesIO(payload))
                    continue
                t = _adapter.numpy_to_tensor(arr)
                for dim, (off, length) in enumerate(zip(req.storage_offsets, req.lengths)):
                    t = t.narrow(dim, int(off), int(length))
                target = planner.resolve_tensor(req).detach()
                if target.size() != t.size():
                    raise FormatError(f"{self.path}: piece {m.names[i]!r} gives {list(t.size())}, the load plan wants {list(target.size())}")
                target.copy_(t)
                planner.commit_tensor(req, target)
            del arr
        fut: Future[None] = Future()
        fut.set_result(None)
        return fut

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: str | os.PathLike) -> bool:
        return isinstance(checkpoint_id, (str, os.PathLike))


def _metadata(r: CheckpointReader) -> Metadata:
    """DCP's Metadata, rebuilt from a 1.3 manifest (checked like any other field)."""
    m = r.manifest
    where = f"{r.path}/{MANIFEST_NAME}"
    d = m.dcp
    if m.shards is None or not isinstance(d, dict):
        raise FormatError(f"{where}: not a checkpoint written through torch.distributed.checkpoint (no 'dcp' field); use ckptfmt.load")
    tmd = d.get("tensors")
    bmd = d.get("bytes")
    if not isinstance(tmd, dict) or not isinstance(bmd, dict):
        raise FormatError(f"{where}: field 'dcp' lacks its 'tensors' or 'bytes' map")
    sdm: dict[str, Any] = {}
    storage_data: dict[MetadataIndex, int] = {}
    for g in m.shards.tensors:
        props = tmd.get(g.name, [False, "contiguous", False])
        if not (isinstance(props, list) and len(props) == 3 and isinstance(props[0], bool) and props[1] in _MEMORY_FORMATS and isinstance(props[2], bool)):
            raise FormatError(f"{where}: dcp.tensors[{g.name!r}] must be [requires_grad, memory_format, pin_memory]")
        dt = _adapter.numpy_to_tensor(np.empty(0, numpy_dtype(m.dtype_table[g.dtype]))).dtype
        chunks = []
        for p, off in zip(g.pieces, g.offsets):
            chunks.append(ChunkStorageMetadata(offsets=torch.Size(off), sizes=torch.Size(m.shape(p))))
            storage_data[MetadataIndex(g.name, off)] = p
        sdm[g.name] = TensorStorageMetadata(
            properties=TensorProperties(dtype=dt, requires_grad=props[0], memory_format=_MEMORY_FORMATS[props[1]], pin_memory=props[2]),
            size=torch.Size(g.shape),
            chunks=chunks,
        )
    for fqn, i in bmd.items():
        if not isinstance(fqn, str) or type(i) is not int or not 0 <= i < m.num_tensors or fqn in sdm:
            raise FormatError(f"{where}: dcp.bytes entry {fqn!r} is invalid")
        sdm[fqn] = BytesStorageMetadata()
        storage_data[MetadataIndex(fqn)] = i
    pd = d.get("planner_data")
    mappings = _plain_mappings(pd) if pd is not None else None
    if pd is not None and mappings is None:
        raise FormatError(f"{where}: dcp.planner_data is not a map of key paths")
    sm = d.get("storage_meta") if isinstance(d.get("storage_meta"), dict) else {}
    version = d.get("version") if isinstance(d.get("version"), str) else None
    return Metadata(
        state_dict_metadata=sdm,
        planner_data=mappings,
        storage_data=storage_data,
        storage_meta=StorageMeta(checkpoint_id=sm.get("checkpoint_id") if isinstance(sm.get("checkpoint_id"), str) else None,
                                 save_id=sm.get("save_id") if isinstance(sm.get("save_id"), str) else None,
                                 load_id=uuid.uuid4().hex),
        version=version,
    )
