"""TensorFlow TensorBundle checkpoints as a source, read without TensorFlow (CRC32C-checked).

A path is a prefix (``dir/ckpt-1`` for ``dir/ckpt-1.index``), its ``.index`` or a shard
file, or a directory with a ``checkpoint`` state file naming the latest.

Example:
    >>> TFSource.claims("fixtures/tf/tf_module")  # doctest: +SKIP
    True
"""

from __future__ import annotations

__all__ = ["TFSource", "tf_prefix"]

import math
import os
import re
import time
from typing import Any

import numpy as np

from ckptfmt._progress import progress_bar
from ckptfmt.api import Problem, VerifyReport
from ckptfmt.errors import CheckpointNotFoundError, FormatError, IntegrityError

from ..tf.bundle import TensorEntry, TFCheckpointReader
from .base import Source, TensorInfo, dtype_str, first_line, make_report

_TF_SHARD = re.compile(r"\.data-\d{5}-of-\d{5}$")


def tf_prefix(path: str) -> str:
    """A shard path (``ckpt-1.data-00000-of-00001``) names its checkpoint too.

    Example:
        >>> tf_prefix("run/ckpt-1")
        'run/ckpt-1'
    """
    m = _TF_SHARD.search(path)
    return path[: m.start()] if m and os.path.isfile(path) else path


class TFSource(Source):
    """A TensorFlow TensorBundle checkpoint, read without TensorFlow (CRC32C-checked)."""

    kind = "tf"

    def __init__(self, path: str) -> None:
        super().__init__(path)
        self._reader = TFCheckpointReader(tf_prefix(path))

    @classmethod
    def claims(cls, path: str) -> bool:
        """A directory with a ``checkpoint`` file, an ``.index`` or shard file, or a prefix with an ``.index``."""
        if os.path.isdir(path):
            return os.path.isfile(os.path.join(path, "checkpoint"))
        if os.path.isfile(path):
            return path.lower().endswith(".index") or bool(_TF_SHARD.search(path))
        return os.path.isfile(path + ".index")

    def keys(self) -> list[str]:
        return self._reader.keys()

    def info(self, name: str) -> TensorInfo:
        e = self._reader.entry(name)
        dt = self._reader.dtype(name)
        if e.slices or dt == np.dtype(object):
            nbytes = e.size if not e.slices else dt.itemsize * math.prod(e.shape)
        else:
            nbytes = e.size
        return TensorInfo(name, dtype_str(dt), tuple(e.shape), int(nbytes))

    def get(self, name: str) -> np.ndarray:
        return self._reader.get(name)

    @property
    def version(self) -> str:
        return f"tensorbundle {self._reader.header.version.producer}"

    def close(self) -> None:
        self._reader.close()

    @classmethod
    def verify(cls, path: str, *, progress: bool | None = None) -> VerifyReport:
        t0 = time.perf_counter()
        problems: list[Problem] = []
        prefix = tf_prefix(path)
        try:
            r = TFCheckpointReader(prefix)
        except CheckpointNotFoundError:
            raise
        except (FormatError, OSError) as e:
            index = prefix if prefix.endswith(".index") else prefix + ".index"
            problems.append(Problem("header", first_line(e), file=index))
            return make_report(path, problems, t0)
        try:
            missing: set[int] = set()
            for shard in range(r.header.num_shards):
                sp = r.shard_path(shard)
                if not os.path.isfile(sp):
                    missing.add(shard)
                    problems.append(Problem("missing_file", f"data shard {sp} is missing", file=sp))
            keys = r.keys()
            entries = {}
            for key in keys:
                try:
                    entries[key] = r.entry(key)
                except (FormatError, OSError) as e:
                    problems.append(Problem("header", first_line(e), file=r.index_path, tensor=key))
            checked, nbytes = _check_entries(path, r, entries, missing, problems, progress)
            version = f"tensorbundle {r.header.version.producer}"
            resolved = r.index_path.removesuffix(".index")  # a directory resolves through its 'checkpoint' file
        finally:
            r.close()
        meta = _meta_problem(resolved)
        if meta is not None:
            problems.append(meta)
        return make_report(path, problems, t0, tensors=len(keys), checked=checked, nbytes=nbytes, version=version)


