"""The dtypes a checkpoint can hold, by their names in the manifest.

All multi-byte values are stored little-endian. bfloat16 and the float8 types come from
``ml_dtypes`` (a small dependency with no framework behind it).

Example:
    >>> import numpy as np
    >>> from ckptfmt.format.dtypes import dtype_name, numpy_dtype
    >>> dtype_name(np.dtype(">f4")), numpy_dtype("float32")
    ('float32', dtype('float32'))
"""

from __future__ import annotations

__all__ = ["DTYPE_NAMES", "dtype_name", "numpy_dtype", "dtype_itemsize", "needs_byteswap", "storage_dtype"]

import sys

import numpy as np

from ckptfmt.errors import FormatError, UnsupportedDtypeError

# Importing ml_dtypes costs most of a command's start-up (about a second on a busy machine),
# so it is imported only when a bfloat16 or float8 dtype is asked for by name. An array can
# only *have* one of these dtypes once ml_dtypes has been imported by someone, which is why
# ``dtype_name`` looks in ``sys.modules`` instead of importing it.
_ML_NAMES = ("bfloat16", "float8_e4m3fn", "float8_e5m2")

_NUMPY_BY_NAME: dict[str, np.dtype | None] = {
    "bool": np.dtype(np.bool_),
    "int8": np.dtype("<i1"),
    "int16": np.dtype("<i2"),
    "int32": np.dtype("<i4"),
    "int64": np.dtype("<i8"),
    "uint8": np.dtype("<u1"),
    "uint16": np.dtype("<u2"),
    "uint32": np.dtype("<u4"),
    "uint64": np.dtype("<u8"),
    "float16": np.dtype("<f2"),
    "bfloat16": None,
    "float32": np.dtype("<f4"),
    "float64": np.dtype("<f8"),
    "complex64": np.dtype("<c8"),
    "complex128": np.dtype("<c16"),
    "float8_e4m3fn": None,
    "float8_e5m2": None,
}

#: Every dtype name the format knows, in a stable order.
DTYPE_NAMES: tuple[str, ...] = tuple(_NUMPY_BY_NAME)

_ITEMSIZES: dict[str, int] = {n: (t.itemsize if t is not None else (2 if n == "bfloat16" else 1)) for n, t in _NUMPY_BY_NAME.items()}
_STD_KINDS = {(t.kind, t.itemsize): n for n, t in _NUMPY_BY_NAME.items() if t is not None}
_ml_types: dict[type, str] = {}
_LITTLE = sys.byteorder == "little"
# dtype -> name for dtypes already seen (np.dtype objects only; equal dtypes share a name).
_NAME_CACHE: dict[np.dtype, str] = {}


def _load_ml_dtypes() -> None:
    import ml_dtypes

    for n in _ML_NAMES:
        dt = np.dtype(getattr(ml_dtypes, n))
        _NUMPY_BY_NAME[n] = dt
        _ml_types[dt.type] = n


def dtype_name(dtype: np.dtype) -> str:
    """Return the format's name for a numpy dtype, in either byte order.

    Raises:
        UnsupportedDtypeError: object, string, structured and other non-numeric dtypes.
    """
    try:
        return _NAME_CACHE[dtype]  # called once or twice per tensor by the writer
    except (KeyError, TypeError):
        pass
    dt = np.dtype(dtype)
    if dt.fields is None and dt.subdtype is None:
        name = _STD_KINDS.get((dt.kind, dt.itemsize))
        if name is not None:
            if type(dtype) is type(dt):
                _NAME_CACHE[dtype] = name
            return name
    # ml_dtypes types are numpy "V"-kind or custom kinds; match them by identity of the type.
    if not _ml_types and "ml_dtypes" in sys.modules:
        _load_ml_dtypes()
    name = _ml_types.get(dt.type)
    if name is not None:
        _NAME_CACHE[dt] = name
        return name
    raise UnsupportedDtypeError(
        f"dtype {dt!r} cannot be stored; supported dtypes are: {', '.join(DTYPE_NAMES)}"
    )


def numpy_dtype(name: str) -> np.dtype:
    """Return the little-endian numpy dtype for a format dtype name.

    Raises:
        FormatError: the name is not one the format defines.
    """
    try:
        dt = _NUMPY_BY_NAME[name]
    except (KeyError, TypeError):
        raise FormatError(f"unknown dtype {name!r} in manifest; known: {', '.join(DTYPE_NAMES)}") from None
    if dt is None:
        _load_ml_dtypes()
        dt = _NUMPY_BY_NAME[name]
    return dt  # type: ignore[return-value]


def dtype_itemsize(name: str) -> int:
    """Bytes per element of a format dtype name, without importing ml_dtypes.

    Example:
        >>> dtype_itemsize("bfloat16"), dtype_itemsize("complex128")
        (2, 16)

    Raises:
        FormatError: the name is not one the format defines.
    """
    try:
        return _ITEMSIZES[name]
    except (KeyError, TypeError):
        raise FormatError(f"unknown dtype {name!r} in manifest; known: {', '.join(DTYPE_NAMES)}") from None


def needs_byteswap(dtype: np.dtype) -> bool:
    """True when values of ``dtype`` must be byte-swapped to be stored little-endian."""
    if _LITTLE and isinstance(dtype, np.dtype) and dtype.byteorder != ">":
        return False  # the writer asks once per tensor: the common answer without np.dtype()
    dt = np.dtype(dtype)
    if dt.itemsize == 1 or dt.byteorder == "|":
        return False
    if dt.byteorder == ">":
        return True
    return dt.byteorder == "=" and sys.byteorder == "big"


def storage_dtype(dtype: np.dtype) -> np.dtype:
    """The dtype values of ``dtype`` have on disk (its little-endian twin)."""
    return numpy_dtype(dtype_name(dtype))
