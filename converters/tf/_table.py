"""The LevelDB-style sorted string table that holds a TensorBundle's ``.index``.

Layout (LevelDB ``table_format.md``; TensorFlow's ``lib/io`` copy is the same)::

    [data block]* [metaindex block] [index block] [footer: 48 bytes]

Each block is followed by a 5-byte trailer: a compression type byte (0 none, 1 snappy)
and the masked CRC32C of the block contents plus that type byte. A block holds
prefix-compressed entries ``varint shared | varint non_shared | varint value_len |
key delta | value`` and ends with an array of uint32 restart offsets and their count.
The index block maps a separator key to each data block's handle
``varint64 offset | varint64 size``. The footer holds the metaindex and index handles,
zero padding to 40 bytes, and the little-endian magic ``0xdb4775248b80fb57``.

An index is small (one entry per tensor), so it is read whole and parsed eagerly; every
offset and length is checked before use.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable

import crc32c as _crc32c

from ckptfmt.errors import FormatError, IntegrityError

from ._wire import read_varint, varint

__all__: list[str] = []

MAGIC = 0xDB4775248B80FB57
FOOTER_SIZE = 48
TRAILER_SIZE = 5
BLOCK_SIZE = 8 * 1024
RESTART_INTERVAL = 16
# A snappy block claiming to inflate beyond this is treated as corrupt rather than
# allocated; TensorFlow's own index blocks are a few hundred KiB at most.
MAX_UNCOMPRESSED_BLOCK = 256 * 1024 * 1024

_MASK_DELTA = 0xA282EAD8


def crc32c(data: bytes | memoryview, value: int = 0) -> int:
    return _crc32c.crc32c(data, value)


def mask_crc(crc: int) -> int:
    """TensorFlow/LevelDB masking, so CRCs of data containing CRCs stay well-distributed."""
    return ((((crc >> 15) | (crc << 17)) & 0xFFFFFFFF) + _MASK_DELTA) & 0xFFFFFFFF


def unmask_crc(masked: int) -> int:
    rot = (masked - _MASK_DELTA) & 0xFFFFFFFF
    return ((rot >> 17) | (rot << 15)) & 0xFFFFFFFF


# ------------------------------------------------------------------------------ reading


def _snappy_decompress(raw: memoryview, where: str) -> bytes:
    try:
        import cramjam
    except ImportError:
        raise FormatError(
            f"{where}: block is snappy-compressed and cramjam is not installed; "
            "install it with: pip install 'ckptfmt[snappy]'"
        ) from None
    length, _ = read_varint(raw, 0, where)
    if length > MAX_UNCOMPRESSED_BLOCK:
        raise FormatError(
            f"{where}: snappy block claims {length} uncompressed bytes (limit "
            f"{MAX_UNCOMPRESSED_BLOCK}); the index is corrupt, re-save the checkpoint"
        )
    try:
        return bytes(cramjam.snappy.decompress_raw(bytes(raw)))
    except Exception as e:  # cramjam raises its own DecompressionError
        raise FormatError(f"{where}: snappy block does not decompress ({e}); re-save the checkpoint") from None


def _decode_handle(buf: bytes | memoryview, pos: int, where: str) -> tuple[int, int, int]:
    offset, pos = read_varint(buf, pos, where)
    size, pos = read_varint(buf, pos, where)
    return offset, size, pos


def _read_block(data: bytes, offset: int, size: int, where: str) -> memoryview:
    end_limit = len(data) - FOOTER_SIZE
    if offset > end_limit or size > end_limit - offset or offset + size + TRAILER_SIZE > end_limit:
        raise FormatError(
            f"{where}: block at byte offset {offset} with size {size} runs past the end of "
            f"the table ({end_limit} bytes before the footer); the index is truncated or corrupt"
        )
    mv = memoryview(data)
    contents = mv[offset : offset + size]
    btype = data[offset + size]
    (stored,) = struct.unpack_from("<I", data, offset + size + 1)
    actual = crc32c(bytes([btype]), crc32c(contents))
    if unmask_crc(stored) != actual:
        raise IntegrityError(
            f"{where}: checksum mismatch in block at byte offset {offset} (stored "
            f"{unmask_crc(stored):#010x}, computed {actual:#010x}); the index is corrupt, "
            "restore it from a backup or re-save the checkpoint"
        )
    if btype == 0:
        return contents
    if btype == 1:
        return memoryview(_snappy_decompress(contents, f"{where} block at byte offset {offset}"))
    raise FormatError(
        f"{where}: block at byte offset {offset} has unknown compression type {btype}; "
        "the index is corrupt or written by an unsupported tool"
    )


def _block_entries(block: memoryview, where: str) -> list[tuple[bytes, memoryview]]:
    n = len(block)
    if n < 4:
        raise FormatError(f"{where}: block of {n} bytes is too short for its restart count")
    (num_restarts,) = struct.unpack_from("<I", block, n - 4)
    if num_restarts > (n - 4) // 4:
        raise FormatError(
            f"{where}: block claims {num_restarts} restart points but holds only {n} bytes"
        )
    limit = n - 4 - 4 * num_restarts
    out: list[tuple[bytes, memoryview]] = []
    key = b""
    pos = 0
    while pos < limit:
        start = pos
        # Three one-byte varints is the usual case (a TensorBundle index has thousands of
        # entries); anything longer takes the checked decoder.
        if pos + 3 <= limit and block[pos] < 0x80 and block[pos + 1] < 0x80 and block[pos + 2] < 0x80:
            shared, non_shared, vlen = block[pos], block[pos + 1], block[pos + 2]
            pos += 3
        else:
            here = f"{where} (entry at block byte offset {start})"
            shared, pos = read_varint(block, pos, here, limit)
            non_shared, pos = read_varint(block, pos, here, limit)
            vlen, pos = read_varint(block, pos, here, limit)
        if shared > len(key) or non_shared > limit - pos or vlen > limit - pos - non_shared:
            raise FormatError(
                f"{where} (entry at block byte offset {start}): key or value lengths run past "
                "the block; the index is corrupt"
            )
        key = key[:shared] + bytes(block[pos : pos + non_shared])
        pos += non_shared
        out.append((key, block[pos : pos + vlen]))
        pos += vlen
    return out


def read_table(data: bytes, where: str) -> list[tuple[bytes, bytes]]:
    """Parse a whole table; return its ``(key, value)`` pairs in key order.

    Raises:
        FormatError: bad magic, truncation, a handle or length out of range, keys out
            of order. ``IntegrityError`` (a subclass) on a block checksum mismatch.
    """
    if len(data) < FOOTER_SIZE:
        raise FormatError(
            f"{where}: {len(data)} bytes is shorter than the {FOOTER_SIZE}-byte table footer; "
            "the index is truncated"
        )
    foot = len(data) - FOOTER_SIZE
    (magic,) = struct.unpack_from("<Q", data, foot + 40)
    if magic != MAGIC:
        raise FormatError(
            f"{where}: bad table magic {magic:#018x} at byte offset {foot + 40} (expected "
            f"{MAGIC:#018x}); this is not a TensorFlow checkpoint index or it is truncated"
        )
    footer = memoryview(data)[foot : foot + 40]
    meta_off, meta_size, pos = _decode_handle(footer, 0, f"{where} footer")
    index_off, index_size, _ = _decode_handle(footer, pos, f"{where} footer")
    _block_entries(_read_block(data, meta_off, meta_size, f"{where} metaindex"), f"{where} metaindex")
    index = _block_entries(_read_block(data, index_off, index_size, f"{where} index block"), f"{where} index block")
    out: list[tuple[bytes, bytes]] = []
    for _, handle in index:
        off, size, _ = _decode_handle(handle, 0, f"{where} index block")
        block = _read_block(data, off, size, f"{where} data block")
        for key, value in _block_entries(block, f"{where} data block at byte offset {off}"):
            if out and key <= out[-1][0]:
                raise FormatError(
                    f"{where}: key {key[:80]!r} in block at byte offset {off} is not after "
                    f"{out[-1][0][:80]!r}; the index is corrupt"
                )
            out.append((key, bytes(value)))
    return out


# ------------------------------------------------------------------------------ writing


class _BlockBuilder:
    def __init__(self) -> None:
        self.buf = bytearray()
        self.restarts = [0]
        self.counter = 0
        self.last_key = b""

    def add(self, key: bytes, value: bytes) -> None:
        shared = 0
        if self.counter < RESTART_INTERVAL:
            limit = min(len(key), len(self.last_key))
            while shared < limit and key[shared] == self.last_key[shared]:
                shared += 1
        else:
            self.restarts.append(len(self.buf))
            self.counter = 0
        self.buf += varint(shared) + varint(len(key) - shared) + varint(len(value))
        self.buf += key[shared:] + value
        self.last_key = key
        self.counter += 1

    def estimated_size(self) -> int:
        return len(self.buf) + 4 * len(self.restarts) + 4

    def finish(self) -> bytes:
        tail = b"".join(struct.pack("<I", r) for r in self.restarts)
        return bytes(self.buf) + tail + struct.pack("<I", len(self.restarts))


def build_table(entries: Iterable[tuple[bytes, bytes]]) -> bytes:
    """Serialize ``(key, value)`` pairs, already sorted by key bytes, as an uncompressed table."""
    out = bytearray()

    def emit(contents: bytes) -> bytes:
        handle = varint(len(out)) + varint(len(contents))
        trailer_crc = mask_crc(crc32c(b"\x00", crc32c(contents)))
        out.extend(contents)
        out.extend(b"\x00" + struct.pack("<I", trailer_crc))
        return handle

    index = _BlockBuilder()
    block = _BlockBuilder()
    prev: bytes | None = None
    for key, value in entries:
        if prev is not None and key <= prev:
            raise ValueError(f"table keys must be strictly increasing: {key!r} after {prev!r}")
        block.add(key, value)
        prev = key
        if block.estimated_size() >= BLOCK_SIZE:
            # The block's last key is a valid separator: >= every key in it and < the next.
            index.add(block.last_key, emit(block.finish()))
            block = _BlockBuilder()
    if block.counter or not index.counter:
        index.add(block.last_key, emit(block.finish()))
    meta_handle = emit(_BlockBuilder().finish())
    index_handle = emit(index.finish())
    footer = (meta_handle + index_handle).ljust(40, b"\x00") + struct.pack("<Q", MAGIC)
    out.extend(footer)
    return bytes(out)
