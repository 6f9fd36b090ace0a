"""A Keras layer's kind from its weights: names and shapes, and the Flattens a checkpoint does not store.

A checkpoint stores variables, not layer classes. The weights' roles and shapes tell most
kinds apart; where they do not (a convolution without a bias fits Conv, ConvTranspose and
DepthwiseConv), the kinds left open are kept as ``config["alternatives"]`` for the torch
model (or the layer's name) to settle.

Example:
    >>> from ckptfmt.converters.mapping import KerasWeight
    >>> infer_kind("fc", (KerasWeight("fc/kernel", (4, 3)), KerasWeight("fc/bias", (3,))))
    ('Dense', {})
"""

from __future__ import annotations

__all__ = ["infer_kind", "insert_flattens", "refit_flattens", "settle_by_name"]

import re
from collections.abc import Sequence
from typing import Any

from ckptfmt.errors import ConversionError

from ..mapping.layers import LAYER_CONVERTERS, KerasLayer, KerasWeight

_DIRECTION = re.compile(r"^_?(forward|backward)(_|$)")  # Bidirectional's forward_layer / forward_lstm...
# Layer-name words that settle a convolution the weights leave open (no bias).
_CONV_HINTS = (("transpose", "Transpose"), ("deconv", "Transpose"), ("depthwise", "Depthwise"), ("dwconv", "Depthwise"))


def infer_kind(name: str, weights: Sequence[KerasWeight]) -> tuple[str, dict[str, Any]]:
    """Keras class and config of a layer from its weights' roles and shapes."""
    probe = KerasLayer(name, "?", {}, tuple(weights))
    try:
        roles = probe.roles()
    except ConversionError:
        roles = {}
    shapes = {r: w.shape for r, w in roles.items()}
    have = set(shapes)
    listing = ", ".join(f"{w.key} {tuple(w.shape)}" for w in weights)
    if any(_DIRECTION.match(c) for w in weights for c in w.key.split("/")):
        try:
            bi_roles = KerasLayer(name, "Bidirectional", {}, tuple(weights)).roles()
        except ConversionError:  # not an RNN's two directions after all (a layer named "forward_proj")
            bi_roles = {}
        fwd = {r.split("/", 1)[1]: w.shape for r, w in bi_roles.items() if r.startswith("forward/")}
        bwd = {r.split("/", 1)[1] for r in bi_roles if r.startswith("backward/")}
        if {"kernel", "recurrent_kernel"} <= set(fwd) and {"kernel", "recurrent_kernel"} <= bwd:
            units = fwd["recurrent_kernel"][0]
            inner = _rnn_kind(name, fwd["kernel"], units, fwd.get("bias"))
            return "Bidirectional", {"layer": {"class_name": inner[0], "config": inner[1]}}
    if {"kernel", "recurrent_kernel"} <= have and have <= {"kernel", "recurrent_kernel", "bias"}:
        return _rnn_kind(name, shapes["kernel"], shapes["recurrent_kernel"][0], shapes.get("bias"))
    try:
        mha = set(KerasLayer(name, "MultiHeadAttention", {}, tuple(weights)).roles())
    except ConversionError:
        mha = set()
    if {"query/kernel", "key/kernel", "value/kernel", "attention_output/kernel"} <= mha <= {
            f"{p}/{r}" for p in ("query", "key", "value", "attention_output") for r in ("kernel", "bias")}:
        return "MultiHeadAttention", {}
    if have in ({"kernel"}, {"kernel", "bias"}):
        rank = len(shapes["kernel"])
        if rank == 2:
            return "Dense", {}
        if rank in (3, 4, 5):
            return _conv_kind(name, shapes["kernel"], shapes.get("bias"))
    if have in ({"depthwise_kernel", "pointwise_kernel"}, {"depthwise_kernel", "pointwise_kernel", "bias"}):
        return ("SeparableConv2D" if len(shapes["pointwise_kernel"]) == 4 else "SeparableConv1D"), {}
    if {"moving_mean", "moving_variance"} <= have <= {"gamma", "beta", "moving_mean", "moving_variance"}:
        return "BatchNormalization", {}
    if have and have <= {"gamma", "beta"}:
        return "LayerNormalization", {}
    if have == {"embeddings"}:
        return "Embedding", {}
    raise ConversionError(
        f"layer {name!r} has weights the converter does not know ({listing}); "
        f"known layers: {', '.join(sorted(LAYER_CONVERTERS))}. Add a rule for it in a mapping file "
        "(ckptfmt.converters.mapping.Mapping JSON, see docs/conversions.md) and pass it with --map"
    )


