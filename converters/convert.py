"""Convert a Keras 3 training checkpoint (TF TensorBundle) to PyTorch and back: weights and
optimizer state, without TensorFlow.

A TF checkpoint stores variables and an object graph, not the Keras layer classes. This
module reads the object graph (:mod:`ckptfmt.converters.tf.object_graph`), groups the
variables by the layer object that owns them, infers each layer's kind from its attribute
names and shapes (:func:`describe_checkpoint_layers`), and then either

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
    "diff_converted",
]

import dataclasses
import importlib
import importlib.util
import os
import re
import sys
from collections.abc import Callable, Mapping as AbcMapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ckptfmt.errors import (
    CheckpointExistsError,
    ConversionError,
    FrameworkNotAvailableError,
    TensorNotFoundError,
    UnmappedKeyError,
)

from . import _convert_io
from .kinds import DiffReport, Source, TensorInfo, diff_sources, open_any
from .mapping.layers import LAYER_CONVERTERS, KerasLayer, KerasWeight, find_flatten_dense, layer_rules
from .mapping.rules import Mapping, Plan, Rename, TensorSpec
from .optim.convert import KERAS_SLOTS, KerasOptimizerState, keras_to_torch_optimizer, torch_to_keras_optimizer
from .tf.bundle import OBJECT_GRAPH_KEY, TFCheckpointReader, TFCheckpointWriter, update_state_file
from .tf.object_graph import CheckpointObjectGraph, choose_roots, read_object_graph, split_object_path

# Sub-objects of one Keras layer: their variables belong to the enclosing layer.
_SUBOBJECTS = {
    "cell", "forward_layer", "backward_layer",
    "_query_dense", "_key_dense", "_value_dense", "_output_dense",
    "query_dense", "key_dense", "value_dense", "output_dense",
}
# Keras 3 default optimizer names (the prefix of the variable names TF records).
_DEFAULT_NAMES = {"adam": "Adam", "adamw": "AdamW", "sgd": "SGD", "rmsprop": "RMSprop"}
# Built-in namings for conversions without --model or --map: Keras 3 and tf.keras 2 layers
# (kinds inferred from the weights), or a plain tf.Module tree (object paths, values as is).
PRESETS = ("keras", "tf-module")
_DIRECTION = re.compile(r"^_?(forward|backward)(_|$)")  # Bidirectional's forward_layer / forward_lstm...
_KERAS2_ALIAS = re.compile(r"^layer(_with_weights)?-\d+$")
# tf.keras 2 slot names -> Keras 3's (the update rules are the same).
_SLOT_NAMES = {"m": "momentum", "v": "velocity", "vhat": "velocity_hat", "rms": "velocity", "mg": "average_gradient"}
_TF_KERAS_SLOT = re.compile(r"^(?P<optimizer>[^/]+)/(?P<slot>m|v|vhat|velocity|momentum|average_gradient)/(?P<variable>.+)$")
# Hyperparameters tf.keras 2 legacy optimizers store as variables.
_LEGACY_HYPER = {"beta_1", "beta_2", "decay", "momentum", "rho", "epsilon"}
# Keras 3 defaults of the hyperparameters a TF checkpoint does not store.
_KERAS_DEFAULTS: dict[str, dict[str, Any]] = {
    "Adam": {"beta_1": 0.9, "beta_2": 0.999, "epsilon": 1e-7, "amsgrad": False},
    "AdamW": {"beta_1": 0.9, "beta_2": 0.999, "epsilon": 1e-7, "amsgrad": False, "weight_decay": 0.004},
    "SGD": {"momentum": 0.0, "nesterov": False},
    "RMSprop": {"rho": 0.9, "momentum": 0.0, "epsilon": 1e-7, "centered": False},
}


# --------------------------------------------------------------------------------------------
# Reading a Keras checkpoint through its object graph


@dataclass(frozen=True, slots=True)
class KerasCheckpoint:
    """What a Keras 3 TF checkpoint holds, resolved through its object graph.

    Attributes:
        keys: ``{source key: checkpoint key}`` of the model's variables.
        shapes: ``{source key: shape}``.
        dtypes: ``{source key: numpy dtype}``.
        layers: the layers in model order (object-graph order), kinds inferred.
        slots: ``{source key: {slot name: checkpoint key}}``.
        iterations_key / learning_rate_key: the optimizer's scalars (None without optimizer).
        optimizer_name: the name TF recorded for the optimizer (``"adam"``), if any.
        hyperparameter_keys: ``{name: checkpoint key}`` of hyperparameters stored as variables
            (tf.keras 2 legacy optimizers: ``beta_1``, ``momentum``, ``decay``...).
        also_iterations / also_learning_rate: the wrapper's own copies when a
            LossScaleOptimizer (mixed precision) wraps the optimizer (whose keys are above).
        loss_scale_keys: its ``dynamic_scale`` and ``step_counter``.
        other: checkpoint keys that are neither model nor optimizer (``save_counter``).
        graph: the object graph.
    """

    keys: dict[str, str]
    shapes: dict[str, tuple[int, ...]]
    dtypes: dict[str, np.dtype]
    layers: tuple[KerasLayer, ...]
    slots: dict[str, dict[str, str]]
    iterations_key: str | None
    learning_rate_key: str | None
    optimizer_name: str | None
    other: tuple[str, ...]
    graph: CheckpointObjectGraph = field(repr=False)
    problems: tuple[str, ...] = ()
    hyperparameter_keys: dict[str, str] = field(default_factory=dict)
    also_iterations: tuple[str, ...] = ()
    also_learning_rate: tuple[str, ...] = ()
    loss_scale_keys: dict[str, str] = field(default_factory=dict)
    root: str = "model"

    def specs(self) -> dict[str, TensorSpec]:
        """``{source key: TensorSpec}`` of the model's variables."""
        return {k: TensorSpec(s, str(self.dtypes[k])) for k, s in self.shapes.items()}


def _natural(path: str) -> tuple:
    return tuple((0, int(p), "") if p.isdigit() else (1, 0, p) for p in path.split("/"))


def _layer_node(path: str) -> str:
    segs = path.split("/")[:-1]
    while len(segs) > 1 and segs[-1] in _SUBOBJECTS:
        segs.pop()
    return "/".join(segs)


