"""Sharded tensors (format 1.3): global tensors stored as pieces written by many processes.

A checkpoint saved by many ranks stores every rank's piece of a global tensor as an
ordinary tensor of the tensor table (with its own chunks and hashes). The body field
``shards`` says which pieces make up which global tensor and where each lies in it; the
tree refers to a global tensor with the node ``["s", j]``. See spec/FORMAT.md, section 12.

The table is columnar like the tensor table:

============  ===================================================================
``names``     array of ``g`` str: global tensor names (unique)
``dtype``     bin, ``g`` x uint8: index into the tensor table's ``dtype_table``
``rank``      bin, ``g`` x uint8
``dims``      bin, sum(rank) x little-endian uint64: the global shapes
``count``     bin, ``g`` x little-endian uint32: pieces of each global tensor
``piece``     bin, sum(count) x little-endian uint32: tensor-table index of each piece
``offset``    bin, sum(count x rank) x little-endian uint64: each piece's offset
============  ===================================================================

Example:
    >>> from ckptfmt.format.shards import GlobalTensor, encode_shards
    >>> sorted(encode_shards([GlobalTensor("w", 9, (4,), (0, 1), ((0,), (2,)))]))
    ['count', 'dims', 'dtype', 'names', 'offset', 'piece', 'rank']
"""

from __future__ import annotations

__all__ = ["GlobalTensor", "ShardTable", "encode_shards", "decode_shards"]

from dataclasses import dataclass
from typing import Any

import numpy as np

from ckptfmt.errors import FormatError, LimitExceededError
from ckptfmt.format.spec import LIMITS, Limits

#: Pieces of one global tensor are checked pairwise for overlap up to this many; a tensor
#: cut into more pieces is refused (DCP writes one piece per rank and tensor, or a few).
MAX_PIECES_PER_TENSOR = 1 << 16


@dataclass(frozen=True, slots=True)
class GlobalTensor:
    """A global tensor: its dtype code, shape, and its pieces with their offsets."""

    name: str
    dtype: int
    shape: tuple[int, ...]
    pieces: tuple[int, ...]
    offsets: tuple[tuple[int, ...], ...]


@dataclass(frozen=True, slots=True)
class ShardTable:
    """The decoded, validated ``shards`` field."""

    tensors: tuple[GlobalTensor, ...]

    def index_of(self, name: str) -> int:
        for j, t in enumerate(self.tensors):
            if t.name == name:
                return j
        raise KeyError(name)


def _u(values: list[int], dt: str) -> bytes:
    return np.asarray(values, dtype=dt).tobytes()


def encode_shards(tensors: list[GlobalTensor]) -> dict:
    """The msgpack-ready ``shards`` body field for ``tensors``."""
    return {
        "names": [t.name for t in tensors],
        "dtype": _u([t.dtype for t in tensors], "u1"),
        "rank": _u([len(t.shape) for t in tensors], "u1"),
        "dims": _u([d for t in tensors for d in t.shape], "<u8"),
        "count": _u([len(t.pieces) for t in tensors], "<u4"),
        "piece": _u([p for t in tensors for p in t.pieces], "<u4"),
        "offset": _u([o for t in tensors for off in t.offsets for o in off], "<u8"),
    }


def _col(raw: dict, key: str, dt: str, count: int, where: str) -> np.ndarray:
    blob = raw.get(key)
    if not isinstance(blob, bytes):
        raise FormatError(f"{where}: shards.{key} is missing or not bytes")
    item = np.dtype(dt).itemsize
    if len(blob) != count * item:
        raise FormatError(f"{where}: shards.{key} has {len(blob)} bytes, expected {count} x {item}")
    return np.frombuffer(blob, dtype=dt)


