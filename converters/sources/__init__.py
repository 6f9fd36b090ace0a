"""Checkpoint formats as sources: one module per format, the same verbs in each.

===============  ==============================================================  ============
kind             what a path looks like                                          module
===============  ==============================================================  ============
``ckptfmt``      a directory holding a ``MANIFEST``                              ``ckptfmt``
``tf``           a TensorBundle prefix (``dir/ckpt-1`` for ``dir/ckpt-1.index``), ``tf``
                 its ``.index`` or a shard file, or a directory with a
                 ``checkpoint`` state file
``torch``        a ``.pt`` / ``.pth`` / ``.bin`` file written by ``torch.save``  ``torch``
``safetensors``  a ``.safetensors`` file                                         ``safetensors``
``onnx``         a ``.onnx`` model (its initializers are the tensors)            ``onnx``
``safetensors-   a Hugging Face ``*.safetensors.index.json`` and its shards, or   ``hfsharded``
sharded``        the directory holding them: one checkpoint
``keras``        a ``.keras`` archive, a Keras 3 ``.weights.h5`` or a tf.keras     ``keras``
                 ``.h5`` (needs h5py, the ``keras`` extra; ``converters/keras/source.py``)
===============  ==============================================================  ============

Each module's :class:`~.base.Source` says which paths are its own (``claims``: layout or
suffix; ``sniff``: a file's first bytes) and reads them (``keys``, ``info``, ``get``,
``verify``). Formats are listed here by name and imported when first used (as fsspec does
for backends); torch and onnx themselves are imported only when a file of that kind is
opened. A new format is one module and one line in :data:`SOURCES`.

Example:
    >>> import numpy as np, os, tempfile, ckptfmt
    >>> d = os.path.join(tempfile.mkdtemp(), "ck")
    >>> _ = ckptfmt.save({"w": np.ones(2, np.float32)}, d)
    >>> detect_kind(d)
    'ckptfmt'
"""

from __future__ import annotations

__all__ = ["KINDS", "SOURCES", "Source", "TensorInfo", "detect_kind", "open_any", "source_class", "canonical_path", "verify_any"]

import importlib
import os
from typing import TYPE_CHECKING

from ckptfmt.errors import CheckpointNotFoundError, FormatError, UnsupportedURLError
from ckptfmt.format.spec import MANIFEST_NAME
from ckptfmt.storage.urls import is_url, resolve

from .base import Source, TensorInfo

if TYPE_CHECKING:
    from ckptfmt.api import VerifyReport

#: Suffixes of the foreign formats: such files are never looked for on an object store.
_FOREIGN_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin", ".onnx", ".index", ".h5", ".keras", ".ckpt")

#: ``{kind: "module:Class"}`` in detection order.
SOURCES: dict[str, str] = {
    "ckptfmt": "ckptfmt.converters.sources.ckptfmt:CkptfmtSource",
    "tf": "ckptfmt.converters.sources.tf:TFSource",
    # before torch: a .keras archive is a zip too
    "keras": "ckptfmt.converters.keras.source:KerasSource",  # lives with the Keras readers (above the sources)
    "torch": "ckptfmt.converters.sources.torch:TorchSource",
    "safetensors": "ckptfmt.converters.sources.safetensors:SafetensorsSource",
    "onnx": "ckptfmt.converters.sources.onnx:OnnxSource",
    "safetensors-sharded": "ckptfmt.converters.sources.hfsharded:ShardedSafetensorsSource",
}

#: Every kind, in detection order.
KINDS: tuple[str, ...] = tuple(SOURCES)


def source_class(kind: str) -> type[Source]:
    """The :class:`Source` subclass of a kind, its module imported on first use.

    Raises:
        ValueError: an unknown kind.

    Example:
        >>> source_class("safetensors").__name__
        'SafetensorsSource'
    """
    try:
        target = SOURCES[kind]
    except KeyError:
        raise ValueError(f"unknown checkpoint kind {kind!r}; known kinds: {', '.join(KINDS)}") from None
    module, _, attr = target.partition(":")
    return getattr(importlib.import_module(module), attr)


def canonical_path(path: str | os.PathLike[str]) -> str:
    """A ckptfmt checkpoint named by its MANIFEST file means the checkpoint directory.

    Example:
        >>> canonical_path("runs/step-3")
        'runs/step-3'
    """
    p = os.fspath(path)
    if is_url(p):
        return p[: -len(MANIFEST_NAME) - 1] if p.endswith("/" + MANIFEST_NAME) else p.rstrip("/")
    if os.path.basename(p) == MANIFEST_NAME and os.path.isfile(p):
        return os.path.dirname(p) or "."
    return p


