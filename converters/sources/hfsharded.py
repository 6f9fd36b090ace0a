"""Sharded Hugging Face checkpoints: ``model.safetensors.index.json`` plus its shards, as one.

``save_pretrained`` splits a large model into ``model-00001-of-00003.safetensors``... and
writes an index, ``{"metadata": {"total_size": N}, "weight_map": {tensor: shard file}}``.
Opened through the index (or the directory holding it), the shards are one checkpoint for
inspect, verify, diff and convert. The index is checked before any shard is opened: shard
names must be plain file names beside the index (no paths, no links), and every tensor must
be in the shard the map names, and no shard may hold a tensor the map does not list.

Example:
    >>> from ckptfmt.converters import kinds
    >>> kinds.detect_kind("hf-model/model.safetensors.index.json")  # doctest: +SKIP
    'safetensors-sharded'
"""

from __future__ import annotations

__all__ = ["INDEX_SUFFIX", "ShardedSafetensorsSource", "find_index"]

import json
import os
import time
from typing import Any

import numpy as np

from ckptfmt.api import Problem, VerifyReport
from ckptfmt.errors import CheckpointNotFoundError, FormatError, TensorNotFoundError

from .base import Source, TensorInfo, make_report
from .safetensors import SafetensorsSource

INDEX_SUFFIX = ".safetensors.index.json"
_MAX_INDEX_BYTES = 100 * 1024 * 1024


def find_index(path: str) -> str | None:
    """The index a path means: itself, or the one ``*.safetensors.index.json`` in a directory."""
    if os.path.isfile(path) and path.endswith(INDEX_SUFFIX):
        return path
    if os.path.isdir(path):
        found = sorted(n for n in os.listdir(path) if n.endswith(INDEX_SUFFIX))
        if len(found) == 1:
            return os.path.join(path, found[0])
    return None


def _read_index(index: str) -> tuple[dict[str, str], Any]:
    """``(weight_map, metadata)`` of an index file; FormatError naming the file otherwise."""
    size = os.path.getsize(index)
    if size > _MAX_INDEX_BYTES:
        raise FormatError(f"{index}: {size} bytes; an index above {_MAX_INDEX_BYTES} bytes is refused")
    try:
        with open(index, "rb") as f:
            doc = json.loads(f.read().decode("utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise FormatError(f"{index}: not a JSON safetensors index ({e})") from None
    wm = doc.get("weight_map") if isinstance(doc, dict) else None
    if not isinstance(wm, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in wm.items()):
        raise FormatError(f"{index}: no 'weight_map' of tensor name -> shard file; not a safetensors index")
    for name, shard in wm.items():
        if not shard or shard != os.path.basename(shard) or shard in (".", "..") or "\\" in shard or "\0" in shard:
            raise FormatError(f"{index}: tensor {name!r} is mapped to {shard!r}; shards must be file names beside the index")
    return wm, doc.get("metadata")


class ShardedSafetensorsSource(Source):
    """A sharded safetensors checkpoint, through its index; shards are opened on demand."""

    kind = "safetensors-sharded"

    def __init__(self, path: str) -> None:
        super().__init__(path)
        index = find_index(path)
        if index is None:
            raise CheckpointNotFoundError(f"no *{INDEX_SUFFIX} at {path}")
        self.index = index
        self._dir = os.path.dirname(os.path.abspath(index))
        self._map, self._meta = _read_index(index)
        self._shards: dict[str, SafetensorsSource] = {}
        for shard in dict.fromkeys(self._map.values()):  # every shard checked up front: no half-read checkpoints
            src = self._shard(shard)
            listed = {n for n, s in self._map.items() if s == shard}
            held = set(src.keys())
            if listed - held:
                missing = sorted(listed - held)
                raise FormatError(f"{src.path}: the index maps {len(missing)} tensor(s) to this shard that it does not hold: {', '.join(map(repr, missing[:10]))}")
            if held - listed:
                extra = sorted(held - listed)
                raise FormatError(f"{src.path}: holds {len(extra)} tensor(s) the index does not list: {', '.join(map(repr, extra[:10]))}; the index is stale")

    @classmethod
    def claims(cls, path: str) -> bool:
        """A ``*.safetensors.index.json`` file, or a directory holding exactly one."""
        return find_index(path) is not None

    def _shard(self, shard: str) -> SafetensorsSource:
        src = self._shards.get(shard)
        if src is None:
            p = os.path.join(self._dir, shard)
            if os.path.islink(p):
                raise FormatError(f"{p}: a shard that is a symbolic link is not followed; copy the file itself")
            if not os.path.isfile(p):
                raise FormatError(f"{p}: shard listed in {self.index} is missing; the checkpoint is incomplete")
            src = self._shards[shard] = SafetensorsSource(p)
        return src

    def keys(self) -> list[str]:
        return list(self._map)

    def _where(self, name: str) -> SafetensorsSource:
        try:
            shard = self._map[name]
        except KeyError:
            raise TensorNotFoundError(f"no tensor {name!r} in {self.index}") from None
        return self._shard(shard)

    def info(self, name: str) -> TensorInfo:
        return self._where(name).info(name)

    def get(self, name: str) -> np.ndarray:
        return self._where(name).get(name)

    @property
    def metadata(self) -> Any:
        return self._meta

    @property
    def version(self) -> str:
        return f"{len(set(self._map.values()))} shards"

    def close(self) -> None:
        for s in self._shards.values():
            s.close()

    @classmethod
    def verify(cls, path: str, *, progress: bool | None = None) -> VerifyReport:
        t0 = time.perf_counter()
        index = find_index(path)
        if index is None:
            raise CheckpointNotFoundError(f"no *{INDEX_SUFFIX} at {path}")
        try:
            wm, meta = _read_index(index)
        except FormatError as e:
            return make_report(path, [Problem("unreadable", str(e), file=index)], t0, readable=False)
        base = os.path.dirname(os.path.abspath(index))
        problems: list[Problem] = []
        tensors = checked = nbytes = 0
        for shard in dict.fromkeys(wm.values()):
            p = os.path.join(base, shard)
            listed = {n for n, s in wm.items() if s == shard}
            if os.path.islink(p) or not os.path.isfile(p):
                what = "is a symbolic link (not followed)" if os.path.islink(p) else "is missing"
                problems.append(Problem("missing_file", f"shard {p} {what}; {len(listed)} tensor(s) of {index} are in it", file=shard))
                continue
            r = SafetensorsSource.verify(p, progress=progress)
            problems.extend(r.problems)
            tensors, checked, nbytes = tensors + r.tensors, checked + r.chunks_checked, nbytes + r.bytes_checked
            if not r.readable:
                continue
            try:
                with SafetensorsSource(p) as s:
                    held = set(s.keys())
            except FormatError:
                continue  # its problems are listed above
            for n in sorted(listed - held):
                problems.append(Problem("missing_tensor", f"{index} maps tensor {n!r} to {shard}, which does not hold it", file=shard, tensor=n))
            for n in sorted(held - listed):
                problems.append(Problem("extra_tensor", f"{shard} holds tensor {n!r} that {index} does not list; the index is stale", file=shard, tensor=n))
        total = meta.get("total_size") if isinstance(meta, dict) else None
        if isinstance(total, int) and not problems and total != nbytes:
            problems.append(Problem("size_mismatch", f"{index} records total_size {total} but the shards hold {nbytes} bytes of tensors", "warning", file=os.path.basename(index)))
        return make_report(path, problems, t0, tensors=tensors, checked=checked, nbytes=nbytes,
                            version=f"{len(set(wm.values()))} shards", coverage="structure")
