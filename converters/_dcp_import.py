"""Checkpoints written by torch.distributed.checkpoint's FileSystemWriter, read without
running anything from them.

DCP stores its metadata (``.metadata``) as a pickle that ``FileSystemReader`` loads with an
unrestricted ``pickle.load``: a file from an untrusted source runs whatever it names. Here
the pickle is read by an unpickler that knows only the dozen-odd classes DCP's metadata is
made of and builds *inert records* of them: no torch class is instantiated, no torch code
runs, and any other global is refused before anything is called. The per-tensor payloads
(``__R_N.distcp``, each item a ``torch.save`` archive) are read with
``torch.load(weights_only=True)`` after their zip CRC-32s are checked; non-tensor items
must be plain values.

Example:
    >>> from ckptfmt.converters._dcp_import import read_dcp_metadata
    >>> md = read_dcp_metadata("runs/dcp-step-100")  # doctest: +SKIP
    >>> sorted(md.tensors)[:2]  # doctest: +SKIP
"""

from __future__ import annotations

__all__ = ["DcpMetadata", "DcpTensor", "read_dcp_metadata", "dcp_import", "ALLOWED_GLOBALS"]

import io
import math
import os
import pickle
import pickletools
import zipfile
from dataclasses import dataclass
from typing import Any

import numpy as np

from ckptfmt.errors import CheckpointNotFoundError, ConversionError, FormatError, LimitExceededError
from ckptfmt.format.dtypes import numpy_dtype
from ckptfmt.format.shards import MAX_PIECES_PER_TENSOR, _check_disjoint
from ckptfmt.format.spec import LIMITS
from ckptfmt.format.tree import PLAIN_TYPES, dense_list_indices

METADATA_NAME = ".metadata"
_MAX_METADATA_BYTES = LIMITS.max_manifest_bytes

# torch dtype attribute -> ckptfmt dtype name (the dtypes DCP can store that ckptfmt holds).
_DTYPES = {
    "float32": "float32", "float": "float32", "float64": "float64", "double": "float64",
    "float16": "float16", "half": "float16", "bfloat16": "bfloat16",
    "int8": "int8", "int16": "int16", "short": "int16", "int32": "int32", "int": "int32",
    "int64": "int64", "long": "int64", "uint8": "uint8", "uint16": "uint16", "uint32": "uint32",
    "uint64": "uint64", "bool": "bool", "complex64": "complex64", "cfloat": "complex64",
    "complex128": "complex128", "cdouble": "complex128",
    "float8_e4m3fn": "float8_e4m3fn", "float8_e5m2": "float8_e5m2",
}


class _Record:
    """An inert stand-in for one of DCP's metadata classes: it only keeps its pickled state."""

    kind = "record"

    def __init__(self, *args: Any) -> None:  # pragma: no cover - pickle uses __new__
        self.state: Any = args

    def __setstate__(self, state: Any) -> None:
        self.state = state

    def field(self, name: str, default: Any = None) -> Any:
        s = getattr(self, "state", None)
        if isinstance(s, tuple) and len(s) == 2 and isinstance(s[1], dict) and s[0] is None:
            s = s[1]  # slots-style state (None, {...})
        return s.get(name, default) if isinstance(s, dict) else default


def _record(kind: str) -> type:
    return type(f"_{kind}", (_Record,), {"kind": kind})


_META = "torch.distributed.checkpoint.metadata"
_RECORDS = {
    (_META, "Metadata"): _record("Metadata"),
    (_META, "TensorStorageMetadata"): _record("TensorStorageMetadata"),
    (_META, "ChunkStorageMetadata"): _record("ChunkStorageMetadata"),
    (_META, "BytesStorageMetadata"): _record("BytesStorageMetadata"),
    (_META, "TensorProperties"): _record("TensorProperties"),
    ("torch.distributed._shard.sharded_tensor.metadata", "TensorProperties"): _record("TensorProperties"),
    (_META, "MetadataIndex"): _record("MetadataIndex"),
    (_META, "StorageMeta"): _record("StorageMeta"),
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"): _record("StorageInfo"),
}


