"""safetensors files, read and written without the safetensors package.

Layout: an 8-byte little-endian header length ``N``, ``N`` bytes of JSON
(``{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {str: str}}``,
padded with spaces), then the data buffer; offsets are relative to the buffer. The
header is validated before any data is touched, as the reference implementation does:
the length is bounded by the file, every offset by the buffer, and the tensors must tile
the buffer exactly (no overlap, no gap, nothing after the last one). Python integers do
not overflow, so every size is computed exactly and compared, never trusted.

We parse and write the format ourselves so that bfloat16 and float8 work through numpy
(``ml_dtypes``) and so that verify can report *every* problem with its tensor and offset.

Example:
    >>> from ckptfmt.converters.sources.safetensors import SafetensorsSource
    >>> src = SafetensorsSource("model.safetensors")  # doctest: +SKIP
    >>> src.info("w")  # doctest: +SKIP
    TensorInfo(name='w', dtype='float32', shape=(2, 3), nbytes=24)
"""

from __future__ import annotations

__all__ = ["ST_DTYPES", "SafetensorsSource", "write_safetensors", "encode_header", "encode_metadata", "decode_metadata"]

import json
import math
import os
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ckptfmt.api import Problem, VerifyReport
from ckptfmt.errors import ConversionError, FormatError, TensorNotFoundError
from ckptfmt.format.dtypes import numpy_dtype

from .base import Source, TensorInfo, jsonable, make_report

#: ckptfmt dtype name -> safetensors dtype string.
ST_DTYPES: dict[str, str] = {
    "bool": "BOOL",
    "uint8": "U8",
    "int8": "I8",
    "int16": "I16",
    "uint16": "U16",
    "float16": "F16",
    "bfloat16": "BF16",
    "int32": "I32",
    "uint32": "U32",
    "float32": "F32",
    "float64": "F64",
    "int64": "I64",
    "uint64": "U64",
    "float8_e4m3fn": "F8_E4M3",
    "float8_e5m2": "F8_E5M2",
    "complex64": "C64",
}
_BY_ST = {v: k for k, v in ST_DTYPES.items()}

#: The reference implementation refuses headers above 100 MB; so do we.
MAX_HEADER_BYTES = 100 * 1024 * 1024
_MAX_RANK = 255
#: Largest byte span of a shape's non-zero dimensions (ckptfmt's tensor size limit, 2**62).
_MAX_SPREAD = 1 << 62
_META_KEY = "__metadata__"
#: Metadata that is not a {str: str} dict is JSON-encoded under this key.
WRAPPED_METADATA_KEY = "ckptfmt.metadata"


@dataclass(frozen=True, slots=True)
class _Entry:
    name: str
    dtype: str  # ckptfmt name
    shape: tuple[int, ...]
    begin: int
    end: int


@dataclass(slots=True)
class _Scan:
    """Everything the header says, plus what is wrong with it."""

    size: int = 0
    data_start: int = 0
    entries: dict[str, _Entry] = field(default_factory=dict)
    metadata: dict[str, str] | None = None
    count: int = 0  # tensors the header declares, valid or not
    problems: list[Problem] = field(default_factory=list)
    readable: bool = True  # False: not a safetensors file at all (no length + JSON object)


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise ValueError(f"duplicate key {k!r}")
        out[k] = v
    return out


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _scan(path: str) -> _Scan:
    """Read and check the header of ``path``; problems are collected, not raised."""
    sc = _Scan()
    raw = _read_header_bytes(path, sc)
    if raw is None:
        return sc
    header = _parse_header(path, raw, sc)
    if header is None:
        return sc
    buffer_len = sc.size - sc.data_start
    sc.count = len(header)
    for name, spec in header.items():
        entry = _check_entry(path, name, spec, sc, buffer_len)
        if entry is not None:
            sc.entries[name] = entry
    if not sc.problems:
        _check_tiling(path, sc, buffer_len)
    return sc


