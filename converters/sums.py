"""Checksum sidecars: per-tensor BLAKE3 of any checkpoint kind, and checking against them.

safetensors, ONNX and legacy torch files record no checksums of their data, so ``verify``
can vouch only for their structure. ``ckptfmt hash PATH... > SUMS`` records, for every
tensor, a BLAKE3 digest of its dtype, shape and little-endian C-order bytes, and
``ckptfmt verify --sums SUMS PATH...`` checks any supported kind against it. The digest is
*format-aware*: it is taken of the tensor as read, not of the file, so it is the same
whichever kind the tensor is stored in and however often it was re-serialised (a
safetensors export of a ckptfmt checkpoint has the same sums as the checkpoint).

Besides the tensors, one line per checkpoint records a BLAKE3 of its *non-tensor contents*
(``{"path", "kind", "contents"}``): a ckptfmt checkpoint's tree (its plain leaves such as
``epoch`` or ``lr``, and where each tensor sits) and user metadata; a torch file's plain
leaves; a safetensors file's ``__metadata__``; whatever metadata other kinds expose. That
digest is in the kind's own terms, so it is compared only when the checkpoint is of the kind
recorded (tensor sums compare across kinds); sums files written before it existed (no such
line) check tensors only.

The sidecar is JSON Lines: a header ``{"ckptfmt_sums": 1}``, then one object per tensor
``{"path", "tensor", "dtype", "shape", "blake3"}`` and one ``{"path", "kind", "contents"}``.

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

__all__ = ["TensorSum", "ContentsSum", "tensor_digest", "contents_digest", "hash_checkpoint", "write_sums", "read_sums",
           "verify_sums"]

import json
import os
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import IO, Any

import blake3
import msgpack
import numpy as np

from ckptfmt.api import Problem, VerifyReport
from ckptfmt.errors import FormatError
from ckptfmt.format.tree import TensorRef

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


@dataclass(frozen=True, slots=True)
class ContentsSum:
    """The line of a sums file for a checkpoint's non-tensor contents (plain leaves, metadata)."""

    path: str
    kind: str
    blake3: str

    def to_dict(self) -> dict:
        return {"path": self.path, "kind": self.kind, "contents": self.blake3}


Sum = TensorSum | ContentsSum


def _canon(x: Any, depth: int = 0) -> Any:
    """A msgpack-able form of plain data that is the same for equal values (dicts sorted)."""
    if depth > 200:
        return ["r", "<too deep>"]
    if x is None or isinstance(x, (bool, str, float)):
        return x
    if isinstance(x, int):
        return x if -(1 << 63) <= x < (1 << 64) else ["i", str(x)]
    if isinstance(x, bytes):
        return ["b", x]
    if isinstance(x, dict):
        items = [[_canon(k, depth + 1), _canon(v, depth + 1)] for k, v in x.items()]
        items.sort(key=lambda kv: msgpack.packb(kv[0], use_bin_type=True))
        return ["d", items]
    if isinstance(x, (list, tuple)):
        return ["l" if isinstance(x, list) else "t", [_canon(v, depth + 1) for v in x]]
    if isinstance(x, np.generic):
        return ["n", str(x.dtype), x.tolist()]
    if isinstance(x, TensorRef):  # where a tensor sits in the tree; its index may differ between saves
        return ["T", x.name]
    return ["r", f"{type(x).__name__}:{x!r}"]  # a TensorRef, a record: its type and value


def contents_digest(contents: Any) -> str:
    """BLAKE3 of plain (non-tensor) contents in a canonical form, as hex.

    Example:
        >>> contents_digest({"epoch": 3, "lr": 0.1}) == contents_digest({"lr": 0.1, "epoch": 3})
        True
    """
    return blake3.blake3(b"ckptfmt-contents-1" + msgpack.packb(_canon(contents), use_bin_type=True)).hexdigest()


def _contents_of(src: Any) -> Any:
    reader = getattr(src, "_reader", None)  # a ckptfmt checkpoint: its tree holds the plain leaves
    if src.kind == "ckptfmt" and reader is not None:
        return {"tree": reader.tree, "metadata": reader.metadata}
    return {"metadata": src.metadata}


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


def hash_checkpoint(
    path: str | os.PathLike[str], *, kind: str | None = None, label: str | None = None, contents: bool = False
) -> list[Sum]:
    """Every tensor's :class:`TensorSum`, reading one tensor at a time (any kind).

    Args:
        path: the checkpoint.
        kind: skip detection.
        label: the path to record (default: ``path`` as given).
        contents: also end the list with a :class:`ContentsSum` of the non-tensor contents.

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
        if contents:
            out.append(ContentsSum(label or p, src.kind, contents_digest(_contents_of(src))))
    return out


def write_sums(entries: Iterable[Sum], out: IO[str]) -> int:
    """Write a sums file (JSON Lines) to a text stream; returns the number of tensors."""
    out.write(json.dumps({"ckptfmt_sums": SUMS_VERSION}) + "\n")
    n = 0
    for e in entries:
        out.write(json.dumps(e.to_dict(), ensure_ascii=False) + "\n")
        n += isinstance(e, TensorSum)
    return n


def read_sums(path: str | os.PathLike[str]) -> list[Sum]:
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
                    if isinstance(d, dict) and "contents" in d and "tensor" not in d:
                        out.append(ContentsSum(d["path"], d["kind"], d["contents"]))
                        if not all(isinstance(d[f], str) for f in ("path", "kind", "contents")):
                            raise TypeError("a field has the wrong type")
                        continue
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
    tensor may be present that was not recorded; the non-tensor contents must match their
    recorded digest when the sums file has one for the same kind. A path the sums file does not mention is
    reported as an error (``not_in_sums``). Reading failures of the checkpoint itself
    raise (as :func:`~ckptfmt.converters.kinds.open_any` does).

    Example:
        >>> [r.ok for r in verify_sums("SUMS", ["model.safetensors"])]  # doctest: +SKIP
        [True]
    """
    recorded = read_sums(sums_file)
    by_path: dict[str, list[TensorSum]] = {}
    contents_by_path: dict[str, ContentsSum] = {}
    for e in recorded:
        if isinstance(e, ContentsSum):
            contents_by_path[e.path] = e
            by_path.setdefault(e.path, [])
        else:
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
        hashed = hash_checkpoint(path, contents=True)
        got = {e.tensor: e for e in hashed if isinstance(e, TensorSum)}
        want_c = contents_by_path.get(key)
        got_c = next(e for e in hashed if isinstance(e, ContentsSum))
        if want_c is not None and want_c.kind == got_c.kind and want_c.blake3 != got_c.blake3:
            problems.append(Problem("hash_mismatch", f"the non-tensor contents of {path} (plain values such as epoch or lr, "
                                                     f"metadata) do not match {sf}: they changed", file=path))
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
