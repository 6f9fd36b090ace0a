"""The Keras 3 layout: a ``.keras`` archive or a ``.weights.h5`` resolved into layers, weights and slots.

A Keras 3 weights file stores each saveable object's variables by position under its
group (``layers/dense_1/vars/0``); the group's ``vars`` carries the object's ``name``. The
reader walks ``config.json``'s layers in order, finding each by name (nested models
recursively); whatever the config does not explain (a subclassed model, a ``.weights.h5``
alone) is read group by group, its class from the group's snake_case name. Each layer's
variables are named by role from its class (:mod:`.kerasfile_layers`); the optimizer's
variables are tied to them by :mod:`.kerasfile_optimizer`.

Part of :mod:`ckptfmt.converters.keras.kerasfile`, which re-exports the public names.
"""

from __future__ import annotations

__all__ = ["read_keras3"]

import dataclasses
from typing import Any

from ckptfmt.errors import ConversionError, FormatError

from ..mapping.registry import KerasLayer, KerasWeight
from .infer import insert_flattens
from .kerasfile_h5 import KerasFileReader, attr_value, natural_key
from .kerasfile_layers import (
    CLASS_BY_SNAKE,
    COMPOSITES,
    LAYER_SPECS,
    STATE_ONLY,
    SUFFIX_N,
    FileLayer,
    FileObject,
    KerasFileCheckpoint,
    guess_roles,
    keras_layer,
    roles_of,
)
from .kerasfile_optimizer import OptimizerVars, tie_optimizer

_Weights = tuple[list[tuple[str, str]], list[str]]  # (variable path, dataset) in saving order; trainable datasets


def read_keras3(reader: KerasFileReader, infer_layers: bool) -> KerasFileCheckpoint:
    """Resolve a Keras 3 ``.keras`` / ``.weights.h5`` into a :class:`KerasFileCheckpoint`.

    Raises:
        FormatError: a layout that is not Keras's (names the file and group).
        ConversionError: a layer of unknown kind (with ``infer_layers``).

    Example:
        >>> with KerasFileReader("fixtures/keras/k3_cnn_adam.weights.h5") as r:
        ...     read_keras3(r, True).notes
        ("layer order solved from the optimizer slots' shapes (a .weights.h5 records none)",)
    """
    objs = _objects(reader)
    if not objs:
        raise FormatError(f"{reader.path}: no Keras variables (no vars groups)")
    config = reader.config if isinstance(reader.config, dict) else None
    layers, order_known = _model_layers(reader, objs, config)
    notes: list[str] = []
    if "" in objs and objs[""].n:
        notes.append(f"the model itself holds {objs[''].n} variables (vars/0..): not converted")
    opt_cfg = _optimizer_config(config)
    opt, other = _read_optimizer(reader, objs, layers, opt_cfg, order_known)
    notes += opt.notes
    if opt.order is not None:
        layers, order_known = opt.order, True
    keys, kl = _keras_layers(reader, layers, infer_layers)
    # without the order no Flatten can be placed: the planner has the torch model's dataflow decide
    # each Dense, or refuses (unordered_flatten_error)
    if infer_layers and order_known and not any(l.class_name == "Flatten" for l in kl):
        kl = insert_flattens(kl)
    other += _unplaced_datasets(reader, keys, opt, other)
    return KerasFileCheckpoint(
        keys=keys, shapes={k: reader.shape(v) for k, v in keys.items()}, dtypes={k: reader.dtype(v) for k, v in keys.items()},
        layers=tuple(kl), slots=opt.slots, iterations_key=opt.iterations_key, learning_rate_key=opt.learning_rate_key,
        optimizer_name=(objs["optimizer"].name if "optimizer" in objs else None), other=tuple(other),
        problems=tuple(opt.problems), path=reader.path, reader=reader, file_kind="keras" if reader.kind == "keras" else "keras3-h5",
        optimizer_config={k: v for k, v in opt_cfg.items() if v is not None}, order_known=order_known, notes=tuple(notes),
    )


def _unplaced_datasets(reader: KerasFileReader, keys: dict[str, str], opt: OptimizerVars, other: list[str]) -> list[str]:
    """The datasets neither a layer's variable nor a tied optimizer variable (nor already in ``other``)."""
    seen = (set(keys.values()) | {k for d in opt.slots.values() for k in d.values()}
            | {k for k in (opt.iterations_key, opt.learning_rate_key) if k})
    return [k for k in reader.keys() if k not in seen and k not in other]


