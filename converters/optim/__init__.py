"""Optimizer state between Keras 3 and torch, and torch optimizers with Keras's exact updates.

* :mod:`.convert` (numpy only): :class:`KerasOptimizerState`, :func:`keras_to_torch_optimizer`,
  :func:`torch_to_keras_optimizer`; every slot goes through its variable's weight-plan entry.
* :mod:`.keras_exact` (imports torch when first used): ``KerasAdam``, ``KerasSGD``,
  ``KerasRMSprop``.

Example:
    >>> from ckptfmt.converters.optim import KerasOptimizerState, keras_to_torch_optimizer
"""

from __future__ import annotations

from typing import Any

from .convert import (
    KERAS_SLOTS,
    KerasOptimizerState,
    OptimizerConversion,
    describe_keras_optimizer,
    keras_optimizer_state,
    keras_to_torch_optimizer,
    torch_to_keras_optimizer,
)

_LAZY = {"KerasAdam", "KerasSGD", "KerasRMSprop"}

__all__ = [
    "KERAS_SLOTS",
    "KerasOptimizerState",
    "OptimizerConversion",
    "describe_keras_optimizer",
    "keras_optimizer_state",
    "keras_to_torch_optimizer",
    "torch_to_keras_optimizer",
    "KerasAdam",
    "KerasSGD",
    "KerasRMSprop",
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        from . import keras_exact

        return getattr(keras_exact, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