def _conv_kind(name: str, kernel: tuple[int, ...], bias: tuple[int, ...] | None) -> tuple[str, dict[str, Any]]:
    """Conv, ConvTranspose or DepthwiseConv from a kernel ``(*k, a, b)`` and its bias.

    All three store a kernel of that rank; the bias tells them apart: ``b`` outputs for a
    convolution, ``a`` for a transposed one, ``a*b`` for a depthwise one (not when ``a == b``,
    nor without a bias). The kinds the weights cannot rule out are kept as
    ``config["alternatives"]`` for the torch model (or the layer name) to settle.
    """
    d = len(kernel) - 2
    a, b = kernel[-2], kernel[-1]
    outputs = {f"Conv{d}D": b, f"Conv{d}DTranspose": a}
    if d in (1, 2):
        outputs[f"DepthwiseConv{d}D"] = a * b
    fits = [kind for kind, n in outputs.items() if bias is None or tuple(bias) == (n,)]
    if not fits:
        raise ConversionError(
            f"layer {name!r}: kernel {kernel} with bias {bias} fits no convolution (a Conv{d}D bias has {b} values, "
            f"a Conv{d}DTranspose bias {a}); write its rules in a mapping file and pass it with --map"
        )
    return fits[0], ({"alternatives": fits[1:]} if len(fits) > 1 else {})


def _rnn_kind(name: str, kernel: tuple[int, ...], units: int, bias: tuple[int, ...] | None) -> tuple[str, dict[str, Any]]:
    if kernel[-1] == 4 * units:
        return "LSTM", {}
    if kernel[-1] == 3 * units:
        if bias is None:  # nothing stored tells; Keras's default
            return "GRU", {"reset_after": True, "assumed": ("reset_after",)}
        return "GRU", {"reset_after": len(bias) == 2}
    raise ConversionError(
        f"recurrent layer {name!r}: kernel {kernel} for {units} units is neither an LSTM (4 gates) nor a GRU (3 gates); "
        "write its rules in a mapping file and pass it with --map"
    )


def insert_flattens(layers: list[KerasLayer]) -> list[KerasLayer]:
    """Put a Flatten before each Dense fed by a flattened channels-last feature map.

    A checkpoint has no weightless layers; a Dense whose input width is a multiple ``S > 1``
    of the channels of the spatial layer before it received a flattened ``(S, C)`` map. The
    HWC -> CHW row permutation depends only on ``S = H*W``, so one spatial dim suffices.
    """
    out: list[KerasLayer] = []
    channels: int | None = None
    open_kind = False  # the channels come from a convolution whose kind is not settled yet
    for layer in layers:
        if layer.class_name == "Dense" and channels:
            rows = layer.weight("kernel").shape[0]
            if rows != channels:
                if rows % channels and open_kind:
                    out.append(layer)  # placed again once the torch model or the name settles the kind
                    channels = None
                    continue
                if rows % channels:
                    raise ConversionError(
                        f"Dense {layer.name!r} takes {rows} features after a layer with {channels} channels; "
                        "the reshape between them is unknown. Write its rules in a mapping file (--map)"
                    )
                out.append(KerasLayer(f"{layer.name}/flatten", "Flatten", {}, (), input_shape=(None, rows // channels, channels)))
        out.append(layer)
        if layer.class_name.startswith(("Conv", "Depthwise", "Separable")):
            channels = _out_channels(layer)
            open_kind = bool(layer.config.get("alternatives"))
        elif layer.class_name != "BatchNormalization":
            channels = None
    return out


def _out_channels(layer: KerasLayer) -> int:
    if layer.class_name.startswith("Separable"):
        return layer.weight("pointwise_kernel").shape[-1]
    *_, a, b = layer.weight("kernel").shape
    if layer.class_name.endswith("Transpose"):
        return a
    return a * b if layer.class_name.startswith("Depthwise") else b


def refit_flattens(before: Sequence[KerasLayer], after: list[KerasLayer]) -> list[KerasLayer]:
    """Re-place the inferred Flattens once the convolutions' kinds are settled."""
    if not any(l.config.get("alternatives") for l in before):
        return after
    return insert_flattens([l for l in after if l.class_name != "Flatten"])


def settle_by_name(layer: KerasLayer) -> tuple[KerasLayer, str | None]:
    """A convolution whose kind the weights leave open, settled by its name (preset only)."""
    alternatives = layer.config.get("alternatives")
    if not alternatives:
        return layer, None
    kinds = [layer.class_name, *alternatives]
    name = layer.name.lower()
    kind = next((k for word, part in _CONV_HINTS if word in name for k in kinds if part in k), kinds[0])
    config = {k: v for k, v in layer.config.items() if k != "alternatives"}
    note = (f"ASSUMED {layer.name}: {kind} (its weights fit {', '.join(kinds)}"
            f"{'' if kind == kinds[0] else '; its name says so'}); pass --model to check against the torch model")
    return KerasLayer(layer.name, kind, config, layer.weights, layer.input_shape, layer.output_shape), note
