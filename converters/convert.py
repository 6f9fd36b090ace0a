"""Convert a Keras 3 training checkpoint (TF TensorBundle) to PyTorch and back: weights and
optimizer state, without TensorFlow.

This module holds the pipelines; the pieces are in :mod:`ckptfmt.converters.keras`. A
reader turns a checkpoint into a :class:`KerasCheckpoint` (the TF reader,
:func:`read_keras_checkpoint`, resolves the object graph, groups the variables by the layer
object that owns them and infers each layer's kind from its attribute names and shapes);
:func:`keras_to_torch` and :func:`torch_to_keras` take that model, never a path. The
planner then either

* matches the layers with the modules of a torch model by type and shape
  (``model_factory``; :func:`ckptfmt.converters.mapping.build_mapping`), or
* uses a mapping file (``mapping``; :class:`ckptfmt.converters.mapping.Mapping`), or
* without either, a built-in preset: ``{layer name}.weight``... (:func:`preset_mapping`).

Source keys of a plan are the Keras variable paths TensorFlow recorded (``conv/kernel``,
``sequential/lstm/lstm_cell/kernel``); a checkpoint whose recorded names are not unique
uses object paths (``model/_operations/1/_kernel``) instead. Optimizer slots are found
through the object graph (Keras 3 stores them by position, ``optimizer/_variables/N``),
never by list position alone, and go through their variable's plan entry
(:mod:`ckptfmt.converters.optim`).

The way back (:func:`torch_to_tf`) needs a *template*: a checkpoint of the target Keras
model and optimizer (``tf.train.Checkpoint(model=m, optimizer=o).write(...)`` after one
build), which supplies the object graph, the keys, the shapes and the dtypes; the values
come from the torch checkpoint through the inverse plan (:func:`torch_to_keras`, in
:mod:`ckptfmt.converters.keras.torch2keras`). :func:`keras_to_keras` (TF checkpoints and
Keras's own files, without torch) is :mod:`ckptfmt.converters.keras.keras2keras`; both are
importable from here.

Example:
    >>> report = tf_to_torch("runs/ckpt-3", "resumed.pt", model_factory="mymodels:make")  # doctest: +SKIP
    >>> print(report.table())  # doctest: +SKIP
"""

from __future__ import annotations

__all__ = [
    "ConversionReport",
    "KerasCheckpoint",
    "describe_checkpoint_layers",
    "read_keras_checkpoint",
    "preset_mapping",
    "module_mapping",
    "PRESETS",
    "load_factory",
    "tf_to_torch",
    "torch_to_tf",
    "keras_to_torch",
    "torch_to_keras",
    "keras_to_keras",
    "diff_converted",
]

import dataclasses
import os
from collections.abc import Callable
from collections.abc import Mapping as AbcMapping
from typing import Any

import numpy as np

from ckptfmt.errors import ConversionError, UnmappedKeyError

from .keras import outputs
from .keras.checkpoint import KerasCheckpoint
from .keras.diff import diff_converted
from .keras.keras2keras import keras_to_keras
from .keras.kerasfile import check_config_mismatches, file_optimizer_config, open_keras_checkpoint
from .keras.optimizer import keras_optimizer_settings, optimizer_keys
from .keras.planner import (
    PRESETS,
    as_mapping,
    check_preset,
    load_factory,
    make_keras_model,
    make_model,
    module_mapping,
    plan_conversion,
    preset_mapping,
)
from .keras.report import ConversionReport
from .keras.tfcheckpoint import describe_checkpoint_layers, read_keras_checkpoint
from .keras.torch2keras import torch_to_keras
from .keras.torch_state import read_torch_side
from .mapping.rules import Mapping, Plan
from .optim.convert import OptimizerConversion, keras_to_torch_optimizer
from .optional import require

# --------------------------------------------------------------------------------------------
# TF -> torch


