"""Read and write TensorFlow TensorBundle checkpoints (``<prefix>.index`` + data shards).

No TensorFlow needed: the index is a LevelDB-style table (see :mod:`._table`) whose
empty key holds a ``BundleHeaderProto`` and every other key a ``BundleEntryProto``
saying which ``<prefix>.data-NNNNN-of-MMMMM`` shard, offset and size hold a tensor and
the masked CRC32C of its bytes. Numeric tensors are stored as raw little-endian
arrays; string tensors as ``varint64`` lengths, a masked CRC32C of those length bytes,
then the bytes. Partitioned variables have an entry with ``slices`` and no data; each
slice is stored under a key built by TensorFlow's ``EncodeTensorNameSlice``.

This module reads the data (:class:`TFCheckpointReader`) and is where the public names
are imported from; the index (finding a checkpoint, its header, its entries checked) is
:mod:`._index`, writing is :mod:`._writer`, slice keys :mod:`._slices`, dtypes :mod:`._dtypes`.

Example:
    >>> from ckptfmt.converters.tf import TFCheckpointReader, write_checkpoint
    >>> import numpy as np
    >>> write_checkpoint("/tmp/doc_ckpt/model", {"w": np.ones((2, 3), np.float32)})
    >>> r = TFCheckpointReader("/tmp/doc_ckpt/model")
    >>> r.shape("w"), r.get("w").sum()
    ((2, 3), 6.0)
"""


from __future__ import annotations

import os
import threading
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from ckptfmt.errors import CheckpointNotFoundError, FormatError, IntegrityError

from ._dtypes import _DT_STRING, _ENUM_NAMES, _ENUM_TO_NUMPY
from ._index import OBJECT_GRAPH_KEY, BundleIndex, TensorEntry, _fmt_key, _open_file, latest_checkpoint
from ._proto import BundleEntry
from ._slices import slice_key, slice_name
from ._table import crc32c, unmask_crc
from ._wire import read_varint
from ._writer import TFCheckpointWriter, update_state_file, write_checkpoint

__all__ = [
    "TFCheckpointReader",
    "TFCheckpointWriter",
    "TensorEntry",
    "write_checkpoint",
    "update_state_file",
    "latest_checkpoint",
    "slice_name",
    "slice_key",
    "OBJECT_GRAPH_KEY",
]

# read_all: tensors up to this size are read in runs of neighbours (one preadv per run of
# at most _BATCH_RUN_MAX bytes, bridging gaps up to _BATCH_GAP); larger ones one by one,
# on two threads only when they add up to _THREADS_MIN_BYTES (threads cost more than they
# save on small reads).
_BATCH_TENSOR_MAX = 1 << 20
_BATCH_RUN_MAX = 16 << 20
_BATCH_GAP = 64 << 10
_THREADS_MIN_BYTES = 64 << 20


