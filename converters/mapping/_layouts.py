"""Layout decisions the weights cannot make: how each Dense is fed, how a LayerNorm's gamma lies.

* :func:`dense_inputs`: for each matched Dense, whether its kernel's rows are a flattened map
  to permute from Keras's ``(H, W, C)`` to torch's ``(C, H, W)`` order, decided by the torch
  model's dataflow (:meth:`~._dataflow.TorchDataflow.linear_input`) checked against the Keras
  model's own Flatten layers; a guess (a Flatten inferred from a checkpoint's shapes, or no
  dataflow where only it could tell) is refused.
* :func:`layernorm_layouts`: a LayerNormalization over several axes, transposed from
  ``(..., C)`` to ``(C, ...)`` when the torch LayerNorm normalises a channels-first map.

Example:
    >>> _norm_axes(-1), _norm_axes([1, 2]), _norm_axes(None)
    ([-1], [1, 2], None)
"""

from __future__ import annotations

__all__ = ["dense_inputs", "flattened_features", "layernorm_layouts"]

import math
from collections.abc import Mapping as AbcMapping
from collections.abc import Sequence
from typing import Any

from ckptfmt.errors import ConversionError

from ._dataflow import LinearInput, TorchDataflow
from .registry import KerasLayer

_CONV_PREFIXES = ("Conv", "Depthwise", "Separable")


def _unfed(layer: KerasLayer, path: str, guessed: AbcMapping[str, Any], order_known: bool, has_convs: bool) -> str | None:
    """The refusal for a Dense whose torch input the dataflow does not show (None: nothing to decide)."""
    if not order_known and has_convs:
        return (f"Dense {layer.name!r} -> {path}: the file does not record the layer order, so only the torch "
                "model's dataflow can tell a flattened map from a pooled vector, and the torch model did not "
                "run it (pass an example input; a model torch.fx cannot trace needs a mapping file, --map)")
    if layer.name in guessed:
        return (f"Dense {layer.name!r} -> {path}: its {layer.weight('kernel').shape[0]} input rows may be a "
                f"flattened {guessed[layer.name]} map or a pooled vector (a checkpoint has no Flatten layers); "
                "pass an example input (the factory's (model, example_input)) so the torch model's dataflow decides")
    return None


def _fed(layer: KerasLayer, path: str, fed: LinearInput, keras_flatten: AbcMapping[str, Sequence[int]]) -> tuple[str | None, Any]:
    """``(problem, decision)`` for a Dense the dataflow shows: ``decision`` is the ``(*spatial, C)`` to
    permute from, or None for no permutation."""
    rows = layer.weight("kernel").shape[0]
    where = f"Dense {layer.name!r} -> Linear {path}"
    keras = tuple(keras_flatten[layer.name]) if layer.name in keras_flatten else None
    if not fed.known:
        return (f"{where}: the torch model feeds it {fed.how}, whose feature order the converter cannot relate to "
                "Keras's; write its rules in a mapping file (--map)"), None
    if fed.flattened is not None and math.prod(fed.flattened) != rows:
        return f"{where}: torch flattens a {fed.flattened} map, not the Dense's {rows} rows", None
    if fed.channels_last is not None:
        if keras is not None and keras != fed.channels_last:
            return (f"{where}: the Keras model flattens {keras_flatten[layer.name]} (H, W, C), the torch model a "
                    f"channels-last {fed.channels_last}: not the same model"), None
        if math.prod(fed.channels_last) != rows:
            return f"{where}: torch flattens a {fed.channels_last} map, not the Dense's {rows} rows", None
        return None, None
    if keras is not None and fed.flattened is None:
        return (f"{where}: the Keras model flattens a {keras_flatten[layer.name]} map, the torch model feeds a "
                f"{fed.how}: not the same model"), None
    if keras is not None and keras != fed.flattened:
        return (f"{where}: the Keras model flattens {keras_flatten[layer.name]} (H, W, C), the torch model "
                f"{fed.flattened} in (H, W, C) terms: not the same model"), None
    return None, fed.flattened


def dense_inputs(matched: Sequence[tuple[KerasLayer, str]], flow: TorchDataflow | None, keras_flatten: AbcMapping[str, Sequence[int]],
                 guessed: AbcMapping[str, Any], order_known: bool) -> dict[str, Sequence[int]]:
    """``{Dense name: (*spatial, C)}``: the Dense layers whose rows are a flattened channels-first map.

    Starts from the Keras model's own Flatten layers (``keras_flatten``); the dataflow, where
    it shows a Dense's input, decides instead (and must agree with Keras).

    Raises:
        ConversionError: every Dense whose feeding cannot be told or disagrees (all listed).
    """
    flatten_from = dict(keras_flatten)
    problems = []
    has_convs = any(l.class_name.startswith(_CONV_PREFIXES) for l, _ in matched)
    for layer, path in matched:
        if layer.class_name != "Dense":
            continue
        fed = flow.linear_input(path) if flow is not None else None
        if fed is None and flow is not None and flow.recorded is not None and (layer.name in keras_flatten or layer.name in guessed):
            problems.append(f"Dense {layer.name!r} -> Linear {path}: torch.fx cannot trace the torch model and the recorded run "
                            "of the example input did not call this Linear, so whether it takes a flattened map (and in which "
                            "order) is unknown; pass an example input that reaches it, or write its rules in a mapping file (--map)")
            continue
        if fed is None:
            problem = _unfed(layer, path, guessed, order_known, has_convs)
            if problem:
                problems.append(problem)
            continue
        problem, flattened = _fed(layer, path, fed, keras_flatten)
        if problem:
            problems.append(problem)
        elif flattened is not None:
            flatten_from[layer.name] = flattened
        else:
            flatten_from.pop(layer.name, None)
    if problems:
        raise ConversionError("cannot tell how the Dense layers are fed:\n  " + "\n  ".join(problems))
    return flatten_from


