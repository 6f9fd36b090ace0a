"""Read and write TensorFlow TensorBundle checkpoints (``<prefix>.index`` + data shards).

No TensorFlow needed: the index is a LevelDB-style table (see :mod:`._table`) whose
empty key holds a ``BundleHeaderProto`` and every other key a ``BundleEntryProto``
saying which ``<prefix>.data-NNNNN-of-MMMMM`` shard, offset and size hold a tensor and
the masked CRC32C of its bytes. Numeric tensors are stored as raw little-endian
arrays; string tensors as ``varint64`` lengths, a masked CRC32C of those length bytes,
then the bytes. Partitioned variables have an entry with ``slices`` and no data; each
slice is stored under a key built by TensorFlow's ``EncodeTensorNameSlice``.

Example:
    >>> from ckptfmt.converters.tf import TFCheckpointReader, write_checkpoint
    >>> import numpy as np
    >>> write_checkpoint("/tmp/doc_ckpt/model", {"w": np.ones((2, 3), np.float32)})
    >>> r = TFCheckpointReader("/tmp/doc_ckpt/model")
    >>> r.shape("w"), r.get("w").sum()
    ((2, 3), 6.0)
"""

from __future__ import annotations

import errno
import os
import sys
import threading
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ckptfmt.errors import (
    CheckpointNotFoundError,
    FormatError,
    IntegrityError,
    LimitExceededError,
    StorageError,
    TensorNotFoundError,
    UnsupportedDtypeError,
    UnsupportedVersionError,
)
from ckptfmt.storage.local import open_regular_file

from ..files import atomic_file, commit_file
from ._proto import BundleEntry, BundleHeader, CheckpointState, VersionDef, read_varint, varint
from ._table import build_table, crc32c, mask_crc, read_table, unmask_crc

__all__ = [
    "TFCheckpointReader",
    "TFCheckpointWriter",
    "TensorEntry",
    "write_checkpoint",
    "update_state_file",
    "latest_checkpoint",
    "slice_name",
    "OBJECT_GRAPH_KEY",
]

OBJECT_GRAPH_KEY = "_CHECKPOINTABLE_OBJECT_GRAPH"

# The TensorBundle version TensorFlow writes and the newest it (and we) can read.
_BUNDLE_VERSION = 1
_MAX_SHARDS = 1 << 20
_MAX_RANK = 64
_MAX_SLICES = 1 << 20
_MAX_ELEMENTS = 1 << 48

# DataType enum (types.proto) -> numpy dtype. DT_STRING is handled separately.
_DT_STRING = 7
# bfloat16 and the float8 types come from ml_dtypes, whose import costs most of a command's
# start-up: it is imported when a tensor of one of them is read, not with this module.
_ML_ENUMS = {14: "bfloat16", 24: "float8_e5m2", 25: "float8_e4m3fn", 26: "float8_e4m3fnuz", 27: "float8_e4m3b11fnuz", 28: "float8_e5m2fnuz"}


class _EnumDtypes(dict):
    """DataType enum -> numpy dtype; ml_dtypes entries are filled in on first use."""

    def __missing__(self, code: int) -> np.dtype:
        name = _ML_ENUMS.get(code)
        if name is None:
            raise KeyError(code)
        _load_ml_enums()
        return self[code]


_ENUM_TO_NUMPY: dict[int, np.dtype] = _EnumDtypes({
    1: np.dtype(np.float32),
    2: np.dtype(np.float64),
    3: np.dtype(np.int32),
    4: np.dtype(np.uint8),
    5: np.dtype(np.int16),
    6: np.dtype(np.int8),
    8: np.dtype(np.complex64),
    9: np.dtype(np.int64),
    10: np.dtype(np.bool_),
    17: np.dtype(np.uint16),
    18: np.dtype(np.complex128),
    19: np.dtype(np.float16),
    22: np.dtype(np.uint32),
    23: np.dtype(np.uint64),
})
_NUMPY_TO_ENUM = {dt: e for e, dt in _ENUM_TO_NUMPY.items()}
_READABLE_ENUMS = frozenset(_ENUM_TO_NUMPY) | frozenset(_ML_ENUMS)
_ENUM_ITEMSIZE = {**{e: dt.itemsize for e, dt in _ENUM_TO_NUMPY.items()}, **{e: 2 if n == "bfloat16" else 1 for e, n in _ML_ENUMS.items()}}


def _load_ml_enums() -> None:
    import ml_dtypes

    for code, name in _ML_ENUMS.items():
        dt = np.dtype(getattr(ml_dtypes, name))
        _ENUM_TO_NUMPY[code] = dt
        _NUMPY_TO_ENUM[dt] = code


_ENUM_NAMES = {
    1: "float32", 2: "float64", 3: "int32", 4: "uint8", 5: "int16", 6: "int8", 7: "string",
    8: "complex64", 9: "int64", 10: "bool", 11: "qint8", 12: "quint8", 13: "qint32",
    14: "bfloat16", 15: "qint16", 16: "quint16", 17: "uint16", 18: "complex128",
    19: "float16", 20: "resource", 21: "variant", 22: "uint32", 23: "uint64",
    24: "float8_e5m2", 25: "float8_e4m3fn", 26: "float8_e4m3fnuz", 27: "float8_e4m3b11fnuz",
    28: "float8_e5m2fnuz", 29: "int4", 30: "uint4",
}