def _read_header_bytes(path: str, sc: _Scan) -> bytes | None:
    """The JSON header's bytes, its length bounded by the limit and the file; None after a problem."""
    bad = sc.problems.append
    with open(path, "rb") as f:
        sc.size = size = os.fstat(f.fileno()).st_size
        if size < 8:
            bad(Problem("truncated_file", f"{path} is {size} bytes; a safetensors file starts with an 8-byte header length", file=path, offset=0))
            return None
        n = int.from_bytes(f.read(8), "little")
        if f.read(1) != b"{":
            sc.readable = False
            bad(Problem("unreadable", f"{path}: not a safetensors file: it does not start with an 8-byte header length followed by a JSON object", file=path, offset=0))
            return None
        f.seek(8)
        if n > MAX_HEADER_BYTES:
            bad(Problem("header", f"{path}: header length {n} exceeds the {MAX_HEADER_BYTES}-byte limit; the file is corrupt or not safetensors", file=path, offset=0))
            return None
        if n > size - 8:
            bad(Problem("truncated_file", f"{path}: header length {n} runs past the end of the {size}-byte file; the file is truncated or corrupt", file=path, offset=8))
            return None
        raw = f.read(n)
    sc.data_start = 8 + n
    return raw


def _parse_header(path: str, raw: bytes, sc: _Scan) -> dict[str, Any] | None:
    """The header as a JSON object without duplicate keys, its metadata taken out into ``sc``."""
    bad = sc.problems.append
    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicates)
    except (UnicodeDecodeError, ValueError) as e:
        bad(Problem("header", f"{path}: the {len(raw)}-byte JSON header is malformed ({e}); the file is corrupt", file=path, offset=8))
        return None
    if not isinstance(header, dict):
        bad(Problem("header", f"{path}: the header is a JSON {type(header).__name__}, not an object", file=path, offset=8))
        return None
    meta = header.pop(_META_KEY, None)
    if meta is not None:
        if isinstance(meta, dict) and all(isinstance(v, str) for v in meta.values()):
            sc.metadata = meta
        else:
            bad(Problem("header", f"{path}: {_META_KEY} must map strings to strings", file=path, offset=8))
    return header


def _check_entry(path: str, name: str, spec: Any, sc: _Scan, buffer_len: int) -> _Entry | None:
    """One tensor's header entry, checked (keys, offsets, shape, dtype, size, bounds); None after a problem."""
    bad = sc.problems.append
    where = f"{path}: tensor {name!r}"
    if not isinstance(spec, dict) or set(spec) != {"dtype", "shape", "data_offsets"}:
        bad(Problem("header", f"{where}: entry must have exactly dtype, shape and data_offsets", file=path, tensor=name, offset=8))
        return None
    st, shape, offs = spec["dtype"], spec["shape"], spec["data_offsets"]
    if not (isinstance(offs, list) and len(offs) == 2 and all(_is_int(o) for o in offs) and 0 <= offs[0] <= offs[1]):
        bad(Problem("header", f"{where}: data_offsets {offs!r} are not two ordered non-negative integers", file=path, tensor=name, offset=8))
        return None
    begin, end = offs
    if not (isinstance(shape, list) and len(shape) <= _MAX_RANK and all(_is_int(d) and d >= 0 for d in shape)):
        bad(Problem("header", f"{where}: shape {shape!r} is not a list of non-negative integers", file=path, tensor=name, offset=sc.data_start + begin))
        return None
    dtype = _BY_ST.get(st) if isinstance(st, str) else None
    if dtype is None:  # reported, and the bounds below are still checked
        bad(Problem("header", f"{where}: dtype {st!r} is not one ckptfmt can read (known: {', '.join(_BY_ST)})", file=path, tensor=name, offset=sc.data_start + begin))
    elif not _size_fits(path, where, name, st, dtype, shape, begin, end, sc):
        return None
    if end > buffer_len:
        bad(Problem("truncated_file", f"{where}: data at bytes {sc.data_start + begin}..{sc.data_start + end} lies past the end of the {sc.size}-byte file; the file is truncated", file=path, tensor=name, offset=sc.data_start + begin))
        return None
    return None if dtype is None else _Entry(name, dtype, tuple(shape), begin, end)


