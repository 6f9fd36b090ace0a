"""The manifest: what a checkpoint holds and where every byte of it lies.

The manifest is columnar so that opening a checkpoint with 100,000 tensors decodes a
handful of msgpack strings and byte arrays instead of 100,000 small maps; the tree is kept
as an encoded blob and decoded only when asked for. See spec/FORMAT.md for the layout.

Example:
    >>> import numpy as np
    >>> from ckptfmt.format.manifest import ManifestBuilder, decode_manifest
    >>> b = ManifestBuilder(chunk_size=4096)
    >>> f = b.add_file("a.data")
    >>> t = b.add_tensor("w", "float32", (2,))
    >>> b.add_chunk(f, 0, b"\\0" * 32)
    >>> b.set_file_size(f, 8)
    >>> m = decode_manifest(b.encode(tree=["t", 0], metadata=None, producer={}))
    >>> m.names, m.tensor(0).nbytes
    (['w'], 8)
"""

from __future__ import annotations

__all__ = ["FileEntry", "TensorEntry", "Manifest", "ManifestBuilder", "decode_manifest", "encode_manifest", "parent_depth"]

import time
from dataclasses import dataclass, field
from typing import Any

import msgpack
import numpy as np

from ckptfmt.errors import FormatError, IntegrityError, LimitExceededError, UnsupportedVersionError
from ckptfmt.format.dtypes import DTYPE_NAMES, dtype_itemsize, numpy_dtype
from ckptfmt.format.hashing import DEFAULT_HASH, FINGERPRINTS, get_fingerprint, get_hash
from ckptfmt.format.shards import decode_shards
from ckptfmt.format.spec import (
    ALIGNMENT,
    FORMAT_NAME,
    FORMAT_VERSION,
    LIMITS,
    MAX_CHUNK_SIZE,
    MIN_CHUNK_SIZE,
    SHARDED_VERSION,
    Limits,
)
from ckptfmt.format.tree import decode_tree


@dataclass(frozen=True, slots=True)
class FileEntry:
    """A data file: its path relative to the checkpoint directory and its size in bytes."""

    path: str
    size: int


@dataclass(frozen=True, slots=True)
class TensorEntry:
    """One tensor of a manifest, with the range of its chunks in the chunk table."""

    index: int
    name: str
    dtype: str
    shape: tuple[int, ...]
    nbytes: int
    first_chunk: int
    num_chunks: int

    @property
    def numpy_dtype(self) -> np.dtype:
        return numpy_dtype(self.dtype)


