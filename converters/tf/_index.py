"""The index of a TensorBundle checkpoint: finding it, its header, and its entries checked.

No TensorFlow needed: the index is a LevelDB-style table (see :mod:`._table`) whose
empty key holds a ``BundleHeaderProto`` and every other key a ``BundleEntryProto``
saying which ``<prefix>.data-NNNNN-of-MMMMM`` shard, offset and size hold a tensor and
the masked CRC32C of its bytes. :class:`BundleIndex` reads and validates it without
touching any data shard; :class:`~ckptfmt.converters.tf.bundle.TFCheckpointReader`
adds the data reads.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ckptfmt.errors import (
    CheckpointNotFoundError,
    FormatError,
    LimitExceededError,
    StorageError,
    TensorNotFoundError,
    UnsupportedDtypeError,
    UnsupportedVersionError,
)
from ckptfmt.storage.local import open_regular_file

from ._dtypes import _DT_STRING, _ENUM_ITEMSIZE, _ENUM_NAMES, _ENUM_TO_NUMPY, _READABLE_ENUMS
from ._proto import BundleEntry, BundleHeader, Extent
from ._state import CheckpointState
from ._table import read_table, unmask_crc

__all__ = ["BundleIndex", "TensorEntry", "latest_checkpoint", "OBJECT_GRAPH_KEY"]

#: The key TensorFlow stores the serialized ``TrackableObjectGraph`` under.
OBJECT_GRAPH_KEY = "_CHECKPOINTABLE_OBJECT_GRAPH"

# The TensorBundle version TensorFlow writes and the newest it (and we) can read.
_BUNDLE_VERSION = 1
_MAX_SHARDS = 1 << 20
_MAX_RANK = 64
_MAX_SLICES = 1 << 20
_MAX_ELEMENTS = 1 << 48


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



def _read_header(pairs: list[tuple[bytes, bytes]], index_path: str) -> BundleHeader:
    """The header under the empty key, checked: shard count, endianness, bundle version."""
    if not pairs or pairs[0][0] != b"":
        raise FormatError(
            f"{index_path}: the index has no header entry (empty key); this is not "
            "a TensorBundle index or it is corrupt"
        )
    h = BundleHeader.decode(pairs[0][1], f"{index_path} header")
    if not 1 <= h.num_shards <= _MAX_SHARDS:
        raise FormatError(
            f"{index_path}: header claims {h.num_shards} data shards (allowed 1.."
            f"{_MAX_SHARDS}); the index is corrupt"
        )
    if h.endianness not in (0, 1):
        raise FormatError(f"{index_path}: unknown endianness {h.endianness} in header")
    if h.version.min_consumer > _BUNDLE_VERSION or _BUNDLE_VERSION in h.version.bad_consumers:
        raise UnsupportedVersionError(
            f"{index_path}: bundle version {h.version} cannot be read by this reader "
            f"(supports version {_BUNDLE_VERSION}); convert it with a newer ckptfmt"
        )
    return h


def _check_shape_and_dtype(e: BundleEntry, where: str) -> None:
    """A rank and element count within bounds, and a dtype this reader knows and can read."""
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


def _check_slice_extents(e: BundleEntry, where: str) -> None:
    """A partitioned variable's slices: not too many, each of the tensor's rank and inside it."""
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


def _check_data_extent(e: BundleEntry, where: str, num_shards: int) -> None:
    """A plain tensor's place: an existing shard, a non-negative span, the size its shape needs."""
    if not 0 <= e.shard_id < num_shards:
        raise FormatError(f"{where}: shard {e.shard_id} is outside 0..{num_shards - 1}")
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


class BundleIndex:
    """The parsed, validated index of a TensorBundle checkpoint; no data shard is touched.

    Entries are decoded and checked when first asked for, then cached. ``path`` and the
    errors are those of :class:`~ckptfmt.converters.tf.bundle.TFCheckpointReader`, which
    adds the data reads.

    Example:
        >>> index = BundleIndex("fixtures/tf/tf_module")  # doctest: +SKIP
        >>> index.shape("model/scale/.ATTRIBUTES/VARIABLE_VALUE")  # doctest: +SKIP
        ()
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.prefix = _resolve_prefix(path)
        self.index_path = self.prefix + ".index"
        with os.fdopen(_open_file(self.index_path), "rb") as f:
            data = f.read()
        pairs = read_table(data, self.index_path)
        self.header = _read_header(pairs, self.index_path)
        self._raw: dict[bytes, bytes] = dict(pairs[1:])
        self._entries: dict[bytes, BundleEntry] = {}
        # Slice keys begin with OrderedCode(0) == b"\x00"; TF hides them from listings.
        self._keys = [k.decode("utf-8", "surrogateescape") for k in self._raw if not k.startswith(b"\x00")]

    def __iter__(self) -> Iterator[str]:
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)

    def __contains__(self, key: object) -> bool:
        return isinstance(key, str) and self._bkey(key) in self._raw and not key.startswith("\x00")

    def keys(self) -> list[str]:  # type: ignore[override]
        """Tensor names in index order (slice keys of partitioned variables excluded)."""
        return list(self._keys)

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
        _check_shape_and_dtype(e, where)
        if e.slices:
            _check_slice_extents(e, where)
        else:
            _check_data_extent(e, where, self.header.num_shards)
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

    def shard_path(self, shard: int) -> str:
        """The path of data shard number ``shard``."""
        return f"{self.prefix}.data-{shard:05d}-of-{self.header.num_shards:05d}"