def _size_fits(path: str, where: str, name: str, st: str, dtype: str, shape: list[int], begin: int, end: int, sc: _Scan) -> bool:
    """The shape is one an array can have, and its bytes are exactly ``data_offsets``'s span."""
    bad = sc.problems.append
    need = math.prod(shape) * numpy_dtype(dtype).itemsize
    spread = math.prod(d or 1 for d in shape) * numpy_dtype(dtype).itemsize
    if spread > _MAX_SPREAD:  # numpy refuses such a shape even when it is empty
        bad(Problem("header", f"{where}: shape {shape} is beyond what any array can have (its non-zero dimensions span {spread} bytes)", file=path, tensor=name, offset=8))
        return False
    if need != end - begin:
        bad(Problem("size_mismatch", f"{where}: {st} of shape {shape} needs {need} bytes but data_offsets [{begin}, {end}] hold {end - begin}", file=path, tensor=name, offset=sc.data_start + begin))
        return False
    return True


def _check_tiling(path: str, sc: _Scan, buffer_len: int) -> None:
    """The tensors must tile the buffer: sorted by offset, each starts where the last ended."""
    bad = sc.problems.append
    pos = 0
    for e in sorted(sc.entries.values(), key=lambda e: (e.begin, e.end)):
        if e.begin < pos:
            bad(Problem("overlap", f"{path}: tensor {e.name!r} at buffer bytes {e.begin}..{e.end} overlaps the tensor before it (which ends at {pos})", file=path, tensor=e.name, offset=sc.data_start + e.begin))
        elif e.begin > pos:
            bad(Problem("gap", f"{path}: buffer bytes {pos}..{e.begin} before tensor {e.name!r} belong to no tensor", file=path, tensor=e.name, offset=sc.data_start + pos))
        pos = max(pos, e.end)
    if pos != buffer_len:
        bad(Problem("size_mismatch", f"{path}: {buffer_len - pos} bytes after the last tensor belong to no tensor (file is {sc.size} bytes, tensors end at {sc.data_start + pos})", file=path, offset=sc.data_start + pos))


class SafetensorsSource(Source):
    """A ``.safetensors`` file; the header is validated on open, data read on demand."""

    kind = "safetensors"

    def __init__(self, path: str) -> None:
        super().__init__(path)
        if not os.path.isfile(path):
            from ckptfmt.errors import CheckpointNotFoundError

            raise CheckpointNotFoundError(f"no safetensors file at {path}")
        self._scan = _scan(path)
        if self._scan.problems:
            raise FormatError(f"{self._scan.problems[0].message} (run `ckptfmt verify {path}` for every problem)")
        self._file: Any = None

    @classmethod
    def claims(cls, path: str) -> bool:
        """A file named ``.safetensors``."""
        return os.path.isfile(path) and path.lower().endswith(".safetensors")

    @classmethod
    def sniff(cls, head: bytes) -> bool:
        """An 8-byte header length, then the JSON header's ``{``."""
        return len(head) == 9 and head[8:9] == b"{"

    def keys(self) -> list[str]:
        return list(self._scan.entries)

    def _entry(self, name: str) -> _Entry:
        try:
            return self._scan.entries[name]
        except KeyError:
            raise TensorNotFoundError(f"no tensor {name!r} in {self.path}") from None

    def info(self, name: str) -> TensorInfo:
        e = self._entry(name)
        return TensorInfo(name, e.dtype, e.shape, e.end - e.begin)

    def get(self, name: str) -> np.ndarray:
        e = self._entry(name)
        arr = np.empty(e.shape, numpy_dtype(e.dtype))
        if self._file is None:
            self._file = open(self.path, "rb")  # noqa: SIM115 - closed in close()
        self._file.seek(self._scan.data_start + e.begin)
        got = self._file.readinto(memoryview(arr.reshape(-1).view(np.uint8)))
        if got != e.end - e.begin:
            raise FormatError(f"{self.path}: tensor {name!r} ends early ({got} of {e.end - e.begin} bytes); the file was truncated")
        return arr

    @property
    def metadata(self) -> dict[str, str] | None:
        return self._scan.metadata

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    @classmethod
    def verify(cls, path: str, *, progress: bool | None = None) -> VerifyReport:
        t0 = time.perf_counter()
        sc = _scan(path)
        nbytes = sum(e.end - e.begin for e in sc.entries.values())
        return make_report(path, sc.problems, t0, tensors=sc.count, checked=len(sc.entries), nbytes=nbytes,
                            readable=sc.readable, coverage="structure")


