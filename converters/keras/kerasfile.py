"""Keras's own files, read and written without Keras: ``.keras``, ``.weights.h5`` and tf.keras ``.h5``.

Three layouts, all HDF5 (read with h5py, the ``keras`` extra):

===================  =========================================================================
file                 layout
===================  =========================================================================
``.keras`` (Keras 3) a zip: ``config.json`` (model and optimizer config), ``metadata.json``,
                     ``model.weights.h5`` (below)
``.weights.h5``      positional datasets ``<object path>/vars/0, 1, ...`` per saveable object;
(Keras 3)            groups are snake_case class names (``layers/dense_1``) or attribute names
                     (subclassed models); the layer's name is the ``vars`` group's ``name``
                     attribute; ``optimizer/vars/N``: 0 iterations, 1 learning rate (absent
                     with a schedule), then the slots; bfloat16 is opaque ``|V2`` with a
                     ``dtype`` attribute
``.h5`` (tf.keras 2) ``model_weights/<layer>/<layer>/kernel:0`` (full model, with
                     ``model_config``/``training_config`` attributes) or the same at the root
                     (``save_weights``); ``optimizer_weights/Adam/m/<layer>/kernel:0``...
===================  =========================================================================

:func:`read_keras_file` resolves such a file into the same :class:`KerasCheckpoint` the TF
checkpoint reader produces (layers, weights, optimizer slots, iterations, learning rate),
plus what only Keras's files carry: each layer's config (epsilon, momentum, class, order)
and the optimizer's hyperparameters. Source keys are Keras variable paths
(``conv/kernel``, ``lstm/lstm_cell/kernel``), as for a TF checkpoint of the same model.

Keras 3 files store variables by position, not by name: roles come from the layer class
(config, or the group's snake_case class name), and the optimizer's slots are tied to the
model's trainable variables by their order, which the config gives; without a config it is
solved from the slot shapes and refused when they do not decide.

HDF5 from untrusted sources is checked before data is read: soft and external links,
external and virtual datasets, unsupported dtypes, and datasets declaring far more bytes
than the file holds are refused with :class:`~ckptfmt.errors.FormatError`.

The parts, each a module of its own (this module re-exports their public names):

=============================  ======================================================================
module                         holds
=============================  ======================================================================
:mod:`.kerasfile_h5`           :class:`KerasFileReader`: the HDF5 bytes of a file or archive, checked
:mod:`.kerasfile_check`        the child-process walk of the HDF5 structure before it is opened here
:mod:`.kerasfile_layers`       :class:`KerasFileCheckpoint`; Keras 3 layer classes and their variables
:mod:`.kerasfile_keras3`       the Keras 3 layout (config-driven layers, groups, roles)
:mod:`.kerasfile_optimizer`    a Keras 3 optimizer's positional slots tied to the model's variables
:mod:`.kerasfile_tfkeras`      the tf.keras 2 ``.h5`` layout (weights and slots by name)
:mod:`.kerasfile_write`        :func:`write_keras_file`: a template's layout with new values
=============================  ======================================================================

Example:
    >>> from ckptfmt.converters.keras.kerasfile import KerasFileReader, read_keras_file
    >>> with KerasFileReader("fixtures/keras/k3_cnn_adam.keras") as r:
    ...     kc = read_keras_file(r)
    ...     [(l.name, l.class_name) for l in kc.layers]
    [('conv', 'Conv2D'), ('bn', 'BatchNormalization'), ('flatten', 'Flatten'), ('head', 'Dense')]
"""

from __future__ import annotations

__all__ = [
    "HDF5_MAGIC",
    "KerasFileCheckpoint",
    "KerasFileReader",
    "read_keras_file",
    "is_keras_file",
    "write_keras_file",
    "is_keras_path",
    "open_keras_checkpoint",
    "file_optimizer_config",
    "check_config_mismatches",
    "write_keras_like_template",
]

import contextlib
import os
from collections.abc import Callable, Iterable, Iterator
from collections.abc import Mapping as AbcMapping
from typing import Any

import numpy as np

from ckptfmt.errors import ConversionError

from .checkpoint import KerasCheckpoint
from .kerasfile_h5 import HDF5_MAGIC, KerasFileReader, is_keras_file
from .kerasfile_h5 import ZIP_MAGIC as ZIP_MAGIC  # importable from here as before the split
from .kerasfile_keras3 import read_keras3
from .kerasfile_layers import KerasFileCheckpoint
from .kerasfile_tfkeras import read_tfkeras
from .kerasfile_write import iter_datasets as iter_datasets  # importable from here as before the split
from .kerasfile_write import write_keras_file


def read_keras_file(reader: KerasFileReader, *, infer_layers: bool = True) -> KerasFileCheckpoint:
    """Resolve a Keras file's datasets into a :class:`KerasFileCheckpoint`.

    Args:
        reader: the open file.
        infer_layers: resolve each layer's kind (not needed with a mapping file).

    Raises:
        FormatError: a layout that is not Keras's (names the file and group).
        ConversionError: a layer of unknown kind (with ``infer_layers``).

    Example:
        >>> with KerasFileReader("m.keras") as r:  # doctest: +SKIP
        ...     kc = read_keras_file(r)
        >>> kc.slots["conv/kernel"]  # doctest: +SKIP
        {'momentum': 'optimizer/vars/2', 'velocity': 'optimizer/vars/3'}
    """
    groups = reader.groups()
    if "model_weights" in groups or "layer_names" in groups.get("", {}):
        return read_tfkeras(reader, infer_layers)
    return read_keras3(reader, infer_layers)


