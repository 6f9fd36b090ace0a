"""Keras training checkpoints to torch and back, one job per module.

* :mod:`.checkpoint`: :class:`KerasCheckpoint`, the model readers produce and everything
  else works on.
* :mod:`.tfcheckpoint`: the reader of TF checkpoints (object graph -> layers, slots), and the
  writer of a TF checkpoint in a template's layout.
* :mod:`.infer`: a layer's kind from its weights.
* :mod:`.planner`: the Keras -> torch plan (torch model, mapping file or preset).
* :mod:`.optimizer`: optimizer settings a checkpoint stores, implies or leaves to defaults.
* :mod:`.report`: :class:`ConversionReport`.
* :mod:`.outputs` / :mod:`.torch_state`: where tf2torch writes, what torch2tf reads.
* :mod:`.diff`: a TF checkpoint, converted on the fly, compared with torch weights.
* :mod:`.torch2keras` / :mod:`.keras2keras`: writing into a Keras template's layout, from a
  torch checkpoint (the torch2tf pipeline) or from another Keras checkpoint or file.

The pipelines that combine them are :mod:`ckptfmt.converters.convert`.

Example:
    >>> from ckptfmt.converters.keras import KerasCheckpoint, read_keras_checkpoint
"""

from __future__ import annotations

from .checkpoint import KerasCheckpoint, TensorReader
from .diff import diff_converted, diff_keras
from .planner import PRESETS, load_factory, module_mapping, plan_conversion, preset_mapping
from .report import ConversionReport
from .tfcheckpoint import describe_checkpoint_layers, read_keras_checkpoint, write_like_template
from .torch_state import read_torch_side

__all__ = [
    "KerasCheckpoint",
    "TensorReader",
    "read_keras_checkpoint",
    "describe_checkpoint_layers",
    "write_like_template",
    "read_torch_side",
    "PRESETS",
    "preset_mapping",
    "module_mapping",
    "plan_conversion",
    "load_factory",
    "ConversionReport",
    "diff_converted",
    "diff_keras",
]
