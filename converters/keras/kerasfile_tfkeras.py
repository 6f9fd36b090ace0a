"""The tf.keras 2 layout: an ``.h5`` from ``model.save`` or ``save_weights`` resolved by name.

tf.keras 2 stores each layer's weights under their variable names
(``model_weights/<layer>/<layer>/kernel:0``, or at the root for ``save_weights``), listed by
the ``layer_names`` and ``weight_names`` attributes; the optimizer's under
``optimizer_weights/<optimizer>/<slot>/<variable>:0`` (legacy optimizers:
``<optimizer>/<variable>/<slot>:0``), so slots are tied by name, never by position. A full
model's ``model_config`` names each layer's class and ``training_config`` the optimizer's.

Part of :mod:`ckptfmt.converters.keras.kerasfile`, which re-exports the public names.
"""

from __future__ import annotations

__all__ = ["read_tfkeras"]

from dataclasses import dataclass, field
from typing import Any

from ckptfmt.errors import ConversionError, FormatError

from ..mapping.registry import KerasLayer, KerasWeight
from .infer import infer_kind, insert_flattens
from .kerasfile_h5 import KerasFileReader, attr_value
from .kerasfile_layers import KNOWN_TO_CONVERTERS, KerasFileCheckpoint, useful_config

# tf.keras 2 slot names (new and legacy optimizers) -> Keras 3's (the update rules are the same).
_TF_SLOTS = {"m": "momentum", "v": "velocity", "vhat": "velocity_hat", "rms": "velocity", "mg": "average_gradient",
             "momentum": "momentum", "velocity": "velocity", "velocity_hat": "velocity_hat", "average_gradient": "average_gradient"}
# Hyperparameters legacy optimizers store as variables (``Adam/beta_1:0``).
_HYPER = ("beta_1", "beta_2", "decay", "momentum", "rho", "epsilon", "learning_rate")


@dataclass(slots=True)
class _OptimizerWeights:
    """The optimizer's weights sorted by what they are, as the reader goes through them."""

    slots: dict[str, dict[str, str]] = field(default_factory=dict)  # variable path -> {slot: dataset}
    iterations_key: str | None = None
    hyper: dict[str, str] = field(default_factory=dict)  # hyperparameter -> dataset
    problems: list[str] = field(default_factory=list)
    name: str | None = None


def read_tfkeras(reader: KerasFileReader, infer_layers: bool) -> KerasFileCheckpoint:
    """Resolve a tf.keras 2 ``.h5`` into a :class:`KerasFileCheckpoint`.

    Raises:
        FormatError: a weight named but missing, two weights of one name, no ``layer_names``.
        ConversionError: a layer whose weights contradict its configured class (with ``infer_layers``).

    Example:
        >>> with KerasFileReader("fixtures/keras/tfk_cnn_adam.h5") as r:
        ...     read_tfkeras(r, True).slots["conv/kernel"]
        {'momentum': 'optimizer_weights/Adam/m/conv/kernel:0', 'velocity': 'optimizer_weights/Adam/v/conv/kernel:0'}
    """
    groups = reader.groups()
    base = "model_weights" if "model_weights" in groups else ""
    root_attrs = groups.get(base, {})
    if "layer_names" not in root_attrs:
        raise FormatError(f"{reader.path}: {base or 'the root'} has no layer_names attribute (not a tf.keras .h5)")
    layer_names = [str(n) for n in attr_value(root_attrs["layer_names"])]
    cfg_by_name = _configs_by_name(reader.config if isinstance(reader.config, dict) else None)
    keys: dict[str, str] = {}
    layers: list[KerasLayer] = []
    for lname in layer_names:
        ws = _layer_weights(reader, groups, base, lname, keys)
        cls, cfg = cfg_by_name.get(lname, (None, {}))
        layer = _layer(reader, lname, tuple(ws), cls, cfg, infer_layers)
        if layer is not None:
            layers.append(layer)
    if infer_layers:
        layers = insert_flattens([l for l in layers if l.class_name != "Flatten"])
    opt = _optimizer_weights(reader, groups, keys)
    lr_key = opt.hyper.pop("learning_rate", None)
    return KerasFileCheckpoint(
        keys=keys, shapes={k: reader.shape(v) for k, v in keys.items()}, dtypes={k: reader.dtype(v) for k, v in keys.items()},
        layers=tuple(layers), slots=opt.slots, iterations_key=opt.iterations_key, learning_rate_key=lr_key,
        optimizer_name=opt.name,
        other=tuple(k for k in reader.keys() if k not in set(keys.values()) and not k.startswith("optimizer_weights/")),
        problems=tuple(opt.problems), hyperparameter_keys=opt.hyper, path=reader.path, reader=reader,
        file_kind="tfkeras-h5", optimizer_config=_training_optimizer_config(reader.training_config), order_known=True,
    )


