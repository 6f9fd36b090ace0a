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

import numpy as np

from ckptfmt._progress import progress_bar
from ckptfmt.api import Problem, VerifyReport
from ckptfmt.errors import CheckpointNotFoundError, FormatError, IntegrityError

from ..tf.bundle import TFCheckpointReader
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
        finally:
            r.close()
        return make_report(path, problems, t0, tensors=len(keys), checked=checked, nbytes=nbytes, version=version)


def _check_entries(path: str, r: TFCheckpointReader, entries: dict, missing: set[int], problems: list[Problem],
                   progress: bool | None) -> tuple[int, int]:
    """Read every entry (CRC32C-checked); problems are collected. Returns (checked, bytes)."""
    bar = progress_bar(sum(e.size for e in entries.values()), f"verifying {path}", progress)
    checked = nbytes = 0
    for key, e in entries.items():
        sliced = bool(e.slices)
        if not sliced and e.shard in missing:
            continue
        sp = None if sliced else r.shard_path(e.shard)
        off = None if sliced else e.offset
        try:
            r.get(key)
        except IntegrityError as ex:
            problems.append(Problem("hash_mismatch", first_line(ex), file=sp, tensor=key, offset=off))
        except (FormatError, OSError) as ex:
            truncated = sp is not None and os.path.isfile(sp) and e.offset + e.size > os.path.getsize(sp)
            kind = "truncated_file" if truncated else ("missing_file" if isinstance(ex, FileNotFoundError) else "unreadable")
            if not (sliced and isinstance(ex, FileNotFoundError) and missing):
                problems.append(Problem(kind, first_line(ex), file=sp, tensor=key, offset=off))
        checked += 1
        nbytes += e.size
        bar.update(e.size)
    bar.close()
    return checked, nbytes
