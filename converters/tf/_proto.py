"""The TensorFlow messages a checkpoint holds, decoded with bounds checked.

Only what a TensorBundle checkpoint holds is modelled here: ``BundleHeaderProto``,
``BundleEntryProto`` (with ``TensorShapeProto`` and ``TensorSliceProto``), ``VersionDef``
and ``TrackableObjectGraph``; the wire codec is :mod:`._wire` and the text-format
``CheckpointState`` of the ``checkpoint`` file :mod:`._state`. Field numbers follow
TensorFlow's ``.proto`` files; unknown fields are skipped on read (and kept verbatim where
a message is re-serialized).

Every decoder takes a ``where`` string (file and key) and raises
:class:`~ckptfmt.errors.FormatError` naming it when the bytes are truncated, a varint is
too long, or a length runs past its message. Nothing here allocates more than the input.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ._wire import (
    _FIXED32,
    _LEN,
    _VARINT,
    _expect,
    _fail,
    _packed_or_single,
    _str,
    f_bytes,
    f_fixed32,
    f_str,
    f_varint,
    iter_fields,
    to_signed64,
)

__all__: list[str] = []  # private module; names are imported explicitly by siblings

@dataclass(frozen=True, slots=True)
class VersionDef:
    producer: int = 0
    min_consumer: int = 0
    bad_consumers: tuple[int, ...] = ()

    @classmethod
    def decode(cls, buf: bytes | memoryview, where: str) -> VersionDef:
        producer = min_consumer = 0
        bad: list[int] = []
        for num, wt, v in iter_fields(buf, where):
            if num == 1:
                _expect(wt, _VARINT, num, where)
                producer = to_signed64(v)  # type: ignore[arg-type]
            elif num == 2:
                _expect(wt, _VARINT, num, where)
                min_consumer = to_signed64(v)  # type: ignore[arg-type]
            elif num == 3:
                bad.extend(to_signed64(x) for x in _packed_or_single(wt, v, where))
        return cls(producer, min_consumer, tuple(bad))

    def encode(self) -> bytes:
        out = b""
        if self.producer:
            out += f_varint(1, self.producer)
        if self.min_consumer:
            out += f_varint(2, self.min_consumer)
        for b in self.bad_consumers:
            out += f_varint(3, b)
        return out


@dataclass(frozen=True, slots=True)
class BundleHeader:
    """``BundleHeaderProto``: the value stored under the empty key of the index."""

    num_shards: int = 0
    endianness: int = 0  # 0 = LITTLE, 1 = BIG
    version: VersionDef = field(default_factory=VersionDef)

    @classmethod
    def decode(cls, buf: bytes | memoryview, where: str) -> BundleHeader:
        num_shards = endianness = 0
        version = VersionDef()
        for num, wt, v in iter_fields(buf, where):
            if num == 1:
                _expect(wt, _VARINT, num, where)
                num_shards = to_signed64(v)  # type: ignore[arg-type]
            elif num == 2:
                _expect(wt, _VARINT, num, where)
                endianness = to_signed64(v)  # type: ignore[arg-type]
            elif num == 3:
                _expect(wt, _LEN, num, where)
                version = VersionDef.decode(v, where)  # type: ignore[arg-type]
        return cls(num_shards, endianness, version)

    def encode(self) -> bytes:
        out = b""
        if self.num_shards:
            out += f_varint(1, self.num_shards)
        if self.endianness:
            out += f_varint(2, self.endianness)
        out += f_bytes(3, self.version.encode())
        return out


Extent = tuple[int, "int | None"]  # (start, length); length None means the whole dimension


def _decode_shape(buf: object, where: str) -> tuple[int, ...]:
    dims: list[int] = []
    for num, wt, v in iter_fields(buf, where):  # type: ignore[arg-type]
        if num == 2:
            _expect(wt, _LEN, num, where)
            size = 0
            for dnum, dwt, dv in iter_fields(v, where):  # type: ignore[arg-type]
                if dnum == 1:
                    _expect(dwt, _VARINT, dnum, where)
                    size = to_signed64(dv)  # type: ignore[arg-type]
            dims.append(size)
        elif num == 3 and v:
            raise _fail(where, "tensor shape has unknown rank")
    return tuple(dims)


def _encode_shape(shape: tuple[int, ...]) -> bytes:
    return b"".join(f_bytes(2, f_varint(1, d) if d else b"") for d in shape)


def _decode_slice(buf: object, where: str) -> tuple[Extent, ...]:
    extents: list[Extent] = []
    for num, wt, v in iter_fields(buf, where):  # type: ignore[arg-type]
        if num == 1:
            _expect(wt, _LEN, num, where)
            start, length = 0, None
            for enum_, ewt, ev in iter_fields(v, where):  # type: ignore[arg-type]
                if enum_ == 1:
                    _expect(ewt, _VARINT, enum_, where)
                    start = to_signed64(ev)  # type: ignore[arg-type]
                elif enum_ == 2:
                    _expect(ewt, _VARINT, enum_, where)
                    length = to_signed64(ev)  # type: ignore[arg-type]
            extents.append((start, length))
    return tuple(extents)


@dataclass(frozen=True, slots=True)
class BundleEntry:
    """``BundleEntryProto``: where one tensor's bytes live and how to check them."""

    dtype: int = 0
    shape: tuple[int, ...] = ()
    shard_id: int = 0
    offset: int = 0
    size: int = 0
    crc32c: int = 0  # masked, as stored
    slices: tuple[tuple[Extent, ...], ...] = ()

    @classmethod
    def decode(cls, buf: bytes | memoryview, where: str) -> BundleEntry:
        if isinstance(buf, bytes):
            fast = _decode_entry_fast(buf)
            if fast is not None:
                return cls(*fast)
        dtype = shard_id = offset = size = crc = 0
        shape: tuple[int, ...] = ()
        slices: list[tuple[Extent, ...]] = []
        for num, wt, v in iter_fields(buf, where):
            if num == 1:
                _expect(wt, _VARINT, num, where)
                dtype = to_signed64(v)  # type: ignore[arg-type]
            elif num == 2:
                _expect(wt, _LEN, num, where)
                shape = _decode_shape(v, where)
            elif num == 3:
                _expect(wt, _VARINT, num, where)
                shard_id = to_signed64(v)  # type: ignore[arg-type]
            elif num == 4:
                _expect(wt, _VARINT, num, where)
                offset = to_signed64(v)  # type: ignore[arg-type]
            elif num == 5:
                _expect(wt, _VARINT, num, where)
                size = to_signed64(v)  # type: ignore[arg-type]
            elif num == 6:
                _expect(wt, _FIXED32, num, where)
                crc = v  # type: ignore[assignment]
            elif num == 7:
                _expect(wt, _LEN, num, where)
                slices.append(_decode_slice(v, where))
        return cls(dtype, shape, shard_id, offset, size, crc, tuple(slices))  # type: ignore[arg-type]

    def encode(self) -> bytes:
        out = f_varint(1, self.dtype) if self.dtype else b""
        out += f_bytes(2, _encode_shape(self.shape))
        if self.shard_id:
            out += f_varint(3, self.shard_id)
        if self.offset:
            out += f_varint(4, self.offset)
        if self.size:
            out += f_varint(5, self.size)
        if self.crc32c:
            out += f_fixed32(6, self.crc32c)
        for sl in self.slices:
            ext = b""
            for start, length in sl:
                body = (f_varint(1, start) if start else b"") + (
                    f_varint(2, length) if length is not None else b""
                )
                ext += f_bytes(1, body)
            out += f_bytes(7, ext)
        return out