def _infer_kind(name: str, weights: Sequence[KerasWeight]) -> tuple[str, dict[str, Any]]:
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


def read_keras_checkpoint(reader: TFCheckpointReader, *, root: str | None = None, optimizer_root: str | None = None,
                          infer_layers: bool = True) -> KerasCheckpoint:
    """Resolve a Keras 3 TF checkpoint's keys through its object graph.

    Args:
        reader: the open checkpoint.
        root: the attribute the model was saved under (``tf.train.Checkpoint(net=...)``); by
            default found from the object graph (an error lists the candidates when several
            attributes hold models).
        optimizer_root: likewise for the optimizer (found from the graph by default).
        infer_layers: infer each layer's kind (not needed with a mapping file).

    Raises:
        TensorNotFoundError: the checkpoint has no object graph.
        ConversionError: a layer of unknown kind (names it and how to add a rule).

    Example:
        >>> kc = read_keras_checkpoint(TFCheckpointReader("fixtures/tf/keras3_conv_adam"))
        >>> [(l.name, l.class_name) for l in kc.layers]
        [('conv', 'Conv2D'), ('bn', 'BatchNormalization'), ('head', 'Dense')]
    """
    graph = read_object_graph(reader)
    found_root, found_opt = choose_roots(graph, root, where=reader.prefix)
    root, optimizer_root = found_root, optimizer_root or found_opt or "optimizer"
    if root != "model":  # paths a user would name start at the model's own attribute
        graph = CheckpointObjectGraph(graph.graph, graph.where, preferred_root=root)
    infos = graph.resolve()
    model_vars: dict[str, Any] = {}  # ckpt key -> info
    slot_keys: dict[str, dict[str, str]] = {}  # variable ckpt key -> {slot: ckpt key}
    iterations_key = lr_key = opt_name = None
    hyper_keys: dict[str, str] = {}
    extra_iterations: list[str] = []  # a LossScaleOptimizer's own counters, set along with the inner's
    extra_lr: list[str] = []
    loss_scale: dict[str, str] = {}
    other: list[str] = []
    unknown_opt: list[str] = []
    for key in reader.keys():
        if key == OBJECT_GRAPH_KEY:
            continue
        info = infos.get(key)
        if info is None:
            other.append(key)
            continue
        segs = info.path.split("/")
        if info.slot is not None:
            slot_keys.setdefault(info.slot.variable_key, {})[_SLOT_NAMES.get(info.slot.slot_name, info.slot.slot_name)] = key
            opt_name = opt_name or (info.full_name.split("/")[0] if "/" in info.full_name else None)
        elif segs[0] == root and not (len(segs) > 2 and segs[1] == "optimizer"):
            model_vars[key] = info
        elif segs[0] in (optimizer_root, root):  # a compiled Keras 3 model tracks its optimizer as model/optimizer
            last = segs[-1].lstrip("_")
            # a LossScaleOptimizer (mixed precision) wraps the real one: its state is the inner's
            inner = "inner_optimizer" in segs
            if last in ("iterations", "iteration", "iter"):
                if iterations_key is None or inner:
                    iterations_key, key = key, iterations_key
                    opt_name = info.full_name.split("/")[0] if "/" in info.full_name else opt_name
                if key is not None:
                    extra_iterations.append(key)
            elif last == "learning_rate":
                if lr_key is None or inner:
                    lr_key, key = key, lr_key
                if key is not None:
                    extra_lr.append(key)
            elif last in ("dynamic_scale", "step_counter"):
                loss_scale[last] = key
            elif last in _LEGACY_HYPER:
                hyper_keys[last] = key
            else:
                unknown_opt.append(key)
        else:
            other.append(key)
    # tf.keras 2 (tf_keras) optimizers keep slots in lists the object graph does not tie to
    # variables; their names do: "{optimizer}/{slot}/{variable name}".
    by_name: dict[str, list[str]] = {}
    for k, i in model_vars.items():
        if i.full_name:
            by_name.setdefault(i.full_name, []).append(k)
    ambiguous: list[str] = []
    for key in list(unknown_opt):
        m = _TF_KERAS_SLOT.match(infos[key].full_name)
        if not m or m["variable"] not in by_name:
            continue
        unknown_opt.remove(key)
        owners = by_name[m["variable"]]
        slot = _SLOT_NAMES.get(m["slot"], m["slot"])
        if len(owners) > 1 or slot in slot_keys.get(owners[0], {}):
            ambiguous.append(f"optimizer variable {key} ({infos[key].full_name}) could belong to any of "
                             f"{', '.join(model_vars[o].path for o in owners)}, which share the name {m['variable']!r} "
                             "(tf.keras 2 ties slots to variables by name only: give the layers unique names, or --no-optimizer)")
            continue
        slot_keys.setdefault(owners[0], {})[slot] = key
        opt_name = opt_name or m["optimizer"]
    # Source keys: the recorded Keras variable paths when they are unique, else object paths.
    names = [i.full_name for i in model_vars.values()]
    use_names = all(names) and len(set(names)) == len(names)
    source = {k: (i.full_name if use_names else i.path) for k, i in model_vars.items()}
    groups: dict[str, list[str]] = {}
    for key, info in model_vars.items():
        groups.setdefault(_layer_node(info.path), []).append(key)
    layers: list[KerasLayer] = []
    taken: set[str] = set()
    for node in sorted(groups, key=lambda n: _tracking_order(graph, n)):
        keys = groups[node]
        weights = tuple(KerasWeight(source[k], tuple(reader.shape(k))) for k in keys)
        name = _layer_name(node, [(model_vars[k].path, model_vars[k].full_name) for k in keys], use_names)
        if name in taken:
            name = node
        taken.add(name)
        kind, config = _infer_kind(name, weights) if infer_layers else ("?", {})
        layers.append(KerasLayer(name, kind, config, weights))
    layers = _insert_flattens(layers) if infer_layers else layers
    problems = [f"optimizer variable {k} is not a slot of any model variable" for k in unknown_opt] + ambiguous
    return KerasCheckpoint(
        keys={source[k]: k for k in model_vars},
        shapes={source[k]: tuple(reader.shape(k)) for k in model_vars},
        dtypes={source[k]: reader.dtype(k) for k in model_vars},
        layers=tuple(layers),
        slots={source[v]: s for v, s in slot_keys.items() if v in source},
        iterations_key=iterations_key,
        learning_rate_key=lr_key,
        optimizer_name=opt_name,
        hyperparameter_keys=hyper_keys,
        also_iterations=tuple(extra_iterations),
        also_learning_rate=tuple(extra_lr),
        loss_scale_keys=loss_scale,
        other=tuple(other),
        graph=graph,
        problems=tuple(problems + [f"optimizer slots of {v} belong to no model variable" for v in slot_keys if v not in source]),
        root=root,
    )