@dataclass(frozen=True, slots=True)
class _DType:
    name: str  # ckptfmt dtype name


def _size(seq: Any = ()) -> tuple[int, ...]:
    if not isinstance(seq, (tuple, list)):  # tuple(x) of an int, a dict, a record... is no size
        raise FormatError(f"invalid torch.Size: a {type(seq).__name__}, not a sequence of ints")
    items = tuple(seq)
    if not all(type(x) is int and 0 <= x <= LIMITS.max_tensor_bytes for x in items) or len(items) > LIMITS.max_rank:
        raise FormatError(f"invalid torch.Size {items[:8]!r}")
    return items


def _layout(name: Any) -> str:
    return str(name)


def _mem_format(value: Any) -> int:
    return int(value)


def _path(*parts: Any) -> str:
    return "/".join(str(p) for p in parts)


#: Every global a DCP ``.metadata`` pickle may name, and what it becomes here.
ALLOWED_GLOBALS: dict[tuple[str, str], Any] = {
    **_RECORDS,
    ("torch", "Size"): _size,
    ("torch.serialization", "_get_layout"): _layout,
    (_META, "_MEM_FORMAT_ENCODING"): _mem_format,
    ("pathlib", "PosixPath"): _path,
    ("pathlib", "PurePosixPath"): _path,
    ("pathlib", "WindowsPath"): _path,
    ("pathlib", "PureWindowsPath"): _path,
    ("collections", "OrderedDict"): dict,
    **{("torch", n): _DType(v) for n, v in _DTYPES.items()},
}


_MEMO_OPS = frozenset({"PUT", "BINPUT", "LONG_BINPUT", "GET", "BINGET", "LONG_BINGET"})


def _scan_opcodes(data: bytes, where: str) -> None:
    """Refuse memo indices no honest pickle of this size can use, before unpickling.

    CPython's C unpickler sizes its memo array from the largest ``PUT`` index it meets, before
    any global is looked up: a 1 KB file with ``LONG_BINPUT 1e9`` makes it allocate gigabytes.
    A pickler numbers its memo entries 0, 1, 2, ... one per opcode at most, so an index at or
    past the number of opcodes is forged. ``pickletools.genops`` reads the opcodes without a memo.
    """
    count, top = 0, -1  # opcodes seen, largest memo index used (no list: the file may be large)
    try:
        for op, arg, _pos in pickletools.genops(data):
            count += 1
            if op.name in _MEMO_OPS:
                if type(arg) is not int or arg < 0:
                    raise ValueError(f"{op.name} with memo index {str(arg)[:20]}")
                top = max(top, arg)
    except Exception as e:  # truncated or unknown opcode: the unpickler would refuse it too
        raise _bad(where, f"not a readable DCP metadata pickle ({type(e).__name__}: {e})") from None
    if top >= count:
        raise _bad(where, f"the pickle uses memo index {top} with only {count} opcodes: forged, refused "
                          "(nothing from the file was run)")


class _AllowListUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        try:
            return ALLOWED_GLOBALS[(module, name)]
        except (KeyError, TypeError):
            raise FormatError(
                f"{self.where}: the pickle names the global {module}.{name}, which is not part of DCP's metadata; "
                "refused (nothing from the file was run)"
            ) from None

    def persistent_load(self, pid: Any) -> Any:
        raise FormatError(f"{self.where}: the pickle uses persistent ids; refused (nothing from the file was run)")


@dataclass(frozen=True, slots=True)
class DcpChunk:
    """One stored piece of a tensor: where it lies in the tensor and in which file."""

    offsets: tuple[int, ...]
    sizes: tuple[int, ...]
    file: str
    offset: int
    length: int


@dataclass(frozen=True, slots=True)
class DcpTensor:
    fqn: str
    dtype: str
    shape: tuple[int, ...]
    chunks: tuple[DcpChunk, ...]


