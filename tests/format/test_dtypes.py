from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest

from ckptfmt.errors import FormatError, UnsupportedDtypeError
from ckptfmt.format.dtypes import DTYPE_NAMES, dtype_name, needs_byteswap, numpy_dtype


def test_every_name_round_trips():
    assert len(DTYPE_NAMES) == 17
    for name in DTYPE_NAMES:
        assert dtype_name(numpy_dtype(name)) == name


@pytest.mark.parametrize(
    "dt,name",
    [(">f4", "float32"), ("<i8", "int64"), (">c16", "complex128"), ("?", "bool"), (ml_dtypes.bfloat16, "bfloat16"),
     (ml_dtypes.float8_e4m3fn, "float8_e4m3fn"), (ml_dtypes.float8_e5m2, "float8_e5m2"), ("u2", "uint16")],
)
def test_names_ignore_byte_order(dt, name):
    assert dtype_name(np.dtype(dt)) == name


@pytest.mark.parametrize("dt", ["O", "U3", "S4", "V8", [("a", "f4")], "M8[s]", "m8[s]", "f16" if hasattr(np, "float128") else "O"])
def test_unsupported_dtypes_are_refused(dt):
    with pytest.raises(UnsupportedDtypeError, match="cannot be stored"):
        dtype_name(np.dtype(dt))


def test_unknown_manifest_name():
    with pytest.raises(FormatError, match="unknown dtype"):
        numpy_dtype("float128")


def test_byteswap_detection():
    assert needs_byteswap(np.dtype(">f4"))
    assert not needs_byteswap(np.dtype("<f4"))
    assert not needs_byteswap(np.dtype("i1"))