def _tracking_order(graph: CheckpointObjectGraph, path: str) -> tuple:
    """Where a layer sits in the order its model tracked its children (creation order).

    A subclassed Keras model's layers are attributes, so their paths sort by name; the
    object graph keeps children in the order they were assigned, which is what a user wrote
    (and usually runs). Falls back to the path's natural order.
    """
    nodes = graph.graph.nodes
    node, key = 0, []
    for seg in split_object_path(path):
        children = nodes[node].children
        idx = next((i for i, c in enumerate(children) if c.local_name == seg), None)
        if idx is None:
            return (1, _natural(path))
        key.append(idx)
        node = children[idx].node_id
    return (0, tuple(key))


def _layer_name(node: str, members: list[tuple[str, str]], use_names: bool) -> str:
    """The Keras layer name: the recorded variable name minus the part below the layer node."""
    if use_names:
        path, full = members[0]
        depth = len(path.split("/")) - len(node.split("/"))
        comps = full.split("/")
        if len(comps) > depth:
            return comps[-depth - 1]
    return node


def _insert_flattens(layers: list[KerasLayer]) -> list[KerasLayer]:
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


def _refit_flattens(before: Sequence[KerasLayer], after: list[KerasLayer]) -> list[KerasLayer]:
    """Re-place the inferred Flattens once the convolutions' kinds are settled."""
    if not any(l.config.get("alternatives") for l in before):
        return after
    return _insert_flattens([l for l in after if l.class_name != "Flatten"])


# Layer-name words that settle a convolution the weights leave open (no bias).
_CONV_HINTS = (("transpose", "Transpose"), ("deconv", "Transpose"), ("depthwise", "Depthwise"), ("dwconv", "Depthwise"))


def _settle_by_name(layer: KerasLayer) -> tuple[KerasLayer, str | None]:
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


def describe_checkpoint_layers(path: str | os.PathLike[str]) -> list[KerasLayer]:
    """The Keras layers of a TF checkpoint, inferred from its object graph and shapes.

    Example:
        >>> [l.class_name for l in describe_checkpoint_layers("fixtures/tf/keras3_seq_sgdm")]
        ['Embedding', 'LSTM', 'GRU', 'Dense']
    """
    with TFCheckpointReader(path) as r:
        return [l for l in read_keras_checkpoint(r).layers if l.weights]


def preset_mapping(layers: Sequence[KerasLayer]) -> Mapping:
    """The built-in preset: each layer becomes the torch module named after it.

    ``conv`` -> ``conv.weight``/``conv.bias``; a Dense after a flattened feature map gets its
    rows permuted. For models whose torch attributes carry the Keras layer names.

    Example:
        >>> m = preset_mapping(describe_checkpoint_layers("fixtures/tf/keras3_conv_adam"))
        >>> sorted(m.plan({k: s for l in describe_checkpoint_layers("fixtures/tf/keras3_conv_adam")
        ...                for k, s in l.specs().items()}).target_specs)[:2]
        ['bn.bias', 'bn.num_batches_tracked']
    """
    settled = [_settle_by_name(layer) for layer in layers]
    layers = _refit_flattens(layers, [layer for layer, _ in settled])
    flatten = find_flatten_dense(layers)
    mapping = Mapping((), tuple(note for _, note in settled if note))
    for layer in layers:
        if layer.weights:
            mapping = mapping + layer_rules(layer, re.sub(r"[^0-9A-Za-z_]", "_", layer.name), flatten_from=flatten.get(layer.name))
    return mapping


def module_mapping(kc: KerasCheckpoint, root: str | None = None) -> Mapping:
    """The ``tf-module`` preset: each variable's object path becomes its torch key, as is.

    For checkpoints of plain ``tf.Module`` trees, whose variables have no Keras layer to say
    how they are laid out: ``model/blocks/0/w`` -> ``blocks.0.w``, values unchanged (add
    transposes in a mapping file where torch wants another layout).

    Example:
        >>> with TFCheckpointReader("fixtures/tf/tf_module") as r:
        ...     kc = read_keras_checkpoint(r, infer_layers=False)
        >>> sorted(module_mapping(kc).plan(kc.specs()).target_specs)[:2]
        ['blocks.0.b', 'blocks.0.w']
    """
    root = root or kc.root
    rules = []
    for source, ckey in kc.keys.items():
        info = kc.graph.info(ckey)
        # the attribute path a user wrote, not tf.keras's positional alias (layer_with_weights-0)
        under = [a for a in info.aliases if a.startswith(root + "/")] or [info.path]
        path = min(under, key=lambda a: sum(bool(_KERAS2_ALIAS.match(seg)) for seg in a.split("/")))
        path = path[len(root) + 1:] if path.startswith(root + "/") else path
        rules.append(Rename(source, path.replace("/", ".")))
    return Mapping(tuple(rules), ("tf-module preset: object paths as torch keys, values unchanged (no layout transforms)",))


# --------------------------------------------------------------------------------------------
# Reports


