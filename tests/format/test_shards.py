"""The shards table (format 1.3): pieces must tile their global tensor exactly, and any
bytes in its columns raise FormatError, nothing else."""

from __future__ import annotations

import os

import msgpack
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import ckptfmt
from ckptfmt.format.dtypes import DTYPE_NAMES
from ckptfmt.format.hashing import get_hash
from ckptfmt.format.manifest import ManifestBuilder, decode_manifest
from ckptfmt.format.shards import GlobalTensor, encode_shards

GOLDEN = os.path.join(os.path.dirname(__file__), "..", "..", "fixtures", "golden", "v1.3", "sharded", "MANIFEST")
F32 = DTYPE_NAMES.index("float32")


def _manifest(pieces: list[tuple[str, tuple[int, ...]]], globals_: list[GlobalTensor], dtype: str = "float32") -> bytes:
    b = ManifestBuilder(chunk_size=4096)
    f = b.add_file("d.data")
    size = 0
    for name, shape in pieces:
        b.add_tensor(name, dtype, shape)
        n = int(np.prod(shape)) * 4
        for off in range(0, n, 4096):
            b.add_chunk(f, size + off, bytes(32))
        size += n
    b.set_file_size(f, size)
    tree = ["d", [g.name for g in globals_], [["s", j] for j in range(len(globals_))]]
    return b.encode(tree=tree, metadata=None, producer={}, extra={"shards": encode_shards(globals_)})


def test_pieces_that_tile_the_tensor_decode():
    data = _manifest([("w@[0,0]", (2, 3)), ("w@[2,0]", (1, 3))], [GlobalTensor("w", F32, (3, 3), (0, 1), ((0, 0), (2, 0)))])
    m = decode_manifest(data)
    assert m.version == (1, 3) and m.shards.tensors[0].shape == (3, 3)


@pytest.mark.parametrize(
    ("pieces", "offsets", "shape", "match"),
    [
        ([(2, 3), (2, 3)], [(0, 0), (1, 0)], (3, 3), "cover"),  # 12 elements for 9
        ([(2, 3), (1, 3)], [(0, 0), (1, 0)], (3, 3), "overlap"),  # a gap at row 2 and an overlap at row 1
        ([(2, 3), (1, 3)], [(0, 0), (3, 0)], (3, 3), "outside"),
        ([(3, 3)], [(0, 0)], (3, 4), "cover"),
        ([(3, 1), (3, 2)], [(0, 0), (0, 0)], (3, 3), "overlap|cover"),
    ],
)
def test_pieces_that_do_not_tile_are_refused(pieces, offsets, shape, match):
    names = [f"w@{i}" for i in range(len(pieces))]
    data = _manifest(list(zip(names, pieces)), [GlobalTensor("w", F32, shape, tuple(range(len(pieces))), tuple(offsets))])
    with pytest.raises(ckptfmt.FormatError, match=match):
        decode_manifest(data)


def test_a_piece_of_another_dtype_is_refused():
    data = _manifest([("w@0", (4,))], [GlobalTensor("w", DTYPE_NAMES.index("int32"), (4,), (0,), ((0,),))])
    with pytest.raises(ckptfmt.FormatError, match="dtype or rank"):
        decode_manifest(data)


def _rehash(env: dict, body: dict) -> bytes:
    raw = msgpack.packb(body, use_bin_type=True)
    env = dict(env, body=raw, hash=get_hash(env["hash_alg"]).digest(raw))
    return msgpack.packb(env, use_bin_type=True)


with open(GOLDEN, "rb") as _f:
    _ENV = msgpack.unpackb(_f.read(), raw=False, strict_map_key=False)
_BODY = msgpack.unpackb(_ENV["body"], raw=False, strict_map_key=False)
_COLUMNS = sorted(_BODY["shards"])


@settings(max_examples=200, deadline=None)
@given(column=st.sampled_from(_COLUMNS), value=st.one_of(st.binary(max_size=300), st.integers(-(2**63), 2**64 - 1), st.none(),
                                                         st.lists(st.text(max_size=5), max_size=6)))
def test_any_shards_column_raises_only_format_error(column, value):
    body = dict(_BODY, shards=dict(_BODY["shards"], **{column: value}))
    try:
        m = decode_manifest(_rehash(_ENV, body))
        m.decode_tree(lambda i: i, make_shard=lambda j: j, make_opaque=lambda i, p: i)
    except ckptfmt.FormatError:
        pass


@settings(max_examples=200, deadline=None)
@given(pos=st.integers(0, 10_000), flip=st.integers(1, 255), column=st.sampled_from(_COLUMNS))
def test_flipped_bytes_in_shards_raise_only_format_error(pos, flip, column):
    col = _BODY["shards"][column]
    if not isinstance(col, bytes) or not col:
        return
    b = bytearray(col)
    b[pos % len(b)] ^= flip
    body = dict(_BODY, shards=dict(_BODY["shards"], **{column: bytes(b)}))
    try:
        decode_manifest(_rehash(_ENV, body))
    except ckptfmt.FormatError:
        pass


@settings(max_examples=300, deadline=None)
@given(st.integers(1, 3).flatmap(lambda r: st.lists(
    st.tuples(st.lists(st.integers(0, 6), min_size=r, max_size=r), st.lists(st.integers(1, 4), min_size=r, max_size=r)),
    min_size=2, max_size=7)))
def test_overlap_check_agrees_with_brute_force(boxes):
    from ckptfmt.format.shards import _check_disjoint

    lo = np.array([b[0] for b in boxes], np.int64)
    hi = lo + np.array([b[1] for b in boxes], np.int64)
    m = len(boxes)
    brute = any(((lo[i] < hi[j]) & (lo[j] < hi[i])).all() for i in range(m) for j in range(i + 1, m))
    try:
        _check_disjoint(lo, hi, np.arange(m), list(range(m)), [str(i) for i in range(m)], "w", "m")
        found = False
    except ckptfmt.FormatError:
        found = True
    assert found == brute