def encode_metadata(metadata: Any) -> dict[str, str] | None:
    """safetensors metadata for any value: a ``{str: str}`` dict as is, else JSON-wrapped."""
    if metadata is None:
        return None
    if isinstance(metadata, dict) and all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
        return dict(metadata)
    return {WRAPPED_METADATA_KEY: json.dumps(jsonable(metadata))}


def decode_metadata(metadata: Any) -> Any:
    """The inverse of :func:`encode_metadata` (anything else is returned unchanged)."""
    if isinstance(metadata, dict) and set(metadata) == {WRAPPED_METADATA_KEY}:
        try:
            return json.loads(metadata[WRAPPED_METADATA_KEY])
        except ValueError:
            pass
    return metadata


def write_safetensors(
    path: str,
    tensors: Iterable[tuple[TensorInfo, Callable[[], np.ndarray]]],
    metadata: dict[str, str] | None = None,
) -> int:
    """Write a safetensors file, reading one tensor at a time from its getter.

    The header is built from the infos first (offsets follow from the sizes), then each
    tensor is fetched, checked against its info and written little-endian.

    Returns:
        The number of bytes written.

    Example:
        >>> import numpy as np
        >>> w = np.ones(3, np.float32)
        >>> write_safetensors("/tmp/doc.safetensors", [(TensorInfo("w", "float32", (3,), 12), lambda: w)])
        76
    """
    items = list(tensors)
    head, pos = encode_header([info for info, _ in items], metadata)
    with open(path, "wb") as f:
        f.write(head)
        for info, getter in items:
            arr = np.asarray(getter())
            want = numpy_dtype(info.dtype)
            if arr.shape != info.shape or arr.dtype.newbyteorder("=") != want.newbyteorder("="):
                raise ConversionError(f"tensor {info.name!r}: read {arr.dtype}{list(arr.shape)}, the header says {info.dtype}{list(info.shape)}")
            arr = np.ascontiguousarray(arr, dtype=want)
            f.write(memoryview(arr.reshape(-1).view(np.uint8)))
    return len(head) + pos


def encode_header(infos: Iterable[TensorInfo], metadata: dict[str, str] | None = None) -> tuple[bytes, int]:
    """The bytes before the data buffer (length + JSON header) for tensors laid out in order.

    Each tensor's ``data_offsets`` follow from the sizes of the ones before it, so a writer
    can emit the header first and then the tensors one at a time.

    Returns:
        ``(header bytes, data buffer length)``.

    Raises:
        ConversionError: a dtype safetensors cannot hold, or a tensor named ``__metadata__``.

    Example:
        >>> head, size = encode_header([TensorInfo("w", "float32", (3,), 12)])
        >>> len(head) % 8, size
        (0, 12)
    """
    header: dict[str, Any] = {}
    if metadata:
        header[_META_KEY] = metadata
    pos = 0
    for info in infos:
        if info.dtype not in ST_DTYPES:
            raise ConversionError(f"tensor {info.name!r}: safetensors cannot hold {info.dtype}")
        if info.name == _META_KEY:
            raise ConversionError(f"a tensor cannot be named {_META_KEY!r} in safetensors")
        if info.name in header:
            raise ConversionError(f"tensor {info.name!r} is listed twice")
        header[info.name] = {"dtype": ST_DTYPES[info.dtype], "shape": list(info.shape), "data_offsets": [pos, pos + info.nbytes]}
        pos += info.nbytes
    raw = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    raw += b" " * (-len(raw) % 8)  # the buffer starts 8-byte aligned
    return len(raw).to_bytes(8, "little") + raw, pos