def unordered_flatten_error(kc: KerasCheckpoint) -> ConversionError | None:
    """The refusal for a file with no layer order whose Dense may follow a flattened convolution.

    A ``.weights.h5`` lists layers by name, so no Flatten can be placed from it: only the torch
    model's dataflow (``--model`` with an example input) tells a flattened map from a pooled
    vector. Returns None when the file records the order or holds no convolution and Dense.
    """
    if getattr(kc, "order_known", True):
        return None
    kinds = [layer.class_name for layer in kc.layers]
    if not (any(k.startswith(("Conv", "Depthwise", "Separable")) for k in kinds) and "Dense" in kinds):
        return None
    return ConversionError(
        f"{kc.path}: a .weights.h5 does not record the order of the model's layers, so it cannot tell whether a Dense "
        "follows a flattened convolution (its rows then need permuting) or a pooled vector. Pass the torch model with an "
        "example input (--model FILE.py:factory returning (model, example_input)) so its dataflow decides, or convert "
        "the model's .keras file instead (ModelCheckpoint or model.save)")


# --------------------------------------------------------------------------------------------
# The pipelines' entry points: either reader, one writer per template kind


def is_keras_path(path: str | os.PathLike[str]) -> bool:
    """True when ``path`` is a Keras file (by suffix or content), not a TF checkpoint.

    Example:
        >>> is_keras_path("fixtures/keras/k3_cnn_adam.weights.h5"), is_keras_path("fixtures/tf/keras3_conv_adam")
        (True, False)
    """
    p = os.fspath(path)
    if not os.path.isfile(p):
        return False
    return p.lower().endswith((".keras", ".h5", ".hdf5")) or is_keras_file(p) is not None


@contextlib.contextmanager
def open_keras_checkpoint(path: str | os.PathLike[str], *, infer_layers: bool = True, root: str | None = None,
                          unknown: str = "raise") -> Iterator[KerasCheckpoint]:
    """The :class:`KerasCheckpoint` of a TF checkpoint or of a Keras file, its reader open inside ``with``.

    ``root`` and ``unknown`` are those of
    :func:`~ckptfmt.converters.keras.tfcheckpoint.read_keras_checkpoint` (a Keras file has one
    model and names every layer's class, so they do not apply to it).

    Example:
        >>> with open_keras_checkpoint("fixtures/keras/k3_cnn_adam.keras") as kc:
        ...     kc.slots["head/bias"]
        {'momentum': 'optimizer/vars/12', 'velocity': 'optimizer/vars/13'}
    """
    p = os.fspath(path)
    if is_keras_path(p):
        with KerasFileReader(p) as reader:
            yield read_keras_file(reader, infer_layers=infer_layers)
        return
    import dataclasses

    from ..tf.bundle import TFCheckpointReader
    from .tfcheckpoint import read_keras_checkpoint

    with TFCheckpointReader(p) as reader:
        yield dataclasses.replace(read_keras_checkpoint(reader, root=root, infer_layers=infer_layers, unknown=unknown), path=p)


# Optimizer settings the converters read from a Keras file's config.
_OPTIMIZER_KEYS = ("class_name", "learning_rate", "beta_1", "beta_2", "epsilon", "amsgrad", "momentum", "nesterov", "rho",
                   "centered", "weight_decay", "use_ema", "gradient_accumulation_steps", "clipnorm", "clipvalue",
                   "global_clipnorm")


def file_optimizer_config(kc: KerasCheckpoint, given: AbcMapping[str, Any] | None) -> dict[str, Any] | None:
    """The optimizer settings a Keras file's config states, overridden by ``given`` (``--optimizer-config``).

    The learning rate comes from the config only when the file stores no variable for it
    (tf.keras ``.h5``); a schedule (a dict) is never taken for a value.

    Example:
        >>> with open_keras_checkpoint("fixtures/keras/k3_cnn_adam.keras") as kc:
        ...     sorted(file_optimizer_config(kc, {"epsilon": 1e-8}).items())[:3]
        [('amsgrad', False), ('beta_1', 0.9), ('beta_2', 0.999)]
    """
    if not isinstance(kc, KerasFileCheckpoint) or not kc.optimizer_config:
        return dict(given) if given is not None else None
    out = {k: v for k, v in kc.optimizer_config.items() if k in _OPTIMIZER_KEYS and v is not None}
    if kc.learning_rate_key is not None or not isinstance(out.get("learning_rate"), (int, float)):
        out.pop("learning_rate", None)
    return {**out, **(given or {})}


def check_config_mismatches(kc: KerasCheckpoint, notes: Iterable[str]) -> None:
    """Refuse a torch model whose normalization eps or momentum differs from what the Keras config states.

    A TF checkpoint or a bare ``.weights.h5`` stores no config: their notes stay notes.

    Raises:
        ConversionError: every mismatch, listed.
    """
    if not isinstance(kc, KerasFileCheckpoint) or kc.file_kind == "keras3-h5":
        return
    bad = [n[len("MISMATCH "):] for n in notes if n.startswith("MISMATCH ")]
    if bad:
        raise ConversionError(f"{kc.path}: the torch model does not match the Keras config:\n  " + "\n  ".join(bad)
                              + "\nbuild the torch layers with the Keras layers' eps and momentum (torch momentum = 1 - Keras momentum)")


def write_keras_like_template(dst: str, template: KerasCheckpoint, value: Callable[[str], np.ndarray], keys: Iterable[str],
                              *, overwrite: bool = False) -> None:
    """Write a Keras file shaped like ``template`` (a :class:`KerasFileCheckpoint`), ``keys`` from ``value``.

    Every other dataset is copied from the template. The file appears atomically.

    Example:
        >>> write_keras_like_template("new.keras", kc, values.__getitem__, values)  # doctest: +SKIP
    """
    wanted = set(keys)
    write_keras_file(template.reader, dst, lambda k: value(k) if k in wanted else None, overwrite=overwrite)
