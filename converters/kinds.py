"""Checkpoints of any kind behind one small interface: detect, list, read, verify, diff, convert.

A *kind* is one on-disk checkpoint format:

===============  ==============================================================  =====
kind             what a path looks like                                          needs
===============  ==============================================================  =====
``ckptfmt``      a directory holding a ``MANIFEST``                              --
``tf``           a TensorBundle prefix (``dir/ckpt-1`` for ``dir/ckpt-1.index``), --
                 its ``.index`` or a shard file, or a directory with a
                 ``checkpoint`` state file
``torch``        a ``.pt`` / ``.pth`` / ``.bin`` file written by ``torch.save``  torch
``safetensors``  a ``.safetensors`` file                                         --
``onnx``         a ``.onnx`` model (its initializers are the tensors)            onnx
===============  ==============================================================  =====

Files without a known suffix are recognised by their first bytes (zip or pickle: torch;
an 8-byte length followed by ``{``: safetensors).

Every kind is opened as a :class:`Source`: ``keys()``, ``info(name)`` (dtype, shape and
size, without reading data), ``get(name)`` (one tensor as numpy), ``metadata``,
``version`` and ``digest``. Tensor names are ``/``-joined paths, as in ckptfmt, so the
same model has the same names in every kind it is converted to. Dtypes are spelled with
ckptfmt's names (``float32``, ``bfloat16``, ...) in every kind.

torch and onnx are imported only when a file of that kind is opened; without them
:class:`~ckptfmt.errors.FrameworkNotAvailableError` names the extra to install.

Example:
    >>> import numpy as np, os, tempfile, ckptfmt
    >>> from ckptfmt.converters import kinds
    >>> d = tempfile.mkdtemp()
    >>> _ = ckptfmt.save({"w": np.ones((2, 3), np.float32)}, os.path.join(d, "ck"))
    >>> kinds.detect_kind(os.path.join(d, "ck"))
    'ckptfmt'
    >>> _ = kinds.convert(os.path.join(d, "ck"), os.path.join(d, "w.safetensors"))
    >>> kinds.verify_any(os.path.join(d, "w.safetensors")).ok
    True
    >>> kinds.diff_any(os.path.join(d, "ck"), os.path.join(d, "w.safetensors")).identical
    True
"""

from __future__ import annotations

__all__ = [
    "KINDS",
    "TensorInfo",
    "Source",
    "Summary",
    "TensorDiff",
    "DiffReport",
    "ConvertResult",
    "detect_kind",
    "open_any",
    "inspect_any",
    "verify_any",
    "diff_any",
    "diff_sources",
    "convert",
    "nest",
    "onnx_import",
    "onnx_export",
]

import importlib
import math
import os
import re
import time
from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, ClassVar, Iterator

import numpy as np

from ckptfmt.api import Problem, VerifyReport
from ckptfmt.errors import (
    CheckpointExistsError,
    CheckpointNotFoundError,
    CkptFmtError,
    ConversionError,
    FormatError,
    IntegrityError,
    UnsupportedDtypeError,
)
from ckptfmt.format.dtypes import dtype_name
from ckptfmt.format.spec import DATA_SUFFIX, MANIFEST_NAME, MANIFEST_TMP_PREFIX

#: Every kind, in detection order.
KINDS: tuple[str, ...] = ("ckptfmt", "tf", "torch", "safetensors", "onnx", "keras")

#: File suffixes of Keras's own files (.keras zip, .weights.h5 and tf.keras .h5).
KERAS_SUFFIXES = (".keras", ".h5", ".hdf5")

#: File suffixes of torch.save files.
TORCH_SUFFIXES = (".pt", ".pth", ".bin")

# Kinds are listed by name and imported when first used (as fsspec does for backends), so
# listing a safetensors file never imports torch or onnx.
_SOURCES: dict[str, str] = {
    "ckptfmt": "ckptfmt.converters.kinds:CkptfmtSource",
    "tf": "ckptfmt.converters.kinds:TFSource",
    "torch": "ckptfmt.converters._torchfile:TorchSource",
    "safetensors": "ckptfmt.converters._safetensors:SafetensorsSource",
    "onnx": "ckptfmt.converters._onnx:OnnxSource",
    "keras": "ckptfmt.converters.kerasfile:KerasSource",
}

# Where a converted checkpoint goes, by the destination's suffix (anything else: ckptfmt).
_TARGET_BY_SUFFIX = {".safetensors": "safetensors", **{s: "torch" for s in TORCH_SUFFIXES}}
_TF_SHARD = re.compile(r"\.data-\d{5}-of-\d{5}$")

# Elements compared per step in diff_any: bounds the float64 temporaries to ~100 MB.
_DIFF_BLOCK = 1 << 22