def flattened_features(matched: Sequence[tuple[KerasLayer, str]], flow: TorchDataflow | None) -> None:
    """Refuse a layer other than a Dense whose per-feature weights meet a flattened map (a
    BatchNormalization or LayerNormalization after a Flatten, a 1x1 convolution on a flattened
    vector): its weights would need a Dense's row permutation, which only a Dense gets.

    Raises:
        ConversionError: every such layer, naming what feeds its torch module.
    """
    if flow is None:
        return
    problems = [f"{layer.class_name} {layer.name!r} -> {path}: the torch model feeds it {fed.how}; its per-feature "
                "weights would have to be permuted like a Dense's rows from Keras's (H, W, C) order, which the converter "
                "does only for a Dense: write its rules in a mapping file (--map)"
                for layer, path in matched if layer.class_name != "Dense" and (fed := flow.feature_inputs.get(path)) is not None]
    if problems:
        raise ConversionError("cannot convert layers fed by a flattened map:\n  " + "\n  ".join(problems))


def _norm_axes(axis: Any) -> list[int] | None:
    return list(axis) if isinstance(axis, (list, tuple)) else [axis] if isinstance(axis, int) else None


def _layernorm_axes(layer: KerasLayer, path: str, flow: TorchDataflow | None) -> tuple[str | None, tuple[int, ...] | None]:
    """``(problem, transpose axes or None)`` for one LayerNormalization whose gamma has ``k > 1`` axes."""
    gamma = layer.weights[0].shape
    k = len(gamma)
    axis = layer.config.get("axis")
    axes = _norm_axes(axis)
    rank = len(layer.input_shape) if layer.input_shape else None
    where = f"LayerNormalization {layer.name!r} -> {path}"
    if axes is None:
        return (f"{where}: its gamma {gamma} normalises {k} axes, and a TF checkpoint does not say which; convert the "
                "model's .keras file, or write its rules in a mapping file (--map)"), None
    if rank is not None:
        trailing = sorted(a % rank for a in axes) == list(range(rank - k, rank))
    else:
        trailing = sorted(axes) == list(range(-k, 0))
    layout = flow.norm_inputs.get(path) if flow is not None else None
    if not trailing:
        return (f"{where}: Keras normalises axes {axis}, not the trailing ones a torch LayerNorm normalises; write its "
                "rules in a mapping file (--map)"), None
    if layout == "last" or (layout == "first" and rank is not None and k == 1):
        return None, None
    if layout == "first" and (rank is None or k == rank - 1):
        return None, (k - 1, *range(k - 1))
    if layout == "first":
        return (f"{where}: Keras normalises the trailing {k} axes of a channels-last map, torch the trailing {k} of a "
                "channels-first one: not the same normalisation"), None
    why = "no dataflow (pass an example input)" if layout is None else layout
    return (f"{where}: gamma {gamma} covers {k} axes and the layout of the torch LayerNorm's input is unknown ({why}); "
            "write its rules in a mapping file (--map)"), None


def layernorm_layouts(matched: Sequence[tuple[KerasLayer, str]], flow: TorchDataflow | None) -> dict[str, tuple[int, ...]]:
    """``{layer name: transpose axes}`` for LayerNormalizations over several axes.

    Keras normalises a channels-last map over its ``axis`` list, so its gamma is laid out in
    ``(..., C)`` order; a torch ``LayerNorm`` normalises its input's trailing dims, which on a
    channels-first map are ``(C, ...)``. Square maps make the shapes agree either way, so the
    Keras config (which axes) and the torch dataflow (which layout) decide, or the conversion
    is refused.
    """
    out: dict[str, tuple[int, ...]] = {}
    problems: list[str] = []
    for layer, path in matched:
        if layer.class_name != "LayerNormalization" or not layer.weights or len(layer.weights[0].shape) <= 1:
            continue
        problem, axes = _layernorm_axes(layer, path, flow)
        if problem:
            problems.append(problem)
        elif axes is not None:
            out[layer.name] = axes
    if problems:
        raise ConversionError("cannot convert a LayerNormalization over several axes:\n  " + "\n  ".join(problems))
    return out