@dataclass(frozen=True, slots=True)
class ConversionReport:
    """What a conversion did (or, in a dry run, would do).

    Attributes:
        direction: ``"tf2torch"`` or ``"torch2tf"``.
        source / destination: the paths.
        plan: the Keras -> torch weight plan (source key, target key, ops, shapes).
        key_map: ``{plan source key: checkpoint key}`` on the TF side.
        unused: source keys left behind (``save_counter``, optimizer state with --no-optimizer).
        optimizer: the optimizer class written (``"torch.optim.Adam"``), or None.
        optimizer_hyperparameters: its constructor's arguments.
        optimizer_report: the slot conversion and expected drift, one ``- `` line each.
        notes: conventions the weights cannot carry (BatchNorm eps, padding, assumed defaults).
        written: False for a dry run.
    """

    direction: str
    source: str
    destination: str
    plan: Plan
    key_map: dict[str, str] = field(default_factory=dict)
    unused: tuple[str, ...] = ()
    optimizer: str | None = None
    optimizer_hyperparameters: dict[str, Any] = field(default_factory=dict)
    optimizer_report: str = ""
    notes: tuple[str, ...] = ()
    written: bool = False

    def table(self) -> str:
        """The mapping table, the unused keys, the notes and the optimizer report, as text."""
        lines = [f"{self.direction}: {self.source} -> {self.destination}" + ("" if self.written else " (dry run: nothing written)"), ""]
        lines.append(self.plan.table())
        if self.unused:
            lines += ["", f"unused source keys ({len(self.unused)}):"] + [f"  {k}" for k in self.unused]
        extra = [n for n in self.notes if n not in self.plan.notes]
        if extra:
            lines += [""] + [f"note: {n}" for n in extra]
        if self.optimizer:
            lines += ["", f"optimizer: {self.optimizer}({', '.join(f'{k}={v!r}' for k, v in self.optimizer_hyperparameters.items())})"]
            lines += [self.optimizer_report] if self.optimizer_report else []
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()


# --------------------------------------------------------------------------------------------
# Helpers


def load_factory(spec: str | Callable[[], Any]) -> Callable[[], Any]:
    """A model factory from ``"pkg.module:factory"`` or ``"path/to/file.py:factory"``.

    The factory returns a ``torch.nn.Module`` or ``(module, example_input)``; the example
    input orders layers that share a type and shape (execution order).

    Example:
        >>> load_factory("collections:OrderedDict")()
        OrderedDict()
    """
    if callable(spec):
        return spec
    module, sep, attr = spec.rpartition(":")
    if not sep or not module or not attr:
        raise ConversionError(f"model factory {spec!r} is not 'pkg.module:function' or 'file.py:function'")
    if module.endswith(".py") or os.sep in module:
        path = Path(module)
        if not path.is_file():
            raise ConversionError(f"model factory file {module!r} does not exist")
        name = f"_ckptfmt_factory_{abs(hash(str(path.resolve())))}"
        mod = sys.modules.get(name)
        if mod is None:
            loader_spec = importlib.util.spec_from_file_location(name, path)
            assert loader_spec is not None and loader_spec.loader is not None
            mod = importlib.util.module_from_spec(loader_spec)
            sys.modules[name] = mod
            loader_spec.loader.exec_module(mod)
    else:
        try:
            mod = importlib.import_module(module)
        except ImportError as e:
            raise ConversionError(f"cannot import the model factory module {module!r}: {e}") from None
    fn = getattr(mod, attr, None)
    if not callable(fn):
        raise ConversionError(f"{module!r} has no callable {attr!r}")
    return fn


def _torch() -> Any:
    try:
        import torch
    except ImportError as e:  # pragma: no cover - exercised only without torch
        raise FrameworkNotAvailableError("torch", "torch", feature="tf2torch/torch2tf conversion") from e
    return torch


def _make_model(factory: str | Callable[[], Any] | None) -> tuple[Any, Any]:
    if factory is None:
        return None, None
    made = load_factory(factory)()
    model, example = (made if isinstance(made, tuple) else (made, None))
    if not isinstance(model, _torch().nn.Module):
        raise ConversionError(f"the model factory returned a {type(model).__name__}, not a torch.nn.Module")
    return model, example


def _as_mapping(mapping: Mapping | str | os.PathLike[str] | None) -> Mapping | None:
    if mapping is None or isinstance(mapping, Mapping):
        return mapping
    return Mapping.load(mapping)


def _preset(preset: str, model: Any) -> str:
    if preset not in PRESETS:
        raise ConversionError(f"unknown preset {preset!r}; the presets are {', '.join(PRESETS)}")
    return "keras" if model is not None else preset  # a model is matched by layer kinds


def _check_dst(dst: str, overwrite: bool) -> None:
    if not overwrite and (os.path.exists(dst) or os.path.exists(dst + ".index")):
        raise CheckpointExistsError(f"{dst} exists")


def _plan(kc: KerasCheckpoint, model: Any, example: Any, mapping: Mapping | None, strict: bool,
          targets: dict[str, tuple[int, ...]] | None = None, preset: str = "keras",
          pairs: AbcMapping[str, str] | None = None) -> tuple[Plan, tuple[str, ...]]:
    """The Keras -> torch plan of a checkpoint, with its notes."""
    sources = kc.specs()
    if pairs and (model is None or mapping is not None):
        raise ConversionError("pairs (--pair) settle the matching of Keras layers to a torch model: they need --model and no --map")
    if model is not None:
        targets = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    if mapping is None and _preset(preset, model) == "tf-module":
        mapping = module_mapping(kc)
    if mapping is None:
        layers = list(kc.layers)
        if model is not None:
            from .mapping.match import build_mapping, settle_kinds

            mapping = build_mapping(_refit_flattens(layers, settle_kinds(layers, model, pairs)), model, example, pairs=pairs)
        else:
            mapping = preset_mapping(layers)
    plan = mapping.plan(sources, targets, strict=strict)
    return plan, plan.notes


def _implied_by_slots(cls: str, kc: KerasCheckpoint, known: AbcMapping[str, Any]) -> dict[str, Any]:
    """Options the slots a checkpoint holds imply, where it does not store them.

    Keras creates ``velocity_hat`` only with amsgrad, ``average_gradient`` only for a centered
    RMSprop, and ``momentum`` slots only with a momentum; a default of 0 would silently drop
    that state, so an unknown momentum coefficient is an error.

    Raises:
        ConversionError: momentum slots without a known momentum coefficient.
    """
    slots = {s for d in kc.slots.values() for s in d}
    out: dict[str, Any] = {}
    if cls in ("Adam", "AdamW") and "velocity_hat" in slots and "amsgrad" not in known:
        out["amsgrad"] = True
    if cls == "RMSprop" and "average_gradient" in slots and "centered" not in known:
        out["centered"] = True
    if cls in ("SGD", "RMSprop") and "momentum" in slots and "momentum" not in known:
        raise ConversionError(
            f"the checkpoint holds {cls} momentum slots but not the momentum coefficient (Keras keeps it in the optimizer's "
            "config, not in the checkpoint; tf.keras 2 SGD keeps the slots even without momentum); pass it, e.g. "
            "--optimizer-config '{\"momentum\": 0.9}' (and \"nesterov\": true if the run used it)"
        )
    return out


