"""The built-in Keras layer kinds: for each class its rules to torch, the signature of its
weights, and the torch modules it accepts, registered with :func:`.registry.register_layer`.

Example:
    >>> from ckptfmt.converters.mapping import LAYER_KINDS
    >>> [k for k in LAYER_KINDS if k.startswith("Conv2D")]
    ['Conv2D', 'Conv2DTranspose']
    >>> LAYER_KINDS["BatchNormalization"].keeps_channels
    True
"""

from __future__ import annotations

__all__ = ["conv_kernel_axes", "flatten_kernel_ops"]

import math
import re
from collections.abc import Sequence
from typing import Any

from ckptfmt.errors import ConversionError

from .registry import (
    Accepts,
    KerasLayer,
    ModuleNotes,
    Signature,
    register_layer,
)
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
    Transpose,
)


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


# -- signatures: a kind from a checkpoint's weights ---------------------------------------------


def _kernel_only(shapes: dict[str, tuple[int, ...]], rank: int) -> bool:
    return set(shapes) in ({"kernel"}, {"kernel", "bias"}) and len(shapes["kernel"]) == rank


def _dense_signature(probe: KerasLayer, shapes: dict[str, tuple[int, ...]]) -> dict[str, Any] | None:
    return {} if _kernel_only(shapes, 2) else None


def _conv_signature(kind: str, d: int) -> Signature:
    """Conv, ConvTranspose and DepthwiseConv all store a kernel ``(*k, a, b)``; the bias tells
    them apart: ``b`` outputs for a convolution, ``a`` for a transposed one, ``a*b`` for a
    depthwise one (not when ``a == b``, nor without a bias: then they are alternatives)."""

    def signature(probe: KerasLayer, shapes: dict[str, tuple[int, ...]]) -> dict[str, Any] | None:
        if not _kernel_only(shapes, d + 2):
            return None
        kernel, bias = shapes["kernel"], shapes.get("bias")
        a, b = kernel[-2], kernel[-1]
        outputs = {f"Conv{d}D": b, f"Conv{d}DTranspose": a, **({f"DepthwiseConv{d}D": a * b} if d in (1, 2) else {})}
        if bias is None or tuple(bias) == (outputs[kind],):
            return {}
        raise ConversionError(
            f"layer {probe.name!r}: kernel {kernel} with bias {bias} fits no convolution (a Conv{d}D bias has {b} values, "
            f"a Conv{d}DTranspose bias {a}); write its rules in a mapping file and pass it with --map"
        )

    return signature


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


def _rnn_signature(kind: str) -> Signature:
    def signature(probe: KerasLayer, shapes: dict[str, tuple[int, ...]]) -> dict[str, Any] | None:
        if not {"kernel", "recurrent_kernel"} <= set(shapes) <= {"kernel", "recurrent_kernel", "bias"}:
            return None
        got, config = _rnn_kind(probe.name, shapes["kernel"], shapes["recurrent_kernel"][0], shapes.get("bias"))
        return config if got == kind else None

    return signature


_DIRECTION = re.compile(r"^_?(forward|backward)(_|$)")  # Bidirectional's forward_layer / forward_lstm...


def _bidirectional_signature(probe: KerasLayer, shapes: dict[str, tuple[int, ...]]) -> dict[str, Any] | None:
    if not any(_DIRECTION.match(c) for w in probe.weights for c in w.key.split("/")):
        return None
    fwd = {r.split("/", 1)[1]: s for r, s in shapes.items() if r.startswith("forward/")}
    bwd = {r.split("/", 1)[1] for r in shapes if r.startswith("backward/")}
    if not ({"kernel", "recurrent_kernel"} <= set(fwd) and {"kernel", "recurrent_kernel"} <= bwd):
        return None
    inner = _rnn_kind(probe.name, fwd["kernel"], fwd["recurrent_kernel"][0], fwd.get("bias"))
    return {"layer": {"class_name": inner[0], "config": inner[1]}}


_MHA_PARTS = ("query", "key", "value", "attention_output")


def _mha_signature(probe: KerasLayer, shapes: dict[str, tuple[int, ...]]) -> dict[str, Any] | None:
    have = set(shapes)
    if {f"{p}/kernel" for p in _MHA_PARTS} <= have <= {f"{p}/{r}" for p in _MHA_PARTS for r in ("kernel", "bias")}:
        return {}
    return None


