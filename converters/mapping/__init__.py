"""Checkpoint key mappings: declarative rules, Keras layer conversions, model-guided matching.

* :mod:`.rules`: ``Rename``/``Convert``/``Drop`` rules and tensor ops as data; a ``Mapping``
  plans (dry run, table), applies, inverts and round-trips through a JSON mapping file (the
  ops in :mod:`.ops`; resolving rules against keys in ``_resolve``, the file in ``_mapfile``).
* :mod:`.registry`: one record per Keras layer class (:class:`LayerKind`: rules, weight
  signature, accepted torch modules); :func:`register_layer` adds one in one call.
* :mod:`.layers`: the built-in kinds.
* :mod:`.describe`: the Flatten trap, descriptions of live Keras models.
* :mod:`.match`: pair Keras layers with the modules of a torch model and build the mapping
  (imports torch, so it is loaded only when one of its names is first used); its steps are
  ``_candidates`` (who could become what), ``_pairing`` (who becomes what: dataflow, then
  order), ``_layouts`` (Dense and LayerNorm layouts), ``_folding`` (a conv bias into a BN),
  and the torch dataflow they read, ``_dataflow`` (torch.fx, or ``_record``: one recorded run).

Example:
    >>> import numpy as np
    >>> from ckptfmt.converters.mapping import Mapping, Convert, Transpose
    >>> m = Mapping((Convert(("*/kernel",), ("*.weight",), (Transpose((1, 0)),)),))
    >>> m.apply({"fc/kernel": np.zeros((3, 2))})["fc.weight"].shape
    (2, 3)
"""

from __future__ import annotations

from typing import Any

from .describe import describe_keras_layer, describe_keras_model, find_flatten_dense
from .layers import conv_kernel_axes, flatten_kernel_ops
from .registry import (
    LAYER_CONVERTERS,
    LAYER_KINDS,
    KerasLayer,
    KerasWeight,
    LayerKind,
    layer_kind,
    layer_rules,
    register_layer,
    unregister_layer,
)
from .rules import (
    AppendFill,
    AppendZeros,
    Cast,
    Concat,
    Convert,
    Discard,
    Drop,
    DropLast,
    Entry,
    Fill,
    GateReorder,
    Mapping,
    Mean,
    Op,
    Plan,
    Rename,
    Repeat,
    Reshape,
    Split,
    Subtract,
    Sum,
    TensorSpec,
    Transpose,
    spec_of,
)

_LAZY = {"build_mapping", "match_layers"}

__all__ = [
    "TensorSpec", "spec_of", "Op", "Transpose", "Reshape", "Split", "Concat", "GateReorder", "Cast",
    "Sum", "AppendZeros", "Repeat", "Mean", "Fill", "Discard", "AppendFill", "DropLast", "Subtract", "Rename", "Convert", "Drop",
    "Entry", "Plan", "Mapping",
    "KerasWeight", "KerasLayer", "LayerKind", "LAYER_KINDS", "LAYER_CONVERTERS", "register_layer",
    "unregister_layer", "layer_kind", "layer_rules", "conv_kernel_axes",
    "flatten_kernel_ops", "find_flatten_dense", "describe_keras_model", "describe_keras_layer",
    "build_mapping", "match_layers",
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        from . import match

        return getattr(match, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