# ----------------------------------------------------------------------------- model


@dataclass(frozen=True, slots=True)
class TensorInfo:
    """What a checkpoint says about one tensor, known without reading its data.

    Attributes:
        name: the ``/``-joined tensor name.
        dtype: ckptfmt's dtype name (``float32``, ``bfloat16``...); for types ckptfmt
            cannot hold, the framework's name (``string``, ``float8_e4m3fnuz``...).
        shape: the tensor's shape.
        nbytes: its size in bytes as stored.
    """

    name: str
    dtype: str
    shape: tuple[int, ...]
    nbytes: int

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape), "nbytes": self.nbytes}


class Source(ABC):
    """A checkpoint of some kind, opened lazily: names and dtypes now, data on demand.

    Use :func:`open_any` to make one; close it (or use ``with``) when done. Subclasses set
    ``kind`` and implement ``keys``, ``info``, ``get`` and the classmethod ``verify``;
    ``metadata``, ``version``, ``digest`` and ``close`` have defaults.

    Example:
        >>> with open_any("model.safetensors") as src:  # doctest: +SKIP
        ...     [(t.name, t.shape) for t in src.tensors()]
    """

    kind: ClassVar[str]

    def __init__(self, path: str) -> None:
        self.path = path

    @abstractmethod
    def keys(self) -> list[str]:
        """Tensor names, in the checkpoint's order."""

    @abstractmethod
    def info(self, name: str) -> TensorInfo:
        """dtype, shape and size of one tensor, without reading it.

        Raises:
            TensorNotFoundError: no such tensor.
        """

    @abstractmethod
    def get(self, name: str) -> np.ndarray:
        """Read one tensor as a numpy array (``object`` arrays of bytes for strings).

        Raises:
            TensorNotFoundError: no such tensor. FormatError / IntegrityError: damaged data.
        """

    @classmethod
    @abstractmethod
    def verify(cls, path: str, *, progress: bool | None = None) -> VerifyReport:
        """Check a checkpoint of this kind completely; see :func:`verify_any`."""

    def tensors(self) -> Iterator[TensorInfo]:
        """:meth:`info` of every tensor, one at a time."""
        for name in self.keys():
            yield self.info(name)

    @property
    def metadata(self) -> Any:
        """Metadata saved with the checkpoint (None when the kind has none)."""
        return None

    @property
    def version(self) -> str | None:
        """The format version of the file, as the kind spells it."""
        return None

    @property
    def digest(self) -> str | None:
        """A content identity, for kinds that record one (ckptfmt)."""
        return None

    def close(self) -> None:
        """Release open files. Arrays already returned stay valid."""

    def __enter__(self) -> Source:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.path!r})"


def _dtype_str(dt: np.dtype) -> str:
    """ckptfmt's name for a numpy dtype, or a readable name for the ones it lacks."""
    try:
        return dtype_name(dt)
    except UnsupportedDtypeError:
        return "string" if dt == np.dtype(object) else str(dt)


def _make_report(
    path: str,
    problems: list[Problem],
    t0: float,
    *,
    tensors: int = 0,
    checked: int = 0,
    nbytes: int = 0,
    digest: str | None = None,
    version: str | None = None,
) -> VerifyReport:
    """A VerifyReport for a foreign kind; ``checked`` counts entries (the kind's "chunks")."""
    ok = not any(p.severity == "error" for p in problems)
    return VerifyReport(path, ok, digest, version, tensors, checked, nbytes, time.perf_counter() - t0, tuple(problems))


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


# ------------------------------------------------------------------------ detection


