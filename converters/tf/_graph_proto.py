"""``TrackableObjectGraph``: the object graph TensorFlow stores in a checkpoint.

Field numbers follow TensorFlow's ``trackable_object_graph.proto``; fields we do not
interpret are kept verbatim so a graph copied from a template re-serializes unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass

from ._wire import _LEN, _VARINT, _expect, _str, f_bytes, f_str, f_varint, iter_fields, to_signed64

__all__: list[str] = []  # private module; names are imported explicitly by siblings

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

