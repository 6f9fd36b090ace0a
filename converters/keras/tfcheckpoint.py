"""Keras checkpoints written by TensorFlow (``tf.train.Checkpoint``, TensorBundle): the reader
that resolves them into a :class:`~.checkpoint.KerasCheckpoint` through their object graph.

A TF checkpoint stores variables and an object graph, not the Keras layer classes. The
reader groups the variables by the layer object that owns them, and infers each layer's
kind from its attribute names and shapes (:mod:`.infer`). Source keys are the Keras
variable paths TensorFlow recorded (``conv/kernel``, ``sequential/lstm/lstm_cell/kernel``);
a checkpoint whose recorded names are not unique uses object paths
(``model/_operations/1/_kernel``) instead. Optimizer slots are found through the object
graph (Keras 3 stores them by position, ``optimizer/_variables/N``), never by list position
alone; tf.keras 2 slots by the variable name they record.

Example:
    >>> with TFCheckpointReader("fixtures/tf/keras3_conv_adam") as r:
    ...     [(l.name, l.class_name) for l in read_keras_checkpoint(r).layers]
    [('conv', 'Conv2D'), ('bn', 'BatchNormalization'), ('head', 'Dense')]
"""

from __future__ import annotations

__all__ = ["read_keras_checkpoint", "describe_checkpoint_layers", "write_like_template", "OBJECT_GRAPH_KEY"]

import os
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ckptfmt.errors import ConversionError

from ..mapping.layers import KerasLayer, KerasWeight
from ..tf.bundle import OBJECT_GRAPH_KEY, TFCheckpointReader, TFCheckpointWriter, update_state_file
from ..tf.object_graph import CheckpointObjectGraph, read_object_graph, split_object_path
from .checkpoint import KerasCheckpoint
from .infer import infer_kind, insert_flattens

# Sub-objects of one Keras layer: their variables belong to the enclosing layer.
_SUBOBJECTS = {
    "cell", "forward_layer", "backward_layer",
    "_query_dense", "_key_dense", "_value_dense", "_output_dense",
    "query_dense", "key_dense", "value_dense", "output_dense",
}
# tf.keras 2 slot names -> Keras 3's (the update rules are the same).
_SLOT_NAMES = {"m": "momentum", "v": "velocity", "vhat": "velocity_hat", "rms": "velocity", "mg": "average_gradient"}
_TF_KERAS_SLOT = re.compile(r"^(?P<optimizer>[^/]+)/(?P<slot>m|v|vhat|velocity|momentum|average_gradient)/(?P<variable>.+)$")
# Hyperparameters tf.keras 2 legacy optimizers store as variables.
_LEGACY_HYPER = {"beta_1", "beta_2", "decay", "momentum", "rho", "epsilon"}


@dataclass(slots=True)
class _Found:
    """Checkpoint keys sorted by what they are, as the reader goes through them."""

    model_vars: dict[str, Any] = field(default_factory=dict)  # ckpt key -> KeyInfo
    slot_keys: dict[str, dict[str, str]] = field(default_factory=dict)  # variable ckpt key -> {slot: ckpt key}
    iterations_key: str | None = None
    lr_key: str | None = None
    opt_name: str | None = None
    hyper_keys: dict[str, str] = field(default_factory=dict)
    extra_iterations: list[str] = field(default_factory=list)  # a LossScaleOptimizer's own counters
    extra_lr: list[str] = field(default_factory=list)
    loss_scale: dict[str, str] = field(default_factory=dict)
    other: list[str] = field(default_factory=list)
    unknown_opt: list[str] = field(default_factory=list)
    ambiguous: list[str] = field(default_factory=list)


def _prefix_name(full_name: str) -> str | None:
    return full_name.split("/")[0] if "/" in full_name else None