@dataclass(frozen=True, slots=True)
class DcpMetadata:
    """What a DCP ``.metadata`` says, as plain data."""

    path: str
    tensors: dict[str, DcpTensor]
    bytes_items: dict[str, DcpChunk]
    mappings: dict[str, tuple] | None
    version: str | None


def _bad(where: str, msg: str) -> FormatError:
    return FormatError(f"{where}: {msg}")


def _storage_info(rec: Any, where: str, what: str) -> tuple[str, int, int]:
    if not isinstance(rec, _Record) or rec.kind != "StorageInfo":
        raise _bad(where, f"{what}: storage data is not a _StorageInfo")
    rel, off, length = rec.field("relative_path"), rec.field("offset"), rec.field("length")
    if rec.field("transform_descriptors"):
        raise _bad(where, f"{what}: stored with stream transforms {rec.field('transform_descriptors')!r}, which this importer does not read")
    if not isinstance(rel, str) or not rel or "/" in rel or "\\" in rel or rel in (".", "..") or "\0" in rel:
        raise _bad(where, f"{what}: invalid data file name {rel!r}")
    if type(off) is not int or type(length) is not int or off < 0 or length < 0 or off + length > LIMITS.max_tensor_bytes:
        raise _bad(where, f"{what}: invalid offset/length {off!r}/{length!r}")
    return rel, off, length


def read_dcp_metadata(path: str | os.PathLike[str]) -> DcpMetadata:
    """Read and check a DCP checkpoint's ``.metadata`` without running code from it.

    Raises:
        CheckpointNotFoundError: no ``.metadata`` in ``path``.
        FormatError: a global outside the allow-list, or malformed metadata.
    """
    path = os.fspath(path)
    mpath = os.path.join(path, METADATA_NAME)
    md = _load_metadata(path, mpath)
    sdm = md.field("state_dict_metadata")
    sdata = md.field("storage_data")
    if not isinstance(sdm, dict) or not isinstance(sdata, dict):
        raise _bad(mpath, "Metadata lacks state_dict_metadata or storage_data")
    where_by_key = _storage_index(sdata, mpath)
    tensors: dict[str, DcpTensor] = {}
    bytes_items: dict[str, DcpChunk] = {}
    for fqn, item in sdm.items():
        if not isinstance(fqn, str) or not isinstance(item, _Record):
            raise _bad(mpath, f"entry {fqn!r} is not a DCP storage metadata record")
        if item.kind == "BytesStorageMetadata":
            bytes_items[fqn] = _bytes_item(fqn, where_by_key, mpath)
        elif item.kind == "TensorStorageMetadata":
            tensors[fqn] = _tensor(fqn, item, where_by_key, mpath)
        else:
            raise _bad(mpath, f"{fqn!r} is a {item.kind}, not tensor or bytes metadata")
    mappings = _mappings(md.field("planner_data"))
    why = None if mappings is None else dense_list_indices(mappings.values())
    if why is not None:
        raise _bad(mpath, f"planner_data (the nesting of the saved state) is not a tree of dense lists: {why}")
    version = md.field("version")
    return DcpMetadata(path, tensors, bytes_items, mappings, version if isinstance(version, str) else None)


def _load_metadata(path: str, mpath: str) -> _Record:
    """The ``.metadata`` pickle, bounded in size, its opcodes scanned, unpickled into inert records."""
    try:
        size = os.path.getsize(mpath)
    except OSError:
        raise CheckpointNotFoundError(f"{path} is not a torch.distributed.checkpoint directory: it has no {METADATA_NAME}") from None
    if size > _MAX_METADATA_BYTES:
        raise _bad(mpath, f"{size} bytes, over the limit of {_MAX_METADATA_BYTES}")
    with open(mpath, "rb") as f:
        data = f.read(_MAX_METADATA_BYTES + 1)
    _scan_opcodes(data, mpath)
    u = _AllowListUnpickler(io.BytesIO(data))
    u.where = mpath
    try:
        md = u.load()
    except FormatError:
        raise
    except Exception as e:  # any malformed pickle: truncated, bad opcode, wrong stack
        raise _bad(mpath, f"not a readable DCP metadata pickle ({type(e).__name__}: {e})") from None
    if not isinstance(md, _Record) or md.kind != "Metadata":
        raise _bad(mpath, "the pickle does not hold a DCP Metadata object")
    return md


