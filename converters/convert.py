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
come from the torch checkpoint through the inverse plan.

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

from ckptfmt.errors import CkptFmtError, ConversionError, UnmappedKeyError

from .files import check_destination
from .keras import outputs
from .keras.checkpoint import KerasCheckpoint
from .keras.diff import diff_converted
from .keras.kerasfile import (
    KerasFileCheckpoint,
    check_config_mismatches,
    file_optimizer_config,
    open_keras_checkpoint,
    write_keras_like_template,
)
from .keras.optimizer import keras_optimizer_settings, optimizer_keys, torch_optimizer_for_template
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
from .keras.tfcheckpoint import describe_checkpoint_layers, read_keras_checkpoint, write_like_template
from .keras.torch_state import read_torch_side
from .mapping.rules import Mapping, Plan
from .optim.convert import KerasOptimizerState, OptimizerConversion, keras_to_torch_optimizer
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
        check: after writing, run the Keras model (weights read from ``src`` by variable
            path) and the torch model (loaded from ``dst``) on the same inputs in eval mode,
            and one optimizer step on identical gradients
            (:func:`ckptfmt.converters.check.check_output`); ``report.check`` holds the
            figures. Needs ``model_factory`` and ``keras_model``.
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
            further apart than the tolerance; the message gives every figure.

    Example:
        >>> r = tf_to_torch("fixtures/tf/keras3_conv_adam", "/tmp/x.pt", dry_run=True)
        >>> r.plan.entry_for("conv/kernel").targets
        ('conv.weight',)
    """
    src, dst = os.fspath(src), os.fspath(dst)
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
        report = keras_to_torch(
            kc, dst, model=model, example=example, mapping=mapping, optimizer=optimizer,
            dry_run=dry_run, exact_optimizer=exact_optimizer, optimizer_config=file_optimizer_config(kc, optimizer_config),
            strict=strict, overwrite=overwrite, preset=preset, pairs=pairs, progress=progress, keras_model=kmodel,
            fold_conv_bias=fold_conv_bias,
        )
        if check:
            from .check import check_output

            try:
                result = check_output(src, dst, kc, report.plan, kmodel, model_factory, tolerance=check_tolerance,
                                      optimizer=report.check)  # keras_to_torch leaves the optimizer's settings there
            except CkptFmtError as e:
                # the output exists: the error says so, whether the check failed or could not run
                if e.args and isinstance(e.args[0], str) and str(dst) not in e.args[0]:
                    e.args = (f"{e.args[0]} ({dst} was written but is not checked)", *e.args[1:])
                raise
            report = dataclasses.replace(report, check=result)
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
) -> ConversionReport:
    """The tf2torch pipeline on a :class:`KerasCheckpoint` from any reader: plan, optimizer, write.

    Args:
        kc: the checkpoint (its reader stays open until this returns).
        dst: as for :func:`tf_to_torch`.
        model / example: the torch model and an example input (see :func:`load_factory`), or None.
        mapping, optimizer, dry_run, exact_optimizer, optimizer_config, strict, overwrite,
            preset, pairs, progress, keras_model, fold_conv_bias: as for :func:`tf_to_torch`
            (``keras_model`` a Keras model object).

    Raises:
        As :func:`tf_to_torch`.

    Example:
        >>> with TFCheckpointReader("fixtures/tf/keras3_conv_adam") as r:  # doctest: +SKIP
        ...     report = keras_to_torch(read_keras_checkpoint(r), "x.pt", dry_run=True)
    """
    dst = os.fspath(dst)
    plan, notes = plan_conversion(kc, model, example, as_mapping(mapping), strict, preset=preset, pairs=pairs,
                                  keras_model=keras_model, fold_conv_bias=fold_conv_bias)
    folds = [e for e in plan.entries if any(type(op).__name__ == "Subtract" for op in e.ops)]
    if folds and optimizer and kc.has_optimizer and not dry_run:
        raise ConversionError(f"{len(folds)} conv bias(es) are folded into BatchNorm running means ({folds[0].sources[1]}...): "
                              "their optimizer state has no torch parameter to go to; convert the weights only (--no-optimizer)")
    check_config_mismatches(kc, notes)
    if not plan.entries:  # never "wrote ... (0 tensors)"
        raise ConversionError(
            f"{kc.path}: nothing to convert: no variable of {kc.root!r} maps to a torch tensor "
            f"({len(kc.keys)} model variables read); check --root, --map or --preset"
        )
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
        _write_torch_side(dst, kc, plan, model, conv, report, overwrite, progress)
    return report


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


def torch_to_keras(
    ckpt: AbcMapping[str, Any],
    template: KerasCheckpoint,
    dst: str | os.PathLike[str],
    *,
    source: str = "the torch checkpoint",
    model: Any = None,
    example: Any = None,
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
    """The torch2tf pipeline: a torch-side checkpoint into the layout of a template :class:`KerasCheckpoint`.

    Args:
        ckpt: ``{"model": {name: array}, "optimizer": state_dict or None, ...}`` as
            :func:`ckptfmt.converters.keras.torch_state.read_torch_side` reads it.
        template: the target's checkpoint (its reader stays open until this returns).
        dst: the TF checkpoint prefix to write.
        source: the torch side's name in messages and the report.
        model / example: the torch model and an example input, or None.
        mapping, optimizer, dry_run, optimizer_class, iterations, overwrite, preset, pairs:
            as for :func:`torch_to_tf`.

    Raises:
        As :func:`torch_to_tf`.

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