Extent = tuple[int, "int | None"]

# read_all: tensors up to this size are read in runs of neighbours (one preadv per run of
# at most _BATCH_RUN_MAX bytes, bridging gaps up to _BATCH_GAP); larger ones one by one,
# on two threads only when they add up to _THREADS_MIN_BYTES (threads cost more than they
# save on small reads).
_BATCH_TENSOR_MAX = 1 << 20
_BATCH_RUN_MAX = 16 << 20
_BATCH_GAP = 64 << 10
_THREADS_MIN_BYTES = 64 << 20


@dataclass(frozen=True, slots=True)
class TensorEntry:
    """Where one tensor of a TensorBundle lives, as recorded in the index.

    Attributes:
        dtype: TensorFlow dtype name (``"float32"``, ``"bfloat16"``, ``"string"``...).
        shape: Full tensor shape.
        shard: Data shard number.
        offset: Byte offset in that shard.
        size: Byte size in that shard.
        crc32c: Unmasked CRC32C of the stored bytes.
        slices: For a partitioned variable, the ``(start, length)`` extents of each
            stored slice (``length`` None means the whole dimension); otherwise empty.
    """

    dtype: str
    shape: tuple[int, ...]
    shard: int
    offset: int
    size: int
    crc32c: int
    slices: tuple[tuple[Extent, ...], ...] = ()


def _fmt_key(key: bytes) -> str:
    return repr(key.decode("utf-8", "backslashreplace"))


# --------------------------------------------------------------------- slice key naming


