"""The Keras checkpoint model: what a reader found in a Keras training checkpoint.

A *reader* (the TF checkpoint reader, :func:`ckptfmt.converters.keras.tfcheckpoint.read_keras_checkpoint`,
today) turns a file into a :class:`KerasCheckpoint`: the model's variables under their
Keras names, the layers they belong to (kinds inferred when asked), the optimizer's slots
and scalars, and a handle that reads values on demand. The planner, the optimizer settings,
the pipelines and the diff work on this model only, never on a file format.

Example:
    >>> from ckptfmt.converters.keras import read_keras_checkpoint
    >>> from ckptfmt.converters.tf import TFCheckpointReader
    >>> with TFCheckpointReader("fixtures/tf/keras3_conv_adam") as r:
    ...     kc = read_keras_checkpoint(r)
    ...     kc.specs()["conv/kernel"].shape, kc.has_optimizer
    ((3, 3, 3, 4), True)
"""

from __future__ import annotations

__all__ = ["KerasCheckpoint", "TensorReader"]

from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from ..mapping.layers import KerasLayer
from ..mapping.rules import TensorSpec


class TensorReader(Protocol):
    """What a :class:`KerasCheckpoint` reads values through (a TFCheckpointReader is one)."""

    def keys(self) -> list[str]: ...

    def get(self, key: str) -> np.ndarray: ...

    def shape(self, key: str) -> tuple[int, ...]: ...

    def dtype(self, key: str) -> np.dtype: ...


@dataclass(frozen=True, slots=True)
class KerasCheckpoint:
    """What a Keras training checkpoint holds, resolved by its reader.

    Attributes:
        keys: ``{source key: checkpoint key}`` of the model's variables.
        shapes: ``{source key: shape}``.
        dtypes: ``{source key: numpy dtype}``.
        layers: the layers in model order, kinds inferred (``"?"`` when not asked for).
        slots: ``{source key: {slot name: checkpoint key}}``.
        iterations_key / learning_rate_key: the optimizer's scalars (None without optimizer).
        optimizer_name: the name recorded for the optimizer (``"adam"``), if any.
        other: checkpoint keys that are neither model nor optimizer (``save_counter``).
        graph: the TF object graph (None for readers of other files).
        problems: optimizer variables that could not be placed (each a sentence).
        hyperparameter_keys: ``{name: checkpoint key}`` of hyperparameters stored as variables
            (tf.keras 2 legacy optimizers: ``beta_1``, ``momentum``, ``decay``...).
        also_iterations / also_learning_rate: the wrapper's own copies when a
            LossScaleOptimizer (mixed precision) wraps the optimizer (whose keys are above).
        loss_scale_keys: its ``dynamic_scale`` and ``step_counter``.
        path: the file it was read from (named in messages).
        reader: reads a checkpoint key's value, shape and dtype (kept open by the caller).
        internal_keys: checkpoint keys of the file's own bookkeeping (the object graph).
    """

    keys: dict[str, str]
    shapes: dict[str, tuple[int, ...]]
    dtypes: dict[str, np.dtype]
    layers: tuple[KerasLayer, ...]
    slots: dict[str, dict[str, str]]
    iterations_key: str | None
    learning_rate_key: str | None
    optimizer_name: str | None
    other: tuple[str, ...]
    graph: Any = field(default=None, repr=False)
    problems: tuple[str, ...] = ()
    hyperparameter_keys: dict[str, str] = field(default_factory=dict)
    also_iterations: tuple[str, ...] = ()
    also_learning_rate: tuple[str, ...] = ()
    loss_scale_keys: dict[str, str] = field(default_factory=dict)
    path: str = ""
    reader: Any = field(default=None, repr=False, compare=False)
    internal_keys: tuple[str, ...] = ()

    def specs(self) -> dict[str, TensorSpec]:
        """``{source key: TensorSpec}`` of the model's variables."""
        return {k: TensorSpec(s, str(self.dtypes[k])) for k, s in self.shapes.items()}

    @property
    def has_optimizer(self) -> bool:
        """True when the checkpoint holds optimizer slots or an iteration count."""
        return bool(self.slots) or self.iterations_key is not None

    def get(self, checkpoint_key: str) -> np.ndarray:
        """The value stored under a checkpoint key."""
        return self.reader.get(checkpoint_key)

    def scalar(self, checkpoint_key: str) -> float:
        """A stored scalar as a float."""
        return float(np.asarray(self.reader.get(checkpoint_key)))

    def stored_keys(self) -> list[str]:
        """Every checkpoint key but the file's own bookkeeping, in the file's order."""
        return [k for k in self.reader.keys() if k not in self.internal_keys]