def _meta_problem(prefix: str) -> Problem | None:
    """A TF1 ``PREFIX.meta`` (a MetaGraphDef protobuf) that is truncated or not a protobuf.

    ckptfmt does not read the graph, and the file records no checksum; its top-level
    protobuf fields are walked so that a truncated or overwritten file is reported rather
    than passed (TF's ``import_meta_graph`` would fail on it). A flipped byte inside a
    field's payload is not detectable.
    """
    mp = prefix + ".meta"
    if not os.path.isfile(mp):
        return None
    with open(mp, "rb") as f:
        data = f.read()
    pos, n = 0, len(data)

    def varint() -> int:
        nonlocal pos
        value = shift = 0
        while True:
            if pos >= n or shift > 63:
                raise ValueError(f"an unterminated varint at byte {pos}")
            b = data[pos]
            pos += 1
            value |= (b & 0x7F) << shift
            shift += 7
            if not b & 0x80:
                return value

    try:
        if not data:
            raise ValueError("it is empty")
        while pos < n:
            start = pos
            key = varint()
            wire, field = key & 7, key >> 3
            if field == 0 or wire not in (0, 1, 2, 5):
                raise ValueError(f"an invalid field key {key} at byte {start}")
            if wire == 0:
                varint()
            else:
                size = {1: 8, 5: 4}.get(wire) or varint()
                if pos + size > n:
                    raise ValueError(f"field {field} at byte {start} runs {pos + size - n} bytes past the end")
                pos += size
    except ValueError as e:
        return Problem("truncated_file", f"{mp}: the MetaGraphDef is truncated or damaged ({e}); TensorFlow cannot import "
                                         "the graph from it (the tensors are not affected)", file=mp)
    return None


def _check_entries(path: str, r: TFCheckpointReader, entries: dict, missing: set[int], problems: list[Problem],
                   progress: bool | None) -> tuple[int, int]:
    """Read every entry (CRC32C-checked); problems are collected. Returns (checked, bytes)."""
    parts = _slice_parts(r, entries, problems)
    total = sum(e.size for e in entries.values()) + sum(p[3] for ps in parts.values() for p in ps)
    bar = progress_bar(total, f"verifying {path}", progress)
    checked = nbytes = 0
    for key, e in entries.items():
        if e.slices:  # a partitioned variable: every slice checked, and named, on its own
            c, b = _check_slices(r, key, parts[key], problems, bar)
            checked, nbytes = checked + c, nbytes + b
            continue
        if e.shard in missing:
            continue
        _check_plain(r, key, e, problems)
        checked += 1
        nbytes += e.size
        bar.update(e.size)
    bar.close()
    return checked, nbytes


def _slice_parts(r: TFCheckpointReader, entries: dict, problems: list[Problem]) -> dict[str, list]:
    """The stored slices of each partitioned variable; one whose index is malformed is reported and dropped from ``entries``."""
    parts: dict[str, list] = {}
    for key, e in list(entries.items()):
        if e.slices:
            try:
                parts[key] = r.slice_parts(key)
            except (FormatError, OSError) as ex:
                problems.append(Problem("header", first_line(ex), file=r.index_path, tensor=key))
                del entries[key]
    return parts


def _check_plain(r: TFCheckpointReader, key: str, e: TensorEntry, problems: list[Problem]) -> None:
    """Read one tensor that is not partitioned; a checksum mismatch, truncation or read error is collected."""
    sp = r.shard_path(e.shard)
    try:
        r.get(key)
    except IntegrityError as ex:
        problems.append(Problem("hash_mismatch", first_line(ex), file=sp, tensor=key, offset=e.offset))
    except (FormatError, OSError) as ex:
        truncated = os.path.isfile(sp) and e.offset + e.size > os.path.getsize(sp)
        kind = "truncated_file" if truncated else ("missing_file" if isinstance(ex, FileNotFoundError) else "unreadable")
        problems.append(Problem(kind, first_line(ex), file=sp, tensor=key, offset=e.offset))


def _check_slices(r: TFCheckpointReader, key: str, parts: list, problems: list[Problem], bar: Any) -> tuple[int, int]:
    """Check each stored slice of a partitioned variable; (slices checked, bytes checked)."""
    checked = nbytes = 0
    bad = False
    for label, shard, offset, size, read in parts:
        if not os.path.isfile(shard):
            bad = True
            continue  # the missing shard is reported once, above
        try:
            read()
        except IntegrityError:
            bad = True
            problems.append(Problem("hash_mismatch", f"slice {label}: checksum mismatch in {shard} at byte offset {offset} "
                                    f"({size} bytes); the shard is corrupt, restore it from a backup", file=shard, tensor=label, offset=offset))
        except (FormatError, OSError) as ex:
            bad = True
            held = os.path.getsize(shard)
            if offset + size > held:
                problems.append(Problem("truncated_file", f"{shard} is truncated: slice {label} needs bytes {offset}..{offset + size} "
                                        f"but the shard holds {held}", file=shard, tensor=label, offset=offset))
            else:
                problems.append(Problem("unreadable", f"slice {label}: {first_line(ex)}", file=shard, tensor=label, offset=offset))
        checked += 1
        nbytes += size
        bar.update(size)
    if not bad:
        try:
            r.get(key)  # the slices together: shapes agree, the whole tensor is covered
        except (FormatError, OSError) as ex:
            problems.append(Problem("header", first_line(ex), file=r.index_path, tensor=key))
    return checked, nbytes