def detect_kind(path: str | os.PathLike[str]) -> str:
    """Tell which kind of checkpoint ``path`` is, from its layout, suffix or first bytes.

    Args:
        path: a checkpoint directory, TensorFlow prefix, or file.

    Returns:
        One of :data:`KINDS`.

    Raises:
        CheckpointNotFoundError: nothing exists at ``path``.
        FormatError: something exists but is not a checkpoint of any known kind.

    Example:
        >>> detect_kind("model.safetensors")  # doctest: +SKIP
        'safetensors'
    """
    p = _canonical(path)
    if os.path.isdir(p):
        names = os.listdir(p)
        if MANIFEST_NAME in names:
            return "ckptfmt"
        if "checkpoint" in names and os.path.isfile(os.path.join(p, "checkpoint")):
            return "tf"
        if any(n.endswith(DATA_SUFFIX) or n.startswith(MANIFEST_TMP_PREFIX) for n in names):
            return "ckptfmt"  # an incomplete ckptfmt checkpoint; opening it says so
        prefixes = sorted(n[: -len(".index")] for n in names if n.endswith(".index"))
        if prefixes:
            raise FormatError(
                f"{p} holds TensorFlow checkpoints but no 'checkpoint' state file naming the latest; "
                f"pass a prefix instead, e.g. {os.path.join(p, prefixes[-1])}"
            )
        raise FormatError(
            f"{p} is a directory but neither a ckptfmt checkpoint (no {MANIFEST_NAME}) nor a "
            "TensorFlow checkpoint directory (no 'checkpoint' file)"
        )
    if os.path.isfile(p):
        low = p.lower()
        if low.endswith(".index") or _TF_SHARD.search(p):
            return "tf"
        if low.endswith(".safetensors"):
            return "safetensors"
        if low.endswith(".onnx"):
            return "onnx"
        if low.endswith(TORCH_SUFFIXES):
            return "torch"
        if low.endswith(KERAS_SUFFIXES):
            return "keras"
        with open(p, "rb") as f:
            head = f.read(9)
        # a .keras zip (config.json, metadata.json) or an HDF5 file, before the torch zip sniff
        if head[:8] == b"\x89HDF\r\n\x1a\n" or (head[:4] == b"PK\x03\x04" and _is_keras_zip(p)):
            return "keras"
        if head[:4] == b"PK\x03\x04" or head[:1] == b"\x80":  # torch zip archive / legacy pickle
            return "torch"
        if len(head) == 9 and head[8:9] == b"{":  # 8-byte header length, then JSON
            return "safetensors"
        raise FormatError(
            f"{p}: not a checkpoint kind ckptfmt knows (by suffix or content); supported: "
            "ckptfmt directories, TensorFlow prefixes, .safetensors, .pt/.pth/.bin, .onnx, .keras/.weights.h5/.h5"
        )
    if os.path.isfile(p + ".index"):
        return "tf"
    raise CheckpointNotFoundError(f"no checkpoint at {p}: the path does not exist")


def _is_keras_zip(path: str) -> bool:
    from ckptfmt.converters.kerasfile import is_keras_file

    return is_keras_file(path) == "keras"


def _source_class(kind: str) -> type[Source]:
    try:
        target = _SOURCES[kind]
    except KeyError:
        raise ValueError(f"unknown checkpoint kind {kind!r}; known kinds: {', '.join(KINDS)}") from None
    module, _, attr = target.partition(":")
    return getattr(importlib.import_module(module), attr)


def open_any(path: str | os.PathLike[str], *, kind: str | None = None) -> Source:
    """Open a checkpoint of any kind lazily.

    Args:
        path: the checkpoint (see :func:`detect_kind`).
        kind: skip detection and open as this kind.

    Raises:
        CheckpointNotFoundError, FormatError (not a checkpoint, or a damaged one),
        FrameworkNotAvailableError (torch or onnx needed but missing).

    Example:
        >>> with open_any("fixtures/tf/tf_module") as src:  # doctest: +SKIP
        ...     src.kind, len(src.keys())
        ('tf', 5)
    """
    p = _canonical(path)
    return _source_class(kind or detect_kind(p))(p)


def _canonical(path: str | os.PathLike[str]) -> str:
    """A ckptfmt checkpoint named by its MANIFEST file means the checkpoint directory."""
    p = os.fspath(path)
    if os.path.basename(p) == MANIFEST_NAME and os.path.isfile(p):
        return os.path.dirname(p) or "."
    return p


# --------------------------------------------------------------------- ckptfmt, tf


class CkptfmtSource(Source):
    """A ckptfmt checkpoint directory, through :func:`ckptfmt.open` (hash-checked reads)."""

    kind = "ckptfmt"

    def __init__(self, path: str) -> None:
        import ckptfmt.api

        super().__init__(path)
        self._reader = ckptfmt.api.open(path)

    def keys(self) -> list[str]:
        return self._reader.keys()

    def info(self, name: str) -> TensorInfo:
        e = self._reader.info(name)
        return TensorInfo(name, e.dtype, tuple(e.shape), int(e.nbytes))

    def get(self, name: str) -> np.ndarray:
        return self._reader.get(name)

    @property
    def metadata(self) -> Any:
        return self._reader.metadata

    @property
    def version(self) -> str:
        major, minor = self._reader.version
        return f"{major}.{minor}"

    @property
    def digest(self) -> str:
        return self._reader.digest

    def close(self) -> None:
        self._reader.close()

    @classmethod
    def verify(cls, path: str, *, progress: bool | None = None) -> VerifyReport:
        import ckptfmt.api

        return ckptfmt.api.verify(path, progress=progress)