def _configs_by_name(config: dict[str, Any] | None) -> dict[str, tuple[str, dict]]:
    """``{layer name: (class, config)}`` of the model config's top-level layers."""
    out: dict[str, tuple[str, dict]] = {}
    if config:
        for e in (config.get("config", {}) or {}).get("layers", []) or []:
            if isinstance(e, dict) and isinstance(e.get("config"), dict):
                out[e["config"].get("name", e.get("name"))] = (e.get("class_name"), e["config"])
    return out


def _layer_weights(reader: KerasFileReader, groups: dict[str, dict[str, Any]], base: str, lname: str,
                   keys: dict[str, str]) -> list[KerasWeight]:
    """A layer's weights in its ``weight_names`` order, each added to ``keys`` (variable path -> dataset)."""
    g = f"{base}/{lname}" if base else lname
    ws = []
    for wn in [str(n) for n in attr_value(groups.get(g, {}).get("weight_names", []))]:
        h5key = f"{g}/{wn}"
        if h5key not in reader._datasets:
            raise FormatError(f"{reader.path}: layer {lname!r} names weight {wn!r}, which is not in the file")
        vpath = wn.removesuffix(":0")
        if vpath in keys:
            raise FormatError(f"{reader.path}: two weights named {wn!r}")
        keys[vpath] = h5key
        ws.append(KerasWeight(vpath, reader.shape(h5key)))
    return ws


def _layer(reader: KerasFileReader, lname: str, ws: tuple[KerasWeight, ...], cls: str | None, cfg: dict[str, Any],
           infer_layers: bool) -> KerasLayer | None:
    """The converters' layer: its kind from the weights, checked against the configured class; None when weightless."""
    if not infer_layers:
        return KerasLayer(lname, "?", {}, ws)
    if cls == "Flatten":
        return KerasLayer(lname, "Flatten", {}, (), input_shape=None)
    if not ws:
        return None
    kind, extra = infer_kind(lname, ws)
    if cls and cls in KNOWN_TO_CONVERTERS and cls != kind and not extra.get("alternatives"):
        raise ConversionError(f"{reader.path}: layer {lname!r} is a {cls} in the config but its weights look like a {kind}")
    if cls in KNOWN_TO_CONVERTERS:
        kind = cls
        extra = {k: v for k, v in extra.items() if k != "alternatives"}
    return KerasLayer(lname, kind, {**extra, **useful_config(cfg)}, ws)


def _optimizer_weights(reader: KerasFileReader, groups: dict[str, dict[str, Any]], keys: dict[str, str]) -> _OptimizerWeights:
    """The ``optimizer_weights`` group's weights: slots tied by variable name, counter, hyperparameters."""
    found = _OptimizerWeights()
    ow = groups.get("optimizer_weights")
    if ow is None:
        return found
    for wn in [str(n) for n in attr_value(ow.get("weight_names", []))]:
        key = f"optimizer_weights/{wn}"
        if key not in reader._datasets:
            raise FormatError(f"{reader.path}: optimizer weight {wn!r} is named but not in the file")
        _place_optimizer_weight(found, wn, key, keys)
    return found


def _place_optimizer_weight(found: _OptimizerWeights, wn: str, key: str, keys: dict[str, str]) -> None:
    """Sort one optimizer weight (``Adam/m/conv/kernel:0``) into ``found``; one ckptfmt does not know is a problem."""
    parts = wn[:-2].split("/") if wn.endswith(":0") else wn.split("/")
    if parts[-1] in ("iteration", "iter"):
        found.iterations_key = key
        found.name = found.name or (parts[0] if len(parts) > 1 else None)
        return
    if len(parts) == 2 and parts[1] in _HYPER:
        found.hyper[parts[1]] = key
        return
    named = _slot_and_variable(parts)
    if named is None:
        found.problems.append(f"optimizer weight {wn} is not a slot ckptfmt knows")
        return
    found.name, slot, var = named
    if var not in keys:
        found.problems.append(f"optimizer weight {wn} names variable {var!r}, which the model does not have")
        return
    found.slots.setdefault(var, {})[_TF_SLOTS[slot]] = key


def _slot_and_variable(parts: list[str]) -> tuple[str, str, str] | None:
    """``(optimizer, slot, variable)`` of a slot's name parts: new optimizers ``Adam/m/conv/kernel``,
    legacy ones ``Adam/conv/kernel/m``; None for a name of neither shape."""
    if len(parts) >= 3 and parts[1] in _TF_SLOTS:
        return parts[0], parts[1], "/".join(parts[2:])
    if len(parts) >= 3 and parts[-1] in _TF_SLOTS:
        return parts[0], parts[-1], "/".join(parts[1:-1])
    return None


def _training_optimizer_config(tc: Any) -> dict[str, Any]:
    """The optimizer's class and non-null settings from ``training_config``, empty when it has none."""
    if isinstance(tc, dict) and isinstance(tc.get("optimizer_config"), dict):
        o = tc["optimizer_config"]
        cls_name = str(o.get("class_name", "")).rpartition(">")[2]
        if isinstance(o.get("config"), dict):
            return {"class_name": cls_name, **{k: v for k, v in o["config"].items() if v is not None}}
    return {}