def _separable_signature(d: int) -> Signature:
    def signature(probe: KerasLayer, shapes: dict[str, tuple[int, ...]]) -> dict[str, Any] | None:
        if set(shapes) in ({"depthwise_kernel", "pointwise_kernel"}, {"depthwise_kernel", "pointwise_kernel", "bias"}):
            return {} if len(shapes["pointwise_kernel"]) == d + 2 else None
        return None

    return signature


def _roles_signature(required: set[str], allowed: set[str]) -> Signature:
    """Weights whose roles include ``required`` (at least one role when empty) and are within ``allowed``."""

    def signature(probe: KerasLayer, shapes: dict[str, tuple[int, ...]]) -> dict[str, Any] | None:
        have = set(shapes)
        return {} if have and required <= have <= allowed else None

    return signature


# -- torch modules: what a layer may become -----------------------------------------------------


def _nn() -> Any:
    from torch import nn  # only model-guided matching asks, and it has torch

    return nn


def _module_accepts(name: str) -> Accepts:
    return lambda layer, module: isinstance(module, getattr(_nn(), name))


def _conv_accepts(layer: KerasLayer, module: Any) -> bool:
    d, cfg = int(layer.class_name[4]), layer.config
    # a checkpoint stores no config: then the kernel's shape is the only check on groups
    return isinstance(module, getattr(_nn(), f"Conv{d}d")) and ("groups" not in cfg or module.groups == cfg["groups"])


def _convt_accepts(layer: KerasLayer, module: Any) -> bool:
    return isinstance(module, getattr(_nn(), f"ConvTranspose{layer.class_name[4]}d"))


def _depthwise_accepts(layer: KerasLayer, module: Any) -> bool:
    # the weight (in*m, 1, *k) of Conv(in, in*m, groups=in) also fits Conv(in*m, in*m,
    # groups=in*m): the input channels are the kernel's (*k, in, m)
    try:
        kernel = layer.roles()["depthwise_kernel" if "depthwise_kernel" in layer.roles() else "kernel"].shape
    except (ConversionError, KeyError):
        kernel = None
    return (isinstance(module, getattr(_nn(), f"Conv{layer.class_name[-2]}d")) and module.groups == module.in_channels
            and (not kernel or module.in_channels == kernel[-2]))


def _separable_accepts(layer: KerasLayer, module: Any) -> bool:
    c = getattr(_nn(), f"Conv{layer.class_name[-2]}d")
    return isinstance(getattr(module, "depthwise", None), c) and isinstance(getattr(module, "pointwise", None), c)


def _rnn_accepts(layer: KerasLayer, module: Any) -> bool:
    return type(module) is getattr(_nn(), layer.class_name) and not module.bidirectional and module.num_layers == 1


def _bidirectional_accepts(layer: KerasLayer, module: Any) -> bool:
    cfg, nn = layer.config, _nn()
    inner = cfg.get("layer", {}).get("class_name") if isinstance(cfg.get("layer"), dict) else None
    return (isinstance(module, (nn.LSTM, nn.GRU)) and module.bidirectional and module.num_layers == 1
            and inner in (None, type(module).__name__))


def _batchnorm_accepts(layer: KerasLayer, module: Any) -> bool:
    return isinstance(module, _nn().modules.batchnorm._BatchNorm)