# --------------------------------------------------------------------------------------------
# Keras <-> Keras: TF checkpoints and Keras's own files, without torch


def keras_to_keras(
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str],
    *,
    template: str | os.PathLike[str],
    optimizer: bool = True,
    dry_run: bool = False,
    overwrite: bool = False,
) -> ConversionReport:
    """Move a Keras model's weights and optimizer state between a TF checkpoint and Keras's files.

    ``src`` and ``template`` are each a TF checkpoint, a ``.keras``, a Keras 3 ``.weights.h5``
    or a tf.keras ``.h5``; ``dst`` is written in the template's layout (its other datasets and,
    for a ``.keras``, its config copied). Variables are paired by their Keras path
    (``conv/kernel``), or else layer by layer in model order when both have the same layer
    classes and shapes; optimizer slots follow their variables, with iterations and the
    learning rate. Nothing is transformed: both sides are Keras layouts. TensorFlow and
    torch are not needed.

    Args:
        src: the checkpoint or file whose values are written.
        dst: the output (a TF prefix for a TF template, else a file like the template).
        template: the layout to write (e.g. ``model.save_weights("t.weights.h5")`` once).
        optimizer: carry the optimizer state (else the template's is copied unchanged).
        dry_run: report the pairing only.
        overwrite: replace ``dst``.

    Raises:
        ConversionError / UnmappedKeyError: variables or slots that do not pair (all listed),
            shapes that differ.

    Example:
        >>> r = keras_to_keras("fixtures/keras/k3_cnn_adam.weights.h5", "/tmp/x.keras",
        ...                    template="fixtures/keras/k3_cnn_adam.keras", dry_run=True)
        >>> r.plan.entry_for("conv/kernel").targets
        ('conv/kernel',)
    """
    from .keras.kerasfile import open_keras_checkpoint as _open
    from .mapping.rules import Rename

    src, dst = os.fspath(src), os.fspath(dst)
    with _open(src, infer_layers=False) as a, _open(template, infer_layers=False) as t:
        pairs = _pair_variables(a, t)
        plan = Mapping(tuple(Rename(s, d) for s, d in pairs.items())).plan(a.specs(), t.specs(), strict=True)
        values: dict[str, tuple[str, str]] = {t.keys[d]: ("src", a.keys[s]) for s, d in pairs.items()}
        notes: list[str] = []
        if optimizer and t.has_optimizer:
            if not a.has_optimizer:
                raise ConversionError(f"{src} holds no optimizer state but the template {template} does: pass --no-optimizer "
                                      "to keep the template's optimizer variables")
            for problems in (a.problems, t.problems):
                if problems:
                    raise UnmappedKeyError("cannot place the optimizer state:\n  " + "\n  ".join(problems))
            back = {d: s for s, d in pairs.items()}
            missing = []
            for d, slots in t.slots.items():
                for slot, ckey in slots.items():
                    have = a.slots.get(back.get(d, ""), {}).get(slot)
                    if have is None:
                        missing.append(f"template slot {slot!r} of {d}")
                    else:
                        values[ckey] = ("src", have)
            extra = [f"{s} slot {slot!r}" for s, d in pairs.items() for slot in a.slots.get(s, {})
                     if slot not in t.slots.get(d, {})]
            if missing or extra:
                raise UnmappedKeyError("the optimizer slots do not pair (is it the same optimizer class and options?):\n  "
                                       + "\n  ".join(missing + [f"{e}: not in the template" for e in extra]))
            if t.iterations_key:
                if not a.iterations_key:
                    raise ConversionError(f"{src} stores no iteration count for the template's {t.iterations_key}")
                values[t.iterations_key] = ("src", a.iterations_key)
                values.update({k: ("src", a.iterations_key) for k in t.also_iterations})
            if t.learning_rate_key:
                if a.learning_rate_key:
                    values[t.learning_rate_key] = ("src", a.learning_rate_key)
                else:
                    notes.append(f"{src} stores no learning rate: the template's is kept")
        elif a.has_optimizer and optimizer:
            notes.append(f"the template {template} holds no optimizer: {src}'s optimizer state is not written")
        leftover = [k for k in t.stored_keys() if k not in values]
        carried = optimizer and t.has_optimizer
        report = ConversionReport("keras2keras", src, dst, plan, dict(a.keys),
                                  tuple(k for k in a.stored_keys() if k not in {v for _, v in values.values()}),
                                  f"Keras optimizer {t.optimizer_name or ''}".rstrip() if carried else None, {}, "", tuple(notes) + tuple(f"{k}: copied from the template" for k in leftover[:20]),
                                  not dry_run)
        if dry_run:
            return report

        def value(ckey: str) -> np.ndarray:
            arr = a.get(values[ckey][1])
            if tuple(np.shape(arr)) != tuple(t.reader.shape(ckey)):
                raise ConversionError(f"{ckey}: {src} has shape {np.shape(arr)}, the template {t.reader.shape(ckey)}")
            return arr

        if isinstance(t, KerasFileCheckpoint):
            write_keras_like_template(dst, t, value, values, overwrite=overwrite)
        else:
            check_destination(dst, "tf", overwrite)
            os.makedirs(os.path.dirname(os.path.abspath(dst)), exist_ok=True)
            write_like_template(dst, t, value, values, leftover)
        return report


