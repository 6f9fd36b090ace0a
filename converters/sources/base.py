"""What every source shares: the :class:`Source` verbs, :class:`TensorInfo`, and the helpers
each format module uses (reports, error lines, dtype names, JSON-ready values, destinations,
atomic files).

A format module (``ckptfmt.py``, ``tf.py``, ``torch.py``, ``safetensors.py``, ``onnx.py``)
subclasses :class:`Source`, says which paths are its own (:meth:`Source.claims` by layout or
suffix, :meth:`Source.sniff` by first bytes) and implements ``keys``, ``info``, ``get`` and
``verify``. Nothing here imports torch, onnx or another format module.

Example:
    >>> TensorInfo("w", "float32", (2, 3), 24).to_dict()
    {'name': 'w', 'dtype': 'float32', 'shape': [2, 3], 'nbytes': 24}
"""

from __future__ import annotations

__all__ = [
    "TensorInfo",
    "Source",
    "ConvertResult",
    "make_report",
    "first_line",
    "dtype_str",
    "jsonable",
    "check_destination",
    "atomic_file",
    "require",
]

import importlib
import math
import os
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np

from ckptfmt.api import Problem, VerifyReport
from ckptfmt.errors import CheckpointExistsError, FrameworkNotAvailableError, UnsupportedDtypeError
from ckptfmt.format.dtypes import dtype_name


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

    Use :func:`ckptfmt.converters.sources.open_any` to make one; close it (or use ``with``)
    when done. Subclasses set ``kind`` and implement ``keys``, ``info``, ``get`` and the
    classmethod ``verify``; ``metadata``, ``version``, ``digest`` and ``close`` have
    defaults. A format module's source also says which paths it reads: :meth:`claims`
    (layout or suffix, asked first) and :meth:`sniff` (the first bytes of a file no kind
    claims).

    Example:
        >>> from ckptfmt.converters.sources import open_any
        >>> with open_any("model.safetensors") as src:  # doctest: +SKIP
        ...     [(t.name, t.shape) for t in src.tensors()]
    """

    kind: ClassVar[str]

    def __init__(self, path: str) -> None:
        self.path = path

    @classmethod
    def claims(cls, path: str) -> bool:
        """True when ``path`` is this kind's by its layout or name (nothing is read but listings)."""
        return False

    @classmethod
    def sniff(cls, head: bytes) -> bool:
        """True when a file's first bytes (up to 9) are this kind's; asked only when no kind claims it."""
        return False

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
        """Check a checkpoint of this kind completely; see :func:`ckptfmt.converters.kinds.verify_any`."""

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


@dataclass(frozen=True, slots=True)
class ConvertResult:
    """What :func:`ckptfmt.converters.kinds.convert` (or ``onnx_export``) wrote.

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


def dtype_str(dt: np.dtype) -> str:
    """ckptfmt's name for a numpy dtype, or a readable name for the ones it lacks.

    Example:
        >>> dtype_str(np.dtype("float32")), dtype_str(np.dtype(object))
        ('float32', 'string')
    """
    try:
        return dtype_name(dt)
    except UnsupportedDtypeError:
        return "string" if dt == np.dtype(object) else str(dt)


def make_report(
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
    """A VerifyReport for a foreign kind; ``checked`` counts entries (the kind's "chunks").

    Example:
        >>> make_report("x.safetensors", [], time.perf_counter()).ok
        True
    """
    ok = not any(p.severity == "error" for p in problems)
    return VerifyReport(path, ok, digest, version, tensors, checked, nbytes, time.perf_counter() - t0, tuple(problems))


def first_line(e: BaseException) -> str:
    """The first line of an exception's message (its type's name when it has none).

    Example:
        >>> first_line(ValueError("bad\\nmore")), first_line(KeyError())
        ('bad', 'KeyError')
    """
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def jsonable(v: Any) -> Any:
    """``v`` with everything JSON cannot hold turned into strings (non-finite floats, bytes, objects).

    Example:
        >>> jsonable({"a": float("nan"), 1: b"\\x01", "n": np.int64(3)})
        {'a': 'nan', '1': '0x01', 'n': 3}
    """
    if isinstance(v, dict):
        return {str(k): jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [jsonable(x) for x in v]
    if isinstance(v, np.generic):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    if isinstance(v, (bytes, bytearray)):
        return "0x" + bytes(v).hex() if len(v) <= 64 else f"<{len(v)} bytes>"
    if v is None or isinstance(v, (bool, int, float, str)):
        return v
    return repr(v)


def check_destination(dst: str, overwrite: bool) -> None:
    """Refuse an existing file destination unless ``overwrite``.

    Raises:
        CheckpointExistsError: ``dst`` exists (a dangling link counts) and ``overwrite`` is false.

    Example:
        >>> check_destination("/nonexistent/new.safetensors", overwrite=False)
    """
    if os.path.lexists(dst) and not overwrite:
        raise CheckpointExistsError(f"{dst} already exists; pass overwrite=True (--overwrite) to replace it")


def atomic_file(dst: str, write: Callable[[str], None]) -> None:
    """Call ``write(tmp)`` and rename ``tmp`` to ``dst``: a failed write leaves no ``dst``.

    Example:
        >>> import tempfile, pathlib
        >>> p = os.path.join(tempfile.mkdtemp(), "f.bin")
        >>> atomic_file(p, lambda tmp: pathlib.Path(tmp).write_bytes(b"x"))
        >>> open(p, "rb").read()
        b'x'
    """
    tmp = os.path.join(os.path.dirname(os.path.abspath(dst)), f".{os.path.basename(dst)}.tmp-{os.getpid()}")
    try:
        write(tmp)
        os.replace(tmp, dst)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def require(module: str, feature: str, *, extra: str | None = None) -> Any:
    """Import an optional framework (``torch``, ``onnx``) or say which extra installs it.

    Raises:
        FrameworkNotAvailableError: it is not installed; the message names ``feature`` and
            the extra (``pip install 'ckptfmt[torch]'``).

    Example:
        >>> require("json", "parsing").__name__
        'json'
    """
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise FrameworkNotAvailableError(module, extra or module, feature=feature) from e