def _uvarint(b: bytes, pos: int, n: int) -> tuple[int, int]:
    """A varint of at most 9 bytes (< 2^63) or (-1, pos) for anything the fast path leaves alone."""
    result = shift = 0
    while pos < n and shift < 63:
        x = b[pos]
        pos += 1
        result |= (x & 0x7F) << shift
        if x < 0x80:
            return result, pos
        shift += 7
    return -1, pos


def _decode_entry_fast(b: bytes) -> tuple | None:
    """``BundleEntry.decode`` for the entries TensorFlow writes for plain tensors.

    A checkpoint of thousands of small variables spends most of its read time decoding
    entries, so the usual shape (fields 1-6 with their wire types, non-negative values, a
    shape of ``dim { size }`` only) is parsed inline here. Anything else -- slices, unknown
    fields, negative or huge values, any malformation -- returns None and the general
    decoder, which names what is wrong, handles it. Both give the same result when both apply.
    """
    n = len(b)
    pos = 0
    dtype = shard_id = offset = size = crc = 0
    shape: tuple[int, ...] | None = ()
    while pos < n:
        key = b[pos]
        pos += 1
        if key == 0x12:  # field 2, LEN: the shape
            if pos < n and b[pos] < 0x80:
                ln = b[pos]
                pos += 1
            else:
                ln, pos = _uvarint(b, pos, n)
            end = pos + ln
            if ln < 0 or end > n:
                return None
            shape = _fast_shape(b, pos, end)
            if shape is None:
                return None
            pos = end
        elif key == 0x35:  # field 6, FIXED32: the masked crc
            if pos + 4 > n:
                return None
            crc = int.from_bytes(b[pos : pos + 4], "little")
            pos += 4
        elif key in (0x08, 0x18, 0x20, 0x28):  # fields 1, 3, 4, 5: varints
            if pos < n and b[pos] < 0x80:
                v = b[pos]
                pos += 1
            else:
                v, pos = _uvarint(b, pos, n)
                if v < 0:
                    return None
            if key == 0x08:
                dtype = v
            elif key == 0x18:
                shard_id = v
            elif key == 0x20:
                offset = v
            else:
                size = v
        else:
            return None
    return dtype, shape, shard_id, offset, size, crc, ()