def _optimizer_class(kc: KerasCheckpoint, config: AbcMapping[str, Any]) -> str:
    if config.get("class_name"):
        cls = str(config["class_name"])
        if cls not in KERAS_SLOTS:
            raise ConversionError(f"optimizer class {cls!r} is not supported (supported: {', '.join(KERAS_SLOTS)})")
        return cls
    slots = frozenset(s for d in kc.slots.values() for s in d)
    # Keras names optimizers after their class, with "_1", "_2"... for later instances.
    by_name = _DEFAULT_NAMES.get(re.sub(r"_\d+$", "", (kc.optimizer_name or "").lower()))
    if by_name is not None and slots <= set(KERAS_SLOTS[by_name]):
        return by_name
    candidates = [c for c in ("Adam", "SGD", "RMSprop") if slots <= set(KERAS_SLOTS[c])]
    if len(candidates) == 1:
        return candidates[0]
    raise ConversionError(
        f"cannot tell the Keras optimizer class: it is named {kc.optimizer_name!r} and has slots "
        f"{', '.join(sorted(slots)) or 'none'}, which fit {', '.join(candidates) or 'no supported class'}; "
        "pass it with --optimizer-config '{\"class_name\": \"Adam\", ...}'"
    )


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
        root: the attribute of ``tf.train.Checkpoint(...)`` holding the model (``net`` for
            ``tf.train.Checkpoint(net=model)``); found from the object graph by default.

    Raises:
        ConversionError: unknown or ambiguous layers, unsupported optimizer options, no
            model or several in the checkpoint (without ``root``), nothing to convert.
        UnmappedKeyError: keys the mapping does not cover (all listed).
        CheckpointExistsError: ``dst`` exists (without ``overwrite``), or is a non-empty
            directory that is not a ckptfmt checkpoint.

    Example:
        >>> r = tf_to_torch("fixtures/tf/keras3_conv_adam", "/tmp/x.pt", dry_run=True)
        >>> r.plan.entry_for("conv/kernel").targets
        ('conv.weight',)
    """
    src, dst = os.fspath(src), os.fspath(dst)
    mapping = _as_mapping(mapping)
    model, example = _make_model(model_factory)
    if not dry_run:  # an existing DST is refused before anything is read
        _convert_io.check_output(dst, _convert_io.output_kind(dst), overwrite, optimizer=False)
    with TFCheckpointReader(src) as reader:
        kc = read_keras_checkpoint(reader, root=root, infer_layers=mapping is None and _preset(preset, model) == "keras")
        plan, notes = _plan(kc, model, example, mapping, strict, preset=preset, pairs=pairs)
        if not plan.entries:  # never "wrote ... (0 tensors)"
            raise ConversionError(
                f"{src}: nothing to convert: no variable of {kc.root!r} maps to a torch tensor "
                f"({len(kc.keys)} model variables read); check --root, --map or --preset"
            )
        used = set(kc.keys.values())
        has_opt = bool(kc.slots) or kc.iterations_key is not None
        conv = None
        if optimizer and has_opt and model is None and dry_run:
            notes = notes + ("optimizer state not planned: it needs --model for the torch parameter order",)
        elif optimizer and has_opt:
            if kc.problems:
                raise UnmappedKeyError("cannot place the optimizer state:\n  " + "\n  ".join(kc.problems))
            if model is None:
                raise ConversionError("converting the optimizer state needs the torch model for its parameter order: "
                                      "pass --model pkg.module:factory, or --no-optimizer for weights only")
            cfg = dict(optimizer_config or {})
            cls = _optimizer_class(kc, cfg)
            iterations = int(np.asarray(reader.get(kc.iterations_key))) if kc.iterations_key else 0
            # tf.keras 2 legacy optimizers store their hyperparameters: they beat the defaults
            stored = {k: float(np.asarray(reader.get(key))) for k, key in kc.hyperparameter_keys.items()}
            decay = stored.pop("decay", 0.0)
            known = {**stored, **{k: v for k, v in cfg.items() if k != "class_name"}}
            known.update(_implied_by_slots(cls, kc, known))
            config = {**_KERAS_DEFAULTS[cls], **known}
            assumed = sorted(k for k in _KERAS_DEFAULTS[cls] if k not in known)
            if kc.learning_rate_key is None and "learning_rate" not in cfg:
                raise ConversionError(
                    f"{src} stores no learning rate: a Keras LearningRateSchedule computes it from the step and is not "
                    f"saved. Pass its value at step {iterations}, e.g. --optimizer-config '{{\"learning_rate\": 0.001}}' "
                    "(and continue the schedule with a torch LR scheduler)"
                )
            lr = float(np.asarray(reader.get(kc.learning_rate_key))) if kc.learning_rate_key else float(cfg["learning_rate"])
            if decay and "learning_rate" not in cfg:
                lr = lr / (1 + decay * iterations)
                notes = notes + (f"optimizer: the legacy time-based decay={decay:g} (lr / (1 + decay*t)) has no torch optimizer "
                                 f"option: learning_rate is its value at t={iterations}, {lr:g}; continue the decay with a LambdaLR",)
            config["learning_rate"] = config.get("learning_rate", lr)
            slot_values = {} if dry_run else {v: {s: reader.get(k) for s, k in d.items()} for v, d in kc.slots.items()}
            if dry_run:  # shapes only: zero slots in the right layout
                slot_values = {v: {s: np.zeros(kc.shapes[v], np.float32) for s in d} for v, d in kc.slots.items()}
            state = KerasOptimizerState(cls, config, iterations, slot_values)
            names = [n for n, _ in model.named_parameters()]
            frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
            conv = keras_to_torch_optimizer(state, plan, names, exact=exact_optimizer, frozen=frozen)
            notes = notes + (f"optimizer: Keras {cls} (named {kc.optimizer_name!r} in the checkpoint), iterations={iterations}, "
                             f"learning_rate={config['learning_rate']:g} "
                             + ("read from the checkpoint" if "learning_rate" not in cfg else "as given")
                             + (f"; stored: {', '.join(f'{k}={v:g}' for k, v in stored.items())}" if stored else "")
                             + (f"; not stored, assumed Keras defaults: {', '.join(f'{k}={config[k]!r}' for k in assumed)}" if assumed else ""),)
            used |= {k for d in kc.slots.values() for k in d.values()}
            used |= {k for k in (kc.iterations_key, kc.learning_rate_key, *kc.hyperparameter_keys.values()) if k}
            used |= {*kc.also_iterations, *kc.also_learning_rate, *kc.loss_scale_keys.values()}
            if "dynamic_scale" in kc.loss_scale_keys:
                scale = float(np.asarray(reader.get(kc.loss_scale_keys["dynamic_scale"])))
                notes = notes + (f"mixed precision: the Keras LossScaleOptimizer's loss scale ({scale:g}) is no optimizer state "
                                 f"in torch; continue with torch.amp.GradScaler(init_scale={scale:g}) (its growth counter restarts)",)
        unused = tuple(k for k in reader.keys() if k not in used and k != OBJECT_GRAPH_KEY)
        report = ConversionReport(
            "tf2torch", src, dst, plan, {s: kc.keys[s] for e in plan.entries for s in e.sources},
            unused, conv.optimizer if conv else None, dict(conv.hyperparameters) if conv else {},
            conv.report if conv else "", tuple(notes), not dry_run,
        )
        if dry_run:
            return report
        kind = _convert_io.output_kind(dst)
        _convert_io.check_output(dst, kind, overwrite, optimizer=conv is not None)
        if kind == "torch":
            _torch()  # FrameworkNotAvailableError before anything is read

        def read(source_key: str) -> np.ndarray:
            return reader.get(kc.keys[source_key])

        if kind == "safetensors":
            _convert_io.write_safetensors_stream(dst, plan, read, metadata=_convert_io.SAFETENSORS_METADATA, progress=progress)
            return report
        if kind == "ckptfmt":
            _write_ckptfmt(dst, plan, read, model, conv, report, overwrite, progress)
            return report
        weights = _convert_io.run_plan(plan, read, progress=progress)
    _write_torch(dst, weights, model, conv, report)
    return report


def _optimizer_type(name: str) -> Any:
    module, _, cls = name.rpartition(".")
    return getattr(importlib.import_module(module), cls)


def _write_ckptfmt(dst: str, plan: Plan, read: Callable[[str], np.ndarray], model: Any, conv: Any,
                   report: ConversionReport, overwrite: bool, progress: bool | None) -> None:
    optimizer = None
    extra: dict[str, Any] = {"conversion_report": report.table()}
    if conv is not None:
        from ckptfmt.adapters.torch import numpy_to_state, state_to_numpy

        # Through a live optimizer, as for a .pt file: its load_state_dict fills the keys the
        # conversion does not set and casts the state, so both outputs hold the same state.
        opt = _optimizer_type(conv.optimizer)(model.parameters(), **conv.hyperparameters)
        opt.load_state_dict(numpy_to_state(conv.state_dict(opt.state_dict())))
        optimizer = state_to_numpy(opt.state_dict())[0]
        extra.update(optimizer_class=conv.optimizer, optimizer_hyperparameters=dict(conv.hyperparameters))
    _convert_io.write_ckptfmt_stream(dst, plan, read, optimizer=optimizer, extra=extra, overwrite=overwrite,
                                     progress=progress, metadata={"converted_by": "ckptfmt tf2torch", "source": report.source})


def _write_torch(dst: str, weights: dict[str, np.ndarray], model: Any, conv: Any, report: ConversionReport) -> None:
    tmp = f"{dst}.tmp-{os.getpid()}"
    torch = _torch()
    from ckptfmt.adapters.torch import numpy_to_state, numpy_to_tensor

    # Shares the arrays' memory (bfloat16/float8 through a bit view); nothing is copied.
    state_dict = {k: numpy_to_tensor(v) for k, v in weights.items()}
    out: dict[str, Any] = {"model": state_dict}
    if conv is not None:
        model.load_state_dict(state_dict)
        opt = _optimizer_type(conv.optimizer)(model.parameters(), **conv.hyperparameters)
        opt.load_state_dict(numpy_to_state(conv.state_dict(opt.state_dict())))
        out.update(optimizer=opt.state_dict(), optimizer_class=conv.optimizer,
                   optimizer_hyperparameters=dict(conv.hyperparameters))
    out["conversion_report"] = report.table()
    try:
        with open(tmp, "wb") as f:
            from ._torchfile import save_to

            save_to(out, f)  # a full disk surfaces as OSError(ENOSPC), not torch's enforce message
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, dst)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


# --------------------------------------------------------------------------------------------
# torch -> TF


def _optimizer_param_names(src: str, model: Any, sd: AbcMapping[str, Any]) -> tuple[list[str], list[str]]:
    """The parameter names in the optimizer's order, and the frozen ones.

    An optimizer is built on ``model.parameters()`` or, often when some are frozen, on the
    trainable ones only; the parameter count tells which (same-shape parameters would pair
    silently wrong otherwise).
    """
    named = list(model.named_parameters())
    frozen = [n for n, p in named if not p.requires_grad]
    count = sum(len(g["params"]) for g in sd["param_groups"])
    if count == len(named):
        return [n for n, _ in named], frozen
    if frozen and count == len(named) - len(frozen):
        return [n for n, p in named if p.requires_grad], []
    raise ConversionError(f"{src}: the optimizer holds {count} parameters, the model has {len(named)} "
                          f"({len(named) - len(frozen)} trainable); build the optimizer on model.parameters()")


def _check_state_shapes(src: str, model: Any, sd: AbcMapping[str, Any], names: Sequence[str]) -> None:
    """Each state tensor has its parameter's shape (an optimizer built in another order fails here)."""
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
    order = [int(i) for g in sd["param_groups"] for i in g["params"]]
    bad = []
    for i, state in sd["state"].items():
        name = names[order.index(int(i))]
        for slot, value in state.items():
            shape = tuple(np.shape(value))
            if shape and shape != shapes[name]:
                bad.append(f"state {i} ({name}, {shapes[name]}): {slot} has shape {shape}")
    if bad:
        raise ConversionError(f"{src}: the optimizer state does not fit the model's parameters in their order "
                              "(was the optimizer built on model.parameters()?):\n  " + "\n  ".join(bad[:10]))