def _storage_index(sdata: dict, mpath: str) -> dict[tuple, Any]:
    """``storage_data`` keyed by ``(fqn, chunk offsets or None)``, each key checked to be a MetadataIndex."""
    where_by_key: dict[tuple, Any] = {}
    for k, v in sdata.items():
        if not isinstance(k, _Record) or k.kind != "MetadataIndex" or not isinstance(k.field("fqn"), str):
            raise _bad(mpath, "a storage_data key is not a MetadataIndex")
        off = k.field("offset")
        try:
            where_by_key[(k.field("fqn"), None if off is None else _size(off))] = v
        except FormatError as e:
            raise _bad(mpath, f"the storage_data key of {k.field('fqn')!r}: {e}") from None
    return where_by_key


def _bytes_item(fqn: str, where_by_key: dict[tuple, Any], mpath: str) -> DcpChunk:
    """Where a non-tensor item (a torch.save of a plain value) is stored."""
    info = where_by_key.get((fqn, None))
    if info is None:
        raise _bad(mpath, f"{fqn!r} has no storage data")
    rel, off, length = _storage_info(info, mpath, fqn)
    return DcpChunk((), (), rel, off, length)


def _tensor_dtype(item: _Record, fqn: str, mpath: str) -> _DType:
    """A tensor's dtype from its TensorProperties (tuple or dict state), which must be dense."""
    props = item.field("properties")
    pstate = getattr(props, "state", None) if isinstance(props, _Record) and props.kind == "TensorProperties" else None
    if isinstance(pstate, tuple) and len(pstate) == 5:
        dt, layout = pstate[0], pstate[1]
    elif isinstance(pstate, dict):
        dt, layout = pstate.get("dtype"), pstate.get("layout")
    else:
        raise _bad(mpath, f"{fqn!r}: unreadable tensor properties")
    if not isinstance(dt, _DType):
        raise _bad(mpath, f"{fqn!r}: dtype {dt!r} is not one ckptfmt can hold")
    if layout not in ("torch.strided", None):
        raise _bad(mpath, f"{fqn!r}: layout {layout!r} is not dense (strided)")
    return dt


def _tensor(fqn: str, item: _Record, where_by_key: dict[tuple, Any], mpath: str) -> DcpTensor:
    """One tensor's metadata: dtype, shape and chunks, the chunks tiling it and storing enough bytes."""
    dt = _tensor_dtype(item, fqn, mpath)
    shape = item.field("size")
    chunks_raw = item.field("chunks")
    if not isinstance(shape, tuple) or not isinstance(chunks_raw, list):
        raise _bad(mpath, f"{fqn!r}: size or chunks missing")
    shape = _size(shape)
    if len(chunks_raw) > MAX_PIECES_PER_TENSOR:
        raise LimitExceededError(f"{mpath}: {fqn!r} has {len(chunks_raw)} chunks, over {MAX_PIECES_PER_TENSOR}")
    chunks = [_chunk(c, fqn, shape, where_by_key, mpath) for c in chunks_raw]
    _check_cover(fqn, shape, chunks, mpath)
    # each chunk is a torch.save archive holding its elements uncompressed: the bytes on
    # disk bound the tensor, checked before anything of its size is allocated
    nbytes = math.prod(shape) * numpy_dtype(dt.name).itemsize
    stored = sum(c.length for c in chunks)
    if nbytes > stored or nbytes > LIMITS.max_tensor_bytes:
        raise _bad(mpath, f"{fqn!r}: shape {list(shape)} of {dt.name} needs {nbytes} bytes, but its chunks store {stored}")
    return DcpTensor(fqn, dt.name, shape, tuple(chunks))


