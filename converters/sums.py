"""Checksum sidecars: per-tensor BLAKE3 of any checkpoint kind, and checking against them.

safetensors, ONNX and legacy torch files record no checksums of their data, so ``verify``
can vouch only for their structure. ``ckptfmt hash PATH... > SUMS`` records, for every
tensor, a BLAKE3 digest of its dtype, shape and little-endian C-order bytes, and
``ckptfmt verify --sums SUMS PATH...`` checks any supported kind against it. The digest is
*format-aware*: it is taken of the tensor as read, not of the file, so it is the same
whichever kind the tensor is stored in and however often it was re-serialised (a
safetensors export of a ckptfmt checkpoint has the same sums as the checkpoint).

The sidecar is JSON Lines: a header ``{"ckptfmt_sums": 1}``, then one object per tensor
``{"path", "tensor", "dtype", "shape", "blake3"}``.

Example:
    >>> import numpy as np, os, tempfile, ckptfmt
    >>> from ckptfmt.converters import kinds, sums
    >>> d = tempfile.mkdtemp()
    >>> _ = ckptfmt.save({"w": np.ones(3, np.float32)}, os.path.join(d, "ck"))
    >>> _ = kinds.convert(os.path.join(d, "ck"), os.path.join(d, "w.safetensors"))
    >>> a = sums.hash_checkpoint(os.path.join(d, "ck"))
    >>> b = sums.hash_checkpoint(os.path.join(d, "w.safetensors"))
    >>> [x.blake3 for x in a] == [x.blake3 for x in b]
    True
"""

from __future__ import annotations

__all__ = ["TensorSum", "tensor_digest", "hash_checkpoint", "write_sums", "read_sums", "verify_sums"]

import json
import os
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import IO

import blake3
import msgpack
import numpy as np

from ckptfmt.api import Problem, VerifyReport
from ckptfmt.errors import FormatError

SUMS_VERSION = 1
_BLOCK = 16 << 20


@dataclass(frozen=True, slots=True)
class TensorSum:
    """One line of a sums file: a tensor of a checkpoint and its digest."""

    path: str
    tensor: str
    dtype: str
    shape: tuple[int, ...]
    blake3: str
    nbytes: int = 0  # as read; not part of the file

    def to_dict(self) -> dict:
        return {"path": self.path, "tensor": self.tensor, "dtype": self.dtype, "shape": list(self.shape), "blake3": self.blake3}


def tensor_digest(arr: np.ndarray, dtype: str) -> str:
    """BLAKE3 of a tensor's dtype name, shape and little-endian C-order bytes, as hex.

    String (object) arrays hash each element with its 8-byte length.

    Example:
        >>> tensor_digest(np.zeros(2, np.float32), "float32")[:12]
        'cd7aee39719f'
    """
    h = blake3.blake3(b"ckptfmt-tensor-1")
    h.update(msgpack.packb([dtype, [int(d) for d in arr.shape]], use_bin_type=True))
    if arr.dtype == np.dtype(object):
        for x in arr.reshape(-1):
            b = x if isinstance(x, bytes) else str(x).encode("utf-8")
            h.update(len(b).to_bytes(8, "little"))
            h.update(b)
        return h.hexdigest()
    if arr.dtype.byteorder == ">" or (arr.dtype.byteorder == "=" and not np.little_endian):
        arr = arr.astype(arr.dtype.newbyteorder("<"))
    flat = np.ascontiguousarray(arr).reshape(-1).view(np.uint8)
    for i in range(0, flat.size, _BLOCK):  # bounded temporaries for a non-contiguous source
        h.update(memoryview(flat[i : i + _BLOCK]))
    return h.hexdigest()


def hash_checkpoint(path: str | os.PathLike[str], *, kind: str | None = None, label: str | None = None) -> list[TensorSum]:
    """Every tensor's :class:`TensorSum`, reading one tensor at a time (any kind).

    Args:
        path: the checkpoint.
        kind: skip detection.
        label: the path to record (default: ``path`` as given).

    Example:
        >>> hash_checkpoint("model.safetensors")[0].tensor  # doctest: +SKIP
        'layer/w'
    """
    from ckptfmt.converters.kinds import open_any

    p = os.fspath(path)
    out = []
    with open_any(p, kind=kind) as src:
        for name in src.keys():
            info = src.info(name)
            arr = src.get(name)
            out.append(TensorSum(label or p, name, info.dtype, tuple(info.shape), tensor_digest(arr, info.dtype), int(arr.nbytes)))
    return out


def write_sums(entries: Iterable[TensorSum], out: IO[str]) -> int:
    """Write a sums file (JSON Lines) to a text stream; returns the number of tensors."""
    out.write(json.dumps({"ckptfmt_sums": SUMS_VERSION}) + "\n")
    n = 0
    for e in entries:
        out.write(json.dumps(e.to_dict(), ensure_ascii=False) + "\n")
        n += 1
    return n


