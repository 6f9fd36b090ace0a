"""What a Keras file resolves to, and what Keras 3 saves for each layer class.

:class:`KerasFileCheckpoint` is the :class:`~.checkpoint.KerasCheckpoint` both file readers
(:mod:`.kerasfile_keras3`, :mod:`.kerasfile_tfkeras`) produce. A Keras 3 weights file holds
each layer's variables by position (``vars/0, 1, ...``): :data:`LAYER_SPECS` gives a built-in
class's variables in saving order and the config flags that drop optional ones,
:data:`COMPOSITES` the sub-objects of layers built from others (an LSTM's cell, an
attention's projections). :func:`roles_of` names a group's positional variables from its
class, :func:`guess_roles` from shapes alone where only one layout fits, and
:func:`keras_layer` checks the class against the weights for the converters.

Part of :mod:`ckptfmt.converters.keras.kerasfile`, which re-exports the public names.
"""

from __future__ import annotations

__all__ = [
    "KerasFileCheckpoint",
    "FileObject",
    "FileLayer",
    "LAYER_SPECS",
    "COMPOSITES",
    "STATE_ONLY",
    "CLASS_BY_SNAKE",
    "SUFFIX_N",
    "KNOWN_TO_CONVERTERS",
    "keras_layer",
    "useful_config",
    "roles_of",
    "guess_roles",
]

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ckptfmt.errors import ConversionError, FormatError

from ..mapping.registry import KerasLayer, KerasWeight
from .checkpoint import KerasCheckpoint
from .infer import infer_kind
from .kerasfile_h5 import KerasFileReader

# A group name and its numeric suffix (``dense_3``): Keras numbers same-class layers in order.
SUFFIX_N = re.compile(r"^(?P<base>.+?)(_(?P<n>\d+))?$")


@dataclass(frozen=True, slots=True)
class KerasFileCheckpoint(KerasCheckpoint):
    """A :class:`KerasCheckpoint` read from a Keras file, with what only such files carry.

    Attributes (besides :class:`KerasCheckpoint`'s, whose keys here are HDF5 dataset paths):
        file_kind: ``"keras"``, ``"keras3-h5"`` (a Keras 3 ``.weights.h5``) or ``"tfkeras-h5"``.
        optimizer_config: the optimizer's class and hyperparameters from the file's config
            (``{"class_name": "Adam", "beta_1": 0.9, ...}``), empty when the file has none.
        order_known: whether the layer order is the model's (from a config, or solved from
            the optimizer's slot shapes).
        notes: what the reader assumed or could not tell.
    """

    file_kind: str = ""
    optimizer_config: dict[str, Any] = field(default_factory=dict)
    order_known: bool = True
    notes: tuple[str, ...] = ()


# Keras 3 built-in layers: their own variables in saving order (trainable first), which
# ones are trainable, and the config flags that drop optional ones.
@dataclass(frozen=True, slots=True)
class _LayerSpec:
    roles: tuple[str, ...]
    trainable: frozenset[str]
    optional: dict[str, str] = field(default_factory=dict)  # role -> config flag that creates it


_KERNEL_BIAS = _LayerSpec(("kernel", "bias"), frozenset({"kernel", "bias"}), {"bias": "use_bias"})
LAYER_SPECS: dict[str, _LayerSpec] = {
    **{c: _KERNEL_BIAS for c in ("Dense", "Conv1D", "Conv2D", "Conv3D", "Conv1DTranspose", "Conv2DTranspose",
                                  "Conv3DTranspose", "DepthwiseConv1D", "DepthwiseConv2D")},
    "SeparableConv1D": _LayerSpec(("depthwise_kernel", "pointwise_kernel", "bias"),
                                  frozenset({"depthwise_kernel", "pointwise_kernel", "bias"}), {"bias": "use_bias"}),
    "SeparableConv2D": _LayerSpec(("depthwise_kernel", "pointwise_kernel", "bias"),
                                  frozenset({"depthwise_kernel", "pointwise_kernel", "bias"}), {"bias": "use_bias"}),
    "BatchNormalization": _LayerSpec(("gamma", "beta", "moving_mean", "moving_variance"), frozenset({"gamma", "beta"}),
                                     {"gamma": "scale", "beta": "center"}),
    "LayerNormalization": _LayerSpec(("gamma", "beta"), frozenset({"gamma", "beta"}), {"gamma": "scale", "beta": "center"}),
    "Embedding": _LayerSpec(("embeddings",), frozenset({"embeddings"})),
    "LSTMCell": _LayerSpec(("kernel", "recurrent_kernel", "bias"), frozenset({"kernel", "recurrent_kernel", "bias"}),
                           {"bias": "use_bias"}),
    "GRUCell": _LayerSpec(("kernel", "recurrent_kernel", "bias"), frozenset({"kernel", "recurrent_kernel", "bias"}),
                          {"bias": "use_bias"}),
    "SimpleRNNCell": _LayerSpec(("kernel", "recurrent_kernel", "bias"), frozenset({"kernel", "recurrent_kernel", "bias"}),
                                {"bias": "use_bias"}),
}
# Composite layers: their sub-objects (HDF5 group paths below the layer), in the order of
# their trainable variables, and the class of each.
COMPOSITES: dict[str, tuple[tuple[str, str], ...]] = {
    "LSTM": (("cell", "LSTMCell"),),
    "GRU": (("cell", "GRUCell"),),
    "SimpleRNN": (("cell", "SimpleRNNCell"),),
    "MultiHeadAttention": (("query_dense", "EinsumDense"), ("key_dense", "EinsumDense"), ("value_dense", "EinsumDense"),
                           ("output_dense", "EinsumDense")),
}
LAYER_SPECS["EinsumDense"] = _KERNEL_BIAS
# Weightless objects Keras saves (groups without datasets, or state that is not a weight).
STATE_ONLY = {"seed_generator", "SeedGenerator"}