def tf_to_torch(
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str],
    *,
    model_factory: str | Callable[[], Any] | None = None,
    mapping: Mapping | str | os.PathLike[str] | None = None,
    optimizer: bool = True,
    dry_run: bool = False,
    exact_optimizer: bool = False,
    optimizer_config: AbcMapping[str, Any] | None = None,
    strict: bool = True,
    overwrite: bool = False,
    preset: str = "keras",
    pairs: AbcMapping[str, str] | None = None,
    progress: bool | None = None,
    keras_model: Any = None,
    check: bool = False,
    check_tolerance: float = 1e-5,
    fold_conv_bias: bool = False,
    root: str | None = None,
) -> ConversionReport:
    """Convert a Keras 3 TF checkpoint (model and optimizer) to a torch checkpoint.

    Args:
        src: the TF checkpoint (prefix ``dir/ckpt-3`` or a directory with a ``checkpoint`` file).
        dst: chosen by its name: ``.pt``/``.pth``/``.bin`` is a ``torch.save`` file (``{"model":
            state_dict, "optimizer": state_dict, "optimizer_class",
            "optimizer_hyperparameters", "conversion_report"}``); ``.safetensors`` holds the
            weights only and is written streaming (about one tensor in memory); any other
            name is a ckptfmt checkpoint directory (new, empty, or an existing checkpoint
            with ``overwrite``) in the :mod:`ckptfmt.torch` layout, weights streamed:
            ``ckptfmt.load(dst)["model"]`` is the state_dict and
            ``ckptfmt.torch.restore(dst, model=m, optimizer=o)`` loads model and optimizer
            (``extra`` holds ``optimizer_class``, ``optimizer_hyperparameters`` and
            ``conversion_report``).
        model_factory: ``"pkg.module:factory"``, ``"file.py:factory"`` or a callable returning
            the torch model (or ``(model, example_input)``); layers are matched by type and shape.
        mapping: a :class:`Mapping` or mapping file; source keys are Keras variable paths.
        optimizer: convert the optimizer state too (needs ``model_factory`` for the
            parameter order).
        dry_run: plan and report only; nothing is read beyond shapes, nothing written.
        exact_optimizer: target ``KerasAdam``/``KerasSGD``/``KerasRMSprop`` (identical updates)
            instead of the stock torch optimizer (whose drift the report states).
        optimizer_config: Keras optimizer config overriding what the checkpoint lacks
            (``class_name``, ``beta_1``, ``epsilon``, ``momentum``, ``nesterov``...).
        strict: every source and target key must be mapped (errors list all of them).
        overwrite: replace ``dst``.
        preset: the naming used without ``model_factory`` or ``mapping``: ``"keras"`` (Keras 3
            and tf.keras 2 layers, kinds inferred from the weights) or ``"tf-module"`` (a plain
            ``tf.Module`` tree: object paths become torch keys, values unchanged).
        pairs: ``{Keras layer name: torch module path}`` fixed by hand, for layers the
            model-guided matching cannot tell apart (as listed in its error).
        progress: a progress bar over the bytes converted, on stderr (default: on a
            terminal, for conversions of 256 MiB or more).
        keras_model: the Keras model the checkpoint was saved from, or a factory for it
            (``"file.py:factory"``): its graph settles matches the torch model's dataflow
            cannot (same-shape layers on parallel branches), and ``check`` runs it.
        check: write the output under a staging name beside ``dst`` (``.NAME.check-PID.EXT``,
            never ``dst``), run the Keras model (weights read from ``src`` by variable path) and
            the torch model (loaded from the staged output) on the same inputs in eval mode,
            and one optimizer step on identical gradients
            (:func:`ckptfmt.converters.check.check_output`), and only on a pass rename it to
            ``dst``; ``report.check`` holds the figures. Needs ``model_factory`` and
            ``keras_model`` (and Keras); the Keras model is loaded and paired with the
            checkpoint before anything is written. A check that fails, cannot run or is
            interrupted removes the staged output and raises, ``dst`` left as it was (a previous
            file stays; :class:`ckptfmt.converters.check.CheckedOutput`). Refused: an
            object-store ``dst``, and ``overwrite`` of an existing ckptfmt checkpoint directory.
        check_tolerance: the largest output difference allowed, relative to the outputs'
            magnitude (at least 1).
        fold_conv_bias: a Keras convolution with a bias whose torch module has none is
            matched without it and its bias folded into the BatchNorm the module feeds
            (``running_mean - bias``; reported). Weights only: the bias's optimizer state has
            no torch parameter, so a conversion with the optimizer refuses it.
        root: the attribute of ``tf.train.Checkpoint(...)`` holding the model (``net`` for
            ``tf.train.Checkpoint(net=model)``); found from the object graph by default.

    Raises:
        ConversionError: unknown or ambiguous layers, unsupported optimizer options, no
            model or several in the checkpoint (without ``root``), nothing to convert.
        UnmappedKeyError: keys the mapping does not cover (all listed).
        CheckpointExistsError: ``dst`` exists (without ``overwrite``), or is a non-empty
            directory that is not a ckptfmt checkpoint.
        CheckFailedError: ``check`` found outputs (or weights after one optimizer step)
            further apart than the tolerance; the message gives every figure (``dst`` not written).
        ConversionError: ``check`` could not run (the reason, and ``dst`` not written, in the
            message), or ``check`` with a ``dst`` it cannot guard (see ``check``).

    Example:
        >>> r = tf_to_torch("fixtures/tf/keras3_conv_adam", "/tmp/x.pt", dry_run=True)
        >>> r.plan.entry_for("conv/kernel").targets
        ('conv.weight',)
    """
    src, dst = os.fspath(src), os.fspath(dst)
    if check and not dry_run:  # a DST the staged check cannot guard: refused before anything is read
        from .check import refuse_unstageable

        refuse_unstageable(dst, overwrite)
    mapping = as_mapping(mapping)
    model, example = make_model(model_factory)
    kmodel = make_keras_model(keras_model)
    if check and (model is None or kmodel is None or dry_run):
        raise ConversionError("check (--check) runs both models: it needs the torch model (--model), the Keras model "
                              "(--keras-model FILE.py:factory) and a written output (no --dry-run)")
    if not dry_run:  # an existing DST is refused before anything is read
        outputs.check_output(dst, outputs.output_kind(dst), overwrite, optimizer=False)
    with open_keras_checkpoint(src, root=root, infer_layers=(mapping is None or model is not None)
                               and check_preset(preset, model) == "keras", unknown="keep") as kc:
        guard = None
        if check:  # what the check needs, made ready before anything is written
            from .check import CheckedOutput

            guard = CheckedOutput(src, dst, kc, kmodel, model_factory, tolerance=check_tolerance, overwrite=overwrite)
        try:  # with check, written to the staged path beside dst (the report names dst)
            report = keras_to_torch(
                kc, dst, model=model, example=example, mapping=mapping, optimizer=optimizer,
                dry_run=dry_run, exact_optimizer=exact_optimizer, optimizer_config=file_optimizer_config(kc, optimizer_config),
                strict=strict, overwrite=overwrite, preset=preset, pairs=pairs, progress=progress, keras_model=kmodel,
                fold_conv_bias=fold_conv_bias, write_to=None if guard is None else guard.staged,
            )
        except BaseException:
            if guard is not None:  # a write stopped halfway: nothing staged left behind
                guard.discard()
            raise
        if guard is not None:  # commits the staged output on a pass; else removes it and raises (dst untouched)
            # keras_to_torch leaves the optimizer's settings in report.check for the step check
            report = dataclasses.replace(report, check=guard.run(report.plan, optimizer=report.check))
        elif report.check is not None:
            report = dataclasses.replace(report, check=None)
    return report