def _model_layers(reader: KerasFileReader, objs: dict[str, FileObject], config: dict[str, Any] | None
                  ) -> tuple[list[FileLayer], bool]:
    """The model's layers and whether they are in the model's order.

    A Functional or Sequential config gives the layers in order; every group it does not
    explain (a subclassed model, a ``.weights.h5`` alone) follows in path order.
    """
    layers: list[FileLayer] = []
    consumed: set[str] = set()
    model_cfg = config.get("config", {}) if config else {}
    model_class = config.get("class_name") if config else None
    order_known = False
    if config and model_class in ("Functional", "Sequential") and isinstance(model_cfg, dict):
        layers = _from_config(reader, objs, "layers", model_cfg, consumed, True)
        order_known = True
    rest = sorted((p for p in objs if p not in consumed and p != "optimizer" and not p.startswith("optimizer/")
                   and p != ""), key=natural_key)
    for path in rest:
        if path in consumed or any(path.startswith(c + "/") for c in consumed):
            continue
        layers += _layer_from_group(reader, objs, path, None, consumed, True)
    return layers, order_known


def _optimizer_config(config: dict[str, Any] | None) -> dict[str, Any]:
    """The compiled optimizer's class and config from ``config.json``, empty when it has none."""
    if config and isinstance(config.get("compile_config"), dict):
        o = config["compile_config"].get("optimizer")
        if isinstance(o, dict) and isinstance(o.get("config"), dict):
            return {"class_name": o.get("class_name"), **o["config"]}
    return {}


def _read_optimizer(reader: KerasFileReader, objs: dict[str, FileObject], layers: list[FileLayer], opt_cfg: dict[str, Any],
                    order_known: bool) -> tuple[OptimizerVars, list[str]]:
    """The optimizer's variables tied to the model's, and its datasets left untied.

    An optimizer that is present but cannot be tied keeps its iteration counter, so that
    converting it is refused, not skipped.
    """
    opt = objs.get("optimizer")
    if opt is None:
        return OptimizerVars(), []
    # under mixed precision compile() wraps the configured optimizer: the config names the inner
    # class, the file holds the wrapper's vars beside an inner_optimizer group
    if opt_cfg.get("class_name") == "LossScaleOptimizer" or "optimizer/inner_optimizer" in objs:
        problem = (f"{reader.path}: a LossScaleOptimizer's state (mixed precision) in a Keras file is not read yet; "
                   "pass --no-optimizer")
        return (OptimizerVars("optimizer/vars/0" if opt.n else None, problems=[problem]),
                [f"optimizer/vars/{i}" for i in range(1, opt.n)])
    tied = tie_optimizer(reader, opt, layers, opt_cfg, order_known)
    if tied.problems and tied.iterations_key is None and opt.n:
        tied = dataclasses.replace(tied, iterations_key="optimizer/vars/0")
    return tied, []


def _keras_layers(reader: KerasFileReader, layers: list[FileLayer], infer_layers: bool
                  ) -> tuple[dict[str, str], list[KerasLayer]]:
    """``{variable path: dataset}`` and the converters' layers (kinds checked with ``infer_layers``)."""
    keys: dict[str, str] = {}
    kl: list[KerasLayer] = []
    for layer in layers:
        ws = []
        for vpath, h5key in layer.weights:
            if vpath in keys:
                raise FormatError(f"{reader.path}: two variables with the Keras path {vpath!r} (layer {layer.name!r})")
            keys[vpath] = h5key
            ws.append(KerasWeight(vpath, reader.shape(h5key)))
        kl.append(keras_layer(layer, tuple(ws)) if infer_layers else KerasLayer(layer.name, "?", {}, tuple(ws)))
    return keys, kl


# ---- the groups of the file


def _objects(reader: KerasFileReader) -> dict[str, FileObject]:
    """Every saveable object (a group with ``vars``) by its group path; datasets anywhere else are refused."""
    groups = reader.groups()
    objs: dict[str, FileObject] = {}
    for path, attrs in groups.items():
        if path != "vars" and not path.endswith("/vars"):
            continue
        owner = path[: -len("/vars")] if path != "vars" else ""
        n = 0
        while f"{path}/{n}" in reader._datasets:
            n += 1
        extra = [k for k in reader._datasets if k.startswith(path + "/") and k.count("/") == path.count("/") + 1]
        if len(extra) != n:
            raise FormatError(f"{reader.path}: {path} holds datasets that are not numbered 0..{n - 1}: "
                              f"{', '.join(sorted(k.rsplit('/', 1)[1] for k in extra)[:5])}")
        objs[owner] = FileObject(owner, str(attr_value(attrs.get("name", owner.rsplit("/", 1)[-1] or "model"))), n)
    stray = [k for k in reader._datasets if k.rsplit("/", 2)[-2:-1] != ["vars"] and not k.startswith(("vars/",))
             and "/vars/" not in k]
    if stray:
        raise FormatError(f"{reader.path}: datasets outside any vars group (not a Keras 3 weights file?): {', '.join(stray[:5])}")
    return objs