_TORCH_OPT = {"Adam", "AdamW", "SGD", "RMSprop", "KerasAdam", "KerasSGD", "KerasRMSprop"}


def _torch_optimizer_name(ckpt: AbcMapping[str, Any], given: str | None) -> str:
    name = given or ckpt.get("optimizer_class")
    if name:
        short = str(name).rpartition(".")[2]
        if short not in _TORCH_OPT:
            raise ConversionError(f"torch optimizer {name!r} is not supported (supported: {', '.join(sorted(_TORCH_OPT))})")
        return short
    group = ckpt["optimizer"]["param_groups"][0]
    states = list(ckpt["optimizer"]["state"].values())
    slot_names = set(states[0]) if states else set()
    if "betas" in group:
        keras = "momentum" in slot_names
        return "KerasAdam" if keras else ("AdamW" if group.get("decoupled_weight_decay") else "Adam")
    if "alpha" in group:
        return "RMSprop"
    if "rho" in group:
        return "KerasRMSprop"
    if "dampening" in group:
        return "SGD"
    if "nesterov" in group:
        return "KerasSGD"
    raise ConversionError("cannot tell the torch optimizer class from its state_dict; pass optimizer_class= (--optimizer-class)")


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
        preset / pairs: as for :func:`tf_to_torch`.

    Raises:
        ConversionError / UnmappedKeyError: as for :func:`tf_to_torch`; also template keys the
            torch checkpoint cannot fill (all listed), or a ``src`` of another kind.
        CheckpointNotFoundError / FormatError: nothing at ``src``, or a damaged file (named).

    Example:
        >>> torch_to_tf("run.pt", "tf/ckpt-1", template="tf_template/ckpt-1",
        ...             model_factory="models.py:make")  # doctest: +SKIP
    """
    src, dst = os.fspath(src), os.fspath(dst)
    mapping = _as_mapping(mapping)
    model, example = _make_model(model_factory)
    ckpt = _convert_io.read_torch_side(src)  # numpy only; our errors name the file
    weights = ckpt["model"]
    with TFCheckpointReader(template) as reader:
        kc = read_keras_checkpoint(reader, infer_layers=mapping is None and _preset(preset, model) == "keras")
        plan, notes = _plan(kc, model, example, mapping, True, {k: tuple(v.shape) for k, v in weights.items()}, preset=preset,
                            pairs=pairs)
        back = plan.inverse()
        out_keys: dict[str, Any] = {}
        unused = tuple(k for k in weights if not any(k in e.sources for e in back.entries))
        made_by = {t: (e, i) for e in back.entries for i, t in enumerate(e.targets)}
        pending: dict[int, list[Any]] = {}  # entry -> [its outputs, targets not yet written]

        def keras_value(source_key: str) -> np.ndarray:
            """One Keras variable; each plan entry runs once and is dropped once written."""
            entry, i = made_by[source_key]
            if id(entry) not in pending:
                pending[id(entry)] = [entry.run(tuple(weights[s] for s in entry.sources)), len(entry.targets)]
            slot = pending[id(entry)]
            slot[1] -= 1
            if not slot[1]:
                del pending[id(entry)]
            return slot[0][i]

        for skey, ckey in kc.keys.items():
            out_keys[ckey] = ("weight", skey)
        opt_name = None
        report_text = ""
        hyper: dict[str, Any] = {}
        ks = None
        template_has_opt = bool(kc.slots) or kc.iterations_key is not None
        if optimizer and ckpt.get("optimizer") is None and template_has_opt:
            raise ConversionError(f"{src} holds no optimizer state but the template {template} does: pass --no-optimizer "
                                  "to copy the template's optimizer variables unchanged")
        if optimizer and ckpt.get("optimizer") is not None:
            if kc.problems:
                raise UnmappedKeyError("cannot place the optimizer state in the template:\n  " + "\n  ".join(kc.problems))
            if model is None:
                raise ConversionError("converting the optimizer state needs the torch model for its parameter order: "
                                      "pass --model pkg.module:factory, or --no-optimizer for weights only")
            if not kc.slots and kc.iterations_key is None:
                raise ConversionError(f"the template {template} holds no optimizer state to fill: save it with "
                                      "tf.train.Checkpoint(model=..., optimizer=...) after the optimizer is built, or pass --no-optimizer")
            opt_name = _torch_optimizer_name(ckpt, optimizer_class)
            sd = ckpt["optimizer"]
            sd = {"state": {int(i): s for i, s in sd["state"].items()}, "param_groups": sd["param_groups"]}
            names, frozen = _optimizer_param_names(src, model, sd)
            _check_state_shapes(src, model, sd, names)
            if iterations is None and "iterations" in ckpt:
                iterations = int(ckpt["iterations"])
            ks, report_text = torch_to_keras_optimizer(opt_name, sd, plan, names, iterations=iterations, frozen=frozen)
            hyper = dict(ks.config)
            if ks.class_name == "SGD" and not ks.config.get("momentum"):
                # tf.keras 2 SGD keeps an "m" slot even without momentum: it stays zero
                for v, d in kc.slots.items():
                    if "momentum" in d and v in kc.shapes:
                        ks.slots.setdefault(v, {}).setdefault("momentum", np.zeros(kc.shapes[v], kc.dtypes[v]))
            want = {(v, s) for v, d in kc.slots.items() for s in d}
            have = {(v, s) for v, d in ks.slots.items() for s in d}
            problems = [f"template slot {s!r} of {v} has no value in the torch optimizer state" for v, s in sorted(want - have)]
            problems += [f"torch optimizer state {s!r} of {v} has no slot in the template (is its optimizer a Keras {ks.class_name}?)"
                         for v, s in sorted(have - want)]
            if problems:
                raise UnmappedKeyError("the torch optimizer state does not fit the template's optimizer:\n  " + "\n  ".join(problems))
            for v, d in kc.slots.items():
                for s, ckey in d.items():
                    out_keys[ckey] = ("slot", (v, s))
            for k in (kc.iterations_key, *kc.also_iterations):
                if k:
                    out_keys[k] = ("iterations", None)
            for k in (kc.learning_rate_key, *kc.also_learning_rate):
                if k:
                    out_keys[k] = ("learning_rate", None)
        leftover = [k for k in reader.keys() if k not in out_keys and k != OBJECT_GRAPH_KEY]
        report = ConversionReport(
            "torch2tf", src, dst, plan, dict(kc.keys), unused, ks.class_name if ks else None, hyper,
            report_text, tuple(notes) + tuple(f"{k}: copied from the template" for k in leftover), not dry_run,
        )
        if dry_run:
            return report
        _check_dst(dst, overwrite)
        os.makedirs(os.path.dirname(os.path.abspath(dst)), exist_ok=True)
        # streamed: one converted tensor at a time goes to the data file (temp names, renamed at the end)
        with TFCheckpointWriter(dst) as writer:
            for ckey, (kind, ref) in out_keys.items():
                if kind == "weight":
                    value = keras_value(ref)
                elif kind == "slot":
                    value = ks.slots[ref[0]][ref[1]]
                elif kind == "iterations":
                    value = np.array(ks.iterations)
                else:
                    value = np.array(ks.config["learning_rate"])
                value = np.asarray(value)
                if tuple(value.shape) != tuple(reader.shape(ckey)):
                    raise ConversionError(f"{ckey}: converted shape {value.shape} but the template has {reader.shape(ckey)}")
                writer.add(ckey, value.astype(reader.dtype(ckey), copy=False))
            for k in leftover:
                writer.add(k, reader.get(k))
            writer.add(OBJECT_GRAPH_KEY, reader.get(OBJECT_GRAPH_KEY))
    update_state_file(dst)
    return report


# --------------------------------------------------------------------------------------------
# Comparing a TF checkpoint with torch weights, through a conversion


class _ConvertedSource(Source):
    """A TF checkpoint seen through a tf2torch plan: the torch tensors it converts to.

    Tensors are computed one plan entry at a time, when asked for.
    """

    kind = "tf2torch"

    def __init__(self, path: str, reader: TFCheckpointReader, keys: dict[str, str], plan: Plan, prefix: str = "") -> None:
        super().__init__(path)
        self._reader, self._keys = reader, keys
        self._where = {prefix + t: (e, i) for e in plan.entries for i, t in enumerate(e.targets)}
        self._last: tuple[Any, tuple[np.ndarray, ...]] = (None, ())

    def _entry(self, name: str) -> tuple[Any, int]:
        if name not in self._where:
            raise TensorNotFoundError(f"{self.path}: the conversion makes no tensor {name!r}")
        return self._where[name]

    def keys(self) -> list[str]:
        return list(self._where)

    def info(self, name: str) -> TensorInfo:
        entry, i = self._entry(name)
        return _convert_io._info(name, entry.target_specs[i])

    def get(self, name: str) -> np.ndarray:
        entry, i = self._entry(name)
        if self._last[0] is not entry:
            self._last = (entry, entry.run(tuple(self._reader.get(self._keys[s]) for s in entry.sources)))
        return self._last[1][i]

    @classmethod
    def verify(cls, path: str, *, progress: bool | None = None) -> Any:
        raise ConversionError(f"{path}: verify the TF checkpoint itself (ckptfmt verify), not its conversion")

    def close(self) -> None:
        self._reader.close()


def diff_converted(
    src: str | os.PathLike[str],
    other: str | os.PathLike[str],
    *,
    model_factory: str | Callable[[], Any] | None = None,
    mapping: Mapping | str | os.PathLike[str] | None = None,
    preset: str = "keras",
    pairs: AbcMapping[str, str] | None = None,
    atol: float = 0.0,
    rtol: float = 0.0,
) -> DiffReport:
    """Compare a TF checkpoint's weights, converted as :func:`tf_to_torch` would, with torch weights.

    ``other`` is any checkpoint :func:`ckptfmt.converters.kinds.open_any` reads (``.pt``,
    ``.safetensors``, a ckptfmt directory). When its weights sit under ``model/`` (a ``.pt``
    or ckptfmt directory written by ``tf2torch``), only those are compared; the optimizer
    state is not. Nothing is written; one plan entry is in memory at a time.

    Use it to check a conversion, or how far a resumed torch run moved from the TF run.

    Args:
        src: the TF checkpoint (the converted side, ``a`` of the report).
        other: the torch-side checkpoint (``b``, the reference for relative differences).
        model_factory / mapping / preset / pairs: as for :func:`tf_to_torch`.
        atol, rtol: tolerances, as for :func:`ckptfmt.converters.kinds.diff_any`.

    Example:
        >>> r = diff_converted("runs/ckpt-3", "resumed.pt", model_factory="models.py:make")  # doctest: +SKIP
        >>> r.identical, [c.name for c in r.changed]  # doctest: +SKIP
        (False, ['model/fc.weight'])
    """
    src, other = os.fspath(src), os.fspath(other)
    mapping = _as_mapping(mapping)
    model, example = _make_model(model_factory)
    reader = TFCheckpointReader(src)
    try:
        kc = read_keras_checkpoint(reader, infer_layers=mapping is None and _preset(preset, model) == "keras")
        plan, _ = _plan(kc, model, example, mapping, True, preset=preset, pairs=pairs)
        with open_any(other) as sb:
            names = set(sb.keys())
            targets = list(plan.target_specs)
            prefix = "model/" if not names.intersection(targets) and any(f"model/{t}" in names for t in targets) else ""
            with _ConvertedSource(src, reader, kc.keys, plan, prefix) as sa:
                report = diff_sources(sa, sb, atol=atol, rtol=rtol)
    finally:
        reader.close()
    if prefix:  # the optimizer state and metadata beside the weights are not compared
        report = dataclasses.replace(report, added=tuple(t for t in report.added if t.name.startswith(prefix)))
    return report