class TFCheckpointReader(BundleIndex, Mapping[str, np.ndarray]):
    """Lazy reader of a TensorFlow TensorBundle checkpoint.

    Opening parses and validates the index only; :meth:`get` reads just the bytes of the
    requested tensor from its data shard and checks their CRC32C.

    Args:
        path: A checkpoint prefix (``dir/ckpt-3``), its ``.index`` file, or a directory
            holding a ``checkpoint`` state file (the latest checkpoint is opened).

    Raises:
        CheckpointNotFoundError: Nothing to open at ``path``.
        FormatError: The index is malformed (``IntegrityError`` on checksum mismatch).

    Example:
        >>> r = TFCheckpointReader("fixtures/tf/tf_module")  # doctest: +SKIP
        >>> r.get("model/scale/.ATTRIBUTES/VARIABLE_VALUE")  # doctest: +SKIP
        array(2., dtype=float32)
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        super().__init__(path)  # the index, parsed and validated
        self._shard_sizes: dict[int, int] = {}
        self._fds: dict[int, int] = {}
        self._fd_lock = threading.Lock()

    # -- Mapping protocol (keys, iteration and membership come from the index) ------------

    def __getitem__(self, key: str) -> np.ndarray:
        return self.get(key)

    def close(self) -> None:
        """Close open shard files; the reader reopens them if used again."""
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def __enter__(self) -> TFCheckpointReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass

    # -- data --------------------------------------------------------------------------

    def _fd(self, shard: int) -> tuple[int, int]:
        fd = self._fds.get(shard)
        if fd is not None:
            return fd, self._shard_sizes[shard]
        with self._fd_lock:  # get() may run on several threads (read_all)
            return self._open_shard(shard)

    def _open_shard(self, shard: int) -> tuple[int, int]:
        fd = self._fds.get(shard)
        if fd is None:
            path = self.shard_path(shard)
            try:
                fd = _open_file(path)
            except FileNotFoundError:
                raise CheckpointNotFoundError(
                    f"{path}: data shard {shard} of checkpoint {self.prefix} is missing; the "
                    "checkpoint is incomplete, copy all its .data-* files"
                ) from None
            self._shard_sizes[shard] = os.fstat(fd).st_size
            self._fds[shard] = fd  # published last: the lock-free path in _fd reads it first
        return fd, self._shard_sizes[shard]

    def _check_span(self, e: BundleEntry, bkey: bytes) -> int:
        """Check the entry lies inside its shard before anything is allocated for it."""
        fd, fsize = self._fd(e.shard_id)
        if e.offset > fsize or e.size > fsize - e.offset:
            raise FormatError(
                f"{self.shard_path(e.shard_id)}: tensor {_fmt_key(bkey)} spans bytes "
                f"{e.offset}..{e.offset + e.size} but the shard holds {fsize} bytes; the shard "
                "is truncated, re-copy it"
            )
        return fd

    def _read_exact(self, e: BundleEntry, bkey: bytes, out: memoryview, check: bool = True) -> None:
        fd = self._check_span(e, bkey)
        path = self.shard_path(e.shard_id)
        done = 0
        while done < e.size:
            n = os.preadv(fd, [out[done:]], e.offset + done)
            if n <= 0:
                raise FormatError(
                    f"{path}: unexpected end of file reading tensor {_fmt_key(bkey)} at byte "
                    f"offset {e.offset + done}; the shard is truncated"
                )
            done += n
        if check:
            self._check_crc(e, bkey, crc32c(out))

    def _check_crc(self, e: BundleEntry, bkey: bytes, actual: int) -> None:
        if actual != unmask_crc(e.crc32c):
            raise IntegrityError(
                f"{self.shard_path(e.shard_id)}: checksum mismatch for tensor {_fmt_key(bkey)} "
                f"at byte offset {e.offset} (size {e.size}; stored {unmask_crc(e.crc32c):#010x}, "
                f"computed {actual:#010x}); the data shard is corrupt, restore it from a backup"
            )

    def _read_plain(self, bkey: bytes, e: BundleEntry) -> np.ndarray:
        self._check_span(e, bkey)
        if e.dtype == _DT_STRING:
            buf = bytearray(e.size)
            self._read_exact(e, bkey, memoryview(buf), check=False)
            return self._decode_strings(bkey, e, buf)
        dt = _ENUM_TO_NUMPY[e.dtype]
        arr = np.empty(e.shape, dtype=dt)
        self._read_exact(e, bkey, memoryview(arr.reshape(-1).view(np.uint8)))
        if self.header.endianness == 1 and dt.itemsize > 1:
            arr = arr.view(dt.newbyteorder(">")).astype(dt)
        return arr

    def _decode_strings(self, bkey: bytes, e: BundleEntry, buf: bytearray) -> np.ndarray:
        where = f"{self.shard_path(e.shard_id)} tensor {_fmt_key(bkey)}"
        count = 1
        for d in e.shape:
            count *= d
        # Every element needs at least one length byte, so a count above the size is bogus.
        if count > len(buf):
            raise FormatError(
                f"{where}: shape {e.shape} has {count} strings but the entry is only "
                f"{len(buf)} bytes; the index is corrupt"
            )
        # TensorFlow checksums each length as a 4-byte little-endian integer (not the
        # varint bytes it stores), then the masked length checksum, then the string bytes.
        lengths = []
        pos = 0
        for _ in range(count):
            n, pos = read_varint(buf, pos, where)
            lengths.append(n)
        if pos + 4 > len(buf):
            raise FormatError(f"{where}: string lengths run into the length checksum at byte offset {e.offset + pos}")
        fixed = np.array(lengths, dtype=np.uint64).astype("<u4").tobytes()
        crc = crc32c(fixed)
        stored = int.from_bytes(buf[pos : pos + 4], "little")
        if unmask_crc(stored) != crc:
            raise IntegrityError(
                f"{where}: checksum mismatch over the string lengths at byte offset "
                f"{e.offset + pos}; the data shard is corrupt, restore it from a backup"
            )
        crc = crc32c(memoryview(buf)[pos:], crc)
        self._check_crc(e, bkey, crc)
        pos += 4
        if sum(lengths) != len(buf) - pos:
            raise FormatError(
                f"{where}: string lengths add up to {sum(lengths)} bytes but {len(buf) - pos} "
                "remain; the checkpoint is corrupt"
            )
        out = np.empty(count, dtype=object)
        for i, n in enumerate(lengths):
            out[i] = bytes(buf[pos : pos + n])
            pos += n
        return out.reshape(e.shape)

    def get(self, key: str) -> np.ndarray:
        """Read one tensor, checking its CRC32C; strings come back as an object array of bytes.

        Raises:
            TensorNotFoundError: ``key`` is not in the checkpoint.
            IntegrityError: Stored bytes do not match their checksum.
            FormatError: The entry or shard is malformed or truncated.

        Example:
            >>> r.get("w").dtype  # doctest: +SKIP
            dtype('float32')
        """
        bkey = self._bkey(key)
        e = self._entry(bkey)
        if not e.slices:
            return self._read_plain(bkey, e)
        dt = np.dtype(object) if e.dtype == _DT_STRING else _ENUM_TO_NUMPY[e.dtype]
        total = int(np.prod(e.shape, dtype=object)) if e.shape else 1
        stored = sum(
            int(np.prod([dim if ln is None else ln for (_, ln), dim in zip(sl, e.shape)], dtype=object))
            if sl else 1
            for sl in e.slices
        )
        if total > stored:
            raise FormatError(
                f"{self.index_path} tensor {_fmt_key(bkey)}: {len(e.slices)} slices hold {stored} "
                f"elements, fewer than the {total} of shape {e.shape}; the checkpoint is incomplete"
            )
        parts = self._slice_entries(bkey, e, total)
        out = np.empty(e.shape, dtype=dt)
        covered = np.zeros(e.shape, dtype=bool) if out.size else None
        for skey, se, index in parts:
            out[index] = self._read_plain(skey, se)
            if covered is not None:
                covered[index] = True
        if covered is not None and not covered.all():
            raise FormatError(f"{self.index_path} tensor {_fmt_key(bkey)}: slices do not cover the whole tensor")
        return out

    def _slice_entries(self, bkey: bytes, e: BundleEntry, total: int) -> list[tuple[bytes, BundleEntry, tuple[slice, ...]]]:
        """Every slice's data entry, checked against the shards *before* the whole is allocated.

        The declared shape alone decides nothing: a 176-byte index can declare (2**24, 2**24).
        The slices' data must lie in the shards, must not share bytes, and must add up to at
        least the whole tensor, so the allocation is bounded by bytes that exist on disk.
        """
        where = f"{self.index_path} tensor {_fmt_key(bkey)}"
        parts = []
        spans: dict[int, list[tuple[int, int, tuple[slice, ...]]]] = {}
        for sl in e.slices:
            skey = slice_key(bkey, sl)
            if skey not in self._raw:
                raise FormatError(f"{where}: slice {sl} has no data entry in the index; the checkpoint is incomplete")
            se = self._entry(skey)
            index = tuple(
                slice(0, dim) if length is None else slice(start, start + length)
                for (start, length), dim in zip(sl, e.shape)
            )
            want = tuple(s.stop - s.start for s in index)
            if se.shape != want or se.dtype != e.dtype or se.slices:
                raise FormatError(
                    f"{where}: slice {sl} is stored with shape {se.shape} and dtype "
                    f"{_ENUM_NAMES.get(se.dtype)}, expected {want}; the checkpoint is corrupt"
                )
            self._check_span(se, skey)
            spans.setdefault(se.shard_id, []).append((se.offset, se.size, index))
            parts.append((skey, se, index))
        on_disk = 0
        for shard, regions in spans.items():
            end = 0
            for off, size, index in sorted(regions, key=lambda r: r[0]):
                if size and off < end:
                    label = slice_name(bkey.decode("utf-8", "backslashreplace"), index)
                    raise FormatError(
                        f"{self.shard_path(shard)}: slice {label} at byte offset "
                        f"{off} shares bytes with another slice; the index is corrupt"
                    )
                end = max(end, off + size)
                on_disk += size
        per_element = 1 if e.dtype == _DT_STRING else _ENUM_TO_NUMPY[e.dtype].itemsize
        if total * per_element > on_disk:
            raise FormatError(
                f"{where}: shape {e.shape} needs {total * per_element} bytes but its slices hold "
                f"{on_disk}; the index is corrupt"
            )
        return parts

    def slice_parts(self, key: str) -> list[tuple[str, str, int, int, Callable[[], np.ndarray]]]:
        """The stored slices of a partitioned variable, for checking one at a time.

        Returns:
            ``(label, shard path, byte offset, size, read)`` per slice, where ``label`` is
            how a person names the slice (``emb[75:100, 0:8]``) and ``read()`` reads it,
            checking its CRC32C (``IntegrityError``) and its bounds (``FormatError``).
            Empty for a variable that is not partitioned.

        Example:
            >>> [p[0] for p in r.slice_parts("emb")]  # doctest: +SKIP
            ['emb[0:4, 0:3]', 'emb[4:7, 0:3]', 'emb[7:10, 0:3]']
        """
        bkey = self._bkey(key)
        e = self._entry(bkey)
        out = []
        for sl in e.slices:
            skey = slice_key(bkey, sl)
            index = tuple(
                slice(0, dim) if length is None else slice(start, start + length)
                for (start, length), dim in zip(sl, e.shape)
            )
            label = slice_name(key, index)
            if skey not in self._raw:
                raise FormatError(f"{self.index_path}: slice {label} has no data entry in the index; the checkpoint is incomplete")
            se = self._entry(skey)
            out.append((label, self.shard_path(se.shard_id), se.offset, se.size,
                        lambda skey=skey, se=se: self._read_plain(skey, se)))
        return out

    def read_all(self) -> dict[str, np.ndarray]:
        """Read every tensor into a dict ``{name: array}``, each checked against its CRC32C.

        Small plain tensors (the thousands of biases and norms of a real model) are read
        in batches: neighbours in a shard come in with one ``preadv`` and are then checked
        and copied out one by one, so the cost per tensor is a CRC call and a copy, not a
        system call and a Python read path. Large tensors are read one at a time, on two
        threads when there are enough large bytes for that to pay (preadv and the CRC32C
        release the GIL; faulting in fresh output memory is their dominant cost).

        Example:
            >>> sorted(r.read_all())  # doctest: +SKIP
            ['b', 'w']
        """
        out: dict[str, np.ndarray] = {}
        small: dict[int, list[tuple[str, bytes, BundleEntry]]] = {}
        large: list[str] = []
        large_bytes = 0
        for key in self._keys:
            bkey = self._bkey(key)
            e = self._entry(bkey)
            if not e.slices and e.dtype != _DT_STRING and e.size <= _BATCH_TENSOR_MAX:
                small.setdefault(e.shard_id, []).append((key, bkey, e))
            else:
                large.append(key)
                large_bytes += e.size
        for shard, items in small.items():
            self._read_batch(shard, items, out)
        if len(large) >= 2 and large_bytes >= _THREADS_MIN_BYTES:
            with ThreadPoolExecutor(max_workers=2, thread_name_prefix="ckptfmt-tf-read") as ex:
                out.update(zip(large, ex.map(self.get, large)))
        else:
            out.update((k, self.get(k)) for k in large)
        return {k: out[k] for k in self._keys}

    def _read_batch(self, shard: int, items: list[tuple[str, bytes, BundleEntry]], out: dict[str, np.ndarray]) -> None:
        """Read plain tensors of one shard in runs of neighbours, one preadv per run."""
        fd, fsize = self._fd(shard)
        items.sort(key=lambda t: t[2].offset)
        swap = self.header.endianness == 1
        i, n = 0, len(items)
        while i < n:
            lo = items[i][2].offset
            hi = lo + items[i][2].size
            j = i + 1
            while j < n:
                e = items[j][2]
                end = e.offset + e.size
                if e.offset - hi > _BATCH_GAP or max(end, hi) - lo > _BATCH_RUN_MAX:
                    break
                hi = max(hi, end)
                j += 1
            if hi > fsize:  # a truncated shard: the per-tensor path names the first tensor past its end
                for _key, bkey, e in items[i:j]:
                    self._check_span(e, bkey)
            buf = bytearray(hi - lo)
            mv = memoryview(buf)
            done = 0
            while done < len(buf):
                got = os.preadv(fd, [mv[done:]], lo + done)
                if got <= 0:
                    raise FormatError(
                        f"{self.shard_path(shard)}: unexpected end of file at byte offset "
                        f"{lo + done} reading tensors {_fmt_key(items[i][1])}..; the shard is truncated"
                    )
                done += got
            for key, bkey, e in items[i:j]:
                a = e.offset - lo
                piece = mv[a : a + e.size]
                actual = crc32c(piece)
                if actual != unmask_crc(e.crc32c):
                    self._check_crc(e, bkey, actual)
                dt = _ENUM_TO_NUMPY[e.dtype]
                arr = np.frombuffer(piece, dtype=dt).reshape(e.shape).copy()
                if swap and dt.itemsize > 1:
                    arr = arr.view(dt.newbyteorder(">")).astype(dt)
                out[key] = arr
            i = j