@dataclass(frozen=True, slots=True, eq=False)
class Manifest:
    """A decoded, validated manifest. Columns are parallel arrays indexed by tensor."""

    version: tuple[int, int]
    digest: bytes
    manifest_hash_alg: str
    created: float
    producer: Any
    metadata: Any
    hash_alg: str
    chunk_size: int
    alignment: int
    files: tuple[FileEntry, ...]
    names: list[str]
    dtypes: np.ndarray  # uint8 index into dtype_table
    dtype_table: tuple[str, ...]
    ranks: np.ndarray  # uint8
    dims: np.ndarray  # int64, all shapes concatenated
    nbytes: np.ndarray  # int64
    first_chunk: np.ndarray  # int64
    chunk_file: np.ndarray  # uint32
    chunk_offset: np.ndarray  # int64
    chunk_hashes: bytes
    tree_blob: bytes
    parent: Any = None
    #: 1.2: indices of the files this save wrote itself (``None``: those not starting ``../``).
    wrote: tuple[int, ...] | None = None
    #: 1.3: the pieces of sharded tensors (a ShardTable), or None for an unsharded checkpoint.
    shards: Any = None
    #: 1.3: torch.distributed.checkpoint's metadata for this checkpoint, as plain data.
    dcp: Any = None
    #: Optional (section 10.1): the fingerprint function of ``chunk_fps``, or None when the
    #: manifest has no fingerprints (or names a function this ckptfmt does not know).
    fp_alg: str | None = None
    #: Each chunk's fingerprint, concatenated (``m`` x its size), or None.
    chunk_fps: bytes | None = None
    where: str = "manifest"
    _cache: dict = field(default_factory=dict, repr=False)

    @property
    def num_tensors(self) -> int:
        return len(self.names)

    @property
    def num_chunks(self) -> int:
        return len(self.chunk_offset)

    def own_files(self) -> list[int]:
        """Indices of the data files this checkpoint's own save wrote (the rest are shared)."""
        if self.wrote is not None:
            return list(self.wrote)
        return [i for i, f in enumerate(self.files) if not f.path.startswith("../")]

    @property
    def hexdigest(self) -> str:
        """The checkpoint's identity: the hash of the manifest body, as hex."""
        return self.digest.hex()

    def index_of(self, name: str) -> int:
        """Return the tensor number of ``name``; raises KeyError if absent."""
        index = self._cache.get("names")
        if index is None:
            index = self._cache["names"] = {n: i for i, n in enumerate(self.names)}
        return index[name]

    def shape(self, i: int) -> tuple[int, ...]:
        start = int(self._dim_starts()[i])
        return tuple(int(d) for d in self.dims[start : start + int(self.ranks[i])])

    def _dim_starts(self) -> np.ndarray:
        cached = self._cache.get("dim_starts")
        if cached is None:
            cached = np.zeros(len(self.ranks), np.int64)
            np.cumsum(self.ranks[:-1], out=cached[1:])
            self._cache["dim_starts"] = cached
        return cached

    def tensor(self, i: int) -> TensorEntry:
        """The entry of tensor number ``i``."""
        cols = self.columns()
        if cols is not None:
            nbytes, first, dtypes, ranks, starts, dims = cols
            nb = nbytes[i]
            s = starts[i]
            return TensorEntry(i, self.names[i], self.dtype_table[dtypes[i]], tuple(dims[s : s + ranks[i]]), nb, first[i], -(-nb // self.chunk_size))
        nb = int(self.nbytes[i])
        return TensorEntry(
            index=i,
            name=self.names[i],
            dtype=self.dtype_table[int(self.dtypes[i])],
            shape=self.shape(i),
            nbytes=nb,
            first_chunk=int(self.first_chunk[i]),
            num_chunks=-(-nb // self.chunk_size),
        )

    def columns(self) -> tuple[list[int], ...] | None:
        """The tensor columns as Python lists, once ``tensor`` has been asked for often.

        Indexing numpy arrays one element at a time costs more than the rest of a small
        tensor's read; converting whole columns costs about as much as 64 such lookups, so
        it is done after that many (a single ``info`` stays cheap on a huge manifest).
        """
        cols = self._cache.get("cols")
        if cols is None:
            n = self._cache.get("lookups", 0) + 1
            self._cache["lookups"] = n
            if n < 64:
                return None
            cols = self._cache["cols"] = (
                self.nbytes.tolist(), self.first_chunk.tolist(), self.dtypes.tolist(),
                self.ranks.tolist(), self._dim_starts().tolist(), self.dims.tolist(),
            )
        return cols

    def chunk_location(self, c: int) -> tuple[int, int]:
        """(file index, byte offset) of chunk ``c`` of the chunk table."""
        cols = self._cache.get("chunk_cols")
        if cols is None:
            if self._cache.get("cols") is None:
                return int(self.chunk_file[c]), int(self.chunk_offset[c])
            cols = self._cache["chunk_cols"] = (self.chunk_file.tolist(), self.chunk_offset.tolist())
        return cols[0][c], cols[1][c]

    def chunk_length(self, entry: TensorEntry, k: int) -> int:
        """Length in bytes of chunk ``k`` (0-based, within the tensor) of ``entry``."""
        return min(self.chunk_size, entry.nbytes - k * self.chunk_size)

    def chunk_hash(self, c: int) -> bytes:
        """The recorded hash of chunk ``c`` of the chunk table."""
        size = self._cache.get("hash_size")
        if size is None:
            size = self._cache["hash_size"] = get_hash(self.hash_alg).digest_size
        return self.chunk_hashes[c * size : (c + 1) * size]

    def chunk_fp(self, c: int) -> bytes | None:
        """The recorded fingerprint of chunk ``c`` (section 10.1), or None without fingerprints."""
        if self.chunk_fps is None:
            return None
        size = FINGERPRINTS[self.fp_alg]  # the size alone: reading needs no fingerprint library
        return self.chunk_fps[c * size : (c + 1) * size]

    def decode_tree(self, make_leaf, limits: Limits = LIMITS, *, make_shard=None, make_opaque=None) -> Any:
        """Decode the saved tree, calling ``make_leaf(i)`` for tensor leaves.

        In a sharded checkpoint (1.3) ``make_shard(j)`` builds sharded tensor ``j`` and
        ``make_opaque(i, path)`` an object only its framework can restore (tensor ``i``
        holds its serialized bytes).
        """
        try:
            node = msgpack.unpackb(self.tree_blob, raw=False, strict_map_key=False, use_list=True)
        except Exception as e:
            raise FormatError(f"{self.where}: the tree is not valid msgpack ({e})") from None
        n_shards = len(self.shards.tensors) if self.shards is not None else 0
        return decode_tree(node, self.num_tensors, make_leaf, limits, where=self.where,
                           n_shards=n_shards, make_shard=make_shard, make_opaque=make_opaque)


def _u(arr: np.ndarray, dt: str) -> bytes:
    return np.ascontiguousarray(arr, dtype=dt).tobytes()


class ManifestBuilder:
    """Collects files, tensors and chunks while a checkpoint is written, then encodes them.

    Chunks must be added in tensor order: all chunks of tensor 0, then of tensor 1, ...
    """

    def __init__(self, *, chunk_size: int, hash_alg: str = DEFAULT_HASH, alignment: int = ALIGNMENT,
                 fingerprint: str | None = None) -> None:
        if not MIN_CHUNK_SIZE <= chunk_size <= MAX_CHUNK_SIZE or chunk_size % ALIGNMENT:
            raise ValueError(
                f"chunk_size must be a multiple of {ALIGNMENT} between {MIN_CHUNK_SIZE} and {MAX_CHUNK_SIZE}, got {chunk_size}"
            )
        self.chunk_size = chunk_size
        self.hash = get_hash(hash_alg)
        self.alignment = alignment
        self.files: list[list] = []
        self.names: list[str] = []
        self.dtypes: list[int] = []
        self.ranks: list[int] = []
        self.dims: list[int] = []
        self.chunk_file: list[int] = []
        self.chunk_offset: list[int] = []
        self.hashes: list[bytes] = []
        #: With ``fingerprint``, every chunk's fingerprint (section 10.1); a chunk added
        #: without one drops the column (it must cover every chunk or none).
        self.fingerprint = get_fingerprint(fingerprint) if fingerprint else None
        if fingerprint and self.fingerprint is None:
            raise ValueError(f"unknown fingerprint {fingerprint!r}")
        self.fps: list[bytes] = []
        self._dtype_codes = {n: i for i, n in enumerate(DTYPE_NAMES)}
        self.digest = b""

    def add_file(self, path: str) -> int:
        self.files.append([path, 0])
        return len(self.files) - 1

    def set_file_size(self, index: int, size: int) -> None:
        self.files[index][1] = size

    def add_tensor(self, name: str, dtype: str, shape: tuple[int, ...]) -> int:
        if len(shape) > LIMITS.max_rank:
            raise LimitExceededError(f"tensor {name!r} has rank {len(shape)} > {LIMITS.max_rank}")
        if len(name) * 4 > LIMITS.max_name_bytes and len(name.encode()) > LIMITS.max_name_bytes:
            raise LimitExceededError(f"tensor name {name[:80]!r}... is longer than {LIMITS.max_name_bytes} bytes")
        self.names.append(name)
        self.dtypes.append(self._dtype_codes[dtype])
        self.ranks.append(len(shape))
        self.dims.extend(map(int, shape))
        return len(self.names) - 1

    def add_chunk(self, file_index: int, offset: int, digest: bytes, fp: bytes | None = None) -> None:
        self.chunk_file.append(file_index)
        self.chunk_offset.append(offset)
        self.hashes.append(digest)
        if self.fingerprint is not None:
            if fp is None:
                self.fingerprint = None
                self.fps = []
            else:
                self.fps.append(fp)

    def encode(self, *, tree: Any, metadata: Any, producer: Any, created: float | None = None, extra: dict | None = None) -> bytes:
        """Encode the manifest file (envelope + hashed body) and return its bytes.

        ``extra`` adds optional body fields (e.g. ``parent`` of an incremental save).
        """
        if len(self.names) > LIMITS.max_tensors:
            raise LimitExceededError(f"{len(self.names)} tensors exceed the limit of {LIMITS.max_tensors}")
        try:
            tree_blob = msgpack.packb(tree, use_bin_type=True)
            body = {
                "created": time.time() if created is None else created,
                "producer": producer,
                "metadata": metadata,
                "hash_alg": self.hash.name,
                "chunk_size": self.chunk_size,
                "alignment": self.alignment,
                "files": self.files,
                "tensors": {
                    "names": self.names,
                    "dtype_table": list(DTYPE_NAMES),
                    "dtype": _u(self.dtypes, "u1"),
                    "rank": _u(self.ranks, "u1"),
                    "dims": _u(self.dims, "<u8"),
                },
                "chunks": {
                    "file": _u(self.chunk_file, "<u4"),
                    "offset": _u(self.chunk_offset, "<u8"),
                    "hash": b"".join(self.hashes),
                },
                "tree": tree_blob,
            }
            if self.fingerprint is not None and self.fps:
                body["chunks"]["fp_alg"] = self.fingerprint.name
                body["chunks"]["fp"] = b"".join(self.fps)
            for k, v in (extra or {}).items():
                body.setdefault(k, v)
            # A sharded checkpoint's tree uses nodes older readers refuse, so it says 1.3.
            version = SHARDED_VERSION if "shards" in body else FORMAT_VERSION
            body_bytes = msgpack.packb(body, use_bin_type=True)
        except (TypeError, ValueError, OverflowError) as e:
            raise FormatError(f"cannot encode the manifest: {e} (is the metadata a msgpack-able value?)") from None
        digest = get_hash(self.hash.name).digest(body_bytes)
        self.digest = digest
        envelope = {
            "format": FORMAT_NAME,
            "version": list(version),
            "hash_alg": self.hash.name,
            "hash": digest,
            "body": body_bytes,
        }
        return msgpack.packb(envelope, use_bin_type=True)


def encode_manifest(builder: ManifestBuilder, **kwargs: Any) -> bytes:
    """Functional spelling of :meth:`ManifestBuilder.encode`."""
    return builder.encode(**kwargs)


def _req(d: Any, key: str, typ: type | tuple, where: str) -> Any:
    if not isinstance(d, dict) or key not in d:
        raise FormatError(f"{where}: required field {key!r} is missing")
    v = d[key]
    if not isinstance(v, typ) or (typ is int and isinstance(v, bool)):
        raise FormatError(f"{where}: field {key!r} has type {type(v).__name__}")
    return v


def _array(blob: bytes, dt: str, count: int | None, what: str, where: str) -> np.ndarray:
    item = np.dtype(dt).itemsize
    if len(blob) % item or (count is not None and len(blob) != count * item):
        raise FormatError(f"{where}: column {what!r} has {len(blob)} bytes, expected {count} x {item}")
    return np.frombuffer(blob, dtype=dt)


def _unpack(data: bytes, where: str) -> Any:
    try:
        return msgpack.unpackb(data, raw=False, strict_map_key=False, use_list=True)
    except Exception as e:  # msgpack raises several unrelated types on bad input
        raise FormatError(f"{where}: not a valid ckptfmt manifest ({type(e).__name__}: {e})") from None


def decode_manifest(data: bytes, *, where: str = "manifest", limits: Limits = LIMITS, check_hash: bool = True) -> Manifest:
    """Decode and validate manifest bytes.

    Every count, size and offset is checked against the spec's limits and against each
    other before any array is allocated from it.

    Args:
        data: the manifest file's bytes.
        where: names the file in error messages.
        limits: the limits to enforce.
        check_hash: verify the body hash (turn off only for trusted data).

    Raises:
        FormatError: malformed manifest. IntegrityError: the body hash does not match.
        UnsupportedVersionError: an unknown major version.
    """
    if len(data) > limits.max_manifest_bytes:
        raise LimitExceededError(f"{where}: manifest is {len(data)} bytes, over the limit of {limits.max_manifest_bytes}")
    env = _unpack(data, where)
    if not isinstance(env, dict) or env.get("format") != FORMAT_NAME:
        raise FormatError(f"{where}: not a {FORMAT_NAME} manifest (missing or wrong 'format' field)")
    version = env.get("version")
    if (
        not isinstance(version, list)
        or len(version) != 2
        or not all(type(v) is int and v >= 0 for v in version)
    ):
        raise FormatError(f"{where}: invalid 'version' field {version!r}")
    if version[0] != FORMAT_VERSION[0]:
        raise UnsupportedVersionError(
            f"{where}: format version {version[0]}.{version[1]} is not supported by this ckptfmt "
            f"(reads {FORMAT_VERSION[0]}.x); upgrade ckptfmt"
        )
    alg = _req(env, "hash_alg", str, where)
    digest = _req(env, "hash", bytes, where)
    body_bytes = _req(env, "body", bytes, where)
    hasher = get_hash(alg)
    if len(digest) != hasher.digest_size:
        raise FormatError(f"{where}: manifest hash has {len(digest)} bytes, expected {hasher.digest_size}")
    if check_hash and hasher.digest(body_bytes) != digest:
        raise IntegrityError(f"{where}: manifest hash mismatch: the manifest was altered or corrupted")
    body = _unpack(body_bytes, where)
    if not isinstance(body, dict):
        raise FormatError(f"{where}: manifest body is not a map")

    chunk_alg = _req(body, "hash_alg", str, where)
    chunk_hasher = get_hash(chunk_alg)
    chunk_size = _req(body, "chunk_size", int, where)
    if not MIN_CHUNK_SIZE <= chunk_size <= MAX_CHUNK_SIZE:
        raise FormatError(f"{where}: chunk_size {chunk_size} outside {MIN_CHUNK_SIZE}..{MAX_CHUNK_SIZE}")
    alignment = _req(body, "alignment", int, where)
    created = body.get("created", 0.0)
    if not isinstance(created, (int, float)) or isinstance(created, bool):
        raise FormatError(f"{where}: field 'created' is not a number")

    files_raw = _req(body, "files", list, where)
    if len(files_raw) > limits.max_files:
        raise LimitExceededError(f"{where}: {len(files_raw)} data files exceed the limit of {limits.max_files}")
    files = []
    for i, fe in enumerate(files_raw):
        if (
            not isinstance(fe, list)
            or len(fe) < 2
            or not isinstance(fe[0], str)
            or type(fe[1]) is not int
            or fe[1] < 0
        ):
            raise FormatError(f"{where}: files[{i}] must be [path, size]")
        if fe[1] > _MAX_FILE_BYTES:
            raise LimitExceededError(f"{where}: files[{i}] ({fe[0]!r}) records a size of {fe[1]} bytes, over the limit of {_MAX_FILE_BYTES}")
        _check_rel_path(fe[0], where)
        files.append(FileEntry(fe[0], fe[1]))

    tens = _req(body, "tensors", dict, where)
    names = _req(tens, "names", list, where)
    n = len(names)
    if n > limits.max_tensors:
        raise LimitExceededError(f"{where}: {n} tensors exceed the limit of {limits.max_tensors}")
    if not all(type(s) is str for s in names):
        raise FormatError(f"{where}: tensor names must be strings")
    long = [s for s in names if len(s) * 4 > limits.max_name_bytes and len(s.encode()) > limits.max_name_bytes]
    if long:
        raise LimitExceededError(f"{where}: tensor name {long[0][:80]!r}... exceeds {limits.max_name_bytes} bytes")
    if len(set(names)) != n:
        raise FormatError(f"{where}: duplicate tensor names")
    dtype_table = _req(tens, "dtype_table", list, where)
    if len(dtype_table) > 255:
        raise FormatError(f"{where}: dtype table too long")
    for name in dtype_table:
        dtype_itemsize(name)  # raises FormatError for unknown names
    dtypes = _array(_req(tens, "dtype", bytes, where), "u1", n, "dtype", where)
    if n and int(dtypes.max()) >= len(dtype_table):
        raise FormatError(f"{where}: dtype code out of range")
    ranks = _array(_req(tens, "rank", bytes, where), "u1", n, "rank", where)
    if n and int(ranks.max()) > limits.max_rank:
        raise LimitExceededError(f"{where}: a tensor has rank {int(ranks.max())} > {limits.max_rank}")
    total_dims = int(ranks.sum(dtype=np.int64))
    dims_u = _array(_req(tens, "dims", bytes, where), "<u8", total_dims, "dims", where)
    if total_dims and int(dims_u.max()) > limits.max_tensor_bytes:
        raise LimitExceededError(f"{where}: a dimension exceeds {limits.max_tensor_bytes}")
    dims = dims_u.astype(np.int64)
    itemsizes = np.array([dtype_itemsize(d) for d in dtype_table] or [1], np.int64)[dtypes]
    nbytes = _products(ranks, dims, itemsizes, limits, where)

    nchunks = -(-nbytes // chunk_size)
    first_chunk = np.zeros(n, np.int64)
    if n:
        np.cumsum(nchunks[:-1], out=first_chunk[1:])
    total_chunks = int(nchunks.sum())
    if total_chunks > limits.max_chunks:
        raise LimitExceededError(f"{where}: {total_chunks} chunks exceed the limit of {limits.max_chunks}")
    chunks = _req(body, "chunks", dict, where)
    chunk_file = _array(_req(chunks, "file", bytes, where), "<u4", total_chunks, "chunks.file", where)
    chunk_offset_u = _array(_req(chunks, "offset", bytes, where), "<u8", total_chunks, "chunks.offset", where)
    hashes = _req(chunks, "hash", bytes, where)
    if len(hashes) != total_chunks * chunk_hasher.digest_size:
        raise FormatError(f"{where}: chunk hash column has {len(hashes)} bytes, expected {total_chunks * chunk_hasher.digest_size}")
    if total_chunks:
        if int(chunk_file.max()) >= len(files):
            raise FormatError(f"{where}: a chunk refers to data file #{int(chunk_file.max())} of {len(files)}")
        if int(chunk_offset_u.max()) > limits.max_tensor_bytes:
            raise FormatError(f"{where}: a chunk offset is out of range")
        chunk_offset = chunk_offset_u.astype(np.int64)
        lengths = np.full(total_chunks, chunk_size, np.int64)
        has = nchunks > 0
        last = first_chunk[has] + nchunks[has] - 1
        lengths[last] = nbytes[has] - (nchunks[has] - 1) * chunk_size
        sizes = np.array([f.size for f in files], np.int64)
        end = chunk_offset + lengths
        bad = np.nonzero(end > sizes[chunk_file])[0]
        if len(bad):
            c = int(bad[0])
            ti = int(np.searchsorted(first_chunk, c, side="right") - 1)
            raise FormatError(
                f"{where}: chunk {c - int(first_chunk[ti])} of tensor {names[ti]!r} ends at byte {int(end[c])}, "
                f"past the end of {files[int(chunk_file[c])].path} ({int(sizes[chunk_file[c]])} bytes)"
            )
    else:
        chunk_offset = np.zeros(0, np.int64)
    fp_alg, fps = _fingerprints(chunks, total_chunks, where)
    tree_blob = _req(body, "tree", bytes, where)
    wrote = body.get("wrote")
    if wrote is not None:
        if not isinstance(wrote, list) or not all(type(i) is int and 0 <= i < len(files) for i in wrote):
            raise FormatError(f"{where}: field 'wrote' must list indices into 'files'")
        wrote = tuple(wrote)
    shards = None
    if body.get("shards") is not None:
        dtype_items = [numpy_dtype(d).itemsize for d in dtype_table]

        def itemsize_of(code: int) -> int:
            if code >= len(dtype_items):
                raise FormatError(f"{where}: a sharded tensor's dtype code {code} is out of range")
            return dtype_items[code]

        def shape_of(i: int) -> tuple[int, ...]:
            start = int(dim_starts[i])
            return tuple(int(d) for d in dims[start : start + int(ranks[i])])

        dim_starts = np.zeros(n, np.int64)
        if n:
            np.cumsum(ranks[:-1], out=dim_starts[1:])
        shards = decode_shards(body["shards"], n_tensors=n, dtypes=dtypes, ranks=ranks, shape_of=shape_of,
                               itemsize_of=itemsize_of, names=names, limits=limits, where=where)
    return Manifest(
        version=(version[0], version[1]),
        digest=digest,
        manifest_hash_alg=alg,
        created=float(created),
        producer=body.get("producer"),
        metadata=body.get("metadata"),
        hash_alg=chunk_alg,
        chunk_size=chunk_size,
        alignment=alignment,
        files=tuple(files),
        names=names,
        dtypes=dtypes,
        dtype_table=tuple(dtype_table),
        ranks=ranks,
        dims=dims,
        nbytes=nbytes,
        first_chunk=first_chunk,
        chunk_file=chunk_file,
        chunk_offset=chunk_offset,
        chunk_hashes=hashes,
        tree_blob=tree_blob,
        parent=_check_parent(body.get("parent"), where),
        wrote=wrote,
        shards=shards,
        dcp=body.get("dcp"),
        fp_alg=fp_alg,
        chunk_fps=fps,
        where=where,
    )


def _fingerprints(chunks: dict, total_chunks: int, where: str) -> tuple[str | None, bytes | None]:
    """The optional fingerprint column (section 10.1): checked when known, ignored when not."""
    alg, fps = chunks.get("fp_alg"), chunks.get("fp")
    if alg is None and fps is None:
        return None, None
    if not isinstance(alg, str) or not isinstance(fps, bytes):
        raise FormatError(f"{where}: chunks.fp_alg (a string) and chunks.fp (bytes) must be given together")
    size = FINGERPRINTS.get(alg)  # only the digest size: opening a checkpoint imports no fingerprint library
    if size is None:
        return None, None  # a function this ckptfmt does not know: the column is ignored
    if len(fps) != total_chunks * size:
        raise FormatError(f"{where}: chunk fingerprint column has {len(fps)} bytes, expected {total_chunks * size}")
    return alg, fps


def _products(ranks: np.ndarray, dims: np.ndarray, itemsizes: np.ndarray, limits: Limits, where: str) -> np.ndarray:
    """Per-tensor byte sizes, refusing any product above the limit (checked in float first)."""
    n = len(ranks)
    if n == 0:
        return np.zeros(0, np.int64)
    # Prepend the item size to every shape so reduceat never sees an empty segment.
    seg_starts = np.zeros(n, np.int64)
    np.cumsum(ranks[:-1].astype(np.int64) + 1, out=seg_starts[1:])
    ext = np.empty(len(dims) + n, np.int64)
    mask = np.ones(len(ext), bool)
    mask[seg_starts] = False
    ext[seg_starts] = itemsizes
    ext[mask] = dims
    approx = np.multiply.reduceat(ext.astype(np.float64), seg_starts)
    if float(approx.max()) > limits.max_tensor_bytes:
        i = int(np.argmax(approx))
        raise LimitExceededError(f"{where}: tensor #{i} would be {approx[i]:.3g} bytes, over the limit of {limits.max_tensor_bytes}")
    # An empty tensor holds no bytes, but numpy still refuses a shape whose non-zero
    # dimensions multiply past its index range: (0, 2**62) must fail here, not at load.
    spread = np.multiply.reduceat(np.where(ext == 0, 1, ext).astype(np.float64), seg_starts)
    if float(spread.max()) > limits.max_tensor_bytes:
        i = int(np.argmax(spread))
        raise LimitExceededError(
            f"{where}: tensor #{i} has a shape whose non-zero dimensions span {spread[i]:.3g} bytes, "
            f"over the limit of {limits.max_tensor_bytes}"
        )
    return np.multiply.reduceat(ext, seg_starts)


#: A data file's recorded size must fit a signed 64-bit offset (sizes are compared as int64).
_MAX_FILE_BYTES = (1 << 63) - 1


def _check_parent(parent: Any, where: str) -> Any:
    """The optional ``parent`` field (1.1): a map whose known fields have their types."""
    if parent is None:
        return None
    if not isinstance(parent, dict):
        raise FormatError(f"{where}: field 'parent' is a {type(parent).__name__}, not a map")
    depth = parent.get("depth", 0)
    if type(depth) is not int or not 0 <= depth <= _MAX_FILE_BYTES:
        raise FormatError(f"{where}: parent.depth {depth!r} is not a non-negative integer")
    for key in ("name", "digest"):
        if key in parent and not isinstance(parent[key], str):
            raise FormatError(f"{where}: parent.{key} is a {type(parent[key]).__name__}, not a string")
    return parent


def _check_rel_path(p: str, where: str) -> None:
    if not p or len(p.encode()) > LIMITS.max_path_bytes or "\\" in p or "\0" in p or p.startswith("/"):
        raise FormatError(f"{where}: invalid data file path {p!r}")
    parts = p.split("/")
    # v1.0 allows a reference into a sibling checkpoint ("../other/x.data") and nothing else.
    if parts[0] == "..":
        parts = parts[2:] if len(parts) >= 3 and parts[1] not in ("", ".", "..") else [".."]
    if any(x in ("", ".", "..") for x in parts):
        raise FormatError(f"{where}: invalid data file path {p!r}")


def parent_depth(parent: Any) -> int:
    """The chain depth a manifest's ``parent`` link records: 0 when it has none or a malformed one.

    An incremental checkpoint's ``parent`` is ``{"name", "digest", "depth"}``; its own depth
    in the chain is ``parent_depth(parent) + 1``.

    Example:
        >>> parent_depth({"name": "step-1", "depth": 2}), parent_depth(None), parent_depth({"depth": "x"})
        (2, 0, 0)
    """
    depth = parent.get("depth", 0) if isinstance(parent, dict) else 0
    return depth if isinstance(depth, int) and not isinstance(depth, bool) and depth >= 0 else 0