def _chunk(c: Any, fqn: str, shape: tuple[int, ...], where_by_key: dict[tuple, Any], mpath: str) -> DcpChunk:
    """One ChunkStorageMetadata: offsets and sizes of the tensor's rank, inside it, with storage data."""
    if not isinstance(c, _Record) or c.kind != "ChunkStorageMetadata":
        raise _bad(mpath, f"{fqn!r}: a chunk is not a ChunkStorageMetadata")
    offs, sizes = c.field("offsets"), c.field("sizes")
    if not isinstance(offs, tuple) or not isinstance(sizes, tuple) or len(offs) != len(shape) or len(sizes) != len(shape):
        raise _bad(mpath, f"{fqn!r}: a chunk's offsets/sizes do not match the tensor's rank")
    try:
        offs, sizes = _size(offs), _size(sizes)
    except FormatError as e:
        raise _bad(mpath, f"{fqn!r}: a chunk's offsets/sizes: {e}") from None
    if any(o + s > d for o, s, d in zip(offs, sizes, shape)):
        raise _bad(mpath, f"{fqn!r}: the chunk at {list(offs)} of shape {list(sizes)} lies outside {list(shape)}")
    info = where_by_key.get((fqn, offs))
    if info is None:
        raise _bad(mpath, f"{fqn!r}: no storage data for the chunk at {list(offs)}")
    rel, off, length = _storage_info(info, mpath, f"{fqn!r} at {list(offs)}")
    return DcpChunk(offs, sizes, rel, off, length)


def _mappings(pd: Any) -> dict[str, tuple] | None:
    if not isinstance(pd, dict):
        return None
    out = {}
    for k, v in pd.items():
        if not isinstance(k, str) or not isinstance(v, tuple) or not v or not all(
            isinstance(x, str) or (type(x) is int and x >= 0) for x in v
        ):
            return None
        out[k] = v
    return out


def _check_cover(fqn: str, shape: tuple[int, ...], chunks: list[DcpChunk], where: str) -> None:
    """The chunks tile the tensor exactly: sizes add up and no two overlap.

    The overlap test is the shard table's sweep (about one candidate pair per chunk for a
    DCP layout), not every pair: 2000 chunks took 22 s pairwise.
    """
    if len(chunks) > MAX_PIECES_PER_TENSOR:
        raise LimitExceededError(f"{where}: {fqn!r} has {len(chunks)} chunks, over {MAX_PIECES_PER_TENSOR}")
    total = math.prod(shape)
    vol = sum(math.prod(c.sizes) for c in chunks)
    if vol != total:
        raise _bad(where, f"{fqn!r}: its chunks cover {vol} of {total} elements")
    r = len(shape)
    keep = [i for i, c in enumerate(chunks) if all(s > 0 for s in c.sizes)]
    if r == 0 or len(keep) < 2:
        if r == 0 and len(keep) > 1:
            raise _bad(where, f"{fqn!r}: two chunks of a scalar overlap")
        return
    lo = np.array([chunks[i].offsets for i in keep], np.int64).reshape(len(keep), r)
    hi = lo + np.array([chunks[i].sizes for i in keep], np.int64).reshape(len(keep), r)
    names = [f"chunk at {list(c.offsets)}" for c in chunks]
    _check_disjoint(lo, hi, np.array(keep), list(range(len(chunks))), names, fqn, where)


class _Files:
    """The checkpoint's data files, opened once, read by (offset, length) with bounds checked."""

    def __init__(self, root: str) -> None:
        self.root = root
        self.handles: dict[str, Any] = {}

    def read(self, c: DcpChunk, what: str) -> bytes:
        fpath = os.path.join(self.root, c.file)
        f = self.handles.get(c.file)
        if f is None:
            try:
                f = self.handles[c.file] = open(fpath, "rb")
            except FileNotFoundError:
                raise FormatError(f"{fpath}: data file of {what} is missing") from None
        size = os.fstat(f.fileno()).st_size
        if c.offset + c.length > size:
            raise FormatError(f"{fpath}: {what} lies at bytes {c.offset}..{c.offset + c.length}, past the end ({size} bytes)")
        f.seek(c.offset)
        return f.read(c.length)

    def close(self) -> None:
        for f in self.handles.values():
            f.close()


