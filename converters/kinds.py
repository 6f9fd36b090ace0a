"""Checkpoints of any kind behind one small interface: detect, list, read, verify, diff, convert.

A *kind* is one on-disk checkpoint format:

===============  ==============================================================  =====
kind             what a path looks like                                          needs
===============  ==============================================================  =====
``ckptfmt``      a directory holding a ``MANIFEST``                              --
``tf``           a TensorBundle prefix (``dir/ckpt-1`` for ``dir/ckpt-1.index``), --
                 its ``.index`` or a shard file, or a directory with a
                 ``checkpoint`` state file
``torch``        a ``.pt`` / ``.pth`` / ``.bin`` file written by ``torch.save``  torch
``safetensors``  a ``.safetensors`` file                                         --
``onnx``         a ``.onnx`` model (its initializers are the tensors)            onnx
``safetensors-   a Hugging Face ``*.safetensors.index.json`` and its shards, or   --
sharded``        the directory holding them: one checkpoint
===============  ==============================================================  =====

Files without a known suffix are recognised by their first bytes (zip or pickle: torch;
an 8-byte length followed by ``{``: safetensors).

Each kind is one module of :mod:`ckptfmt.converters.sources` (detection and reading);
this module puts them behind the verbs. Every kind is opened as a :class:`Source`: ``keys()``, ``info(name)`` (dtype, shape and
size, without reading data), ``get(name)`` (one tensor as numpy), ``metadata``,
``version`` and ``digest``. Tensor names are ``/``-joined paths, as in ckptfmt, so the
same model has the same names in every kind it is converted to. Dtypes are spelled with
ckptfmt's names (``float32``, ``bfloat16``, ...) in every kind.

torch and onnx are imported only when a file of that kind is opened; without them
:class:`~ckptfmt.errors.FrameworkNotAvailableError` names the extra to install.

Example:
    >>> import numpy as np, os, tempfile, ckptfmt
    >>> from ckptfmt.converters import kinds
    >>> d = tempfile.mkdtemp()
    >>> _ = ckptfmt.save({"w": np.ones((2, 3), np.float32)}, os.path.join(d, "ck"))
    >>> kinds.detect_kind(os.path.join(d, "ck"))
    'ckptfmt'
    >>> _ = kinds.convert(os.path.join(d, "ck"), os.path.join(d, "w.safetensors"))
    >>> kinds.verify_any(os.path.join(d, "w.safetensors")).ok
    True
    >>> kinds.diff_any(os.path.join(d, "ck"), os.path.join(d, "w.safetensors")).identical
    True
"""

from __future__ import annotations

__all__ = [
    "KINDS",
    "TensorInfo",
    "Source",
    "Summary",
    "TensorDiff",
    "DiffReport",
    "ConvertResult",
    "detect_kind",
    "open_any",
    "inspect_any",
    "verify_any",
    "diff_any",
    "diff_sources",
    "convert",
    "nest",
    "onnx_import",
    "onnx_export",
    "target_kind",
]

import os
from dataclasses import dataclass
from typing import Any

import ckptfmt.api
from ckptfmt.errors import ConversionError
from ckptfmt.format.dtypes import DTYPE_NAMES
from ckptfmt.format.tree import unescape_key

from .diff import DiffReport, TensorDiff, diff_any, diff_sources
from .files import atomic_file, check_destination
from .sources import KINDS, detect_kind, open_any, verify_any
from .sources import safetensors as _st
from .sources.base import ConvertResult, Source, TensorInfo, jsonable
from .sources.torch import TORCH_SUFFIXES

# Where a converted checkpoint goes, by the destination's suffix (anything else: ckptfmt).
_TARGET_BY_SUFFIX = {".safetensors": "safetensors", **{s: "torch" for s in TORCH_SUFFIXES}}


# ---------------------------------------------------------------------- inspect, verify