def _fast_shape(b: bytes, pos: int, end: int) -> tuple[int, ...] | None:
    """The fast path's ``TensorShapeProto`` in ``b[pos:end]``: ``dim { size }`` fields only, else None."""
    dims = []
    while pos < end:
        if b[pos] != 0x12:  # only `dim` fields
            return None
        pos += 1
        if pos < end and b[pos] < 0x80:
            dl = b[pos]
            pos += 1
        else:
            dl, pos = _uvarint(b, pos, end)
        dend = pos + dl
        if dl < 0 or dend > end:
            return None
        d = 0
        while pos < dend:
            if b[pos] != 0x08:  # only `size`
                return None
            pos += 1
            if pos < dend and b[pos] < 0x80:
                d = b[pos]
                pos += 1
            else:
                d, pos = _uvarint(b, pos, dend)
                if d < 0:
                    return None
        if pos != dend:
            return None
        dims.append(d)
    if pos != end:
        return None
    return tuple(dims)


# ------------------------------------------------------------------ TrackableObjectGraph


@dataclass(frozen=True, slots=True)
class ObjectReference:
    node_id: int
    local_name: str


@dataclass(frozen=True, slots=True)
class SerializedTensor:
    name: str
    full_name: str
    checkpoint_key: str


@dataclass(frozen=True, slots=True)
class SlotVariableReference:
    original_variable_node_id: int
    slot_name: str
    slot_variable_node_id: int


@dataclass(frozen=True, slots=True)
class TrackableObject:
    children: tuple[ObjectReference, ...] = ()
    attributes: tuple[SerializedTensor, ...] = ()
    slot_variables: tuple[SlotVariableReference, ...] = ()
    # Fields we do not interpret (registered_saver, has_checkpoint_values), kept as
    # already-encoded bytes so a graph copied from a template re-serializes unchanged.
    unknown_fields: bytes = b""


def _decode_object(buf: object, where: str) -> TrackableObject:
    children: list[ObjectReference] = []
    attrs: list[SerializedTensor] = []
    slots: list[SlotVariableReference] = []
    unknown = bytearray()
    for num, wt, v in iter_fields(buf, where):  # type: ignore[arg-type]
        if num == 1:
            _expect(wt, _LEN, num, where)
            node_id, name = 0, ""
            for cn, cwt, cv in iter_fields(v, where):  # type: ignore[arg-type]
                if cn == 1:
                    _expect(cwt, _VARINT, cn, where)
                    node_id = to_signed64(cv)  # type: ignore[arg-type]
                elif cn == 2:
                    _expect(cwt, _LEN, cn, where)
                    name = _str(cv, where)
            children.append(ObjectReference(node_id, name))
        elif num == 2:
            _expect(wt, _LEN, num, where)
            strs = ["", "", ""]
            for an, awt, av in iter_fields(v, where):  # type: ignore[arg-type]
                if an in (1, 2, 3):
                    _expect(awt, _LEN, an, where)
                    strs[an - 1] = _str(av, where)
            attrs.append(SerializedTensor(*strs))
        elif num == 3:
            _expect(wt, _LEN, num, where)
            orig, slot_name, slot_node = 0, "", 0
            for sn, swt, sv in iter_fields(v, where):  # type: ignore[arg-type]
                if sn == 1:
                    _expect(swt, _VARINT, sn, where)
                    orig = to_signed64(sv)  # type: ignore[arg-type]
                elif sn == 2:
                    _expect(swt, _LEN, sn, where)
                    slot_name = _str(sv, where)
                elif sn == 3:
                    _expect(swt, _VARINT, sn, where)
                    slot_node = to_signed64(sv)  # type: ignore[arg-type]
            slots.append(SlotVariableReference(orig, slot_name, slot_node))
        elif wt == _LEN:
            unknown += f_bytes(num, bytes(v))  # type: ignore[arg-type]
        elif wt == _VARINT:
            unknown += f_varint(num, v)  # type: ignore[arg-type]
    return TrackableObject(tuple(children), tuple(attrs), tuple(slots), bytes(unknown))


def _encode_object(obj: TrackableObject) -> bytes:
    out = bytearray()
    for c in obj.children:
        out += f_bytes(1, (f_varint(1, c.node_id) if c.node_id else b"") + f_str(2, c.local_name))
    for a in obj.attributes:
        out += f_bytes(2, f_str(1, a.name) + f_str(2, a.full_name) + f_str(3, a.checkpoint_key))
    for s in obj.slot_variables:
        body = (
            (f_varint(1, s.original_variable_node_id) if s.original_variable_node_id else b"")
            + f_str(2, s.slot_name)
            + (f_varint(3, s.slot_variable_node_id) if s.slot_variable_node_id else b"")
        )
        out += f_bytes(3, body)
    out += obj.unknown_fields
    return bytes(out)


@dataclass(frozen=True, slots=True)
class TrackableObjectGraph:
    nodes: tuple[TrackableObject, ...] = ()

    @classmethod
    def decode(cls, buf: bytes | memoryview, where: str) -> TrackableObjectGraph:
        nodes = []
        for num, wt, v in iter_fields(buf, where):
            if num == 1:
                _expect(wt, _LEN, num, where)
                nodes.append(_decode_object(v, where))
        return cls(tuple(nodes))

    def encode(self) -> bytes:
        return b"".join(f_bytes(1, _encode_object(n)) for n in self.nodes)