def keras_to_torch(
    kc: KerasCheckpoint,
    dst: str | os.PathLike[str],
    *,
    model: Any = None,
    example: Any = None,
    mapping: Mapping | str | os.PathLike[str] | None = None,
    optimizer: bool = True,
    dry_run: bool = False,
    exact_optimizer: bool = False,
    optimizer_config: AbcMapping[str, Any] | None = None,
    strict: bool = True,
    overwrite: bool = False,
    preset: str = "keras",
    pairs: AbcMapping[str, str] | None = None,
    progress: bool | None = None,
    keras_model: Any = None,
    fold_conv_bias: bool = False,
    write_to: str | None = None,
) -> ConversionReport:
    """The tf2torch pipeline on a :class:`KerasCheckpoint` from any reader: plan, optimizer, write.

    Args:
        kc: the checkpoint (its reader stays open until this returns).
        dst: as for :func:`tf_to_torch`.
        model / example: the torch model and an example input (see :func:`load_factory`), or None.
        mapping, optimizer, dry_run, exact_optimizer, optimizer_config, strict, overwrite,
            preset, pairs, progress, keras_model, fold_conv_bias: as for :func:`tf_to_torch`
            (``keras_model`` a Keras model object).
        write_to: where to write instead of ``dst`` (a staging path of the same kind, as
            ``check`` uses); the report, also the one stored in the output, names ``dst``.

    Raises:
        As :func:`tf_to_torch`.

    Example:
        >>> with TFCheckpointReader("fixtures/tf/keras3_conv_adam") as r:  # doctest: +SKIP
        ...     report = keras_to_torch(read_keras_checkpoint(r), "x.pt", dry_run=True)
    """
    dst = os.fspath(dst)
    plan, notes = plan_conversion(kc, model, example, as_mapping(mapping), strict, preset=preset, pairs=pairs,
                                  keras_model=keras_model, fold_conv_bias=fold_conv_bias)
    _refuse_unwritable_plan(kc, plan, notes, with_optimizer=optimizer and kc.has_optimizer and not dry_run)
    conv, opt_notes, state = _torch_optimizer(kc, plan, model, optimizer=optimizer, dry_run=dry_run, exact=exact_optimizer,
                                              optimizer_config=optimizer_config)
    used = set(kc.keys.values()) | (optimizer_keys(kc) if conv is not None else set())
    report = ConversionReport(
        "tf2torch", kc.path, dst, plan, {s: kc.keys[s] for e in plan.entries for s in e.sources},
        tuple(k for k in kc.stored_keys() if k not in used), conv.optimizer if conv else None,
        dict(conv.hyperparameters) if conv else {}, conv.report if conv else "", tuple(notes) + opt_notes, not dry_run,
        # what a check needs to make the same optimizer step in Keras (replaced by the check's result)
        {"class_name": state.class_name, "config": dict(state.config), "iterations": state.iterations,
         "torch_class": conv.optimizer, "torch_hyperparameters": dict(conv.hyperparameters)} if conv and state else None,
    )
    if not dry_run:
        _write_torch_side(write_to or dst, kc, plan, model, conv, report, overwrite, progress)
    return report