def _torch_payload(data: bytes, where: str) -> Any:
    """``torch.load(weights_only=True)`` of one torch.save archive, its CRCs checked first."""
    from ckptfmt.converters.sources.torch import _torch

    torch = _torch()
    if not data.startswith(b"PK\x03\x04"):
        raise FormatError(f"{where}: not a torch.save archive (only DCP's default torch_save serialization is read)")
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as z:
            bad = z.testzip()
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as e:
        raise FormatError(f"{where}: damaged torch.save archive ({e})") from None
    if bad is not None:
        raise FormatError(f"{where}: CRC-32 mismatch in archive member {bad}: the data is corrupted")
    try:
        return torch.load(io.BytesIO(data), weights_only=True, map_location="cpu")
    except Exception as e:  # weights_only refusals are UnpicklingError; damaged data various
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise FormatError(f"{where}: refused by torch.load(weights_only=True): {first}") from None


def _load_tensor(t: DcpTensor, files: _Files, root: str) -> np.ndarray:
    from ckptfmt.adapters import torch as ta

    out = np.empty(t.shape, numpy_dtype(t.dtype))
    for c in t.chunks:
        what = f"tensor {t.fqn!r} chunk at {list(c.offsets)}"
        where = f"{os.path.join(root, c.file)} bytes {c.offset}..{c.offset + c.length} ({what})"
        value = _torch_payload(files.read(c, what), where)
        import torch

        if not isinstance(value, torch.Tensor):
            raise FormatError(f"{where}: holds a {type(value).__name__}, not a tensor")
        arr = ta.tensor_to_numpy(value, t.fqn)
        if tuple(arr.shape) != c.sizes or np.dtype(arr.dtype) != numpy_dtype(t.dtype):
            raise FormatError(f"{where}: holds {arr.dtype}{list(arr.shape)}, the metadata says {t.dtype}{list(c.sizes)}")
        out[tuple(slice(o, o + s) for o, s in zip(c.offsets, c.sizes))] = arr
    return out


def _plain(value: Any, fqn: str, where: str) -> Any:
    def ok(v: Any, depth: int = 0) -> bool:
        if depth > LIMITS.max_tree_depth:
            return False
        if isinstance(v, PLAIN_TYPES):
            return True
        if isinstance(v, (list, tuple)):
            return all(ok(x, depth + 1) for x in v)
        if isinstance(v, dict):
            return all((isinstance(k, (str, int)) and not isinstance(k, bool)) and ok(x, depth + 1) for k, x in v.items())
        return False

    if not ok(value):
        raise FormatError(f"{where}: item {fqn!r} is a {type(value).__name__}, not a plain value ckptfmt can store")
    return value


