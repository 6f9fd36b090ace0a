"""Keras layer -> torch module conversions, as :class:`~.rules.Mapping` data.

Each Keras layer class has a function that, given a :class:`KerasLayer` description (its
weights' keys and shapes, its config) and the path of the torch module it becomes, returns the
rules that carry its weights over. The way back (torch -> Keras) is the inverse of the same
plan (:meth:`~.rules.Plan.inverse`), so each conversion is written once. Formulas and
convention differences are in ``docs/conversions.md``.

Descriptions come from a live Keras model (:func:`describe_keras_model`, duck-typed: keras is
never imported here) or, later, from a checkpoint's object graph.

Example:
    >>> layer = KerasLayer("fc", "Dense", {}, (KerasWeight("fc/kernel", (3, 2)),
    ...                                        KerasWeight("fc/bias", (2,))))
    >>> plan = layer_rules(layer, "head").plan(layer.specs())
    >>> plan.target_specs["head.weight"].shape
    (2, 3)
"""

from __future__ import annotations

__all__ = [
    "KerasWeight",
    "KerasLayer",
    "LAYER_CONVERTERS",
    "layer_rules",
    "conv_kernel_axes",
    "flatten_kernel_ops",
    "find_flatten_dense",
    "describe_keras_model",
    "describe_keras_layer",
]

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from ckptfmt.errors import ConversionError

from .rules import (
    AppendZeros,
    Concat,
    Convert,
    Fill,
    GateReorder,
    Mapping,
    Op,
    Rename,
    Reshape,
    Rule,
    Split,
    TensorSpec,
    Transpose,
)

# Components of object-graph keys that are not part of a weight's role.
_NOISE = {".ATTRIBUTES", "VARIABLE_VALUE"}
# Keras 3 attribute names of MultiHeadAttention's sublayers -> their layer names.
_ALIASES = {"query_dense": "query", "key_dense": "key", "value_dense": "value", "output_dense": "attention_output"}


@dataclass(frozen=True, slots=True)
class KerasWeight:
    """One weight of a Keras layer: its key in the source tensors and its shape."""

    key: str
    shape: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class KerasLayer:
    """What a conversion needs to know about one Keras layer.

    Attributes:
        name: the layer's name (``"dense_1"``).
        class_name: its Keras class (``"Dense"``).
        config: ``layer.get_config()`` (only the keys a conversion reads are used).
        weights: its weights, in any order; their roles come from the keys' last components.
        input_shape: the layer's input shape with the batch dim (None when unknown), used to
            detect the Flatten trap.
        output_shape: likewise for its output.
    """

    name: str
    class_name: str
    config: dict[str, Any] = field(default_factory=dict, hash=False, compare=False)
    weights: tuple[KerasWeight, ...] = ()
    input_shape: tuple[int | None, ...] | None = None
    output_shape: tuple[int | None, ...] | None = None

    def specs(self) -> dict[str, TensorSpec]:
        """``{weight key: TensorSpec}``, the source side of a plan."""
        return {w.key: TensorSpec(tuple(w.shape)) for w in self.weights}

    def roles(self) -> dict[str, KerasWeight]:
        """The weights by role: ``"kernel"``, ``"query/kernel"``, ``"forward/bias"``..."""
        out: dict[str, KerasWeight] = {}
        for w in self.weights:
            comps = [c.lstrip("_") for c in w.key.split("/") if c not in _NOISE]
            comps = [_ALIASES.get(c, c) for c in comps]
            role = comps[-1]
            if self.class_name == "MultiHeadAttention" and len(comps) > 1:
                role = f"{comps[-2]}/{role}"
            elif self.class_name == "Bidirectional":
                direction = next((d for c in comps for d in ("forward", "backward") if c.startswith(d)), None)
                if direction is None:
                    raise ConversionError(f"layer {self.name!r}: cannot tell the direction of weight {w.key!r}")
                role = f"{direction}/{role}"
            if role in out:
                raise ConversionError(f"layer {self.name!r}: weights {out[role].key!r} and {w.key!r} have the same role {role!r}")
            out[role] = w
        return out

    def weight(self, role: str) -> KerasWeight:
        roles = self.roles()
        if role not in roles:
            raise ConversionError(f"{self.class_name} layer {self.name!r} has no {role!r} weight (it has: {', '.join(roles) or 'none'})")
        return roles[role]


