"""A ``torch.save`` file written one tensor at a time.

``torch.save`` pickles an object with every tensor's storage in memory and then writes them
all. :func:`save_torch_stream` writes the same file (a stored zip: ``archive/data.pkl``,
``.format_version``, ``.storage_alignment``, ``byteorder``, one ``data/<key>`` record per
storage, ``version``) from a tree whose tensor leaves may be :class:`DeferredTensor`: the
pickle refers to each storage by its key only, so it is written first, and each storage's
bytes are produced when its record is written, in row blocks of at most a few MB (a
transposed view is never copied whole). ``torch.load(weights_only=True)`` reads it back with
the same structure and bit-identical tensors as ``torch.save`` of the materialized tree.

Why not torch's own record writer (``torch._C.PyTorchFileWriter``): its ``write_record`` takes
each record as one buffer, so a transposed kernel would need a full copy next to its source.
The zip is written with :mod:`zipfile` in torch's layout: records stored (not compressed), each
record's data 64-byte aligned by padding its local header's extra field (torch's "FB" field),
as ``torch.load(mmap=True)`` expects.

Example:
    >>> import io, numpy as np, torch
    >>> from ckptfmt._writer import DeferredTensor
    >>> buf = io.BytesIO()
    >>> save_torch_stream({"w": DeferredTensor((2, 3), np.dtype(np.float32), lambda: np.ones((3, 2), np.float32).T)}, buf)
    24
    >>> torch.load(io.BytesIO(buf.getvalue()), weights_only=True)["w"].shape
    torch.Size([2, 3])
"""

from __future__ import annotations

__all__ = ["save_torch_stream"]

import collections
import io
import os
import pickle
import struct
import zipfile
from collections.abc import Callable, Iterable
from typing import Any, BinaryIO

import numpy as np

from ckptfmt._writer import DeferredTensor, _pieces
from ckptfmt.errors import ConversionError
from ckptfmt.format.dtypes import dtype_name

#: Data records start at multiples of this (torch's default ``storage_alignment``).
_ALIGN = 64
_PAD_FIELD = 0x4246  # "FB", the extra field torch pads local headers with
#: Records at least this large get zip64 sizes up front (zipfile itself switches at ~2 GB).
_ZIP64_FROM = 1 << 30
#: Bytes copied at a time from a strided (e.g. transposed) array.
_BLOCK = 8 << 20
_FORMAT_VERSION = b"1"  # torch's .format_version: storages numbered in pickling order
_FILE_VERSION = b"3\n"  # the version record torch writes for such files


class _Storage:
    """A storage in the pickle: persisted by key, its bytes written as record ``data/<key>``."""

    __slots__ = ("key", "numel", "storage_type")

    def __init__(self, key: str, storage_type: Any, numel: int) -> None:
        self.key, self.storage_type, self.numel = key, storage_type, numel


def _contiguous_strides(shape: tuple[int, ...]) -> tuple[int, ...]:
    """torch's strides of a contiguous tensor (a zero-length dim counts as 1)."""
    strides, n = [], 1
    for d in reversed(shape):
        strides.append(n)
        n *= max(int(d), 1)
    return tuple(reversed(strides))


class _Pickler(pickle.Pickler):
    """Pickles tensor leaves as ``torch._utils._rebuild_tensor_v2`` of a persisted storage, as torch does."""

    def __init__(self, file: BinaryIO, torch: Any) -> None:
        super().__init__(file, protocol=2)
        self._torch = torch
        self._types: dict[str, tuple[Any, Any]] = {}
        #: (record key, leaf, its path in the tree) in pickling order
        self.leaves: list[tuple[str, Any, str]] = []
        #: id(leaf) -> its path in the tree ("optimizer/state/12/exp_avg"), for messages
        self.paths: dict[int, str] = {}

    def persistent_id(self, obj: Any) -> Any:
        if type(obj) is _Storage:
            return ("storage", obj.storage_type, obj.key, "cpu", obj.numel)
        return None

    def reducer_override(self, obj: Any) -> Any:
        torch = self._torch
        if isinstance(obj, torch.Tensor):
            from ckptfmt.adapters.torch import tensor_to_numpy

            if obj.requires_grad or type(obj) is not torch.Tensor:
                raise ConversionError(f"{type(obj).__name__} with requires_grad={obj.requires_grad}: "
                                      "only plain tensors are written to a .pt file here")
            arr = tensor_to_numpy(obj)
            shape, dt = tuple(arr.shape), arr.dtype
        elif isinstance(obj, (np.ndarray, DeferredTensor)):
            arr, shape, dt = obj, tuple(int(d) for d in obj.shape), np.dtype(obj.dtype)
        else:
            return NotImplemented
        numel = int(np.prod(shape, dtype=np.int64))
        typed, tdt = self._storage_type(dt)
        key = str(len(self.leaves))
        self.leaves.append((key, arr, self.paths.get(id(obj), f"data/{key}")))
        strides = _contiguous_strides(shape)
        if typed is not None:  # a legacy typed storage (FloatStorage...): _rebuild_tensor_v2, as torch.save
            return torch._utils._rebuild_tensor_v2, (_Storage(key, typed, numel), 0, shape, strides, False,
                                                     collections.OrderedDict())
        # dtypes without one (uint16/32/64, float8...): an untyped storage sized in bytes and the
        # dtype passed to _rebuild_tensor_v3, as torch.save writes them
        storage = _Storage(key, torch.storage.UntypedStorage, numel * dt.itemsize)
        return torch._utils._rebuild_tensor_v3, (storage, 0, shape, strides, False, collections.OrderedDict(), tdt)

    def _storage_type(self, dt: np.dtype) -> tuple[Any, Any]:
        """The legacy typed storage class of ``dt`` (None when torch has none) and torch's dtype."""
        name = dtype_name(dt)
        if name not in self._types:
            from ckptfmt.adapters.torch import numpy_to_tensor

            tdt = numpy_to_tensor(np.empty(0, dt)).dtype
            names = self._torch.storage._dtype_to_storage_type_map()
            self._types[name] = (getattr(self._torch, names[tdt]) if tdt in names else None, tdt)
        return self._types[name]