def _refuse_unwritable_plan(kc: KerasCheckpoint, plan: Plan, notes: list[str], *, with_optimizer: bool) -> None:
    """Refuse a plan that writes nothing, or folds conv biases whose optimizer state would be converted;
    and a Keras file whose config disagrees with the notes."""
    folds = [e for e in plan.entries if any(type(op).__name__ == "Subtract" for op in e.ops)]
    if folds and with_optimizer:
        raise ConversionError(f"{len(folds)} conv bias(es) are folded into BatchNorm running means ({folds[0].sources[1]}...): "
                              "their optimizer state has no torch parameter to go to; convert the weights only (--no-optimizer)")
    check_config_mismatches(kc, notes)
    if not plan.entries:  # never "wrote ... (0 tensors)"
        raise ConversionError(
            f"{kc.path}: nothing to convert: no variable of {kc.root!r} maps to a torch tensor "
            f"({len(kc.keys)} model variables read); check --root, --map or --preset"
        )


def _torch_optimizer(kc: KerasCheckpoint, plan: Plan, model: Any, *, optimizer: bool, dry_run: bool, exact: bool,
                     optimizer_config: AbcMapping[str, Any] | None) -> tuple[OptimizerConversion | None, tuple[str, ...], Any]:
    """The torch optimizer state of a Keras checkpoint (None when not asked for or not held), with notes
    and the Keras optimizer's settings."""
    if not (optimizer and kc.has_optimizer):
        return None, (), None
    if model is None and dry_run:
        return None, ("optimizer state not planned: it needs --model for the torch parameter order",), None
    if kc.problems:
        raise UnmappedKeyError("cannot place the optimizer state:\n  " + "\n  ".join(kc.problems))
    if model is None:
        raise ConversionError("converting the optimizer state needs the torch model for its parameter order: "
                              "pass --model pkg.module:factory, or --no-optimizer for weights only")
    state, notes = keras_optimizer_settings(kc, optimizer_config, shapes_only=dry_run)
    names = [n for n, _ in model.named_parameters()]
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
    return keras_to_torch_optimizer(state, plan, names, exact=exact, frozen=frozen), notes, state