def _key(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def conv_kernel_axes(spatial_dims: int) -> tuple[int, ...]:
    """Axes taking a Keras conv kernel ``(*k, in, out)`` to torch ``(out, in, *k)``.

    The same permutation takes a Keras transposed-conv kernel ``(*k, out, in)`` to torch's
    ``(in, out, *k)``.

    Example:
        >>> conv_kernel_axes(2)
        (3, 2, 0, 1)
    """
    n = spatial_dims
    return (n + 1, n) + tuple(range(n))


def flatten_kernel_ops(spatial: Sequence[int], channels: int, units: int) -> tuple[Op, ...]:
    """Ops taking the kernel of a Dense that follows a channels-last Flatten to torch.

    Keras flattens ``(*spatial, C)`` (NHWC) feature maps, torch ``(C, *spatial)`` (NCHW); the
    kernel's rows are permuted accordingly, then transposed to torch's ``(out, in)``.

    Example:
        >>> [op.describe() for op in flatten_kernel_ops((2, 3), 4, 5)]
        ['Reshape((2, 3, 4, 5))', 'Transpose((2, 0, 1, 3))', 'Reshape((24, 5))', 'Transpose((1, 0))']
    """
    n = len(spatial)
    rows = channels * math.prod(spatial)
    return (
        Reshape(tuple(spatial) + (channels, units)),
        Transpose((n,) + tuple(range(n)) + (n + 1,)),
        Reshape((rows, units)),
        Transpose((1, 0)),
    )


# -- one function per Keras class ---------------------------------------------------------------

Converter = Callable[..., Mapping]


def _dense(layer: KerasLayer, p: str, *, flatten_from: Sequence[int] | None = None) -> Mapping:
    kernel = layer.weight("kernel")
    ops: tuple[Op, ...] = (Transpose((1, 0)),)
    notes: tuple[str, ...] = ()
    if flatten_from is not None:
        *spatial, channels = flatten_from
        if channels * math.prod(spatial) != kernel.shape[0]:
            raise ConversionError(
                f"Dense {layer.name!r}: its kernel has {kernel.shape[0]} rows but the Flatten before it "
                f"receives {tuple(flatten_from)} = {channels * math.prod(spatial)} features"
            )
        ops = flatten_kernel_ops(spatial, channels, kernel.shape[1])
        notes = (f"{layer.name}: kernel rows permuted from Keras's flattened {tuple(flatten_from)} (channels last) to torch's channels-first order",)
    rules: list[Rule] = [Convert((kernel.key,), (_key(p, "weight"),), ops)]
    if "bias" in layer.roles():
        rules.append(Rename(layer.weight("bias").key, _key(p, "bias")))
    return Mapping(tuple(rules), notes)


def _conv(layer: KerasLayer, p: str, **_: Any) -> Mapping:
    kernel = layer.weight("kernel")
    rules: list[Rule] = [Convert((kernel.key,), (_key(p, "weight"),), (Transpose(conv_kernel_axes(len(kernel.shape) - 2)),))]
    if "bias" in layer.roles():
        rules.append(Rename(layer.weight("bias").key, _key(p, "bias")))
    return Mapping(tuple(rules))


def _depthwise_ops(shape: tuple[int, ...]) -> tuple[Op, ...]:
    *k, cin, mult = shape
    n = len(k)
    # (*k, in, mult) -> (*k, in*mult, 1) -> (in*mult, 1, *k): output channel i*mult + m, as in TF.
    return (Reshape(tuple(k) + (cin * mult, 1)), Transpose((n, n + 1) + tuple(range(n))))


def _depthwise(layer: KerasLayer, p: str, **_: Any) -> Mapping:
    kernel = layer.weight("kernel")
    rules: list[Rule] = [Convert((kernel.key,), (_key(p, "weight"),), _depthwise_ops(kernel.shape))]
    if "bias" in layer.roles():
        rules.append(Rename(layer.weight("bias").key, _key(p, "bias")))
    return Mapping(tuple(rules))


def _separable(layer: KerasLayer, p: str, **_: Any) -> Mapping:
    dw, pw = layer.weight("depthwise_kernel"), layer.weight("pointwise_kernel")
    rules: list[Rule] = [
        Convert((dw.key,), (_key(p, "depthwise.weight"),), _depthwise_ops(dw.shape)),
        Convert((pw.key,), (_key(p, "pointwise.weight"),), (Transpose(conv_kernel_axes(len(pw.shape) - 2)),)),
    ]
    if "bias" in layer.roles():
        rules.append(Rename(layer.weight("bias").key, _key(p, "pointwise.bias")))
    return Mapping(tuple(rules), (f"{layer.name}: torch side is a module with children 'depthwise' (Conv, groups=in, bias=False) and 'pointwise' (1x1 Conv)",))


def _batchnorm(layer: KerasLayer, p: str, **_: Any) -> Mapping:
    roles = layer.roles()
    if ("gamma" in roles) != ("beta" in roles):
        raise ConversionError(
            f"BatchNormalization {layer.name!r} has only one of gamma/beta (scale={layer.config.get('scale')}, "
            f"center={layer.config.get('center')}); torch's affine BatchNorm needs both or neither"
        )
    rules: list[Rule] = [Rename(roles[k].key, _key(p, t)) for k, t in (("gamma", "weight"), ("beta", "bias")) if k in roles]
    rules += [
        Rename(layer.weight("moving_mean").key, _key(p, "running_mean")),
        Rename(layer.weight("moving_variance").key, _key(p, "running_var")),
        Convert((), (_key(p, "num_batches_tracked"),), (Fill((), "int64", 0),)),
    ]
    if "epsilon" not in layer.config:  # from a checkpoint: no config
        note = BN_UNKNOWN_NOTE
    else:  # one note per distinct value, not per layer
        eps, mom = layer.config["epsilon"], layer.config.get("momentum", 0.99)
        note = (f"BatchNormalization: build the torch BatchNorm with eps={eps} (Keras default 1e-3, torch 1e-5) and "
                f"momentum={1 - mom:.6g} (torch momentum = 1 - Keras momentum {mom})")
    return Mapping(tuple(rules), (note,))


# Notes of layers read from a checkpoint (no config): the same for every layer, so they appear once.
BN_UNKNOWN_NOTE = ("BatchNormalization: epsilon and momentum are not stored in a TF checkpoint; build each torch BatchNorm with "
                   "the Keras layer's (Keras defaults eps=1e-3, momentum 0.99 = torch momentum 0.01; torch's: 1e-5, 0.1)")
LN_UNKNOWN_NOTE = ("LayerNormalization: epsilon is not stored in a TF checkpoint; build each torch LayerNorm with the Keras "
                   "layer's (Keras default 1e-3, torch 1e-5)")


def _layernorm(layer: KerasLayer, p: str, **_: Any) -> Mapping:
    roles = layer.roles()
    rules = tuple(Rename(roles[k].key, _key(p, t)) for k, t in (("gamma", "weight"), ("beta", "bias")) if k in roles)
    if "epsilon" not in layer.config:
        note = LN_UNKNOWN_NOTE
    else:
        note = f"LayerNormalization: build the torch LayerNorm with eps={layer.config['epsilon']} (Keras default 1e-3, torch 1e-5)"
    return Mapping(rules, (note,))


def _embedding(layer: KerasLayer, p: str, **_: Any) -> Mapping:
    return Mapping((Rename(layer.weight("embeddings").key, _key(p, "weight")),), (
        f"{layer.name}: Keras 3 on TensorFlow squares an embedding's gradient per occurrence of an index (IndexedSlices): "
        "to resume its Adam/RMSprop exactly, build nn.Embedding(..., sparse=True) and use KerasAdam/KerasRMSprop; "
        "tf.keras 2 sums repeated rows first, as a dense nn.Embedding does",))


def _check_activations(layer: KerasLayer, config: dict[str, Any]) -> None:
    act, rec = config.get("activation", "tanh"), config.get("recurrent_activation", "sigmoid")
    if act != "tanh" or rec != "sigmoid":
        raise ConversionError(
            f"{layer.class_name} {layer.name!r} uses activation={act!r}, recurrent_activation={rec!r}; "
            "torch's LSTM/GRU are fixed to tanh/sigmoid, so this layer has no torch equivalent"
        )


def _rnn_rules(layer: KerasLayer, cls: str, config: dict[str, Any], p: str, role_prefix: str = "", suffix: str = "") -> list[Rule]:
    roles = layer.roles()
    kernel, rkernel = roles[role_prefix + "kernel"], roles[role_prefix + "recurrent_kernel"]
    _check_activations(layer, config)
    ih, hh, bih, bhh = (_key(p, f"{n}_l0{suffix}") for n in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"))
    if cls == "LSTM":
        # Keras gates i, f, c, o are torch's i, f, g, o: the same order, no reordering.
        rules: list[Rule] = [
            Convert((kernel.key,), (ih,), (Transpose((1, 0)),)),
            Convert((rkernel.key,), (hh,), (Transpose((1, 0)),)),
        ]
        if role_prefix + "bias" in roles:
            rules.append(Convert((roles[role_prefix + "bias"].key,), (bih, bhh), (AppendZeros(1),)))
        return rules
    if not config.get("reset_after", True):
        raise ConversionError(
            f"GRU {layer.name!r} has reset_after=False: it applies the reset gate before the recurrent "
            "matrix product, torch.nn.GRU after it (Keras reset_after=True); the two compute different "
            "functions and no weight mapping makes them equal. Retrain with reset_after=True (the Keras default)"
        )
    reorder = GateReorder(("z", "r", "h"), ("r", "z", "h"), 1)
    rules = [
        Convert((kernel.key,), (ih,), (reorder, Transpose((1, 0)))),
        Convert((rkernel.key,), (hh,), (reorder, Transpose((1, 0)))),
    ]
    if role_prefix + "bias" in roles:
        bias = roles[role_prefix + "bias"]
        units3 = bias.shape[-1]
        rules.append(Convert((bias.key,), (bih, bhh), (Split(0, (1, 1)), Reshape((units3,)), GateReorder(("z", "r", "h"), ("r", "z", "h"), 0))))
    return rules


def _lstm(layer: KerasLayer, p: str, **_: Any) -> Mapping:
    return Mapping(tuple(_rnn_rules(layer, "LSTM", layer.config, p)), _RNN_NOTES["LSTM"](layer.name))


def _gru(layer: KerasLayer, p: str, **_: Any) -> Mapping:
    return Mapping(tuple(_rnn_rules(layer, "GRU", layer.config, p)), _RNN_NOTES["GRU"](layer.name) + _assumed(layer.name, layer.config))


def _assumed(name: str, config: dict[str, Any]) -> tuple[str, ...]:
    if "reset_after" in config.get("assumed", ()):
        return (f"ASSUMED {name}: reset_after=True (a GRU without bias stores nothing that tells; "
                "with reset_after=False torch's GRU computes a different function)",)
    return ()


_RNN_NOTES = {
    "LSTM": lambda n: (f"{n}: Keras's single LSTM bias goes to bias_ih, zeros to bias_hh (back: their sum); torch trains both, so the effective bias learns with twice the step; "
                        "for an exact resume freeze bias_hh (bias_hh_l0.requires_grad_(False))",),
    "GRU": lambda n: (f"{n}: GRU gates reordered from Keras (z, r, h) to torch (r, z, n); bias row 0 -> bias_ih, row 1 -> bias_hh",),
}


def _bidirectional(layer: KerasLayer, p: str, **_: Any) -> Mapping:
    inner = layer.config.get("layer", {})
    cls = inner.get("class_name") if isinstance(inner, dict) else None
    if cls is None:  # no config: guess from the weights (GRU biases are 2-D)
        cls = "GRU" if len(layer.weight("forward/bias").shape) == 2 else "LSTM"
    if cls not in ("LSTM", "GRU"):
        raise ConversionError(f"Bidirectional {layer.name!r} wraps a {cls}; only LSTM and GRU have torch equivalents")
    inner_config = inner.get("config", {}) if isinstance(inner, dict) else {}
    rules = _rnn_rules(layer, cls, inner_config, p, "forward/") + _rnn_rules(layer, cls, inner_config, p, "backward/", "_reverse")
    notes = _RNN_NOTES[cls](layer.name) + _assumed(layer.name, inner_config)
    merge = layer.config.get("merge_mode", "concat")
    if merge != "concat":
        notes += (f"{layer.name}: merge_mode={merge!r}; torch concatenates the two directions, combine them yourself",)
    return Mapping(tuple(rules), notes)


def _mha(layer: KerasLayer, p: str, **_: Any) -> Mapping:
    q, k, v, o = (layer.weight(f"{n}/kernel") for n in ("query", "key", "value", "attention_output"))
    d, heads, head_dim = q.shape
    if not (k.shape == v.shape == q.shape and o.shape == (heads, head_dim, d) and heads * head_dim == d):
        raise ConversionError(
            f"MultiHeadAttention {layer.name!r}: query/key/value kernels {q.shape}/{k.shape}/{v.shape}, output {o.shape}; "
            "torch.nn.MultiheadAttention needs query, key and value of one width d, value_dim == key_dim, "
            "num_heads * key_dim == d and an output of width d"
        )
    inner = heads * head_dim
    rules: list[Rule] = [
        Convert((q.key, k.key, v.key), (_key(p, "in_proj_weight"),), (Reshape((d, inner)), Transpose((1, 0)), Concat(0))),
        Convert((o.key,), (_key(p, "out_proj.weight"),), (Reshape((inner, d)), Transpose((1, 0)))),
    ]
    roles = layer.roles()
    if "query/bias" in roles:
        rules += [
            Convert(tuple(roles[f"{n}/bias"].key for n in ("query", "key", "value")), (_key(p, "in_proj_bias"),), (Reshape((inner,)), Concat(0))),
            Rename(roles["attention_output/bias"].key, _key(p, "out_proj.bias")),
        ]
    return Mapping(tuple(rules), (f"{layer.name}: torch.nn.MultiheadAttention({d}, {heads}, batch_first=True); both scale queries by 1/sqrt({head_dim})",))


LAYER_CONVERTERS: dict[str, Converter] = {
    "Dense": _dense,
    "Conv1D": _conv,
    "Conv2D": _conv,
    "Conv3D": _conv,
    "Conv1DTranspose": _conv,
    "Conv2DTranspose": _conv,
    "Conv3DTranspose": _conv,
    "DepthwiseConv2D": _depthwise,
    "DepthwiseConv1D": _depthwise,
    "SeparableConv2D": _separable,
    "SeparableConv1D": _separable,
    "BatchNormalization": _batchnorm,
    "LayerNormalization": _layernorm,
    "Embedding": _embedding,
    "LSTM": _lstm,
    "GRU": _gru,
    "Bidirectional": _bidirectional,
    "MultiHeadAttention": _mha,
}


def layer_rules(layer: KerasLayer, prefix: str, *, flatten_from: Sequence[int] | None = None) -> Mapping:
    """The rules converting ``layer``'s weights to the torch module at ``prefix``.

    Args:
        layer: the Keras layer description.
        prefix: the torch module's path in the model (``"features.0"``; ``""`` for the root).
        flatten_from: for a Dense after a channels-last Flatten, the Flatten's input shape
            without the batch dim (``(H, W, C)``); see :func:`find_flatten_dense`.

    Raises:
        ConversionError: the class has no torch equivalent, or its config rules one out.

    Example:
        >>> bn = KerasLayer("bn", "BatchNormalization", {"epsilon": 1e-3},
        ...                 tuple(KerasWeight(f"bn/{n}", (4,)) for n in ("gamma", "beta", "moving_mean", "moving_variance")))
        >>> sorted(layer_rules(bn, "b").plan(bn.specs()).target_specs)
        ['b.bias', 'b.num_batches_tracked', 'b.running_mean', 'b.running_var', 'b.weight']
    """
    fn = LAYER_CONVERTERS.get(layer.class_name)
    if fn is None:
        raise ConversionError(
            f"layer {layer.name!r} is a {layer.class_name}, which has no conversion "
            f"(supported: {', '.join(sorted(LAYER_CONVERTERS))}); write its rules as a Mapping"
        )
    if flatten_from is not None and layer.class_name != "Dense":
        raise ConversionError(f"flatten_from applies to Dense layers only, not {layer.class_name} {layer.name!r}")
    return fn(layer, prefix, flatten_from=flatten_from) if flatten_from is not None else fn(layer, prefix)


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
