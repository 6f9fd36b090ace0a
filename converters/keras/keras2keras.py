"""Keras -> Keras: a model's weights and optimizer state between a TF checkpoint and Keras's files.

Both sides are Keras layouts, so nothing is transformed: variables are paired
(:func:`pair_variables`), optimizer slots follow their variables with the iteration count and
the learning rate, and the output is written in the template's layout (a TF checkpoint
prefix, or a Keras file of the template's kind). Neither TensorFlow nor torch is needed.

The steps of :func:`keras_to_keras`, each its own function: pair the variables, pair the
optimizer state, report, write.

Example:
    >>> r = keras_to_keras("fixtures/keras/k3_cnn_adam.weights.h5", "/tmp/x.keras",
    ...                    template="fixtures/keras/k3_cnn_adam.keras", dry_run=True)
    >>> r.plan.entry_for("conv/kernel").targets
    ('conv/kernel',)
"""

from __future__ import annotations

__all__ = ["keras_to_keras", "pair_variables"]

import os

import numpy as np

from ckptfmt.errors import ConversionError, UnmappedKeyError

from ..files import check_destination
from ..mapping.registry import KerasLayer
from ..mapping.rules import Mapping, Rename
from .checkpoint import KerasCheckpoint
from .kerasfile import KerasFileCheckpoint, open_keras_checkpoint, write_keras_like_template
from .report import ConversionReport
from .tfcheckpoint import write_like_template

#: ``{template checkpoint key: ("src", source checkpoint key)}``: where each written value comes from.
_Values = dict[str, tuple[str, str]]


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
    src, dst, template = os.fspath(src), os.fspath(dst), os.fspath(template)
    with open_keras_checkpoint(src, infer_layers=False) as a, open_keras_checkpoint(template, infer_layers=False) as t:
        pairs = pair_variables(a, t)
        plan = Mapping(tuple(Rename(s, d) for s, d in pairs.items())).plan(a.specs(), t.specs(), strict=True)
        values: _Values = {t.keys[d]: ("src", a.keys[s]) for s, d in pairs.items()}
        notes: list[str] = []
        carried = optimizer and t.has_optimizer
        if carried:
            values.update(_optimizer_values(a, t, pairs, notes, src, template))
        elif a.has_optimizer and optimizer:
            notes.append(f"the template {template} holds no optimizer: {src}'s optimizer state is not written")
        leftover = [k for k in t.stored_keys() if k not in values]
        report = ConversionReport(
            "keras2keras", src, dst, plan, dict(a.keys), tuple(k for k in a.stored_keys() if k not in {v for _, v in values.values()}),
            f"Keras optimizer {t.optimizer_name or ''}".rstrip() if carried else None, {}, "",
            tuple(notes) + tuple(f"{k}: copied from the template" for k in leftover[:20]), not dry_run,
        )
        if not dry_run:
            _write(dst, a, t, values, leftover, overwrite, src)
        return report


def _write(dst: str, a: KerasCheckpoint, t: KerasCheckpoint, values: _Values, leftover: list[str], overwrite: bool,
           src: str) -> None:
    """``dst`` in the template's layout: each key of ``values`` read from ``a`` (shape checked), the rest copied."""

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


# --------------------------------------------------------------------------------------------
# the optimizer state: slots by their variables, then the scalars


def _optimizer_values(a: KerasCheckpoint, t: KerasCheckpoint, pairs: dict[str, str], notes: list[str], src: str,
                      template: str) -> _Values:
    """Where the template's optimizer variables come from in ``a`` (notes appended to ``notes``; ``src`` and
    ``template`` name the sides in messages).

    Raises:
        ConversionError / UnmappedKeyError: ``a`` holds no optimizer state, an optimizer
            variable of either side could not be placed, or slots that do not pair (all listed).
    """
    if not a.has_optimizer:
        raise ConversionError(f"{src} holds no optimizer state but the template {template} does: pass --no-optimizer "
                              "to keep the template's optimizer variables")
    for problems in (a.problems, t.problems):
        if problems:
            raise UnmappedKeyError("cannot place the optimizer state:\n  " + "\n  ".join(problems))
    return {**_slot_values(a, t, pairs), **_scalar_values(a, t, notes, src)}


def _slot_values(a: KerasCheckpoint, t: KerasCheckpoint, pairs: dict[str, str]) -> _Values:
    """Each template slot from the same slot of its paired variable in ``a``; unpaired ones all listed."""
    back = {d: s for s, d in pairs.items()}
    values: _Values = {}
    missing = []
    for d, slots in t.slots.items():
        mine = a.slots.get(back.get(d, ""), {})
        for slot, ckey in slots.items():
            if slot in mine:
                values[ckey] = ("src", mine[slot])
            else:
                missing.append(f"template slot {slot!r} of {d}")
    extra = [f"{s} slot {slot!r}: not in the template" for s, d in pairs.items() for slot in a.slots.get(s, {})
             if slot not in t.slots.get(d, {})]
    if missing or extra:
        raise UnmappedKeyError("the optimizer slots do not pair (is it the same optimizer class and options?):\n  "
                               + "\n  ".join(missing + extra))
    return values