def _record(zf: zipfile.ZipFile, name: str, size: int, pieces: Iterable[Any]) -> None:
    """One stored record whose data starts at a multiple of _ALIGN, written piece by piece."""
    info = zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0))
    info.compress_type = zipfile.ZIP_STORED
    info.file_size = size
    zip64 = size >= _ZIP64_FROM
    # local header: 30 bytes, the name, our extra field (4 + pad), zipfile's zip64 field (20)
    fixed = zf.start_dir + 30 + len(name.encode()) + 4 + (20 if zip64 else 0)
    pad = -fixed % _ALIGN
    info.extra = struct.pack("<HH", _PAD_FIELD, pad) + b"Z" * pad
    with zf.open(info, "w", force_zip64=zip64) as w:
        if zf.fp.tell() % _ALIGN:  # pragma: no cover - a zipfile whose header layout changed
            raise ConversionError(f"{name}: its data would start at {zf.fp.tell()}, not {_ALIGN}-byte aligned")
        written = 0
        for piece in pieces:
            w.write(piece)
            written += len(piece)
    if written != size:
        raise ConversionError(f"{name}: wrote {written} bytes, expected {size}")


def _materialize(path: str, leaf: Any) -> np.ndarray:
    """The leaf's array; a deferred one checks itself (a StreamedTensor's may be in another shape
    with the same elements in C order, which is all a record holds). Its errors pass unchanged:
    a damaged source stays an IntegrityError."""
    return leaf.materialize(path) if isinstance(leaf, DeferredTensor) else leaf


def _leaf_paths(obj: Any, prefix: str = "") -> Iterable[tuple[int, str]]:
    """(id, path) of every tensor-like leaf of a tree of dicts, lists and tuples."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _leaf_paths(v, f"{prefix}{k}/")
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            yield from _leaf_paths(v, f"{prefix}{i}/")
    elif prefix:
        yield id(obj), prefix[:-1]


def save_torch_stream(obj: Any, f: str | BinaryIO, *, on_bytes: Callable[[int], Any] | None = None) -> int:
    """Write ``obj`` as ``torch.save(obj, f)`` would, one tensor's bytes at a time.

    Tensor leaves are ``torch.Tensor`` (plain, CPU), ``np.ndarray`` (any strides or byte
    order; bfloat16/float8 as ``ml_dtypes``; uint16/32/64 and float8, which torch keeps in
    untyped storages, as ``torch.save`` writes them) or :class:`DeferredTensor` (loaded when its record
    is written, in the order the pickle meets them, and dropped right after). Each becomes a
    contiguous tensor of its own storage. Everything else is pickled as ``torch.save`` pickles
    it (use only what ``torch.load(weights_only=True)`` accepts).

    Args:
        obj: the tree to write.
        f: a path (written to a temporary name beside it, synced and renamed: an interrupted
            write leaves the previous file) or a seekable binary file opened for writing.
        on_bytes: called with the byte count of each piece of tensor data written (progress).

    Returns:
        The number of tensor bytes written.

    Raises:
        ConversionError: a dtype torch cannot hold, a tensor that requires grad, or a deferred
            value other than declared (named by its path in ``obj``).
        CkptFmtError: a deferred value's own error, unchanged (a damaged source's IntegrityError).

    Example:
        >>> import numpy as np, tempfile, os
        >>> p = os.path.join(tempfile.mkdtemp(), "a.pt")
        >>> save_torch_stream({"a": np.arange(3, dtype=np.int64)}, p)
        24
    """
    if isinstance(f, (str, os.PathLike)):  # a path: written beside it and renamed, never half a file
        from ..files import atomic_file

        total = 0

        def write(tmp: str) -> None:
            nonlocal total
            with open(tmp, "wb") as out:
                total = save_torch_stream(obj, out, on_bytes=on_bytes)

        atomic_file(os.fspath(f), write)
        return total
    import torch

    buf = io.BytesIO()
    pickler = _Pickler(buf, torch)
    pickler.paths = dict(_leaf_paths(obj))
    pickler.dump(obj)
    leaves, pickler = collections.deque(pickler.leaves), None
    total = 0
    with zipfile.ZipFile(f, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
        data = buf.getbuffer()
        _record(zf, "archive/data.pkl", len(data), [data])
        del data
        for name, value in ((".format_version", _FORMAT_VERSION), (".storage_alignment", str(_ALIGN).encode()),
                            ("byteorder", b"little")):  # _pieces writes little-endian on any host
            _record(zf, f"archive/{name}", len(value), [value])
        while leaves:
            key, leaf, path = leaves.popleft()  # dropped once written
            arr = _materialize(path, leaf)
            leaf = None
            pieces = _pieces(arr, _BLOCK)
            if on_bytes is not None:
                pieces = _counted(pieces, on_bytes)
            _record(zf, f"archive/data/{key}", int(arr.nbytes), pieces)
            total += int(arr.nbytes)
            arr = pieces = None
        _record(zf, "archive/version", len(_FILE_VERSION), [_FILE_VERSION])
    return total


def _counted(pieces: Iterable[memoryview], on_bytes: Callable[[int], Any]) -> Iterable[memoryview]:
    for p in pieces:
        yield p
        on_bytes(len(p))