def _tf_reader_class() -> Any:
    try:
        from ckptfmt.converters.tf.bundle import TFCheckpointReader
    except ImportError as e:
        raise CkptFmtError(
            f"the TensorFlow checkpoint reader (ckptfmt.converters.tf) cannot be imported: {e}; "
            "reinstall ckptfmt"
        ) from e
    return TFCheckpointReader


def _tf_prefix(path: str) -> str:
    """A shard path (``ckpt-1.data-00000-of-00001``) names its checkpoint too."""
    m = _TF_SHARD.search(path)
    return path[: m.start()] if m and os.path.isfile(path) else path


class TFSource(Source):
    """A TensorFlow TensorBundle checkpoint, read without TensorFlow (CRC32C-checked)."""

    kind = "tf"

    def __init__(self, path: str) -> None:
        super().__init__(path)
        self._reader = _tf_reader_class()(_tf_prefix(path))

    def keys(self) -> list[str]:
        return self._reader.keys()

    def info(self, name: str) -> TensorInfo:
        e = self._reader.entry(name)
        dt = self._reader.dtype(name)
        if e.slices or dt == np.dtype(object):
            nbytes = e.size if not e.slices else dt.itemsize * math.prod(e.shape)
        else:
            nbytes = e.size
        return TensorInfo(name, _dtype_str(dt), tuple(e.shape), int(nbytes))

    def get(self, name: str) -> np.ndarray:
        return self._reader.get(name)

    @property
    def version(self) -> str:
        return f"tensorbundle {self._reader.header.version.producer}"

    def close(self) -> None:
        self._reader.close()

    @classmethod
    def verify(cls, path: str, *, progress: bool | None = None) -> VerifyReport:
        from ckptfmt._progress import progress_bar

        t0 = time.perf_counter()
        problems: list[Problem] = []
        reader_cls = _tf_reader_class()
        prefix = _tf_prefix(path)
        try:
            r = reader_cls(prefix)
        except CheckpointNotFoundError:
            raise
        except (FormatError, OSError) as e:
            index = prefix if prefix.endswith(".index") else prefix + ".index"
            problems.append(Problem("header", _first_line(e), file=index))
            return _make_report(path, problems, t0)
        try:
            missing: set[int] = set()
            for shard in range(r.header.num_shards):
                sp = r.shard_path(shard)
                if not os.path.isfile(sp):
                    missing.add(shard)
                    problems.append(Problem("missing_file", f"data shard {sp} is missing", file=sp))
            keys = r.keys()
            entries = {}
            for key in keys:
                try:
                    entries[key] = r.entry(key)
                except (FormatError, OSError) as e:
                    problems.append(Problem("header", _first_line(e), file=r.index_path, tensor=key))
            bar = progress_bar(sum(e.size for e in entries.values()), f"verifying {path}", progress)
            checked = nbytes = 0
            for key, e in entries.items():
                sliced = bool(e.slices)
                if not sliced and e.shard in missing:
                    continue
                sp = None if sliced else r.shard_path(e.shard)
                off = None if sliced else e.offset
                try:
                    r.get(key)
                except IntegrityError as ex:
                    problems.append(Problem("hash_mismatch", _first_line(ex), file=sp, tensor=key, offset=off))
                except (FormatError, OSError) as ex:
                    truncated = sp is not None and os.path.isfile(sp) and e.offset + e.size > os.path.getsize(sp)
                    kind = "truncated_file" if truncated else ("missing_file" if isinstance(ex, FileNotFoundError) else "unreadable")
                    if not (sliced and isinstance(ex, FileNotFoundError) and missing):
                        problems.append(Problem(kind, _first_line(ex), file=sp, tensor=key, offset=off))
                checked += 1
                nbytes += e.size
                bar.update(e.size)
            bar.close()
            version = f"tensorbundle {r.header.version.producer}"
        finally:
            r.close()
        return _make_report(path, problems, t0, tensors=len(keys), checked=checked, nbytes=nbytes, version=version)


# ---------------------------------------------------------------------- inspect, verify