def _ordered_num(v: int) -> bytes:
    """OrderedCode ``WriteNumIncreasing``: a length byte, then big-endian bytes."""
    body = v.to_bytes((v.bit_length() + 7) // 8, "big") if v else b""
    return bytes([len(body)]) + body


def _ordered_signed(v: int) -> bytes:
    """OrderedCode ``WriteSignedNumIncreasing``: n leading header bits code the length n."""
    x = ~v if v < 0 else v
    n = 1
    while n < 10 and x.bit_length() > 7 * n - 1:
        n += 1
    raw = bytearray((v & ((1 << (8 * n)) - 1)).to_bytes(n, "big"))
    # Header: n one-bits then a zero bit, XOR-ed over the sign-extended value.
    ones = n
    i = 0
    while ones >= 8:
        raw[i] ^= 0xFF
        ones -= 8
        i += 1
    raw[i] ^= (0xFF << (8 - ones)) & 0xFF
    return bytes(raw)


def _ordered_string(s: bytes) -> bytes:
    """OrderedCode ``WriteString``: NUL and 0xFF escaped, then the terminator 00 01."""
    return _escape_ordered(s) + b"\x00\x01"


def _escape_ordered(s: bytes) -> bytes:
    out = bytearray()
    for b in s:
        if b == 0x00:
            out += b"\x00\xff"
        elif b == 0xFF:
            out += b"\xff\x00"
        else:
            out.append(b)
    return bytes(out)


def slice_name(name: str, index: tuple[slice, ...]) -> str:
    """A slice of a partitioned variable as a person writes it: ``emb[75:100, 0:8]``.

    Example:
        >>> slice_name("emb", (slice(75, 100), slice(0, 8)))
        'emb[75:100, 0:8]'
    """
    dims = ", ".join(f"{s.start}:{s.stop}" for s in index)
    return f"{name}[{dims}]"


def slice_key(name: bytes, extents: tuple[Extent, ...]) -> bytes:
    """The index key TensorFlow stores one slice of a partitioned variable under."""
    out = _ordered_num(0) + _ordered_string(name) + _ordered_num(len(extents))
    for start, length in extents:
        if length is None:
            start, length = 0, -1
        out += _ordered_signed(start) + _ordered_signed(length)
    return out


# ----------------------------------------------------------------------- reader


def latest_checkpoint(directory: str | os.PathLike[str]) -> str | None:
    """Return the latest checkpoint prefix recorded in ``directory/checkpoint``, or None.

    Relative paths in the state file are relative to ``directory``, as in TensorFlow.

    Example:
        >>> latest_checkpoint("fixtures/tf/tf_module")  # doctest: +SKIP
        'fixtures/tf/tf_module/ckpt-1'
    """
    state_path = Path(directory) / "checkpoint"
    try:
        text = state_path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    except UnicodeDecodeError:
        raise FormatError(f"{state_path}: not UTF-8 text; fix or delete the state file") from None
    state = CheckpointState.parse(text, str(state_path))
    if not state.model_checkpoint_path:
        return None
    p = Path(state.model_checkpoint_path)
    if not p.is_absolute():
        return str(Path(directory) / p)
    # TF1 Savers record absolute paths; after the directory is moved, look next to the file.
    if not os.path.exists(str(p) + ".index") and os.path.exists(Path(directory) / (p.name + ".index")):
        return str(Path(directory) / p.name)
    return str(p)


def _resolve_prefix(path: str | os.PathLike[str]) -> str:
    p = os.fspath(path)
    if p.endswith(".index") and os.path.isfile(p):
        return p[: -len(".index")]
    if os.path.isfile(p + ".index"):
        return p
    if os.path.isdir(p):
        latest = latest_checkpoint(p)
        if latest is None:
            raise CheckpointNotFoundError(
                f"{p}: directory has no 'checkpoint' state file naming a checkpoint; pass a "
                "checkpoint prefix such as 'dir/ckpt-1' instead"
            )
        if not os.path.isfile(latest + ".index"):
            raise CheckpointNotFoundError(
                f"{p}/checkpoint names {latest!r} but {latest}.index does not exist; the "
                "checkpoint was deleted or moved, fix the state file or pass a prefix"
            )
        return latest
    raise CheckpointNotFoundError(
        f"{p}: no TensorFlow checkpoint here (looked for {p}.index and a directory with a "
        "'checkpoint' file); pass the prefix, e.g. 'dir/ckpt-1' for 'dir/ckpt-1.index'"
    )


def _open_file(path: str) -> int:
    """Open a regular file; a FIFO or device is refused at once (never waited on)."""
    try:
        return open_regular_file(path)
    except StorageError as e:
        if e.errno == errno.EINVAL:
            raise FormatError(str(e)) from None
        raise


class TFCheckpointReader(Mapping[str, np.ndarray]):
    """Lazy reader of a TensorFlow TensorBundle checkpoint.

    Opening parses and validates the index only; :meth:`get` reads just the bytes of the
    requested tensor from its data shard and checks their CRC32C.

    Args:
        path: A checkpoint prefix (``dir/ckpt-3``), its ``.index`` file, or a directory
            holding a ``checkpoint`` state file (the latest checkpoint is opened).

    Raises:
        CheckpointNotFoundError: Nothing to open at ``path``.
        FormatError: The index is malformed (``IntegrityError`` on checksum mismatch).

    Example:
        >>> r = TFCheckpointReader("fixtures/tf/tf_module")  # doctest: +SKIP
        >>> r.get("model/scale/.ATTRIBUTES/VARIABLE_VALUE")  # doctest: +SKIP
        array(2., dtype=float32)
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.prefix = _resolve_prefix(path)
        self.index_path = self.prefix + ".index"
        with os.fdopen(_open_file(self.index_path), "rb") as f:
            data = f.read()
        pairs = read_table(data, self.index_path)
        if not pairs or pairs[0][0] != b"":
            raise FormatError(
                f"{self.index_path}: the index has no header entry (empty key); this is not "
                "a TensorBundle index or it is corrupt"
            )
        self.header = BundleHeader.decode(pairs[0][1], f"{self.index_path} header")
        h = self.header
        if not 1 <= h.num_shards <= _MAX_SHARDS:
            raise FormatError(
                f"{self.index_path}: header claims {h.num_shards} data shards (allowed 1.."
                f"{_MAX_SHARDS}); the index is corrupt"
            )
        if h.endianness not in (0, 1):
            raise FormatError(f"{self.index_path}: unknown endianness {h.endianness} in header")
        if h.version.min_consumer > _BUNDLE_VERSION or _BUNDLE_VERSION in h.version.bad_consumers:
            raise UnsupportedVersionError(
                f"{self.index_path}: bundle version {h.version} cannot be read by this reader "
                f"(supports version {_BUNDLE_VERSION}); convert it with a newer ckptfmt"
            )
        self._raw: dict[bytes, bytes] = dict(pairs[1:])
        self._entries: dict[bytes, BundleEntry] = {}
        # Slice keys begin with OrderedCode(0) == b"\x00"; TF hides them from listings.
        self._keys = [k.decode("utf-8", "surrogateescape") for k in self._raw if not k.startswith(b"\x00")]
        self._shard_sizes: dict[int, int] = {}
        self._fds: dict[int, int] = {}
        self._fd_lock = threading.Lock()

    # -- Mapping protocol --------------------------------------------------------------

    def __getitem__(self, key: str) -> np.ndarray:
        return self.get(key)

    def __iter__(self) -> Iterator[str]:
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)

    def __contains__(self, key: object) -> bool:
        return isinstance(key, str) and self._bkey(key) in self._raw and not key.startswith("\x00")

    def keys(self) -> list[str]:  # type: ignore[override]
        """Tensor names in index order (slice keys of partitioned variables excluded)."""
        return list(self._keys)

    def close(self) -> None:
        """Close open shard files; the reader reopens them if used again."""
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def __enter__(self) -> TFCheckpointReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass

    # -- metadata ----------------------------------------------------------------------

    @staticmethod
    def _bkey(key: str) -> bytes:
        return key.encode("utf-8", "surrogateescape")

    def _entry(self, bkey: bytes) -> BundleEntry:
        cached = self._entries.get(bkey)
        if cached is not None:
            return cached
        raw = self._raw.get(bkey)
        if raw is None:
            raise TensorNotFoundError(
                f"{self.index_path}: no tensor {_fmt_key(bkey)} in the checkpoint; list the "
                "available names with .keys()"
            )
        where = f"{self.index_path} entry {_fmt_key(bkey)}"
        e = BundleEntry.decode(raw, where)
        if len(e.shape) > _MAX_RANK or any(d < 0 for d in e.shape):
            raise FormatError(f"{where}: invalid shape {e.shape}; the index is corrupt")
        bound = 1
        for d in e.shape:
            bound *= max(d, 1)
        if bound > _MAX_ELEMENTS:
            raise LimitExceededError(
                f"{where}: shape {e.shape} exceeds {_MAX_ELEMENTS} elements; the index is corrupt"
            )
        if e.dtype not in _ENUM_NAMES:
            raise FormatError(f"{where}: unknown dtype enum {e.dtype}; the index is corrupt")
        if e.dtype not in _READABLE_ENUMS and e.dtype != _DT_STRING:
            raise UnsupportedDtypeError(
                f"{where}: dtype {_ENUM_NAMES.get(e.dtype, e.dtype)} cannot be read without "
                "TensorFlow; load this tensor with tf.train.load_checkpoint"
            )
        if e.slices:
            if len(e.slices) > _MAX_SLICES:
                raise LimitExceededError(f"{where}: {len(e.slices)} slices exceed {_MAX_SLICES}")
            for sl in e.slices:
                if len(sl) != len(e.shape):
                    raise FormatError(f"{where}: slice rank {len(sl)} != tensor rank {len(e.shape)}")
                for (start, length), dim in zip(sl, e.shape):
                    if start < 0 or (length is not None and (length < 0 or start + length > dim)):
                        raise FormatError(
                            f"{where}: slice extent ({start}, {length}) is outside dimension "
                            f"{dim}; the index is corrupt"
                        )
        else:
            if not 0 <= e.shard_id < self.header.num_shards:
                raise FormatError(
                    f"{where}: shard {e.shard_id} is outside 0..{self.header.num_shards - 1}"
                )
            if e.offset < 0 or e.size < 0:
                raise FormatError(f"{where}: negative offset {e.offset} or size {e.size}")
            if e.dtype != _DT_STRING:
                nbytes = _ENUM_ITEMSIZE[e.dtype]
                for d in e.shape:
                    nbytes *= d
                if nbytes != e.size:
                    raise FormatError(
                        f"{where}: shape {e.shape} of {_ENUM_NAMES[e.dtype]} needs {nbytes} "
                        f"bytes but the entry records {e.size}; the index is corrupt"
                    )
        self._entries[bkey] = e
        return e

    def entry(self, key: str) -> TensorEntry:
        """Index record of ``key``: dtype name, shape, shard, offset, size, crc32c, slices.

        Example:
            >>> r.entry("w").shape  # doctest: +SKIP
            (2, 3)
        """
        e = self._entry(self._bkey(key))
        return TensorEntry(
            _ENUM_NAMES.get(e.dtype, str(e.dtype)), e.shape, e.shard_id, e.offset, e.size,
            unmask_crc(e.crc32c), e.slices,
        )

    def dtype(self, key: str) -> np.dtype:
        """Numpy dtype of ``key`` (``object`` for strings; ml_dtypes for bfloat16/float8)."""
        e = self._entry(self._bkey(key))
        return np.dtype(object) if e.dtype == _DT_STRING else _ENUM_TO_NUMPY[e.dtype]

    def shape(self, key: str) -> tuple[int, ...]:
        """Shape of ``key``."""
        return self._entry(self._bkey(key)).shape

    # -- data --------------------------------------------------------------------------

    def shard_path(self, shard: int) -> str:
        return f"{self.prefix}.data-{shard:05d}-of-{self.header.num_shards:05d}"

    def _fd(self, shard: int) -> tuple[int, int]:
        fd = self._fds.get(shard)
        if fd is not None:
            return fd, self._shard_sizes[shard]
        with self._fd_lock:  # get() may run on several threads (read_all)
            return self._open_shard(shard)

    def _open_shard(self, shard: int) -> tuple[int, int]:
        fd = self._fds.get(shard)
        if fd is None:
            path = self.shard_path(shard)
            try:
                fd = _open_file(path)
            except FileNotFoundError:
                raise CheckpointNotFoundError(
                    f"{path}: data shard {shard} of checkpoint {self.prefix} is missing; the "
                    "checkpoint is incomplete, copy all its .data-* files"
                ) from None
            self._shard_sizes[shard] = os.fstat(fd).st_size
            self._fds[shard] = fd  # published last: the lock-free path in _fd reads it first
        return fd, self._shard_sizes[shard]

    def _check_span(self, e: BundleEntry, bkey: bytes) -> int:
        """Check the entry lies inside its shard before anything is allocated for it."""
        fd, fsize = self._fd(e.shard_id)
        if e.offset > fsize or e.size > fsize - e.offset:
            raise FormatError(
                f"{self.shard_path(e.shard_id)}: tensor {_fmt_key(bkey)} spans bytes "
                f"{e.offset}..{e.offset + e.size} but the shard holds {fsize} bytes; the shard "
                "is truncated, re-copy it"
            )
        return fd

    def _read_exact(self, e: BundleEntry, bkey: bytes, out: memoryview, check: bool = True) -> None:
        fd = self._check_span(e, bkey)
        path = self.shard_path(e.shard_id)
        done = 0
        while done < e.size:
            n = os.preadv(fd, [out[done:]], e.offset + done)
            if n <= 0:
                raise FormatError(
                    f"{path}: unexpected end of file reading tensor {_fmt_key(bkey)} at byte "
                    f"offset {e.offset + done}; the shard is truncated"
                )
            done += n
        if check:
            self._check_crc(e, bkey, crc32c(out))

    def _check_crc(self, e: BundleEntry, bkey: bytes, actual: int) -> None:
        if actual != unmask_crc(e.crc32c):
            raise IntegrityError(
                f"{self.shard_path(e.shard_id)}: checksum mismatch for tensor {_fmt_key(bkey)} "
                f"at byte offset {e.offset} (size {e.size}; stored {unmask_crc(e.crc32c):#010x}, "
                f"computed {actual:#010x}); the data shard is corrupt, restore it from a backup"
            )

    def _read_plain(self, bkey: bytes, e: BundleEntry) -> np.ndarray:
        self._check_span(e, bkey)
        if e.dtype == _DT_STRING:
            buf = bytearray(e.size)
            self._read_exact(e, bkey, memoryview(buf), check=False)
            return self._decode_strings(bkey, e, buf)
        dt = _ENUM_TO_NUMPY[e.dtype]
        arr = np.empty(e.shape, dtype=dt)
        self._read_exact(e, bkey, memoryview(arr.reshape(-1).view(np.uint8)))
        if self.header.endianness == 1 and dt.itemsize > 1:
            arr = arr.view(dt.newbyteorder(">")).astype(dt)
        return arr

    def _decode_strings(self, bkey: bytes, e: BundleEntry, buf: bytearray) -> np.ndarray:
        where = f"{self.shard_path(e.shard_id)} tensor {_fmt_key(bkey)}"
        count = 1
        for d in e.shape:
            count *= d
        # Every element needs at least one length byte, so a count above the size is bogus.
        if count > len(buf):
            raise FormatError(
                f"{where}: shape {e.shape} has {count} strings but the entry is only "
                f"{len(buf)} bytes; the index is corrupt"
            )
        # TensorFlow checksums each length as a 4-byte little-endian integer (not the
        # varint bytes it stores), then the masked length checksum, then the string bytes.
        lengths = []
        pos = 0
        for _ in range(count):
            n, pos = read_varint(buf, pos, where)
            lengths.append(n)
        if pos + 4 > len(buf):
            raise FormatError(f"{where}: string lengths run into the length checksum at byte offset {e.offset + pos}")
        fixed = np.array(lengths, dtype=np.uint64).astype("<u4").tobytes()
        crc = crc32c(fixed)
        stored = int.from_bytes(buf[pos : pos + 4], "little")
        if unmask_crc(stored) != crc:
            raise IntegrityError(
                f"{where}: checksum mismatch over the string lengths at byte offset "
                f"{e.offset + pos}; the data shard is corrupt, restore it from a backup"
            )
        crc = crc32c(memoryview(buf)[pos:], crc)
        self._check_crc(e, bkey, crc)
        pos += 4
        if sum(lengths) != len(buf) - pos:
            raise FormatError(
                f"{where}: string lengths add up to {sum(lengths)} bytes but {len(buf) - pos} "
                "remain; the checkpoint is corrupt"
            )
        out = np.empty(count, dtype=object)
        for i, n in enumerate(lengths):
            out[i] = bytes(buf[pos : pos + n])
            pos += n
        return out.reshape(e.shape)

    def get(self, key: str) -> np.ndarray:
        """Read one tensor, checking its CRC32C; strings come back as an object array of bytes.

        Raises:
            TensorNotFoundError: ``key`` is not in the checkpoint.
            IntegrityError: Stored bytes do not match their checksum.
            FormatError: The entry or shard is malformed or truncated.

        Example:
            >>> r.get("w").dtype  # doctest: +SKIP
            dtype('float32')
        """
        bkey = self._bkey(key)
        e = self._entry(bkey)
        if not e.slices:
            return self._read_plain(bkey, e)
        dt = np.dtype(object) if e.dtype == _DT_STRING else _ENUM_TO_NUMPY[e.dtype]
        total = int(np.prod(e.shape, dtype=object)) if e.shape else 1
        stored = sum(
            int(np.prod([dim if ln is None else ln for (_, ln), dim in zip(sl, e.shape)], dtype=object))
            if sl else 1
            for sl in e.slices
        )
        if total > stored:
            raise FormatError(
                f"{self.index_path} tensor {_fmt_key(bkey)}: {len(e.slices)} slices hold {stored} "
                f"elements, fewer than the {total} of shape {e.shape}; the checkpoint is incomplete"
            )
        parts = self._slice_entries(bkey, e, total)
        out = np.empty(e.shape, dtype=dt)
        covered = np.zeros(e.shape, dtype=bool) if out.size else None
        for skey, se, index in parts:
            out[index] = self._read_plain(skey, se)
            if covered is not None:
                covered[index] = True
        if covered is not None and not covered.all():
            raise FormatError(f"{self.index_path} tensor {_fmt_key(bkey)}: slices do not cover the whole tensor")
        return out

    def _slice_entries(self, bkey: bytes, e: BundleEntry, total: int) -> list[tuple[bytes, BundleEntry, tuple[slice, ...]]]:
        """Every slice's data entry, checked against the shards *before* the whole is allocated.

        The declared shape alone decides nothing: a 176-byte index can declare (2**24, 2**24).
        The slices' data must lie in the shards, must not share bytes, and must add up to at
        least the whole tensor, so the allocation is bounded by bytes that exist on disk.
        """
        where = f"{self.index_path} tensor {_fmt_key(bkey)}"
        parts = []
        spans: dict[int, list[tuple[int, int, tuple[slice, ...]]]] = {}
        for sl in e.slices:
            skey = slice_key(bkey, sl)
            if skey not in self._raw:
                raise FormatError(f"{where}: slice {sl} has no data entry in the index; the checkpoint is incomplete")
            se = self._entry(skey)
            index = tuple(
                slice(0, dim) if length is None else slice(start, start + length)
                for (start, length), dim in zip(sl, e.shape)
            )
            want = tuple(s.stop - s.start for s in index)
            if se.shape != want or se.dtype != e.dtype or se.slices:
                raise FormatError(
                    f"{where}: slice {sl} is stored with shape {se.shape} and dtype "
                    f"{_ENUM_NAMES.get(se.dtype)}, expected {want}; the checkpoint is corrupt"
                )
            self._check_span(se, skey)
            spans.setdefault(se.shard_id, []).append((se.offset, se.size, index))
            parts.append((skey, se, index))
        on_disk = 0
        for shard, regions in spans.items():
            end = 0
            for off, size, index in sorted(regions, key=lambda r: r[0]):
                if size and off < end:
                    label = slice_name(bkey.decode("utf-8", "backslashreplace"), index)
                    raise FormatError(
                        f"{self.shard_path(shard)}: slice {label} at byte offset "
                        f"{off} shares bytes with another slice; the index is corrupt"
                    )
                end = max(end, off + size)
                on_disk += size
        per_element = 1 if e.dtype == _DT_STRING else _ENUM_TO_NUMPY[e.dtype].itemsize
        if total * per_element > on_disk:
            raise FormatError(
                f"{where}: shape {e.shape} needs {total * per_element} bytes but its slices hold "
                f"{on_disk}; the index is corrupt"
            )
        return parts

    def slice_parts(self, key: str) -> list[tuple[str, str, int, int, Callable[[], np.ndarray]]]:
        """The stored slices of a partitioned variable, for checking one at a time.

        Returns:
            ``(label, shard path, byte offset, size, read)`` per slice, where ``label`` is
            how a person names the slice (``emb[75:100, 0:8]``) and ``read()`` reads it,
            checking its CRC32C (``IntegrityError``) and its bounds (``FormatError``).
            Empty for a variable that is not partitioned.

        Example:
            >>> [p[0] for p in r.slice_parts("emb")]  # doctest: +SKIP
            ['emb[0:4, 0:3]', 'emb[4:7, 0:3]', 'emb[7:10, 0:3]']
        """
        bkey = self._bkey(key)
        e = self._entry(bkey)
        out = []
        for sl in e.slices:
            skey = slice_key(bkey, sl)
            index = tuple(
                slice(0, dim) if length is None else slice(start, start + length)
                for (start, length), dim in zip(sl, e.shape)
            )
            label = slice_name(key, index)
            if skey not in self._raw:
                raise FormatError(f"{self.index_path}: slice {label} has no data entry in the index; the checkpoint is incomplete")
            se = self._entry(skey)
            out.append((label, self.shard_path(se.shard_id), se.offset, se.size,
                        lambda skey=skey, se=se: self._read_plain(skey, se)))
        return out

    def read_all(self) -> dict[str, np.ndarray]:
        """Read every tensor into a dict ``{name: array}``, each checked against its CRC32C.

        Small plain tensors (the thousands of biases and norms of a real model) are read
        in batches: neighbours in a shard come in with one ``preadv`` and are then checked
        and copied out one by one, so the cost per tensor is a CRC call and a copy, not a
        system call and a Python read path. Large tensors are read one at a time, on two
        threads when there are enough large bytes for that to pay (preadv and the CRC32C
        release the GIL; faulting in fresh output memory is their dominant cost).

        Example:
            >>> sorted(r.read_all())  # doctest: +SKIP
            ['b', 'w']
        """
        out: dict[str, np.ndarray] = {}
        small: dict[int, list[tuple[str, bytes, BundleEntry]]] = {}
        large: list[str] = []
        large_bytes = 0
        for key in self._keys:
            bkey = self._bkey(key)
            e = self._entry(bkey)
            if not e.slices and e.dtype != _DT_STRING and e.size <= _BATCH_TENSOR_MAX:
                small.setdefault(e.shard_id, []).append((key, bkey, e))
            else:
                large.append(key)
                large_bytes += e.size
        for shard, items in small.items():
            self._read_batch(shard, items, out)
        if len(large) >= 2 and large_bytes >= _THREADS_MIN_BYTES:
            with ThreadPoolExecutor(max_workers=2, thread_name_prefix="ckptfmt-tf-read") as ex:
                out.update(zip(large, ex.map(self.get, large)))
        else:
            out.update((k, self.get(k)) for k in large)
        return {k: out[k] for k in self._keys}

    def _read_batch(self, shard: int, items: list[tuple[str, bytes, BundleEntry]], out: dict[str, np.ndarray]) -> None:
        """Read plain tensors of one shard in runs of neighbours, one preadv per run."""
        fd, fsize = self._fd(shard)
        items.sort(key=lambda t: t[2].offset)
        swap = self.header.endianness == 1
        i, n = 0, len(items)
        while i < n:
            lo = items[i][2].offset
            hi = lo + items[i][2].size
            j = i + 1
            while j < n:
                e = items[j][2]
                end = e.offset + e.size
                if e.offset - hi > _BATCH_GAP or max(end, hi) - lo > _BATCH_RUN_MAX:
                    break
                hi = max(hi, end)
                j += 1
            if hi > fsize:  # a truncated shard: the per-tensor path names the first tensor past its end
                for _key, bkey, e in items[i:j]:
                    self._check_span(e, bkey)
            buf = bytearray(hi - lo)
            mv = memoryview(buf)
            done = 0
            while done < len(buf):
                got = os.preadv(fd, [mv[done:]], lo + done)
                if got <= 0:
                    raise FormatError(
                        f"{self.shard_path(shard)}: unexpected end of file at byte offset "
                        f"{lo + done} reading tensors {_fmt_key(items[i][1])}..; the shard is truncated"
                    )
                done += got
            for key, bkey, e in items[i:j]:
                a = e.offset - lo
                piece = mv[a : a + e.size]
                actual = crc32c(piece)
                if actual != unmask_crc(e.crc32c):
                    self._check_crc(e, bkey, actual)
                dt = _ENUM_TO_NUMPY[e.dtype]
                arr = np.frombuffer(piece, dtype=dt).reshape(e.shape).copy()
                if swap and dt.itemsize > 1:
                    arr = arr.view(dt.newbyteorder(">")).astype(dt)
                out[key] = arr
            i = j


# ----------------------------------------------------------------------- writer


def _encode_strings(arr: np.ndarray, key: str) -> tuple[bytes, int]:
    """DT_STRING layout; returns the bytes and TensorFlow's (unmasked) CRC32C for them."""
    items = []
    for x in arr.reshape(-1):
        if isinstance(x, (bytes, bytearray, np.bytes_)):
            items.append(bytes(x))
        elif isinstance(x, str):
            items.append(x.encode("utf-8"))
        else:
            raise UnsupportedDtypeError(
                f"tensor {key!r}: string tensors must hold bytes or str, got {type(x).__name__}"
            )
    lengths = b"".join(varint(len(b)) for b in items)
    fixed = np.array([len(b) for b in items], dtype=np.uint64).astype("<u4").tobytes()
    length_ck = mask_crc(crc32c(fixed)).to_bytes(4, "little")
    body = b"".join(items)
    crc = crc32c(body, crc32c(length_ck, crc32c(fixed)))
    return lengths + length_ck + body, crc


def _tensor_bytes(key: str, value: object) -> tuple[int, tuple[int, ...], bytes | memoryview, int]:
    arr = np.asarray(value)
    if arr.dtype == object or arr.dtype.kind in "SU":
        data, crc = _encode_strings(arr, key)
        return _DT_STRING, arr.shape, data, crc
    dt = arr.dtype.newbyteorder("=") if arr.dtype.byteorder == ">" else arr.dtype
    if len(_NUMPY_TO_ENUM) < len(_READABLE_ENUMS) and "ml_dtypes" in sys.modules:
        _load_ml_enums()  # an array can only have an ml_dtypes dtype once ml_dtypes is imported
    enum = _NUMPY_TO_ENUM.get(np.dtype(dt))
    if enum is None:
        raise UnsupportedDtypeError(
            f"tensor {key!r}: dtype {arr.dtype} has no TensorFlow checkpoint equivalent; "
            "cast it to a supported dtype first"
        )
    shape = arr.shape  # ascontiguousarray turns 0-d into 1-d
    arr = np.ascontiguousarray(arr, dtype=np.dtype(dt).newbyteorder("<"))
    data = memoryview(arr.reshape(-1).view(np.uint8))
    return enum, shape, data, crc32c(data)


class TFCheckpointWriter:
    """Write a single-shard TensorBundle that TensorFlow's ``load_checkpoint`` reads.

    Tensors are streamed to ``<prefix>.data-00000-of-00001`` as they are added; the
    sorted index is written by :meth:`finish`. Files are written under temporary names
    and renamed into place, so a crash never leaves a half-written index.

    Example:
        >>> with TFCheckpointWriter("/tmp/doc_w/ckpt") as w:  # doctest: +SKIP
        ...     w.add("x", np.arange(3))
    """

    def __init__(self, prefix: str | os.PathLike[str]) -> None:
        self.prefix = os.fspath(prefix)
        parent = os.path.dirname(self.prefix)
        if parent:
            os.makedirs(parent, exist_ok=True)
        self._data_path = f"{self.prefix}.data-00000-of-00001"
        self._tmp_data = self._data_path + ".tmp"
        self._f = open(self._tmp_data, "wb")
        self._offset = 0
        self._entries: dict[bytes, BundleEntry] = {}

    def add(self, key: str, value: object) -> None:
        """Append one tensor (numpy array, scalar, or bytes/str array for DT_STRING)."""
        if not key or key.startswith("\x00"):
            raise ValueError(f"invalid tensor name {key!r}: must be non-empty and not start with NUL")
        bkey = key.encode("utf-8")
        if bkey in self._entries:
            raise ValueError(f"tensor {key!r} was already added to {self.prefix}")
        enum, shape, data, crc = _tensor_bytes(key, value)
        self._f.write(data)
        size = len(data) if isinstance(data, bytes) else data.nbytes
        self._entries[bkey] = BundleEntry(
            dtype=enum, shape=tuple(shape), shard_id=0, offset=self._offset, size=size,
            crc32c=mask_crc(crc),
        )
        self._offset += size

    def finish(self) -> None:
        """Flush data, write the index and rename both into place (both synced first)."""
        self._f.close()
        header = BundleHeader(1, 0, VersionDef(producer=_BUNDLE_VERSION))
        pairs = [(b"", header.encode())] + [(k, self._entries[k].encode()) for k in sorted(self._entries)]
        index_tmp = self.prefix + ".index.tmp"
        with open(index_tmp, "wb") as f:
            f.write(build_table(pairs))
        commit_file(self._tmp_data, self._data_path)  # the index, renamed last, is the commit
        commit_file(index_tmp, self.prefix + ".index")

    def abort(self) -> None:
        self._f.close()
        for p in (self._tmp_data, self.prefix + ".index.tmp"):
            try:
                os.remove(p)
            except FileNotFoundError:
                pass

    def __enter__(self) -> TFCheckpointWriter:
        return self

    def __exit__(self, exc_type: object, *exc: object) -> None:
        if exc_type is None:
            self.finish()
        else:
            self.abort()


def write_checkpoint(
    prefix: str | os.PathLike[str],
    tensors: Mapping[str, object],
    *,
    object_graph: bytes | None = None,
    update_state: bool = False,
) -> str:
    """Write ``tensors`` as a TensorFlow checkpoint at ``prefix``; return the prefix.

    Args:
        prefix: Path prefix; creates ``<prefix>.index`` and ``<prefix>.data-00000-of-00001``.
        tensors: Name to array; numpy numeric dtypes, ``ml_dtypes.bfloat16``, bool,
            complex, and object/bytes arrays (written as DT_STRING).
        object_graph: A serialized ``TrackableObjectGraph`` stored under
            ``_CHECKPOINTABLE_OBJECT_GRAPH`` so ``tf.train.Checkpoint.restore`` can match
            objects (see :func:`ckptfmt.converters.tf.object_graph.build_object_graph`).
        update_state: Also write/refresh the ``checkpoint`` state file in the prefix's
            directory, making this the latest checkpoint.

    Example:
        >>> write_checkpoint("/tmp/doc_wc/ckpt-1", {"a": np.zeros(3)}, update_state=True)  # doctest: +SKIP
        '/tmp/doc_wc/ckpt-1'
    """
    prefix = os.fspath(prefix)
    with TFCheckpointWriter(prefix) as w:
        for k, v in tensors.items():
            w.add(k, v)
        if object_graph is not None:
            w.add(OBJECT_GRAPH_KEY, np.array(bytes(object_graph), dtype=object))
    if update_state:
        update_state_file(prefix)
    return prefix


def update_state_file(prefix: str) -> None:
    """Make ``prefix`` the latest checkpoint in its directory's ``checkpoint`` state file.

    Example:
        >>> update_state_file("/tmp/doc_wc/ckpt-2")  # doctest: +SKIP
    """
    directory = os.path.dirname(prefix) or "."
    name = os.path.basename(prefix)
    state_path = os.path.join(directory, "checkpoint")
    old = CheckpointState()
    if os.path.exists(state_path):
        try:
            old = CheckpointState.parse(Path(state_path).read_text(encoding="utf-8"), state_path)
        except (FormatError, UnicodeDecodeError):
            old = CheckpointState()
    paths = [p for p in old.all_model_checkpoint_paths if p != name] + [name]
    new = CheckpointState(name, tuple(paths))
    atomic_file(state_path, lambda tmp: Path(tmp).write_text(new.format(), encoding="utf-8"))
