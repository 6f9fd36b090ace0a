"""torch -> Keras: a torch-side checkpoint written in the layout of a template Keras checkpoint.

The template (a TF checkpoint, or a ``.keras`` / ``.weights.h5`` / tf.keras ``.h5`` file of
the target model and optimizer) supplies the keys, shapes, dtypes and object graph; the
values come from the torch checkpoint through the inverse of the Keras -> torch plan, and
the optimizer state through :func:`ckptfmt.converters.keras.optimizer.torch_optimizer_for_template`.
Template keys nothing fills are copied from the template and reported.

Example:
    >>> with TFCheckpointReader("tf_template/ckpt-1") as r:  # doctest: +SKIP
    ...     torch_to_keras(read_torch_side("run.pt"), read_keras_checkpoint(r), "tf/ckpt-1", model=m)
"""

from __future__ import annotations

__all__ = ["torch_to_keras"]

import os
from collections.abc import Mapping as AbcMapping
from typing import Any

import numpy as np

from ckptfmt.errors import ConversionError, UnmappedKeyError

from ..files import check_destination
from ..mapping.rules import Mapping, Plan
from ..optim.convert import KerasOptimizerState
from .checkpoint import KerasCheckpoint
from .kerasfile import KerasFileCheckpoint, write_keras_like_template
from .optimizer import torch_optimizer_for_template
from .planner import as_mapping, plan_conversion
from .report import ConversionReport
from .tfcheckpoint import write_like_template


def torch_to_keras(ckpt: AbcMapping[str, Any], template: KerasCheckpoint, dst: str | os.PathLike[str], *,
                   source: str = "the torch checkpoint", model: Any = None, example: Any = None,
                   mapping: Mapping | str | os.PathLike[str] | None = None, optimizer: bool = True, dry_run: bool = False,
                   optimizer_class: str | None = None, iterations: int | None = None, overwrite: bool = False,
                   preset: str = "keras", pairs: AbcMapping[str, str] | None = None, keras_model: Any = None) -> ConversionReport:
    """The torch2tf pipeline: a torch-side checkpoint into the layout of a template :class:`KerasCheckpoint`.

    Args:
        ckpt: ``{"model": {name: array}, "optimizer": state_dict or None, ...}`` as
            :func:`ckptfmt.converters.keras.torch_state.read_torch_side` reads it.
        template: the target's checkpoint (its reader stays open until this returns).
        dst: the TF checkpoint prefix to write.
        source: the torch side's name in messages and the report.
        model / example: the torch model and an example input, or None.
        mapping, optimizer, dry_run, optimizer_class, iterations, overwrite, preset, pairs:
            as for :func:`ckptfmt.converters.convert.torch_to_tf`.

    Raises:
        As :func:`ckptfmt.converters.convert.torch_to_tf`.

    Example:
        >>> with TFCheckpointReader("tf_template/ckpt-1") as r:  # doctest: +SKIP
        ...     torch_to_keras(read_torch_side("run.pt"), read_keras_checkpoint(r), "tf/ckpt-1", model=m)
    """
    kc, dst = template, os.fspath(dst)
    weights = ckpt["model"]
    plan, notes = plan_conversion(kc, model, example, as_mapping(mapping), True, {k: tuple(v.shape) for k, v in weights.items()},
                                  preset=preset, pairs=pairs, keras_model=keras_model)
    back = plan.inverse()
    unused = tuple(k for k in weights if not any(k in e.sources for e in back.entries))
    ks, report_text = _keras_optimizer(ckpt, kc, plan, model, source=source, optimizer=optimizer,
                                       optimizer_class=optimizer_class, iterations=iterations)
    out_keys = _template_keys(kc, ks is not None)
    leftover = [k for k in kc.stored_keys() if k not in out_keys]
    report = ConversionReport(
        "torch2tf", source, dst, plan, dict(kc.keys), unused, ks.class_name if ks else None, dict(ks.config) if ks else {},
        report_text, tuple(notes) + tuple(f"{k}: copied from the template" for k in leftover), not dry_run,
    )
    if dry_run:
        return report
    check_destination(dst, "tf", overwrite)
    os.makedirs(os.path.dirname(os.path.abspath(dst)), exist_ok=True)
    if isinstance(kc, KerasFileCheckpoint):  # a .keras / .weights.h5 / .h5 template: the same kind of file
        write_keras_like_template(dst, kc, _KerasValues(kc, back, weights, ks, out_keys), out_keys, overwrite=overwrite)
    else:
        write_like_template(dst, kc, _KerasValues(kc, back, weights, ks, out_keys), out_keys, leftover)
    return report


