"""TensorFlow's ``DataType`` enum (``types.proto``) as numpy dtypes, names and item sizes.

bfloat16 and the float8 types come from ml_dtypes, whose import costs most of a command's
start-up: it is imported when a tensor of one of them is read, not with this module.
"""

from __future__ import annotations

import numpy as np

__all__: list[str] = []  # private module; names are imported explicitly by siblings

# DT_STRING is not a numpy dtype: its tensors are read and written as object arrays of bytes.
_DT_STRING = 7
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