def _class_of(group: str) -> str | None:
    """The Keras class a group's snake_case name (``batch_normalization_2``) names, if a known one."""
    base = group.rsplit("/", 1)[-1]
    m = SUFFIX_N.match(base)
    return CLASS_BY_SNAKE.get(m["base"] if m else base) or CLASS_BY_SNAKE.get(base)


def _from_config(reader: KerasFileReader, objs: dict[str, FileObject], base: str, model_cfg: dict[str, Any], consumed: set[str],
                 trainable: bool) -> list[FileLayer]:
    """The layers of a Functional/Sequential config, in its order, each found by name under ``base``."""
    by_name: dict[str, str] = {}
    for path, o in objs.items():
        if path.startswith(base + "/") and path.count("/") == base.count("/") + 1:
            by_name.setdefault(o.name, path)
    out: list[FileLayer] = []
    trainable = trainable and model_cfg.get("trainable", True) is not False
    for entry in model_cfg.get("layers", []) or []:
        out += _entry_layers(reader, objs, base, by_name, entry, consumed, trainable)
    missed = [p for p, o in objs.items() if p.startswith(base + "/") and o.n and p not in consumed
              and not any(p.startswith(c + "/") for c in consumed)]
    if missed:
        raise FormatError(f"{reader.path}: variables of {', '.join(missed[:5])} belong to no layer of config.json")
    return out


def _entry_layers(reader: KerasFileReader, objs: dict[str, FileObject], base: str, by_name: dict[str, str], entry: Any,
                  consumed: set[str], trainable: bool) -> list[FileLayer]:
    """The layers of one config entry: a nested model's, the entry's own, or none when it saved nothing."""
    if not isinstance(entry, dict):
        raise FormatError(f"{reader.path}: config.json: a layer entry is not an object")
    cls = entry.get("class_name")
    cfg = entry.get("config") if isinstance(entry.get("config"), dict) else {}
    name = cfg.get("name") or entry.get("name")
    path = by_name.get(name)
    if path is None:
        if cls == "Flatten" and _build_input(entry) is not None:  # no vars group when nothing was saved
            return [FileLayer(str(name), "Flatten", {}, [], [], f"{base}/flatten", 0, _build_input(entry))]
        return []  # weightless layers need not be saved; a layer with weights missing is caught by the caller
    consumed.add(path)
    if cls in ("Functional", "Sequential") and isinstance(cfg, dict):
        return _from_config(reader, objs, path + "/layers", cfg, consumed, trainable and cfg.get("trainable", True) is not False)
    return _layer_from_group(reader, objs, path, (cls, cfg), consumed, trainable, _build_input(entry))


def _datasets_below(objs: dict[str, FileObject], path: str) -> list[str]:
    """The objects at or below ``path`` that hold variables, in path order."""
    return sorted((p for p, o in objs.items() if (p == path or p.startswith(path + "/")) and o.n), key=natural_key)


def _layer_from_group(reader: KerasFileReader, objs: dict[str, FileObject], path: str, given: tuple[str, dict] | None,
                      consumed: set[str], trainable: bool, input_shape: tuple[int | None, ...] | None = None) -> list[FileLayer]:
    """The layer of a group (and, when given, its config entry); a container's layers, each on its own."""
    o = objs[path]
    cls = given[0] if given else _class_of(path)
    cfg = dict(given[1]) if given else {}
    trainable = trainable and cfg.get("trainable", True) is not False
    below = _datasets_below(objs, path)
    consumed.update(below)
    consumed.add(path)
    chain, ordinal = _chain(path)
    if not below:
        if cls == "Flatten" and input_shape is not None:
            return [FileLayer(o.name, "Flatten", cfg, [], [], chain, ordinal, input_shape)]
        return []
    if cls in STATE_ONLY or path.rsplit("/", 1)[-1].startswith("seed_generator"):
        return []
    if cls in LAYER_SPECS and below == [path]:
        (weights, train), known = _positional_weights(reader, o, cls, cfg, trainable, o.name), True
    elif cls in COMPOSITES or cls == "Bidirectional":
        (weights, train), known = _composite_weights(reader, objs, path, below, cls, cfg, trainable), True
    elif below != [path]:
        return _container_layers(reader, objs, path, consumed, trainable)
    else:  # an unknown class, or a group named after an attribute: positional variables only
        (weights, train), known = _guessed_weights(reader, o, trainable), False
    return [FileLayer(o.name, cls or "?", cfg, weights, train, chain, ordinal, input_shape, class_known=known and cls is not None)]


def _positional_weights(reader: KerasFileReader, o: FileObject, cls: str, cfg: dict[str, Any], trainable: bool,
                        owner: str) -> _Weights:
    """A built-in layer's (or sub-object's) variables, named ``{owner}/{role}`` from its class and config."""
    weights: list[tuple[str, str]] = []
    train: list[str] = []
    for i, r in enumerate(roles_of(reader, o, cls, cfg)):
        key = f"{o.path}/vars/{i}"
        weights.append((f"{owner}/{r}", key))
        if r in LAYER_SPECS[cls].trainable and trainable:
            train.append(key)
    return weights, train