def read_sums(path: str | os.PathLike[str]) -> list[TensorSum]:
    """Parse a sums file.

    Raises:
        FormatError: not a ckptfmt sums file, or a malformed line (named by number).
    """
    p = os.fspath(path)
    out = []
    with open(p, encoding="utf-8", errors="strict") as f:
        lines = iter(enumerate(f, 1))
        try:
            _, first = next(lines)
            head = json.loads(first)
        except (StopIteration, ValueError, UnicodeDecodeError):
            raise FormatError(f"{p}: not a ckptfmt sums file (write one with `ckptfmt hash PATH... > {p}`)") from None
        if not isinstance(head, dict) or head.get("ckptfmt_sums") != SUMS_VERSION:
            raise FormatError(f"{p}: not a version-{SUMS_VERSION} ckptfmt sums file (first line {first.strip()[:60]!r})")
        try:
            for no, line in lines:
                if not line.strip():
                    continue
                try:
                    d = json.loads(line)
                    e = TensorSum(d["path"], d["tensor"], d["dtype"], tuple(int(x) for x in d["shape"]), d["blake3"])
                    if not all(isinstance(v, str) for v in (e.path, e.tensor, e.dtype, e.blake3)):
                        raise TypeError("a field has the wrong type")
                except (ValueError, KeyError, TypeError) as ex:
                    raise FormatError(f"{p}, line {no}: malformed sums entry ({ex})") from None
                out.append(e)
        except UnicodeDecodeError:
            raise FormatError(f"{p}: not UTF-8 text; not a ckptfmt sums file") from None
    return out


def _recorded_for(path: str, by_path: dict[str, list[TensorSum]]) -> tuple[str | None, list[TensorSum]]:
    """The sums recorded for ``path``: same string, same normalised path, or a unique basename."""
    if path in by_path:
        return path, by_path[path]
    norm = {os.path.normpath(os.path.abspath(k)): k for k in by_path}
    k = norm.get(os.path.normpath(os.path.abspath(path)))
    if k is not None:
        return k, by_path[k]
    same = [k for k in by_path if os.path.basename(os.path.normpath(k)) == os.path.basename(os.path.normpath(path))]
    if len(same) == 1:
        return same[0], by_path[same[0]]
    return None, []


def verify_sums(sums_file: str | os.PathLike[str], paths: Iterable[str | os.PathLike[str]]) -> Iterator[VerifyReport]:
    """Check checkpoints against a sums file: one :class:`ckptfmt.VerifyReport` per path.

    Every recorded tensor must be present with the same dtype, shape and digest, and no
    tensor may be present that was not recorded. A path the sums file does not mention is
    reported as an error (``not_in_sums``). Reading failures of the checkpoint itself
    raise (as :func:`~ckptfmt.converters.kinds.open_any` does).

    Example:
        >>> [r.ok for r in verify_sums("SUMS", ["model.safetensors"])]  # doctest: +SKIP
        [True]
    """
    recorded = read_sums(sums_file)
    by_path: dict[str, list[TensorSum]] = {}
    for e in recorded:
        by_path.setdefault(e.path, []).append(e)
    sf = os.fspath(sums_file)
    for raw in paths:
        path = os.fspath(raw)
        t0 = time.perf_counter()
        key, want = _recorded_for(path, by_path)
        problems: list[Problem] = []
        if key is None:
            problems.append(Problem("not_in_sums", f"{sf} records no tensors for {path}; hash it with `ckptfmt hash {path}`", file=path))
            yield VerifyReport(path, False, None, None, 0, 0, 0, time.perf_counter() - t0, tuple(problems))
            continue
        got = {e.tensor: e for e in hash_checkpoint(path)}
        expected = {e.tensor: e for e in want}
        for name, e in expected.items():
            g = got.get(name)
            if g is None:
                problems.append(Problem("missing_tensor", f"tensor {name!r} recorded in {sf} is not in {path}", file=path, tensor=name))
            elif (g.dtype, g.shape) != (e.dtype, e.shape):
                problems.append(Problem("size_mismatch", f"tensor {name!r} is {g.dtype}{list(g.shape)} in {path}, {sf} records {e.dtype}{list(e.shape)}", file=path, tensor=name))
            elif g.blake3 != e.blake3:
                problems.append(Problem("hash_mismatch", f"tensor {name!r} in {path} does not match its BLAKE3 in {sf}: its contents changed", file=path, tensor=name))
        for name in got.keys() - expected.keys():
            problems.append(Problem("extra_tensor", f"tensor {name!r} of {path} is not recorded in {sf}", file=path, tensor=name))
        nbytes = sum(g.nbytes for g in got.values())
        yield VerifyReport(path, not problems, None, None, len(got), len(got), nbytes, time.perf_counter() - t0, tuple(problems))