def _optimizer_variable(found: _Found, key: str, info: Any, segs: list[str]) -> None:
    """An optimizer's own variable: its step, learning rate, loss scale or a stored hyperparameter."""
    last = segs[-1].lstrip("_")
    # a LossScaleOptimizer (mixed precision) wraps the real one: its state is the inner's
    inner = "inner_optimizer" in segs
    if last in ("iterations", "iteration", "iter"):
        if found.iterations_key is None or inner:
            found.iterations_key, key = key, found.iterations_key
            found.opt_name = _prefix_name(info.full_name) or found.opt_name
        if key is not None:
            found.extra_iterations.append(key)
    elif last == "learning_rate":
        if found.lr_key is None or inner:
            found.lr_key, key = key, found.lr_key
        if key is not None:
            found.extra_lr.append(key)
    elif last in ("dynamic_scale", "step_counter"):
        found.loss_scale[last] = key
    elif last in _LEGACY_HYPER:
        found.hyper_keys[last] = key
    else:
        found.unknown_opt.append(key)


def _sort_keys(reader: TFCheckpointReader, infos: dict[str, Any], root: str, optimizer_root: str) -> _Found:
    found = _Found()
    for key in reader.keys():
        if key == OBJECT_GRAPH_KEY:
            continue
        info = infos.get(key)
        if info is None:
            found.other.append(key)
            continue
        segs = info.path.split("/")
        if info.slot is not None:
            found.slot_keys.setdefault(info.slot.variable_key, {})[_SLOT_NAMES.get(info.slot.slot_name, info.slot.slot_name)] = key
            found.opt_name = found.opt_name or _prefix_name(info.full_name)
        elif segs[0] == root and not (len(segs) > 2 and segs[1] == "optimizer"):
            found.model_vars[key] = info
        elif segs[0] in (optimizer_root, root):  # a compiled Keras 3 model tracks its optimizer as model/optimizer
            _optimizer_variable(found, key, info, segs)
        else:
            found.other.append(key)
    return found


def _tf_keras_slots(found: _Found, infos: dict[str, Any]) -> None:
    """tf.keras 2 (tf_keras) slots: kept in lists the object graph does not tie to variables;
    their names do: ``{optimizer}/{slot}/{variable name}``."""
    by_name: dict[str, list[str]] = {}
    for k, i in found.model_vars.items():
        if i.full_name:
            by_name.setdefault(i.full_name, []).append(k)
    for key in list(found.unknown_opt):
        m = _TF_KERAS_SLOT.match(infos[key].full_name)
        if not m or m["variable"] not in by_name:
            continue
        found.unknown_opt.remove(key)
        owners = by_name[m["variable"]]
        slot = _SLOT_NAMES.get(m["slot"], m["slot"])
        if len(owners) > 1 or slot in found.slot_keys.get(owners[0], {}):
            found.ambiguous.append(
                f"optimizer variable {key} ({infos[key].full_name}) could belong to any of "
                f"{', '.join(found.model_vars[o].path for o in owners)}, which share the name {m['variable']!r} "
                "(tf.keras 2 ties slots to variables by name only: give the layers unique names, or --no-optimizer)")
            continue
        found.slot_keys.setdefault(owners[0], {})[slot] = key
        found.opt_name = found.opt_name or m["optimizer"]


def _layers(reader: TFCheckpointReader, graph: CheckpointObjectGraph, model_vars: dict[str, Any], source: dict[str, str],
            use_names: bool, infer_layers: bool) -> list[KerasLayer]:
    """The model's variables grouped by the layer object owning them, in tracking order."""
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
        kind, config = infer_kind(name, weights) if infer_layers else ("?", {})
        layers.append(KerasLayer(name, kind, config, weights))
    return insert_flattens(layers) if infer_layers else layers