def _snake(name: str) -> str:
    """Keras's ``naming.to_snake_case``: the group names of container items."""
    s = re.sub(r"(.)([A-Z][a-z]+)", r"\1_\2", name)
    s = re.sub(r"([a-z])([A-Z])", r"\1_\2", s).lower()
    return s if s[:1] != "_" else "private" + s


CLASS_BY_SNAKE = {_snake(c): c for c in [*LAYER_SPECS, *COMPOSITES, "Bidirectional", "Functional", "Sequential", "InputLayer",
                                       "Flatten", "Dropout"]}


@dataclass
class FileObject:
    """One saveable object of a Keras 3 weights file."""

    path: str  # its HDF5 group (the parent of "vars")
    name: str  # the `name` attribute
    n: int  # its datasets vars/0..n-1
    children: list[str] = field(default_factory=list)


@dataclass
class FileLayer:
    """A layer being resolved: name, class, config, and its weights as (role path, h5 key)."""

    name: str
    class_name: str
    config: dict[str, Any]
    weights: list[tuple[str, str]]  # (variable path, h5 key), saving order
    trainable: list[str]  # h5 keys of trainable variables, in optimizer order
    chain: str  # layers sharing a chain keep their relative order
    ordinal: int
    input_shape: tuple[int | None, ...] | None = None
    class_known: bool = True


def keras_layer(layer: FileLayer, ws: tuple[KerasWeight, ...]) -> KerasLayer:
    """The converter's view of a layer: its class (config or group name) checked against its weights."""
    cls, cfg = layer.class_name, useful_config(layer.config)
    if cls == "Flatten" and cfg.get("data_format") == "channels_first":
        raise ConversionError(f"Flatten {layer.name!r} takes channels-first maps, whose row order ckptfmt does not "
                              "convert yet; write the Dense's rules in a mapping file (--map)")
    if cls == "Flatten" or not ws:
        return KerasLayer(layer.name, cls, cfg, ws, input_shape=layer.input_shape)
    kind, extra = infer_kind(layer.name, ws)
    if layer.class_known and cls in KNOWN_TO_CONVERTERS:
        if cls != kind and cls not in extra.get("alternatives", ()):
            raise ConversionError(f"layer {layer.name!r} is a Keras {cls} but its weights look like a {kind}")
        extra = {k: v for k, v in extra.items() if k not in ("alternatives", "assumed")}
    elif layer.class_known and cls != "?":
        raise ConversionError(f"layer {layer.name!r} is a Keras {cls}, which the converter does not know (its weights "
                              f"look like a {kind}); write its rules in a mapping file (--map)")
    else:
        cls = kind
    if cls == "Bidirectional" and isinstance(cfg.get("layer"), dict):
        inner = cfg["layer"]
        cfg["layer"] = {"class_name": inner.get("class_name"), "config": useful_config(inner.get("config") or {})}
    return KerasLayer(layer.name, cls, {**extra, **cfg}, ws, input_shape=layer.input_shape)


# The Keras classes the converters have rules for (the class a file names is trusted for these).
KNOWN_TO_CONVERTERS = {"Dense", "Conv1D", "Conv2D", "Conv3D", "Conv1DTranspose", "Conv2DTranspose", "Conv3DTranspose",
                        "DepthwiseConv1D", "DepthwiseConv2D", "SeparableConv1D", "SeparableConv2D", "BatchNormalization",
                        "LayerNormalization", "Embedding", "LSTM", "GRU", "Bidirectional", "MultiHeadAttention"}