def _scalar_values(a: KerasCheckpoint, t: KerasCheckpoint, notes: list[str], src: str) -> _Values:
    """The iteration count (required when the template has one) and the learning rate (else the template's, noted)."""
    values: _Values = {}
    if t.iterations_key:
        if not a.iterations_key:
            raise ConversionError(f"{src} stores no iteration count for the template's {t.iterations_key}")
        values.update({k: ("src", a.iterations_key) for k in (t.iterations_key, *t.also_iterations)})
    if t.learning_rate_key:
        if a.learning_rate_key:
            values[t.learning_rate_key] = ("src", a.learning_rate_key)
        else:
            notes.append(f"{src} stores no learning rate: the template's is kept")
    return values


# --------------------------------------------------------------------------------------------
# pairing the variables


def pair_variables(a: KerasCheckpoint, t: KerasCheckpoint) -> dict[str, str]:
    """``{source key of a: source key of t}``: by Keras path, else layer by layer in order.

    A side whose file does not record the layer order (a ``.weights.h5``) pairs layers by
    their shapes only, and layers sharing shapes are refused: never paired by a listing order.

    Raises:
        ConversionError: layers of the same shapes on a side without a recorded order.
        UnmappedKeyError: the variables pair neither by name nor layer by layer (all listed).

    Example:
        >>> from ckptfmt.converters.keras.kerasfile import open_keras_checkpoint
        >>> with open_keras_checkpoint("fixtures/keras/k3_cnn_adam.keras", infer_layers=False) as k:
        ...     pair_variables(k, k)["conv/kernel"]
        'conv/kernel'
    """
    if set(a.keys) == set(t.keys):
        return {k: k for k in a.keys}
    la = [l for l in a.layers if l.weights]
    lt = [l for l in t.layers if l.weights]
    unordered = [c.path for c in (a, t) if not getattr(c, "order_known", True)]
    if len(la) == len(lt):
        pairs = _pair_by_shapes(la, lt, unordered) if unordered else _pair_in_order(la, lt)
        if pairs is not None:
            return pairs
    raise _unpaired_error(a, t)


def _signature(layer: KerasLayer) -> list[tuple[int, ...]]:
    return [tuple(w.shape) for w in layer.weights]


def _pair_in_order(la: list[KerasLayer], lt: list[KerasLayer]) -> dict[str, str] | None:
    """Layer by layer in model order, when every pair of layers has the same shapes; else None."""
    if not all(_signature(x) == _signature(y) for x, y in zip(la, lt)):
        return None
    return {wa.key: wt.key for x, y in zip(la, lt) for wa, wt in zip(x.weights, y.weights)}


def _pair_by_shapes(la: list[KerasLayer], lt: list[KerasLayer], unordered: list[str]) -> dict[str, str] | None:
    """Layers paired by their shapes alone (a ``.weights.h5`` lists its layers by name, not in the
    model's order); None when the sides' shapes differ.

    Raises:
        ConversionError: several layers share shapes (a tie only an order could break).
    """
    by_sig: dict[str, list[list[KerasLayer]]] = {}
    for side, layers in ((0, la), (1, lt)):
        for layer in layers:
            by_sig.setdefault(repr(_signature(layer)), [[], []])[side].append(layer)
    if not all(len(x) == len(y) for x, y in by_sig.values()):
        return None
    tied = [(k, x, y) for k, (x, y) in by_sig.items() if len(x) > 1]
    if tied:
        raise ConversionError(
            f"{', '.join(unordered)} does not record the order of the model's layers (a .weights.h5 lists them "
            "by name), and layers of the same shapes cannot be told apart: "
            + "; ".join(f"{', '.join(l.name for l in x)} vs {', '.join(l.name for l in y)} ({k})" for k, x, y in tied)
            + ". Use the model's .keras file (its config records the order) or a TF checkpoint on that side")
    return {wa.key: wt.key for x, y in by_sig.values() for wa, wt in zip(x[0].weights, y[0].weights)}


def _unpaired_error(a: KerasCheckpoint, t: KerasCheckpoint) -> UnmappedKeyError:
    only_a = sorted(set(a.keys) - set(t.keys))
    only_t = sorted(set(t.keys) - set(a.keys))
    return UnmappedKeyError(
        "the variables do not pair by name, nor layer by layer in order (different layers or shapes):\n"
        + "".join(f"  only in the source: {k} {a.shapes[k]}\n" for k in only_a[:20])
        + "".join(f"  only in the template: {k} {t.shapes[k]}\n" for k in only_t[:20])
        + "save the template from the same model (model.save_weights / tf.train.Checkpoint after building it)")
