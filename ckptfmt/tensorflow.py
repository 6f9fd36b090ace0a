"""Save and restore live TensorFlow / Keras state with ckptfmt.

Example:
    >>> import tensorflow as tf, tempfile, os, ckptfmt.tensorflow
    >>> m = tf.Module(); m.w = tf.Variable([1.0, 2.0])
    >>> path = os.path.join(tempfile.mkdtemp(), "ck")
    >>> ckptfmt.tensorflow.save(path, m)
    >>> _ = m.w.assign([0.0, 0.0])
    >>> ckptfmt.tensorflow.restore(path, m)
    >>> m.w.numpy()
    array([1., 2.], dtype=float32)

Importing this module without TensorFlow installed raises
:class:`~ckptfmt.errors.FrameworkNotAvailableError`, which names the extra to install.
"""

from __future__ import annotations

__all__ = ["save", "restore"]

import os
from typing import Any

# Imported first: raises FrameworkNotAvailableError("tensorflow", "tensorflow") when missing.
from ckptfmt.adapters import tensorflow as _adapter

# isort: split
import ckptfmt


def save(path: str | os.PathLike[str], obj: Any, *, metadata: Any = None, overwrite: bool = False) -> None:
    """Save every variable reachable from ``obj``, keyed by object-graph path.

    Args:
        path: where to write the checkpoint.
        obj: a ``tf.train.Checkpoint``, a Keras model (with its optimizer once compiled)
            or any ``tf.Module``.
        metadata: any msgpack-able value, stored as the checkpoint's metadata.
        overwrite: replace an existing checkpoint at ``path``.

    Raises:
        UnsupportedDtypeError: a variable's dtype cannot be stored (its path is named).
        CheckpointExistsError: ``path`` exists and ``overwrite`` is false.

    Example:
        >>> ckptfmt.tensorflow.save("ckpt/step-100", model)  # doctest: +SKIP
    """
    ckptfmt.save(_adapter.to_state(obj), path, metadata=metadata, overwrite=overwrite)


def restore(path: str | os.PathLike[str], obj: Any, *, strict: bool = True) -> None:
    """Restore a checkpoint written by :func:`save` into ``obj``.

    ``obj`` must have the saved architecture and be built; a fresh, unbuilt Keras optimizer
    is built with the model's variables, so training resumes exactly.

    Raises:
        CheckpointNotFoundError: nothing at ``path``.
        ConversionError: with ``strict``, variables missing on either side (all listed);
            always, shape mismatches (named). Nothing is assigned when this is raised.
        FormatError: ``path`` is not a TensorFlow checkpoint written by ckptfmt.

    Example:
        >>> ckptfmt.tensorflow.restore("ckpt/step-100", fresh_model)  # doctest: +SKIP
    """
    _adapter.from_state(ckptfmt.load(path), obj, strict=strict)
