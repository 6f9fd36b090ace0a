"""Keras models described as data: the Flatten trap, and descriptions of live Keras models.

Descriptions come from a live Keras model (:func:`describe_keras_model`, duck-typed: keras is
never imported here) or from a checkpoint's object graph
(:func:`ckptfmt.converters.keras.read_keras_checkpoint`).

Example:
    >>> ls = [KerasLayer("f", "Flatten", input_shape=(None, 2, 2, 3)),
    ...       KerasLayer("d", "Dense", weights=(KerasWeight("d/kernel", (12, 5)),))]
    >>> find_flatten_dense(ls)
    {'d': (2, 2, 3)}
"""

from __future__ import annotations

__all__ = ["find_flatten_dense", "describe_keras_model", "describe_keras_layer"]

from collections.abc import Iterable, Sequence
from typing import Any

from ckptfmt.errors import ConversionError

from .registry import KerasLayer, KerasWeight

# -- the Flatten trap ---------------------------------------------------------------------------

# Weightless layers that keep the feature order between a Flatten and the Dense after it.
_ORDER_KEEPING = {
    "Dropout", "Activation", "ReLU", "LeakyReLU", "PReLU", "ELU", "Softmax", "GaussianNoise",
    "GaussianDropout", "AlphaDropout", "ActivityRegularization", "Identity",
}


def find_flatten_dense(layers: Iterable[KerasLayer], shapes: dict[str, Sequence[int]] | None = None) -> dict[str, tuple[int, ...]]:
    """Find the Dense layers fed by a channels-last Flatten of a spatial feature map.

    Args:
        layers: the model's layers in order.
        shapes: ``{flatten layer name: its input shape without batch}`` where the descriptions
            carry no shapes.

    Returns:
        ``{dense name: (*spatial, C)}``, to pass as ``flatten_from`` to :func:`layer_rules`.

    Raises:
        ConversionError: a Flatten's input shape is unknown, or a weighted layer other than
            Dense sits between the Flatten and its Dense.

    Example:
        >>> ls = [KerasLayer("f", "Flatten", input_shape=(None, 2, 2, 3)),
        ...       KerasLayer("d", "Dense", weights=(KerasWeight("d/kernel", (12, 5)),))]
        >>> find_flatten_dense(ls)
        {'d': (2, 2, 3)}
    """
    shapes = shapes or {}
    out: dict[str, tuple[int, ...]] = {}
    pending: tuple[KerasLayer, tuple[int, ...]] | None = None
    prev: KerasLayer | None = None
    for layer in layers:
        if pending is not None:
            if layer.class_name == "Dense":
                out[layer.name] = pending[1]
                pending = None
            elif layer.weights or layer.class_name not in _ORDER_KEEPING:
                raise ConversionError(
                    f"{layer.class_name} {layer.name!r} follows Flatten {pending[0].name!r} of a channels-last feature map "
                    f"{pending[1]}; only a Dense there can have its rows permuted to torch's order"
                )
        if layer.class_name == "Flatten" and layer.config.get("data_format") in (None, "channels_last"):
            shape = shapes.get(layer.name)
            if shape is None:
                full = layer.input_shape or (prev.output_shape if prev is not None else None)
                if full is None:
                    raise ConversionError(
                        f"Flatten {layer.name!r}: its input shape is unknown; pass shapes={{{layer.name!r}: (H, W, C)}} "
                        "so the Dense after it can be permuted to torch's channels-first order"
                    )
                shape = tuple(full[1:])
            if len(shape) >= 2:  # a feature map (*spatial, C); a flat vector needs nothing
                pending = (layer, tuple(int(s) for s in shape))
        prev = layer
    return out


# -- descriptions from a live Keras model (duck-typed) ------------------------------------------


def _shape_of(layer: Any, attr: str) -> tuple[int | None, ...] | None:
    try:
        t = getattr(layer, attr)
    except Exception:  # keras raises for layers never called or called on several inputs
        return None
    if isinstance(t, (list, tuple)) or not hasattr(t, "shape"):
        return None
    return tuple(None if d is None else int(d) for d in t.shape)


def describe_keras_layer(layer: Any) -> KerasLayer:
    """A :class:`KerasLayer` from a live Keras 3 layer (keys are the weights' ``path``).

    Example:
        >>> import keras  # doctest: +SKIP
        >>> describe_keras_layer(keras.layers.Dense(2)).class_name  # doctest: +SKIP
        'Dense'
    """
    return KerasLayer(
        name=layer.name,
        class_name=type(layer).__name__,
        config=dict(layer.get_config()),
        weights=tuple(KerasWeight(w.path, tuple(int(d) for d in w.shape)) for w in layer.weights),
        input_shape=_shape_of(layer, "input"),
        output_shape=_shape_of(layer, "output"),
    )


def describe_keras_model(model: Any) -> list[KerasLayer]:
    """Descriptions of a live Keras model's layers in order, nested models flattened.

    Example:
        >>> layers = describe_keras_model(keras_model)  # doctest: +SKIP
    """
    out: list[KerasLayer] = []
    for layer in model.layers:
        if hasattr(layer, "layers") and type(layer).__name__ in ("Sequential", "Functional", "Model"):
            out += describe_keras_model(layer)
        else:
            out.append(describe_keras_layer(layer))
    return out