def _norm_notes(momentum: bool) -> ModuleNotes:
    """Epsilon (and a BatchNorm's momentum) the weights do not carry, and the variance convention.

    A TF checkpoint stores no layer config, so eps and momentum are unknown: the note says so
    and gives the values found in the torch model, which must be the Keras model's. With a
    config (a live Keras model, a ``.keras`` file) a difference is a ``MISMATCH``.
    """
    cls = "BatchNormalization" if momentum else "LayerNormalization"
    unknown = ("UNKNOWN {what} of {{count}} layer(s): {role} is not stored in a TF checkpoint; the torch model has "
               "{{found}}. They must be the Keras model's (Keras defaults: epsilon 1e-3, momentum 0.99; keras.applications' "
               "DenseNet/ResNet use epsilon 1.001e-5, MobileNetV2 momentum 0.999)")

    def notes(layer: KerasLayer, path: str, module: Any) -> list[tuple[str, str]]:
        out = []
        eps = layer.config.get("epsilon")
        if eps is None:
            out.append((unknown.format(what=f"{cls} epsilon", role="epsilon"), f"eps={module.eps:g}"))
        elif abs(module.eps - eps) > 1e-12:
            out.append((f"MISMATCH {cls} epsilon: Keras {eps:g}, torch eps={module.eps:g}; outputs will differ "
                        "({count} layer(s): {layers})", ""))
        if not momentum:
            return out
        if module.momentum is not None:
            mom = layer.config.get("momentum")
            if mom is None:
                out.append((unknown.format(what=f"{cls} momentum", role="momentum"),
                            f"momentum={module.momentum:g} (Keras momentum {1 - module.momentum:.6g})"))
            elif abs(module.momentum - (1 - mom)) > 1e-9:
                out.append((f"MISMATCH BatchNormalization momentum: Keras {mom:g} is torch momentum={1 - mom:.6g}, the torch "
                            f"module has {module.momentum:g}; running statistics will update differently "
                            "({count} layer(s): {layers})", ""))
        out.append(("BatchNormalization variance ({count} layer(s)): Keras updates moving_variance with the biased batch "
                    "variance, torch running_var with the unbiased one (x n/(n-1)); resumed training moves them apart "
                    "(eval outputs right after the conversion are equal)", ""))
        return out

    return notes


# -- feature maps: channels a layer leaves (for the Flatten before a Dense) ----------------------


def _conv_channels(layer: KerasLayer) -> int:
    *_, a, b = layer.weight("kernel").shape
    if layer.class_name.endswith("Transpose"):
        return a
    return a * b if layer.class_name.startswith("Depthwise") else b


def _separable_channels(layer: KerasLayer) -> int:
    return layer.weight("pointwise_kernel").shape[-1]


# -- the built-in kinds -------------------------------------------------------------------------


def _register_builtins() -> None:
    register_layer("Dense", _dense, signature=_dense_signature, accepts=_module_accepts("Linear"))
    for d in (1, 2, 3):
        # within a family: Conv, then ConvTranspose, then DepthwiseConv (the first fit is assumed)
        register_layer(f"Conv{d}D", _conv, signature=_conv_signature(f"Conv{d}D", d), accepts=_conv_accepts,
                       out_channels=_conv_channels)
        register_layer(f"Conv{d}DTranspose", _conv, signature=_conv_signature(f"Conv{d}DTranspose", d),
                       accepts=_convt_accepts, out_channels=_conv_channels)
        if d in (1, 2):
            register_layer(f"DepthwiseConv{d}D", _depthwise, signature=_conv_signature(f"DepthwiseConv{d}D", d),
                           accepts=_depthwise_accepts, out_channels=_conv_channels)
            register_layer(f"SeparableConv{d}D", _separable, signature=_separable_signature(d), accepts=_separable_accepts,
                           out_channels=_separable_channels)
    register_layer("BatchNormalization", _batchnorm, accepts=_batchnorm_accepts, module_notes=_norm_notes(True),
                   signature=_roles_signature({"moving_mean", "moving_variance"}, {"gamma", "beta", "moving_mean", "moving_variance"}),
                   keeps_channels=True)
    register_layer("LayerNormalization", _layernorm, signature=_roles_signature(set(), {"gamma", "beta"}),
                   accepts=_module_accepts("LayerNorm"), module_notes=_norm_notes(False))
    register_layer("Embedding", _embedding, signature=_roles_signature({"embeddings"}, {"embeddings"}),
                   accepts=_module_accepts("Embedding"))
    register_layer("LSTM", _lstm, signature=_rnn_signature("LSTM"), accepts=_rnn_accepts)
    register_layer("GRU", _gru, signature=_rnn_signature("GRU"), accepts=_rnn_accepts)
    register_layer("Bidirectional", _bidirectional, signature=_bidirectional_signature, accepts=_bidirectional_accepts)
    register_layer("MultiHeadAttention", _mha, signature=_mha_signature, accepts=_module_accepts("MultiheadAttention"))


_register_builtins()


