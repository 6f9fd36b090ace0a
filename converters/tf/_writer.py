"""Write TensorFlow TensorBundle checkpoints (``<prefix>.index`` + one data shard).

Numeric tensors are stored as raw little-endian arrays; string tensors as ``varint64``
lengths, a masked CRC32C of those length bytes, then the bytes. The index is a sorted
table (:mod:`._table`) written last: its rename commits the checkpoint.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from ckptfmt.errors import FormatError, UnsupportedDtypeError

from ..files import atomic_file, commit_file
from ._dtypes import _DT_STRING, _NUMPY_TO_ENUM, _READABLE_ENUMS, _load_ml_enums
from ._index import _BUNDLE_VERSION, OBJECT_GRAPH_KEY
from ._proto import BundleEntry, BundleHeader, VersionDef
from ._state import CheckpointState
from ._table import build_table, crc32c, mask_crc
from ._wire import varint

__all__ = ["TFCheckpointWriter", "write_checkpoint", "update_state_file"]


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
