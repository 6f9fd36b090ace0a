"""The index keys of a partitioned variable's slices, and how a person names a slice.

TensorFlow stores each slice of a partitioned variable under a key built by its
``EncodeTensorNameSlice``: OrderedCode numbers and strings, which sort as the values do.
"""

from __future__ import annotations

from ._proto import Extent

__all__ = ["slice_name", "slice_key"]


def _ordered_num(v: int) -> bytes:
    """OrderedCode ``WriteNumIncreasing``: a length byte, then big-endian bytes."""
    body = v.to_bytes((v.bit_length() + 7) // 8, "big") if v else b""
    return bytes([len(body)]) + body


def _ordered_signed(v: int) -> bytes:
    """OrderedCode ``WriteSignedNumIncreasing``: n leading header bits code the length n."""
    x = ~v if v < 0 else v
    n = 1
    while n < 10 and x.bit_length() > 7 * n - 1:
        n += 1
    raw = bytearray((v & ((1 << (8 * n)) - 1)).to_bytes(n, "big"))
    # Header: n one-bits then a zero bit, XOR-ed over the sign-extended value.
    ones = n
    i = 0
    while ones >= 8:
        raw[i] ^= 0xFF
        ones -= 8
        i += 1
    raw[i] ^= (0xFF << (8 - ones)) & 0xFF
    return bytes(raw)


def _ordered_string(s: bytes) -> bytes:
    """OrderedCode ``WriteString``: NUL and 0xFF escaped, then the terminator 00 01."""
    return _escape_ordered(s) + b"\x00\x01"


def _escape_ordered(s: bytes) -> bytes:
    out = bytearray()
    for b in s:
        if b == 0x00:
            out += b"\x00\xff"
        elif b == 0xFF:
            out += b"\xff\x00"
        else:
            out.append(b)
    return bytes(out)


def slice_name(name: str, index: tuple[slice, ...]) -> str:
    """A slice of a partitioned variable as a person writes it: ``emb[75:100, 0:8]``.

    Example:
        >>> slice_name("emb", (slice(75, 100), slice(0, 8)))
        'emb[75:100, 0:8]'
    """
    dims = ", ".join(f"{s.start}:{s.stop}" for s in index)
    return f"{name}[{dims}]"


def slice_key(name: bytes, extents: tuple[Extent, ...]) -> bytes:
    """The index key TensorFlow stores one slice of a partitioned variable under."""
    out = _ordered_num(0) + _ordered_string(name) + _ordered_num(len(extents))
    for start, length in extents:
        if length is None:
            start, length = 0, -1
        out += _ordered_signed(start) + _ordered_signed(length)
    return out