def decode_shards(
    raw: Any,
    *,
    n_tensors: int,
    dtypes: np.ndarray,
    ranks: np.ndarray,
    shape_of,
    itemsize_of,
    names: list[str],
    limits: Limits = LIMITS,
    where: str = "manifest",
) -> ShardTable:
    """Validate the ``shards`` field against the tensor table.

    Every global tensor must be covered exactly by its pieces: each piece has the global
    tensor's dtype and rank, lies inside it, no two pieces overlap, and their sizes add up
    to the global size. A piece belongs to one global tensor at most.

    Raises:
        FormatError: anything malformed or inconsistent, naming the global tensor.
    """
    if not isinstance(raw, dict):
        raise FormatError(f"{where}: field 'shards' is not a map")
    gnames = raw.get("names")
    if not isinstance(gnames, list) or not all(type(s) is str for s in gnames):
        raise FormatError(f"{where}: shards.names must be a list of str")
    g = len(gnames)
    if g > limits.max_tensors:
        raise LimitExceededError(f"{where}: {g} sharded tensors exceed the limit of {limits.max_tensors}")
    if len(set(gnames)) != g:
        raise FormatError(f"{where}: duplicate sharded tensor names")
    gdtype = _col(raw, "dtype", "u1", g, where)
    grank = _col(raw, "rank", "u1", g, where)
    if g and int(grank.max()) > limits.max_rank:
        raise LimitExceededError(f"{where}: a sharded tensor has rank {int(grank.max())} > {limits.max_rank}")
    total_dims = int(grank.sum(dtype=np.int64))
    gdims = _col(raw, "dims", "<u8", total_dims, where)
    if total_dims and int(gdims.max()) > limits.max_tensor_bytes:
        raise LimitExceededError(f"{where}: a sharded tensor dimension exceeds {limits.max_tensor_bytes}")
    count = _col(raw, "count", "<u4", g, where)
    total_pieces = int(count.sum(dtype=np.int64))
    if total_pieces > n_tensors:
        raise FormatError(f"{where}: shards list {total_pieces} pieces but the tensor table has {n_tensors} tensors")
    piece = _col(raw, "piece", "<u4", total_pieces, where)
    if total_pieces and int(piece.max()) >= n_tensors:
        raise FormatError(f"{where}: a shard refers to tensor #{int(piece.max())} of {n_tensors}")
    if len(np.unique(piece)) != total_pieces:
        raise FormatError(f"{where}: a tensor is a piece of more than one sharded tensor")
    # Offsets: each piece has its global tensor's rank.
    per_piece_rank = np.repeat(grank.astype(np.int64), count.astype(np.int64))
    total_off = int(per_piece_rank.sum())
    offs = _col(raw, "offset", "<u8", total_off, where)
    if total_off and int(offs.max()) > limits.max_tensor_bytes:
        raise FormatError(f"{where}: a shard offset is out of range")

    out = []
    d0 = p0 = o0 = 0
    for j in range(g):
        r, n, name = int(grank[j]), int(count[j]), gnames[j]
        shape = tuple(int(x) for x in gdims[d0 : d0 + r])
        d0 += r
        if n > MAX_PIECES_PER_TENSOR:
            raise LimitExceededError(f"{where}: sharded tensor {name!r} has {n} pieces, over {MAX_PIECES_PER_TENSOR}")
        item = itemsize_of(int(gdtype[j]))  # raises FormatError for a bad code
        vol = 1.0
        for x in shape:
            vol *= x
        if vol * item > limits.max_tensor_bytes:
            raise LimitExceededError(f"{where}: sharded tensor {name!r} would exceed {limits.max_tensor_bytes} bytes")
        pieces = tuple(int(p) for p in piece[p0 : p0 + n])
        p0 += n
        offsets = []
        lo = np.zeros((n, r), np.int64)
        hi = np.zeros((n, r), np.int64)
        covered = 0
        for k, p in enumerate(pieces):
            off = tuple(int(x) for x in offs[o0 : o0 + r])
            o0 += r
            if int(dtypes[p]) != int(gdtype[j]) or int(ranks[p]) != r:
                raise FormatError(f"{where}: piece {names[p]!r} of sharded tensor {name!r} differs from it in dtype or rank")
            pshape = shape_of(p)
            if any(a + b > s for a, b, s in zip(off, pshape, shape)):
                raise FormatError(f"{where}: piece {names[p]!r} at {list(off)} of shape {list(pshape)} lies outside sharded tensor {name!r} of shape {list(shape)}")
            pv = 1
            for x in pshape:
                pv *= x
            covered += pv
            lo[k] = np.array(off, np.int64)
            hi[k] = lo[k] + np.array(pshape, np.int64)
            offsets.append(off)
        total = 1
        for x in shape:
            total *= x
        if covered != total:
            raise FormatError(f"{where}: the pieces of sharded tensor {name!r} cover {covered} of its {total} elements")
        nonempty = np.nonzero((hi > lo).all(axis=1) if r else np.ones(n, bool))[0]
        if r == 0 and len(nonempty) > 1:
            raise FormatError(f"{where}: pieces of scalar sharded tensor {name!r} overlap")
        if r and len(nonempty) > 1:
            _check_disjoint(lo[nonempty], hi[nonempty], nonempty, pieces, names, name, where)
        out.append(GlobalTensor(name, int(gdtype[j]), shape, pieces, tuple(offsets)))
    return ShardTable(tuple(out))


def _check_disjoint(lo: np.ndarray, hi: np.ndarray, idx: np.ndarray, pieces, names, name: str, where: str) -> None:
    """Refuse two non-empty boxes [lo, hi) that overlap (they do when they overlap on every axis).

    Sweep along the axis that leaves the fewest candidate pairs (boxes sorted by their start
    on it; a box can only overlap the later ones starting before it ends), then test those
    pairs on every axis at once. A DCP layout (pieces split along some axes) leaves about
    one candidate per piece; a layout needing more than 2**26 candidates is refused.
    """
    n = len(lo)
    best = None
    for ax in range(lo.shape[1]):
        order = np.argsort(lo[:, ax], kind="stable")
        ends = np.searchsorted(lo[order, ax], hi[order, ax], side="left")
        counts = np.maximum(ends - np.arange(n) - 1, 0)
        total = int(counts.sum())
        if best is None or total < best[0]:
            best = (total, order, counts)
    total, order, counts = best
    if total == 0:
        return
    if total > 1 << 26:
        raise LimitExceededError(f"{where}: the pieces of sharded tensor {name!r} are laid out too irregularly to check")
    a = np.repeat(np.arange(n), counts)
    first = np.repeat(np.cumsum(counts) - counts, counts)
    b = a + 1 + (np.arange(total) - first)
    pa, pb = order[a], order[b]
    hit = ((lo[pa] < hi[pb]) & (lo[pb] < hi[pa])).all(axis=1)
    if hit.any():
        k = int(np.argmax(hit))
        x, y = pieces[int(idx[pa[k]])], pieces[int(idx[pb[k]])]
        raise FormatError(f"{where}: pieces {names[x]!r} and {names[y]!r} of sharded tensor {name!r} overlap")