def detect_kind(path: str | os.PathLike[str]) -> str:
    """Tell which kind of checkpoint ``path`` is, from its layout, suffix or first bytes.

    Every kind's source is asked whether it claims the path (layout or suffix), in the
    order of :data:`KINDS`; a file no kind claims is recognised by its first bytes.

    Args:
        path: a checkpoint directory, TensorFlow prefix, or file.

    Returns:
        One of :data:`KINDS`.

    Raises:
        CheckpointNotFoundError: nothing exists at ``path``.
        FormatError: something exists but is not a checkpoint of any known kind.

    Example:
        >>> detect_kind("model.safetensors")  # doctest: +SKIP
        'safetensors'
    """
    p = canonical_path(path)
    if is_url(p):
        # Object stores hold ckptfmt checkpoints; foreign files are read from local disk.
        resolve(p)  # an unsupported scheme or a missing backend is reported as such
        if os.path.splitext(p)[1].lower() in _FOREIGN_SUFFIXES:
            raise UnsupportedURLError(
                f"{p}: only ckptfmt checkpoints are read from object stores; copy the file to local disk first"
            )
        return "ckptfmt"
    for kind in KINDS:
        if source_class(kind).claims(p):
            return kind
    if os.path.isdir(p):
        prefixes = sorted(n[: -len(".index")] for n in os.listdir(p) if n.endswith(".index"))
        if prefixes:
            raise FormatError(
                f"{p} holds TensorFlow checkpoints but no 'checkpoint' state file naming the latest; "
                f"pass a prefix instead, e.g. {os.path.join(p, prefixes[-1])}"
            )
        raise FormatError(
            f"{p} is a directory but neither a ckptfmt checkpoint (no {MANIFEST_NAME}) nor a "
            "TensorFlow checkpoint directory (no 'checkpoint' file)"
        )
    if os.path.isfile(p):
        with open(p, "rb") as f:
            head = f.read(9)
        for kind in KINDS:
            if source_class(kind).sniff(head):
                return kind
        raise FormatError(
            f"{p}: not a checkpoint kind ckptfmt knows (by suffix or content); supported: "
            "ckptfmt directories, TensorFlow prefixes, .safetensors, .pt/.pth/.bin, .onnx, .keras/.weights.h5/.h5"
        )
    raise CheckpointNotFoundError(f"no checkpoint at {p}: the path does not exist")


def open_any(path: str | os.PathLike[str], *, kind: str | None = None) -> Source:
    """Open a checkpoint of any kind lazily.

    Args:
        path: the checkpoint (see :func:`detect_kind`).
        kind: skip detection and open as this kind.

    Raises:
        CheckpointNotFoundError, FormatError (not a checkpoint, or a damaged one),
        FrameworkNotAvailableError (torch or onnx needed but missing).

    Example:
        >>> with open_any("fixtures/tf/tf_module") as src:  # doctest: +SKIP
        ...     src.kind, len(src.keys())
        ('tf', 5)
    """
    p = canonical_path(path)
    return source_class(kind or detect_kind(p))(p)


def verify_any(path: str | os.PathLike[str], *, kind: str | None = None, progress: bool | None = None) -> VerifyReport:
    """Check a checkpoint of any kind completely; corruption is reported, not raised.

    What is checked depends on what the kind records:

    - ckptfmt: :func:`ckptfmt.verify` (every chunk hash, every file's size).
    - tf: the index, every shard's presence, every tensor's CRC32C.
    - safetensors: the header (length bounded by the file, JSON, dtypes, shapes) and the
      data offsets (in bounds, no overlap, no gap, each matching its dtype and shape, the
      last one ending where the file ends). safetensors has no checksums: a flipped bit
      inside tensor data cannot be detected.
    - torch: the zip archive's CRC-32 of every member (a corrupted member is traced to the
      tensors stored in it), then ``torch.load(weights_only=True)``.
    - onnx: the protobuf, ``onnx.checker``, and every external data file present and long
      enough. ONNX has no checksums either.

    Args:
        path: the checkpoint.
        kind: skip detection.
        progress: show a progress bar (default: on a terminal, for large inputs).

    Returns:
        A :class:`ckptfmt.VerifyReport`; ``chunks_checked`` counts the kind's units (chunks,
        tensors, archive members).

    Raises:
        CheckpointNotFoundError: nothing at ``path``. FormatError: not a known kind.
        FrameworkNotAvailableError: torch or onnx is needed but missing.

    Example:
        >>> report = verify_any("model.safetensors")  # doctest: +SKIP
        >>> report.ok, [str(p) for p in report.problems]  # doctest: +SKIP
        (True, [])
    """
    p = canonical_path(path)
    return source_class(kind or detect_kind(p)).verify(p, progress=progress)