def dcp_import(
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str],
    *,
    to: str | None = None,
    overwrite: bool = False,
) -> Any:
    """Read a DCP checkpoint (``.metadata`` + ``__R_N.distcp``) into a ckptfmt or safetensors one.

    Sharded tensors are assembled whole. A ckptfmt destination keeps DCP's nesting
    (``{"model": {...}, "optim": {...}}``) and its plain values; a safetensors one holds the
    tensors under their DCP names, with the plain values JSON-encoded in its metadata.

    Args:
        src: the DCP checkpoint directory.
        dst: the destination.
        to: ``"ckptfmt"`` or ``"safetensors"`` (default: from ``dst``'s suffix).
        overwrite: replace an existing ``dst``.

    Returns:
        A :class:`~ckptfmt.converters.kinds.ConvertResult`.

    Raises:
        FormatError: a global outside DCP's metadata classes, a payload ``weights_only``
        refuses, a damaged archive, inconsistent metadata. CheckpointExistsError: ``dst``
        exists. FrameworkNotAvailableError: torch is needed for the payloads.

    Example:
        >>> dcp_import("runs/dcp-step-100", "runs/imported")  # doctest: +SKIP
    """
    from ckptfmt._writer import DeferredTensor
    from ckptfmt.converters import kinds

    s_path, d_path = os.fspath(src), os.fspath(dst)
    from ckptfmt.converters.files import atomic_file, check_destination

    target = to or kinds.target_kind(d_path)
    if target not in ("ckptfmt", "safetensors"):
        raise ConversionError(f"dcp-import writes ckptfmt or safetensors, not {target!r}")
    kinds._check_suffix(d_path, target)
    check_destination(d_path, "ckptfmt" if target == "ckptfmt" else "file", overwrite)
    md = read_dcp_metadata(s_path)
    files = _Files(s_path)
    try:
        plain: dict[str, Any] = {}
        for fqn, c in md.bytes_items.items():
            where = f"{os.path.join(s_path, c.file)} bytes {c.offset}..{c.offset + c.length} (item {fqn!r})"
            plain[fqn] = _plain(_torch_payload(files.read(c, f"item {fqn!r}"), where), fqn, where)
        nbytes = sum(int(np.prod(t.shape, dtype=np.int64)) * numpy_dtype(t.dtype).itemsize for t in md.tensors.values())
        if target == "safetensors":
            from ckptfmt.converters.sources.safetensors import encode_metadata, write_safetensors

            items = [(kinds.TensorInfo(fqn, t.dtype, t.shape, int(np.prod(t.shape, dtype=np.int64)) * numpy_dtype(t.dtype).itemsize),
                      lambda t=t: _load_tensor(t, files, s_path)) for fqn, t in md.tensors.items()]
            atomic_file(d_path, lambda tmp: write_safetensors(tmp, items, encode_metadata(plain or None)))
        else:
            import ckptfmt.api

            leaves: dict[str, Any] = {}
            for fqn, t in md.tensors.items():
                leaves[fqn] = DeferredTensor(t.shape, numpy_dtype(t.dtype), lambda t=t: _load_tensor(t, files, s_path))
            leaves.update(plain)
            state = _nest(leaves, md.mappings)
            ckptfmt.api.save(state, d_path, overwrite=overwrite,
                             metadata={"imported_from": "torch.distributed.checkpoint", "dcp_version": md.version})
    finally:
        files.close()
    return kinds.ConvertResult(d_path, target, len(md.tensors), nbytes, ())


def _nest(leaves: dict[str, Any], mappings: dict[str, tuple] | None) -> dict[str, Any]:
    """Put DCP's flat items back where they were (a list where the next key is an int)."""
    if not mappings:
        return dict(leaves)
    root: dict = {}
    missing = object()
    for fqn, value in leaves.items():
        path = mappings.get(fqn, (fqn,))
        cur: Any = root
        for key, nxt in zip(path[:-1], path[1:]):
            if isinstance(cur, list):
                if not isinstance(key, int):
                    return dict(leaves)
                cur.extend([missing] * (key + 1 - len(cur)))
                if cur[key] is missing:
                    cur[key] = [] if isinstance(nxt, int) else {}
                cur = cur[key]
            else:
                cur = cur.setdefault(key, [] if isinstance(nxt, int) else {})
            if not isinstance(cur, (dict, list)):
                return dict(leaves)
        last = path[-1]
        if isinstance(cur, list):
            if not isinstance(last, int):
                return dict(leaves)
            cur.extend([missing] * (last + 1 - len(cur)))
            if cur[last] is not missing:
                return dict(leaves)
            cur[last] = value
        elif last in cur:
            return dict(leaves)
        else:
            cur[last] = value

    def fill(x: Any) -> Any:
        if isinstance(x, dict):
            return {k: fill(v) for k, v in x.items()}
        if isinstance(x, list):
            return [None if v is missing else fill(v) for v in x]
        return x

    return fill(root)