@dataclass(frozen=True, slots=True)
class Summary:
    """What :func:`inspect_any` found: kind, version, tensors, totals, metadata, digest."""

    path: str
    kind: str
    version: str | None
    digest: str | None
    metadata: Any
    tensors: tuple[TensorInfo, ...]

    @property
    def count(self) -> int:
        return len(self.tensors)

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (metadata values JSON cannot hold are turned into strings)."""
        return {
            "path": self.path,
            "kind": self.kind,
            "version": self.version,
            "digest": self.digest,
            "count": self.count,
            "nbytes": self.nbytes,
            "metadata": _jsonable(self.metadata),
            "tensors": [t.to_dict() for t in self.tensors],
        }


def _jsonable(v: Any) -> Any:
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    if isinstance(v, np.generic):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    if isinstance(v, (bytes, bytearray)):
        return "0x" + bytes(v).hex() if len(v) <= 64 else f"<{len(v)} bytes>"
    if v is None or isinstance(v, (bool, int, float, str)):
        return v
    return repr(v)


def inspect_any(path: str | os.PathLike[str], *, kind: str | None = None) -> Summary:
    """Describe a checkpoint of any kind without reading its tensor data.

    Example:
        >>> s = inspect_any("model.safetensors")  # doctest: +SKIP
        >>> s.kind, s.count, s.nbytes  # doctest: +SKIP
        ('safetensors', 12, 4096)
    """
    with open_any(path, kind=kind) as src:
        return Summary(src.path, src.kind, src.version, src.digest, src.metadata, tuple(src.tensors()))


def verify_any(path: str | os.PathLike[str], *, kind: str | None = None, progress: bool | None = None) -> VerifyReport:
    """Check a checkpoint of any kind completely; corruption is reported, not raised.

    What is checked depends on what the kind records:

    - ckptfmt: :func:`ckptfmt.verify` (every chunk hash, every file's size).
    - tf: the index, every shard's presence, every tensor's CRC32C.
    - safetensors: the header (length bounded by the file, JSON, dtypes, shapes) and the
      data offsets (in bounds, no overlap, no gap, each matching its dtype and shape, the
      last one ending where the file ends). safetensors has no checksums: a flipped bit
      inside tensor data cannot be detected.
    - torch: the zip archive's CRC-32 of every member (a corrupted member is traced to the
      tensors stored in it), then ``torch.load(weights_only=True)``.
    - onnx: the protobuf, ``onnx.checker``, and every external data file present and long
      enough. ONNX has no checksums either.

    Args:
        path: the checkpoint.
        kind: skip detection.
        progress: show a progress bar (default: on a terminal, for large inputs).

    Returns:
        A :class:`ckptfmt.VerifyReport`; ``chunks_checked`` counts the kind's units (chunks,
        tensors, archive members).

    Raises:
        CheckpointNotFoundError: nothing at ``path``. FormatError: not a known kind.
        FrameworkNotAvailableError: torch or onnx is needed but missing.

    Example:
        >>> report = verify_any("model.safetensors")  # doctest: +SKIP
        >>> report.ok, [str(p) for p in report.problems]  # doctest: +SKIP
        (True, [])
    """
    p = _canonical(path)
    return _source_class(kind or detect_kind(p)).verify(p, progress=progress)


# ------------------------------------------------------------------------------ diff


@dataclass(frozen=True, slots=True)
class TensorDiff:
    """A tensor present in both checkpoints whose dtype, shape or values differ.

    ``max_abs`` is ``max |a - b|`` and ``max_rel`` is ``max |a - b| / |b|`` (infinite where
    ``b`` is 0 and ``a`` is not); both are None when the shapes differ or the values are
    not numbers.
    """

    name: str
    dtype_a: str
    dtype_b: str
    shape_a: tuple[int, ...]
    shape_b: tuple[int, ...]
    max_abs: float | None
    max_rel: float | None

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["shape_a"], d["shape_b"] = list(self.shape_a), list(self.shape_b)
        d["max_abs"], d["max_rel"] = _jsonable(self.max_abs), _jsonable(self.max_rel)
        return d


@dataclass(frozen=True, slots=True)
class DiffReport:
    """What :func:`diff_any` found. ``identical`` is true when nothing was added, removed or changed."""

    a: str
    b: str
    kind_a: str
    kind_b: str
    atol: float
    rtol: float
    added: tuple[TensorInfo, ...] = ()
    removed: tuple[TensorInfo, ...] = ()
    changed: tuple[TensorDiff, ...] = ()
    unchanged: int = 0

    @property
    def identical(self) -> bool:
        return not (self.added or self.removed or self.changed)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        return {
            "a": self.a,
            "b": self.b,
            "kind_a": self.kind_a,
            "kind_b": self.kind_b,
            "atol": self.atol,
            "rtol": self.rtol,
            "identical": self.identical,
            "added": [t.to_dict() for t in self.added],
            "removed": [t.to_dict() for t in self.removed],
            "changed": [c.to_dict() for c in self.changed],
            "unchanged": self.unchanged,
        }


def _compare(x: np.ndarray, y: np.ndarray, atol: float, rtol: float) -> tuple[bool, float | None, float | None]:
    """(close enough, max abs diff, max rel diff) of two arrays of the same shape."""
    if x.dtype == np.dtype(object) or y.dtype == np.dtype(object):
        return bool(np.array_equal(x, y)), None, None
    if x.size == 0:
        return True, 0.0, 0.0
    if x.dtype == y.dtype and x.dtype.kind in "biu" and np.array_equal(x, y):
        return True, 0.0, 0.0  # exact, and int64 beyond 2**53 is not rounded through float64
    xf, yf = x.reshape(-1), y.reshape(-1)
    cplx = x.dtype.kind == "c" or y.dtype.kind == "c"
    work = np.complex128 if cplx else np.float64
    ints = x.dtype.kind in "biu" and y.dtype.kind in "biu"
    close, max_abs, max_rel = True, 0.0, 0.0
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        for i in range(0, xf.size, _DIFF_BLOCK):
            xo, yo = xf[i : i + _DIFF_BLOCK], yf[i : i + _DIFF_BLOCK]
            a, b = xo.astype(work), yo.astype(work)
            d = np.abs(a - b)
            same = (a == b) | (np.isnan(a) & np.isnan(b))
            d[same] = 0.0
            d[np.isnan(d)] = np.inf  # one side NaN, or inf - inf of opposite signs
            if ints:
                # Integers above 2**53 can round to the same float64; distinct ones differ by >= 1.
                exact = xo == yo
                d[~exact & (d == 0)] = 1.0
            ref = np.abs(b)
            rel = np.where(d == 0, 0.0, d / np.where(ref == 0, 0.0, ref))
            rel[np.isnan(rel)] = np.inf
            max_abs = max(max_abs, float(d.max()))
            max_rel = max(max_rel, float(rel.max()))
            # d == 0 first: inf == inf must pass even though 0 * inf is NaN.
            close = close and bool(np.all((d == 0) | (d <= atol + rtol * ref)))
    return close, max_abs, max_rel


def diff_any(
    a: str | os.PathLike[str],
    b: str | os.PathLike[str],
    *,
    atol: float = 0.0,
    rtol: float = 0.0,
    kind_a: str | None = None,
    kind_b: str | None = None,
) -> DiffReport:
    """Compare the tensors of two checkpoints, of the same kind or not.

    A tensor is *changed* when its dtype or shape differs, or when some element fails
    ``|a - b| <= atol + rtol * |b|`` (NaN equals NaN). With the default tolerances of 0
    any difference counts. One tensor pair is in memory at a time.

    Args:
        a, b: the checkpoints (``b`` is the reference for relative differences).
        atol, rtol: tolerances.
        kind_a, kind_b: skip detection.

    Example:
        >>> r = diff_any("ckpt-100", "model.safetensors", atol=1e-6)  # doctest: +SKIP
        >>> r.identical, [c.name for c in r.changed]  # doctest: +SKIP
        (False, ['head.weight'])
    """
    _check_tolerances(atol, rtol)
    with open_any(a, kind=kind_a) as sa, open_any(b, kind=kind_b) as sb:
        return diff_sources(sa, sb, atol=atol, rtol=rtol)


def _check_tolerances(atol: float, rtol: float) -> None:
    if atol < 0 or rtol < 0:
        raise ValueError(f"tolerances must be non-negative, got atol={atol}, rtol={rtol}")


def diff_sources(sa: Source, sb: Source, *, atol: float = 0.0, rtol: float = 0.0) -> DiffReport:
    """:func:`diff_any` of two open sources (``sb`` is the reference).

    Example:
        >>> with open_any("a.safetensors") as sa, open_any("b.pt") as sb:  # doctest: +SKIP
        ...     diff_sources(sa, sb, atol=1e-6).identical
        True
    """
    _check_tolerances(atol, rtol)
    ka, kb = sa.keys(), sb.keys()
    set_a, set_b = set(ka), set(kb)
    removed = tuple(sa.info(n) for n in ka if n not in set_b)
    added = tuple(sb.info(n) for n in kb if n not in set_a)
    changed: list[TensorDiff] = []
    unchanged = 0
    for name in ka:
        if name not in set_b:
            continue
        ia, ib = sa.info(name), sb.info(name)
        if ia.shape != ib.shape:
            changed.append(TensorDiff(name, ia.dtype, ib.dtype, ia.shape, ib.shape, None, None))
            continue
        close, max_abs, max_rel = _compare(sa.get(name), sb.get(name), atol, rtol)
        if close and ia.dtype == ib.dtype:
            unchanged += 1
        else:
            changed.append(TensorDiff(name, ia.dtype, ib.dtype, ia.shape, ib.shape, max_abs, max_rel))
    return DiffReport(sa.path, sb.path, sa.kind, sb.kind, atol, rtol, added, removed, tuple(changed), unchanged)


# --------------------------------------------------------------------------- convert


@dataclass(frozen=True, slots=True)
class ConvertResult:
    """What :func:`convert` (or :func:`onnx_export`) wrote.

    Attributes:
        path: the destination.
        kind: its kind.
        tensors: how many tensors were written.
        nbytes: their total size.
        skipped: ``(name, reason)`` of source tensors the target cannot hold.
    """

    path: str
    kind: str
    tensors: int
    nbytes: int
    skipped: tuple[tuple[str, str], ...] = field(default_factory=tuple)


def _target_kind(dst: str) -> str:
    low = dst.lower()
    for suffix, kind in _TARGET_BY_SUFFIX.items():
        if low.endswith(suffix):
            return kind
    if low.endswith(".onnx"):
        raise ConversionError(
            f"{dst}: writing ONNX needs a model to put the tensors into; use onnx_export "
            "(ckptfmt convert onnx-export SRC MODEL.onnx OUT.onnx)"
        )
    return "ckptfmt"


def _check_dst(dst: str, overwrite: bool) -> None:
    if os.path.lexists(dst) and not overwrite:
        raise CheckpointExistsError(f"{dst} already exists; pass overwrite=True (--overwrite) to replace it")


def _atomic_file(dst: str, write: Callable[[str], None]) -> None:
    """Call ``write(tmp)`` and rename ``tmp`` to ``dst``: a failed write leaves no ``dst``."""
    tmp = os.path.join(os.path.dirname(os.path.abspath(dst)), f".{os.path.basename(dst)}.tmp-{os.getpid()}")
    try:
        write(tmp)
        os.replace(tmp, dst)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def nest(flat: dict[str, Any]) -> dict[str, Any]:
    """Turn ``/``-joined names into nested dicts, so ckptfmt gives them back unchanged.

    ``{"a/b": x}`` saved as is would be named ``a~1b`` by ckptfmt (``/`` inside a key is
    escaped); nested as ``{"a": {"b": x}}`` it is named ``a/b``. Components are
    unescaped (``~1`` -> ``/``, ``~0`` -> ``~``), the inverse of ckptfmt's naming. When
    names clash (``a`` and ``a/b`` both tensors) or have empty components, the flat dict
    is returned unchanged.

    Example:
        >>> nest({"a/b": 1, "a/c": 2, "d": 3})
        {'a': {'b': 1, 'c': 2}, 'd': 3}
    """
    root: dict[str, Any] = {}
    for name, value in flat.items():
        parts = [p.replace("~1", "/").replace("~0", "~") for p in name.split("/")]
        if any(not p for p in parts):
            return dict(flat)
        node = root
        for p in parts[:-1]:
            child = node.setdefault(p, {})
            if not isinstance(child, dict) or child is value:
                return dict(flat)
            node = child
        if parts[-1] in node:
            return dict(flat)
        node[parts[-1]] = value
    return root


def _plan(src: Source, target: str, skip_unsupported: bool) -> tuple[list[TensorInfo], list[tuple[str, str]]]:
    """Which tensors the target can hold; string tensors are always skipped."""
    from ckptfmt.converters import _safetensors

    keep: list[TensorInfo] = []
    skipped: list[tuple[str, str]] = []
    bad: list[str] = []
    for info in src.tensors():
        if info.dtype == "string":
            skipped.append((info.name, "string tensor"))
            continue
        ok = info.dtype in _safetensors.ST_DTYPES if target == "safetensors" else _known_dtype(info.dtype)
        if ok:
            keep.append(info)
        elif skip_unsupported:
            skipped.append((info.name, f"{target} cannot hold {info.dtype}"))
        else:
            bad.append(f"{info.name} ({info.dtype})")
    if bad:
        raise ConversionError(
            f"{src.path}: {len(bad)} tensor(s) have a dtype {target} cannot hold: {', '.join(bad[:10])}"
            f"{' ...' if len(bad) > 10 else ''}; cast them first or skip them (--skip-unsupported)"
        )
    return keep, skipped


def _known_dtype(name: str) -> bool:
    from ckptfmt.format.dtypes import DTYPE_NAMES

    return name in DTYPE_NAMES


def _metadata_for(target: str, metadata: Any) -> Any:
    from ckptfmt.converters import _safetensors

    if target == "safetensors":
        return _safetensors.encode_metadata(metadata)
    if target == "ckptfmt":
        return _safetensors.decode_metadata(metadata)
    return None


def convert(
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str],
    *,
    to: str | None = None,
    src_kind: str | None = None,
    overwrite: bool = False,
    skip_unsupported: bool = False,
) -> ConvertResult:
    """Copy the tensors of a checkpoint of any kind into a ckptfmt, safetensors or torch one.

    Every tensor becomes one entry of the target, under the same ``/``-joined name (a
    ckptfmt target nests them, see :func:`nest`); plain values are not tensors and are
    not copied. Metadata is carried where the target has room for it (safetensors keeps
    a ``{str: str}`` dict as is and anything else JSON-encoded under
    ``"ckptfmt.metadata"``; a torch file holds only the flat dict of tensors). The
    destination appears atomically.

    Args:
        src: the source checkpoint, any kind (tf and onnx included).
        dst: the destination.
        to: ``"ckptfmt"``, ``"safetensors"`` or ``"torch"``; by default from ``dst``'s
            suffix (``.safetensors``; ``.pt``/``.pth``/``.bin``; anything else ckptfmt).
        src_kind: skip detection of ``src``.
        overwrite: replace an existing ``dst``.
        skip_unsupported: leave out tensors whose dtype the target cannot hold instead of
            failing (string tensors are always left out; see ``ConvertResult.skipped``).

    Raises:
        CheckpointExistsError: ``dst`` exists. ConversionError: a dtype the target cannot
        hold. FrameworkNotAvailableError: torch/onnx needed. Errors of :func:`open_any`.

    Example:
        >>> convert("fixtures/tf/tf_module", "/tmp/model.safetensors")  # doctest: +SKIP
        ConvertResult(path='/tmp/model.safetensors', kind='safetensors', tensors=4, ...)
    """
    s_path, d_path = os.fspath(src), os.fspath(dst)
    target = to or _target_kind(d_path)
    if target not in ("ckptfmt", "safetensors", "torch"):
        raise ConversionError(f"cannot convert to {target!r}; targets: ckptfmt, safetensors, torch (onnx: onnx_export)")
    _check_dst(d_path, overwrite)
    with open_any(s_path, kind=src_kind) as s:
        keep, skipped = _plan(s, target, skip_unsupported)
        nbytes = sum(t.nbytes for t in keep)
        if target == "safetensors":
            from ckptfmt.converters._safetensors import write_safetensors

            meta = _metadata_for(target, s.metadata)
            _atomic_file(d_path, lambda tmp: write_safetensors(tmp, [(t, lambda n=t.name: s.get(n)) for t in keep], meta))
        elif target == "torch":
            from ckptfmt.converters._torchfile import write_torch

            _atomic_file(d_path, lambda tmp: write_torch(tmp, {t.name: s.get(t.name) for t in keep}))
        else:
            import ckptfmt.api

            state = nest({t.name: s.get(t.name) for t in keep})
            ckptfmt.api.save(state, d_path, metadata=_metadata_for(target, s.metadata), overwrite=overwrite)
    return ConvertResult(d_path, target, len(keep), nbytes, tuple(skipped))


def onnx_import(
    model: str | os.PathLike[str],
    dst: str | os.PathLike[str],
    *,
    to: str | None = None,
    overwrite: bool = False,
    skip_unsupported: bool = False,
) -> ConvertResult:
    """Extract an ONNX model's initializers (external data included) into a checkpoint.

    Same as :func:`convert` with ``src_kind="onnx"``.

    Example:
        >>> onnx_import("model.onnx", "weights.safetensors")  # doctest: +SKIP
    """
    return convert(model, dst, to=to, src_kind="onnx", overwrite=overwrite, skip_unsupported=skip_unsupported)


def onnx_export(
    src: str | os.PathLike[str],
    model: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    allow_missing: bool = False,
    allow_unknown: bool = False,
    overwrite: bool = False,
) -> ConvertResult:
    """Write a checkpoint's tensors into an ONNX model's initializers, by name, as a new model.

    Every tensor must match its initializer's shape and dtype. By default every
    initializer must get a tensor and every tensor must have an initializer. The result
    is saved to ``out`` (external data beside it in ``<out>.data`` when the model used
    external data or is too large for one protobuf) and checked with ``onnx.checker``.

    Args:
        src: the checkpoint with the new values, any kind.
        model: the ONNX model to fill in (left unchanged).
        out: the new model.
        allow_missing: keep the model's values for initializers ``src`` lacks.
        allow_unknown: ignore tensors of ``src`` the model has no initializer for.
        overwrite: replace an existing ``out``.

    Raises:
        ConversionError: shape/dtype mismatches (all listed). UnmappedKeyError: missing or
        unknown names (all listed). CheckpointExistsError: ``out`` exists.

    Example:
        >>> onnx_export("finetuned.safetensors", "model.onnx", "finetuned.onnx")  # doctest: +SKIP
    """
    from ckptfmt.converters._onnx import export_onnx

    return export_onnx(
        os.fspath(src), os.fspath(model), os.fspath(out),
        allow_missing=allow_missing, allow_unknown=allow_unknown, overwrite=overwrite,
    )

