"""A small, bounded protobuf wire-format codec: varints, fields, and their encoders.

Every decoder takes a ``where`` string (file and key) and raises
:class:`~ckptfmt.errors.FormatError` naming it when the bytes are truncated, a varint is
too long, or a length runs past its message. Nothing here allocates more than the input.
The messages built on it are in :mod:`._proto`; the text ``checkpoint`` file is :mod:`._state`.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator

from ckptfmt.errors import FormatError

__all__: list[str] = []  # private module; names are imported explicitly by siblings

# Wire types.
_VARINT, _FIXED64, _LEN, _FIXED32 = 0, 1, 2, 5

_ADVICE = "the checkpoint is corrupt or not a TensorFlow checkpoint; re-save it"


def _fail(where: str, what: str) -> FormatError:
    return FormatError(f"{where}: {what}; {_ADVICE}")


# --------------------------------------------------------------------------- decoding


def read_varint(buf: bytes | memoryview, pos: int, where: str, limit: int | None = None) -> tuple[int, int]:
    """Decode an unsigned varint (at most 64 bits) at ``pos``; return ``(value, next_pos)``."""
    end = len(buf) if limit is None else limit
    result = 0
    shift = 0
    while True:
        if pos >= end:
            raise _fail(where, f"varint truncated at byte offset {pos}")
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            break
        shift += 7
        if shift >= 70:
            raise _fail(where, f"varint longer than 10 bytes ending at byte offset {pos}")
    if result >> 64:
        raise _fail(where, f"varint overflows 64 bits ending at byte offset {pos}")
    return result, pos


def to_signed64(v: int) -> int:
    return v - (1 << 64) if v >> 63 else v


def iter_fields(buf: bytes | memoryview, where: str) -> Iterator[tuple[int, int, object]]:
    """Yield ``(field_number, wire_type, value)``; ``value`` is an int or a memoryview."""
    mv = memoryview(buf)
    n = len(mv)
    pos = 0
    while pos < n:
        key, pos = read_varint(mv, pos, where)
        num, wt = key >> 3, key & 7
        if num == 0:
            raise _fail(where, f"field number 0 at byte offset {pos}")
        if wt == _VARINT:
            value, pos = read_varint(mv, pos, where)
        elif wt == _FIXED64:
            if pos + 8 > n:
                raise _fail(where, f"fixed64 field {num} truncated at byte offset {pos}")
            value = int.from_bytes(mv[pos : pos + 8], "little")
            pos += 8
        elif wt == _FIXED32:
            if pos + 4 > n:
                raise _fail(where, f"fixed32 field {num} truncated at byte offset {pos}")
            value = int.from_bytes(mv[pos : pos + 4], "little")
            pos += 4
        elif wt == _LEN:
            length, pos = read_varint(mv, pos, where)
            if length > n - pos:
                raise _fail(
                    where,
                    f"field {num} claims {length} bytes at byte offset {pos} but only "
                    f"{n - pos} remain",
                )
            value = mv[pos : pos + length]
            pos += length
        else:
            raise _fail(where, f"unsupported wire type {wt} for field {num} at byte offset {pos}")
        yield num, wt, value


def _expect(wt: int, want: int, num: int, where: str) -> None:
    if wt != want:
        raise _fail(where, f"field {num} has wire type {wt}, expected {want}")


def _str(v: object, where: str) -> str:
    try:
        return bytes(v).decode("utf-8")  # type: ignore[arg-type]
    except UnicodeDecodeError as e:
        raise _fail(where, f"string field is not valid UTF-8 ({e})") from None


def _packed_or_single(wt: int, v: object, where: str) -> list[int]:
    """Repeated varint fields may arrive packed (LEN) or one by one (VARINT)."""
    if wt == _VARINT:
        return [v]  # type: ignore[list-item]
    if wt == _LEN:
        out = []
        mv = v  # type: ignore[assignment]
        pos = 0
        while pos < len(mv):  # type: ignore[arg-type]
            x, pos = read_varint(mv, pos, where)  # type: ignore[arg-type]
            out.append(x)
        return out
    raise _fail(where, f"repeated varint field has wire type {wt}")


# --------------------------------------------------------------------------- encoding


def varint(v: int) -> bytes:
    """Encode a non-negative int (negative ints as 64-bit two's complement)."""
    if v < 0:
        v += 1 << 64
    out = bytearray()
    while v >= 0x80:
        out.append((v & 0x7F) | 0x80)
        v >>= 7
    out.append(v)
    return bytes(out)


def f_varint(num: int, v: int) -> bytes:
    return varint(num << 3 | _VARINT) + varint(v)


def f_bytes(num: int, b: bytes) -> bytes:
    return varint(num << 3 | _LEN) + varint(len(b)) + b


def f_str(num: int, s: str) -> bytes:
    return f_bytes(num, s.encode("utf-8"))


def f_fixed32(num: int, v: int) -> bytes:
    return varint(num << 3 | _FIXED32) + struct.pack("<I", v)