@dataclass(frozen=True, slots=True)
class Summary:
    """What :func:`inspect_any` found: kind, version, tensors, totals, metadata, digest."""

    path: str
    kind: str
    version: str | None
    digest: str | None
    metadata: Any
    tensors: tuple[TensorInfo, ...]
    content_digest: str | None = None

    @property
    def count(self) -> int:
        return len(self.tensors)

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (metadata values JSON cannot hold are turned into strings)."""
        return {
            "path": self.path,
            "kind": self.kind,
            "version": self.version,
            "digest": self.digest,
            "content_digest": self.content_digest,
            "count": self.count,
            "nbytes": self.nbytes,
            "metadata": jsonable(self.metadata),
            "tensors": [t.to_dict() for t in self.tensors],
        }


def inspect_any(path: str | os.PathLike[str], *, kind: str | None = None) -> Summary:
    """Describe a checkpoint of any kind without reading its tensor data.

    Example:
        >>> s = inspect_any("model.safetensors")  # doctest: +SKIP
        >>> s.kind, s.count, s.nbytes  # doctest: +SKIP
        ('safetensors', 12, 4096)
    """
    with open_any(path, kind=kind) as src:
        return Summary(src.path, src.kind, src.version, src.digest, src.metadata, tuple(src.tensors()), src.content_digest)


# --------------------------------------------------------------------------- convert


def target_kind(dst: str) -> str:
    """The kind :func:`convert` writes to ``dst`` by its name: ``safetensors``, ``torch`` or ``ckptfmt``.

    Raises:
        ConversionError: an ``.onnx`` name (ONNX is written by :func:`onnx_export`).

    Example:
        >>> target_kind("w.safetensors"), target_kind("run.PT"), target_kind("runs/step-3")
        ('safetensors', 'torch', 'ckptfmt')
    """
    low = dst.lower()
    for suffix, kind in _TARGET_BY_SUFFIX.items():
        if low.endswith(suffix):
            return kind
    if low.endswith(".onnx"):
        raise ConversionError(
            f"{dst}: writing ONNX needs a model to put the tensors into; use onnx_export "
            "(ckptfmt convert onnx-export SRC MODEL.onnx OUT.onnx)"
        )
    return "ckptfmt"


def _check_suffix(dst: str, target: str) -> None:
    """Refuse a destination whose suffix names another kind: nobody could read it back as such."""
    low = dst.lower().rstrip("/")
    implied = next((k for suffix, k in _TARGET_BY_SUFFIX.items() if low.endswith(suffix)), None)
    if implied is None and low.endswith(".onnx"):
        implied = "onnx"
    if implied is not None and implied != target:
        raise ConversionError(
            f"{dst}: the suffix says {implied} but the target is {target}; a {target} checkpoint under this "
            f"name would be misread by every tool. Name it for what it is, or convert to {implied}"
            + (f" (ckptfmt convert to-{implied})" if implied in ("safetensors", "torch") else "")
        )


def nest(flat: dict[str, Any]) -> dict[str, Any]:
    """Turn ``/``-joined names into nested dicts, so ckptfmt gives them back unchanged.

    ``{"a/b": x}`` saved as is would be named ``a~1b`` by ckptfmt (``/`` inside a key is
    escaped); nested as ``{"a": {"b": x}}`` it is named ``a/b``. Components are
    unescaped (``~1`` -> ``/``, ``~0`` -> ``~``), the inverse of ckptfmt's naming. When
    names clash (``a`` and ``a/b`` both tensors) or have empty components, the flat dict
    is returned unchanged.

    Example:
        >>> nest({"a/b": 1, "a/c": 2, "d": 3})
        {'a': {'b': 1, 'c': 2}, 'd': 3}
    """
    root: dict[str, Any] = {}
    for name, value in flat.items():
        parts = [unescape_key(p) for p in name.split("/")]
        if any(not p for p in parts):
            return dict(flat)
        node = root
        for p in parts[:-1]:
            child = node.setdefault(p, {})
            if not isinstance(child, dict) or child is value:
                return dict(flat)
            node = child
        if parts[-1] in node:
            return dict(flat)
        node[parts[-1]] = value
    return root


def _plan(src: Source, target: str, skip_unsupported: bool) -> tuple[list[TensorInfo], list[tuple[str, str]]]:
    """Which tensors the target can hold; string tensors are always skipped."""
    keep: list[TensorInfo] = []
    skipped: list[tuple[str, str]] = []
    bad: list[str] = []
    for info in src.tensors():
        if info.dtype == "string":
            skipped.append((info.name, "string tensor"))
            continue
        ok = info.dtype in _st.ST_DTYPES if target == "safetensors" else _known_dtype(info.dtype)
        if ok:
            keep.append(info)
        elif skip_unsupported:
            skipped.append((info.name, f"{target} cannot hold {info.dtype}"))
        else:
            bad.append(f"{info.name} ({info.dtype})")
    if bad:
        raise ConversionError(
            f"{src.path}: {len(bad)} tensor(s) have a dtype {target} cannot hold: {', '.join(bad[:10])}"
            f"{' ...' if len(bad) > 10 else ''}; cast them first or skip them (--skip-unsupported)"
        )
    return keep, skipped


def _known_dtype(name: str) -> bool:
    return name in DTYPE_NAMES


def _metadata_for(target: str, metadata: Any) -> Any:
    if target == "safetensors":
        return _st.encode_metadata(metadata)
    if target == "ckptfmt":
        return _st.decode_metadata(metadata)
    return None


def convert(
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str],
    *,
    to: str | None = None,
    src_kind: str | None = None,
    overwrite: bool = False,
    skip_unsupported: bool = False,
) -> ConvertResult:
    """Copy the tensors of a checkpoint of any kind into a ckptfmt, safetensors or torch one.

    Every tensor becomes one entry of the target, under the same ``/``-joined name (a
    ckptfmt target nests them, see :func:`nest`); plain values are not tensors and are
    not copied. Metadata is carried where the target has room for it (safetensors keeps
    a ``{str: str}`` dict as is and anything else JSON-encoded under
    ``"ckptfmt.metadata"``; a torch file holds only the flat dict of tensors). The
    destination appears atomically.

    Args:
        src: the source checkpoint, any kind (tf and onnx included).
        dst: the destination.
        to: ``"ckptfmt"``, ``"safetensors"`` or ``"torch"``; by default from ``dst``'s
            suffix (``.safetensors``; ``.pt``/``.pth``/``.bin``; anything else ckptfmt).
        src_kind: skip detection of ``src``.
        overwrite: replace an existing ``dst``.
        skip_unsupported: leave out tensors whose dtype the target cannot hold instead of
            failing (string tensors are always left out; see ``ConvertResult.skipped``).

    Raises:
        CheckpointExistsError: ``dst`` exists. ConversionError: a dtype the target cannot
        hold. FrameworkNotAvailableError: torch/onnx needed. Errors of :func:`open_any`.

    Example:
        >>> convert("fixtures/tf/tf_module", "/tmp/model.safetensors")  # doctest: +SKIP
        ConvertResult(path='/tmp/model.safetensors', kind='safetensors', tensors=4, ...)
    """
    s_path, d_path = os.fspath(src), os.fspath(dst)
    target = to or target_kind(d_path)
    if target not in ("ckptfmt", "safetensors", "torch"):
        raise ConversionError(f"cannot convert to {target!r}; targets: ckptfmt, safetensors, torch (onnx: onnx_export)")
    _check_suffix(d_path, target)
    check_destination(d_path, "ckptfmt" if target == "ckptfmt" else "file", overwrite)
    with open_any(s_path, kind=src_kind) as s:
        keep, skipped = _plan(s, target, skip_unsupported)
        nbytes = sum(t.nbytes for t in keep)
        if target == "safetensors":
            meta = _metadata_for(target, s.metadata)
            atomic_file(d_path, lambda tmp: _st.write_safetensors(tmp, [(t, lambda n=t.name: s.get(n)) for t in keep], meta))
        elif target == "torch":
            from .sources.torch import write_torch

            atomic_file(d_path, lambda tmp: write_torch(tmp, {t.name: s.get(t.name) for t in keep}))
        else:
            state = nest({t.name: s.get(t.name) for t in keep})
            ckptfmt.api.save(state, d_path, metadata=_metadata_for(target, s.metadata), overwrite=overwrite)
    return ConvertResult(d_path, target, len(keep), nbytes, tuple(skipped))


def onnx_import(
    model: str | os.PathLike[str],
    dst: str | os.PathLike[str],
    *,
    to: str | None = None,
    overwrite: bool = False,
    skip_unsupported: bool = False,
) -> ConvertResult:
    """Extract an ONNX model's initializers (external data included) into a checkpoint.

    Same as :func:`convert` with ``src_kind="onnx"``.

    Example:
        >>> onnx_import("model.onnx", "weights.safetensors")  # doctest: +SKIP
    """
    return convert(model, dst, to=to, src_kind="onnx", overwrite=overwrite, skip_unsupported=skip_unsupported)


def onnx_export(
    src: str | os.PathLike[str],
    model: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    allow_missing: bool = False,
    allow_unknown: bool = False,
    overwrite: bool = False,
) -> ConvertResult:
    """Write a checkpoint's tensors into an ONNX model's initializers, by name, as a new model.

    Every tensor must match its initializer's shape and dtype. By default every
    initializer must get a tensor and every tensor must have an initializer. The result
    is saved to ``out`` (external data beside it in ``<out>.data`` when the model used
    external data or is too large for one protobuf) and checked with ``onnx.checker``.

    Args:
        src: the checkpoint with the new values, any kind.
        model: the ONNX model to fill in (left unchanged).
        out: the new model.
        allow_missing: keep the model's values for initializers ``src`` lacks.
        allow_unknown: ignore tensors of ``src`` the model has no initializer for.
        overwrite: replace an existing ``out``.

    Raises:
        ConversionError: shape/dtype mismatches (all listed). UnmappedKeyError: missing or
        unknown names (all listed). CheckpointExistsError: ``out`` exists.

    Example:
        >>> onnx_export("finetuned.safetensors", "model.onnx", "finetuned.onnx")  # doctest: +SKIP
    """
    from .sources.onnx import export_onnx

    return export_onnx(
        os.fspath(src), os.fspath(model), os.fspath(out),
        allow_missing=allow_missing, allow_unknown=allow_unknown, overwrite=overwrite,
    )