def useful_config(cfg: dict[str, Any]) -> dict[str, Any]:
    """The entries of a layer's config the converters use (epsilon, momentum, padding...)."""
    keep = ("epsilon", "momentum", "reset_after", "axis", "center", "scale", "use_bias", "padding", "strides", "data_format",
            "groups", "num_heads", "key_dim", "value_dim", "layer", "merge_mode", "trainable")
    return {k: cfg[k] for k in keep if k in cfg}


def roles_of(reader: KerasFileReader, o: FileObject, cls: str, cfg: dict[str, Any]) -> list[str]:
    """The roles of a built-in layer's positional variables, in saving order.

    The config's flags (``use_bias``, ``center``, ``scale``) say which optional variables
    exist; without a config the count decides, and is refused when two layouts fit it.
    """
    spec = LAYER_SPECS[cls]
    if cfg:
        roles = [r for r in spec.roles if cfg.get(spec.optional.get(r, ""), True) is not False]
    else:
        roles = list(spec.roles)
        if o.n != len(roles):
            drop = [r for r in spec.roles if r in spec.optional]
            candidates = [[r for r in spec.roles if r not in d] for d in _subsets(drop) if len(spec.roles) - len(d) == o.n]
            if len(candidates) != 1:
                raise ConversionError(
                    f"{reader.path}: {cls} {o.name!r} ({o.path}) has {o.n} variables, which fit "
                    f"{' or '.join('/'.join(c) for c in candidates) or 'no known layout'}; convert the model's .keras "
                    "file instead (its config says which)")
            roles = candidates[0]
    if len(roles) != o.n:
        raise FormatError(f"{reader.path}: {cls} {o.name!r} ({o.path}) has {o.n} variables; its config implies "
                          f"{len(roles)} ({', '.join(roles)})")
    return roles


def _subsets(items: list[str]) -> list[list[str]]:
    """Every subset of ``items`` (the optional roles a layer may lack)."""
    out: list[list[str]] = [[]]
    for it in items:
        out += [s + [it] for s in out]
    return out


def guess_roles(reader: KerasFileReader, o: FileObject) -> list[str]:
    """Roles of a layer whose class the file does not name (a subclassed model's attribute),
    where its shapes allow one layout only; else ``var_N`` (refused when converted)."""
    shapes = [reader.shape(f"{o.path}/vars/{i}") for i in range(o.n)]
    for fits, roles in _SHAPE_LAYOUTS:
        if fits(shapes):
            return list(roles)
    return [f"var_{i}" for i in range(o.n)]


def _kernel_and_bias(shapes: list[tuple[int, ...]]) -> bool:
    """A Dense or convolution kernel and a bias as long as one of its last two dimensions."""
    return len(shapes) == 2 and 2 <= len(shapes[0]) <= 5 and len(shapes[1]) == 1 and shapes[1][0] in shapes[0][-2:]


def _conv_kernel(shapes: list[tuple[int, ...]]) -> bool:
    """A convolution without bias (a rank-2 one may be an Embedding)."""
    return len(shapes) == 1 and 3 <= len(shapes[0]) <= 5


def _recurrent_cell(shapes: list[tuple[int, ...]]) -> bool:
    """An RNN cell: kernel and recurrent kernel of the same width, a whole number of gates, and a bias."""
    if len(shapes) != 3:
        return False
    kernel, recurrent, bias = shapes
    return (len(kernel) == 2 and len(recurrent) == 2 and kernel[1] == recurrent[1] and recurrent[1] % recurrent[0] == 0
            and len(bias) in (1, 2))


def _same_vectors(n: int) -> Callable[[list[tuple[int, ...]]], bool]:
    """A test for ``n`` vectors of one shape (a normalization's scale, offset and statistics)."""

    def fits(shapes: list[tuple[int, ...]]) -> bool:
        return len(shapes) == n and all(len(s) == 1 and s == shapes[0] for s in shapes)

    return fits


# Layouts tried in order by guess_roles: each a test of the variables' shapes, and their roles.
_SHAPE_LAYOUTS: tuple[tuple[Callable[[list[tuple[int, ...]]], bool], tuple[str, ...]], ...] = (
    (_kernel_and_bias, ("kernel", "bias")),
    (_conv_kernel, ("kernel",)),
    (_recurrent_cell, ("kernel", "recurrent_kernel", "bias")),
    (_same_vectors(4), ("gamma", "beta", "moving_mean", "moving_variance")),
    (_same_vectors(2), ("gamma", "beta")),
)