def read_keras_checkpoint(reader: TFCheckpointReader, *, root: str = "model", optimizer_root: str = "optimizer",
                          infer_layers: bool = True) -> KerasCheckpoint:
    """Resolve a Keras 3 TF checkpoint's keys through its object graph.

    Args:
        reader: the open checkpoint (values are read through it later: keep it open).
        root: the name the model was saved under (``tf.train.Checkpoint(model=...)``).
        optimizer_root: likewise for the optimizer.
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
    infos = graph.resolve()
    found = _sort_keys(reader, infos, root, optimizer_root)
    _tf_keras_slots(found, infos)
    model_vars = found.model_vars
    # Source keys: the recorded Keras variable paths when they are unique, else object paths.
    names = [i.full_name for i in model_vars.values()]
    use_names = all(names) and len(set(names)) == len(names)
    source = {k: (i.full_name if use_names else i.path) for k, i in model_vars.items()}
    layers = _layers(reader, graph, model_vars, source, use_names, infer_layers)
    problems = [f"optimizer variable {k} is not a slot of any model variable" for k in found.unknown_opt] + found.ambiguous
    problems += [f"optimizer slots of {v} belong to no model variable" for v in found.slot_keys if v not in source]
    return KerasCheckpoint(
        keys={source[k]: k for k in model_vars},
        shapes={source[k]: tuple(reader.shape(k)) for k in model_vars},
        dtypes={source[k]: reader.dtype(k) for k in model_vars},
        layers=tuple(layers),
        slots={source[v]: s for v, s in found.slot_keys.items() if v in source},
        iterations_key=found.iterations_key,
        learning_rate_key=found.lr_key,
        optimizer_name=found.opt_name,
        hyperparameter_keys=found.hyper_keys,
        also_iterations=tuple(found.extra_iterations),
        also_learning_rate=tuple(found.extra_lr),
        loss_scale_keys=found.loss_scale,
        other=tuple(found.other),
        graph=graph,
        problems=tuple(problems),
        path=getattr(reader, "prefix", ""),
        reader=reader,
        internal_keys=(OBJECT_GRAPH_KEY,),
    )


def _natural(path: str) -> tuple:
    return tuple((0, int(p), "") if p.isdigit() else (1, 0, p) for p in path.split("/"))


def _layer_node(path: str) -> str:
    segs = path.split("/")[:-1]
    while len(segs) > 1 and segs[-1] in _SUBOBJECTS:
        segs.pop()
    return "/".join(segs)


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


def describe_checkpoint_layers(path: str | os.PathLike[str]) -> list[KerasLayer]:
    """The Keras layers of a TF checkpoint, inferred from its object graph and shapes.

    Example:
        >>> [l.class_name for l in describe_checkpoint_layers("fixtures/tf/keras3_seq_sgdm")]
        ['Embedding', 'LSTM', 'GRU', 'Dense']
    """
    with TFCheckpointReader(path) as r:
        return [l for l in read_keras_checkpoint(r).layers if l.weights]


def write_like_template(dst: str, template: KerasCheckpoint, value: Callable[[str], np.ndarray], keys: Iterable[str],
                        leftover: Iterable[str]) -> None:
    """Write a TF checkpoint with the template's object graph, keys, shapes and dtypes.

    Each of ``keys`` gets ``value(key)`` (its shape checked, cast to the template's dtype),
    streamed one tensor at a time; ``leftover`` keys are copied from the template. The
    ``checkpoint`` state file is updated so ``tf.train.latest_checkpoint`` finds ``dst``.

    Raises:
        ConversionError: a value whose shape is not the template's.

    Example:
        >>> write_like_template("tf/ckpt-1", kc, values.__getitem__, values, [])  # doctest: +SKIP
    """
    reader = template.reader
    # streamed: one converted tensor at a time goes to the data file (temp names, renamed at the end)
    with TFCheckpointWriter(dst) as writer:
        for ckey in keys:
            arr = np.asarray(value(ckey))
            if tuple(arr.shape) != tuple(reader.shape(ckey)):
                raise ConversionError(f"{ckey}: converted shape {arr.shape} but the template has {reader.shape(ckey)}")
            writer.add(ckey, arr.astype(reader.dtype(ckey), copy=False))
        for k in leftover:
            writer.add(k, reader.get(k))
        writer.add(OBJECT_GRAPH_KEY, reader.get(OBJECT_GRAPH_KEY))
    update_state_file(dst)