def _write_torch_side(dst: str, kc: KerasCheckpoint, plan: Plan, model: Any, conv: OptimizerConversion | None,
                      report: ConversionReport, overwrite: bool, progress: bool | None) -> None:
    kind = outputs.output_kind(dst)
    outputs.check_output(dst, kind, overwrite, optimizer=conv is not None)
    if kind == "torch":
        require("torch", "tf2torch/torch2tf conversion")  # before anything is read

    def read(source_key: str) -> np.ndarray:
        return kc.get(kc.keys[source_key])

    if kind == "safetensors":
        outputs.write_safetensors_stream(dst, plan, read, metadata=outputs.SAFETENSORS_METADATA, progress=progress)
    elif kind == "ckptfmt":
        outputs.write_ckptfmt(dst, plan, read, model, conv, report.table(), report.source, overwrite, progress)
    else:
        outputs.write_torch_checkpoint(dst, plan, read, model, conv, report.table(), progress)


# --------------------------------------------------------------------------------------------
# torch -> TF


def torch_to_tf(
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str],
    *,
    template: str | os.PathLike[str],
    model_factory: str | Callable[[], Any] | None = None,
    mapping: Mapping | str | os.PathLike[str] | None = None,
    optimizer: bool = True,
    dry_run: bool = False,
    optimizer_class: str | None = None,
    iterations: int | None = None,
    overwrite: bool = False,
    preset: str = "keras",
    pairs: AbcMapping[str, str] | None = None,
    keras_model: Any = None,
) -> ConversionReport:
    """Convert a torch checkpoint (model and optimizer) to a Keras 3 TF checkpoint.

    Args:
        src: a ``.pt``/``.pth``/``.bin`` file holding ``{"model": state_dict, "optimizer":
            state_dict, ...}`` (as written by :func:`tf_to_torch`) or a bare state_dict,
            loaded with ``weights_only``; a ``.safetensors`` file (weights only); or a
            ckptfmt checkpoint directory (as :func:`tf_to_torch` or :func:`ckptfmt.torch.save`
            write it, or a bare state_dict saved with :func:`ckptfmt.save`). Only a torch
            file needs torch installed (and ``model_factory``, which builds a torch model).
        dst: the TF checkpoint prefix to write (``out/ckpt-1``; the ``checkpoint`` state file
            is updated so ``tf.train.latest_checkpoint(out)`` finds it).
        template: a TF checkpoint of the target Keras model (and optimizer, to carry its
            state); its object graph, keys, shapes and dtypes are reused.
        model_factory / mapping: as for :func:`tf_to_torch` (the same Keras -> torch plan is
            inverted).
        optimizer: convert the optimizer state (the template must hold the optimizer's slots).
        optimizer_class: the torch optimizer class when ``src`` does not say
            (``"SGD"``, ``"Adam"``, ``"KerasAdam"``...).
        iterations: the Keras iteration count when torch keeps none (stock SGD).
        preset / pairs / keras_model: as for :func:`tf_to_torch`.

    Raises:
        ConversionError / UnmappedKeyError: as for :func:`tf_to_torch`; also template keys the
            torch checkpoint cannot fill (all listed), or a ``src`` of another kind.
        CheckpointNotFoundError / FormatError: nothing at ``src``, or a damaged file (named).

    Example:
        >>> torch_to_tf("run.pt", "tf/ckpt-1", template="tf_template/ckpt-1",
        ...             model_factory="models.py:make")  # doctest: +SKIP
    """
    src, dst = os.fspath(src), os.fspath(dst)
    mapping = as_mapping(mapping)
    model, example = make_model(model_factory)
    ckpt = read_torch_side(src)  # numpy only; our errors name the file
    with open_keras_checkpoint(template, infer_layers=(mapping is None or model is not None)
                               and check_preset(preset, model) == "keras", unknown="keep") as kc:
        return torch_to_keras(
            ckpt, kc, dst, source=src, model=model, example=example,
            mapping=mapping, optimizer=optimizer, dry_run=dry_run, optimizer_class=optimizer_class,
            iterations=iterations, overwrite=overwrite, preset=preset, pairs=pairs, keras_model=make_keras_model(keras_model),
        )