def _composite_weights(reader: KerasFileReader, objs: dict[str, FileObject], path: str, below: list[str], cls: str,
                       cfg: dict[str, Any], trainable: bool) -> _Weights:
    """A composite layer's variables (an RNN's cell, Bidirectional's two directions, attention's projections).

    Each sub-object's variables are named through the objects' names (``bi/forward_gru/gru_cell/kernel``);
    a variable outside the sub-objects Keras's class has is refused.
    """
    o = objs[path]
    weights: list[tuple[str, str]] = []
    train: list[str] = []
    got = set()
    for sub, sub_cls, prefix, sub_cfg in _composite_parts(cls, cfg):
        sp = f"{path}/{sub}"
        if sp not in objs and not any(p.startswith(sp + "/") for p in below):
            continue  # an unbuilt direction or sub-layer: nothing saved
        if sp not in objs or not objs[sp].n:
            raise FormatError(f"{reader.path}: {cls} {o.name!r}: {sp} holds no variables")
        so = objs[sp]
        got.add(sp)
        names = [n for n in prefix.split("/") if n] if prefix else []
        owner = "/".join([o.name, *[objs[f"{path}/{x}"].name for x in names if f"{path}/{x}" in objs], so.name])
        w, t = _positional_weights(reader, so, sub_cls, sub_cfg, trainable, owner)
        weights += w
        train += t
    left = [p for p in below if p not in got]
    if left:
        raise FormatError(f"{reader.path}: {cls} {o.name!r} holds variables Keras's {cls} does not: {', '.join(left)}")
    return weights, train


def _container_layers(reader: KerasFileReader, objs: dict[str, FileObject], path: str, consumed: set[str],
                      trainable: bool) -> list[FileLayer]:
    """The layers of a container of layers (a custom layer or block), each sub-layer on its own."""
    if objs[path].n:
        raise ConversionError(f"{reader.path}: layer {objs[path].name!r} ({path}) holds its own variables and sub-layers; "
                              "write its rules in a mapping file (--map)")
    out: list[FileLayer] = []
    for p in _children(objs, path):
        out += _layer_from_group(reader, objs, p, None, consumed, trainable)
    return out


def _guessed_weights(reader: KerasFileReader, o: FileObject, trainable: bool) -> _Weights:
    """The variables of a group of no known class, roles guessed from their shapes (:func:`guess_roles`)."""
    weights: list[tuple[str, str]] = []
    train: list[str] = []
    for i, r in enumerate(guess_roles(reader, o)):
        key = f"{o.path}/vars/{i}"
        weights.append((f"{o.name}/{r}", key))
        if trainable and r not in ("moving_mean", "moving_variance"):
            train.append(key)
    return weights, train


def _children(objs: dict[str, FileObject], path: str) -> list[str]:
    """The outermost objects below ``path`` (each a layer of a container)."""
    below = sorted((p for p in objs if p.startswith(path + "/")), key=natural_key)
    return [p for p in below if not any(p.startswith(q + "/") for q in below if q != p)]


def _chain(path: str) -> tuple[str, int]:
    parent, _, base = path.rpartition("/")
    m = SUFFIX_N.match(base)
    if parent and m and CLASS_BY_SNAKE.get(m["base"]):
        return f"{parent}/{m['base']}", int(m["n"] or 0)
    return path, 0


def _build_input(entry: dict[str, Any]) -> tuple[int | None, ...] | None:
    """A config entry's recorded input shape (``build_config``), when it is one plain shape."""
    shape = (entry.get("build_config") or {}).get("input_shape") if isinstance(entry.get("build_config"), dict) else None
    if isinstance(shape, list) and all(d is None or (isinstance(d, int) and d >= 0) for d in shape):
        return tuple(shape)
    return None


def _composite_parts(cls: str, cfg: dict[str, Any]) -> list[tuple[str, str, str, dict]]:
    """(sub-object path, its class, name-path prefix, its config) of a composite layer."""
    if cls == "Bidirectional":
        inner = cfg.get("layer", {}) if isinstance(cfg.get("layer"), dict) else {}
        inner_cls = inner.get("class_name", "LSTM")
        inner_cfg = inner.get("config", {}) if isinstance(inner.get("config"), dict) else {}
        cell = dict(COMPOSITES.get(inner_cls, (("cell", "LSTMCell"),)))["cell"]
        return [(f"{d}/cell", cell, f"{d}", inner_cfg) for d in ("forward_layer", "backward_layer")]
    return [(sub, sub_cls, "", cfg if sub == "cell" else {"use_bias": cfg.get("use_bias", True)})
            for sub, sub_cls in COMPOSITES[cls]]