def _keras_optimizer(ckpt: AbcMapping[str, Any], kc: KerasCheckpoint, plan: Plan, model: Any, *, source: str, optimizer: bool,
                     optimizer_class: str | None, iterations: int | None) -> tuple[KerasOptimizerState | None, str]:
    """The Keras optimizer state of a torch-side checkpoint (None when not asked for), with its report."""
    if not optimizer:
        return None, ""
    if ckpt.get("optimizer") is None:
        if kc.has_optimizer:
            raise ConversionError(f"{source} holds no optimizer state but the template {kc.path} does: pass --no-optimizer "
                                  "to copy the template's optimizer variables unchanged")
        return None, ""
    if kc.problems:
        raise UnmappedKeyError("cannot place the optimizer state in the template:\n  " + "\n  ".join(kc.problems))
    if model is None:
        raise ConversionError("converting the optimizer state needs the torch model for its parameter order: "
                              "pass --model pkg.module:factory, or --no-optimizer for weights only")
    if not kc.has_optimizer:
        raise ConversionError(f"the template {kc.path} holds no optimizer state to fill: save it with "
                              "tf.train.Checkpoint(model=..., optimizer=...) after the optimizer is built, or pass --no-optimizer")
    return torch_optimizer_for_template(source, ckpt, kc, plan, model, optimizer_class, iterations)


def _template_keys(kc: KerasCheckpoint, with_optimizer: bool) -> dict[str, tuple[str, Any]]:
    """``{template checkpoint key: (what fills it, its reference)}``, in the order they are written."""
    out: dict[str, tuple[str, Any]] = {ckey: ("weight", skey) for skey, ckey in kc.keys.items()}
    if with_optimizer:
        for v, d in kc.slots.items():
            for s, ckey in d.items():
                out[ckey] = ("slot", (v, s))
        for k in (kc.iterations_key, *kc.also_iterations):
            if k:
                out[k] = ("iterations", None)
        for k in (kc.learning_rate_key, *kc.also_learning_rate):
            if k:
                out[k] = ("learning_rate", None)
    return out


class _KerasValues:
    """The value of each template key; each plan entry runs once and is dropped once written."""

    def __init__(self, kc: KerasCheckpoint, back: Plan, weights: AbcMapping[str, np.ndarray],
                 ks: KerasOptimizerState | None, out_keys: dict[str, tuple[str, Any]]) -> None:
        self._weights, self._ks, self._out_keys = weights, ks, out_keys
        self._made_by = {t: (e, i) for e in back.entries for i, t in enumerate(e.targets)}
        self._pending: dict[int, list[Any]] = {}  # entry -> [its outputs, targets not yet written]

    def _keras_value(self, source_key: str) -> np.ndarray:
        entry, i = self._made_by[source_key]
        if id(entry) not in self._pending:
            self._pending[id(entry)] = [entry.run(tuple(self._weights[s] for s in entry.sources)), len(entry.targets)]
        slot = self._pending[id(entry)]
        slot[1] -= 1
        if not slot[1]:
            del self._pending[id(entry)]
        return slot[0][i]

    def __call__(self, ckey: str) -> np.ndarray:
        kind, ref = self._out_keys[ckey]
        if kind == "weight":
            return self._keras_value(ref)
        assert self._ks is not None
        if kind == "slot":
            return self._ks.slots[ref[0]][ref[1]]
        if kind == "iterations":
            return np.array(self._ks.iterations)
        return np.array(self._ks.config["learning_rate"])