def _pair_variables(a: KerasCheckpoint, t: KerasCheckpoint) -> dict[str, str]:
    """``{source key of a: source key of t}``: by Keras path, else layer by layer in order.

    A side whose file does not record the layer order (a ``.weights.h5``) pairs layers by
    their shapes only, and layers sharing shapes are refused: never paired by a listing order.
    """
    if set(a.keys) == set(t.keys):
        return {k: k for k in a.keys}
    la = [l for l in a.layers if l.weights]
    lt = [l for l in t.layers if l.weights]
    sig = lambda l: [tuple(w.shape) for w in l.weights]  # noqa: E731
    unordered = [c.path for c in (a, t) if not getattr(c, "order_known", True)]
    if unordered and len(la) == len(lt):
        # a .weights.h5 lists its layers by name, not in the model's order: only shapes can pair them
        by_sig: dict[str, list[list[Any]]] = {}
        for side, layers in ((0, la), (1, lt)):
            for layer in layers:
                by_sig.setdefault(repr(sig(layer)), [[], []])[side].append(layer)
        if all(len(x) == len(y) for x, y in by_sig.values()):
            tied = [(k, x, y) for k, (x, y) in by_sig.items() if len(x) > 1]
            if tied:
                raise ConversionError(
                    f"{', '.join(unordered)} does not record the order of the model's layers (a .weights.h5 lists them "
                    "by name), and layers of the same shapes cannot be told apart: "
                    + "; ".join(f"{', '.join(l.name for l in x)} vs {', '.join(l.name for l in y)} ({k})" for k, x, y in tied)
                    + ". Use the model's .keras file (its config records the order) or a TF checkpoint on that side")
            return {wa.key: wt.key for x, y in by_sig.values() for wa, wt in zip(x[0].weights, y[0].weights)}
    elif len(la) == len(lt) and all(sig(x) == sig(y) for x, y in zip(la, lt)):
        return {wa.key: wt.key for x, y in zip(la, lt) for wa, wt in zip(x.weights, y.weights)}
    only_a = sorted(set(a.keys) - set(t.keys))
    only_t = sorted(set(t.keys) - set(a.keys))
    raise UnmappedKeyError(
        "the variables do not pair by name, nor layer by layer in order (different layers or shapes):\n"
        + "".join(f"  only in the source: {k} {a.shapes[k]}\n" for k in only_a[:20])
        + "".join(f"  only in the template: {k} {t.shapes[k]}\n" for k in only_t[:20])
        + "save the template from the same model (model.save_weights / tf.train.Checkpoint after building it)")
