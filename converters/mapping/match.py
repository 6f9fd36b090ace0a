"""Match Keras layers to the modules of a torch model by type and shape, and build the Mapping.

A Keras layer matches a torch module when the module is of the kind the layer becomes
(``Dense`` -> ``nn.Linear``, ``DepthwiseConv2D`` -> ``nn.Conv2d`` with ``groups == in``...)
and the module's own ``state_dict()`` has exactly the keys and shapes the layer's rules
produce. Registration order never decides anything:

* a layer whose type+shape signature fits exactly one module is matched to it;
* layers sharing a signature with several modules are matched in execution order, taken from
  forward hooks on one run of ``example_input`` (the model runs in eval mode under
  ``no_grad`` and its mode is restored);
* without ``example_input`` such ties are refused with the candidates listed, as is any
  layer that fits no module (``pairs={keras name: torch path}`` settles a case by hand).

Example:
    >>> mapping = build_mapping(describe_keras_model(keras_model), torch_model,
    ...                         example_input=torch.zeros(1, 3, 32, 32))  # doctest: +SKIP
    >>> print(mapping.plan(keras_weights, torch_model.state_dict()))  # doctest: +SKIP
"""

from __future__ import annotations

__all__ = ["match_layers", "build_mapping", "settle_kinds"]

from collections import defaultdict
from collections.abc import Mapping as AbcMapping
from collections.abc import Sequence
from typing import Any

from ckptfmt.errors import ConversionError

from ..optional import require
from .describe import find_flatten_dense
from .registry import LAYER_KINDS, KerasLayer, layer_rules
from .rules import Mapping

torch = require("torch", "model-guided mapping")
nn = torch.nn


def _accepts(layer: KerasLayer, module: nn.Module) -> bool:
    """Whether ``module`` is of the kind ``layer`` becomes (its record says; shapes are checked separately)."""
    kind = LAYER_KINDS.get(layer.class_name)
    return kind is not None and kind.accepts is not None and bool(kind.accepts(layer, module))


def _hyper_notes(layer: KerasLayer, path: str, module: nn.Module) -> list[str]:
    """Mismatches between the Keras config and the torch module that weights cannot fix (its record says)."""
    kind = LAYER_KINDS.get(layer.class_name)
    return list(kind.module_notes(layer, path, module)) if kind is not None and kind.module_notes is not None else []


def _trace_order(model: nn.Module, example_input: Any, modules: dict[str, nn.Module]) -> dict[str, int]:
    order: dict[str, int] = {}
    handles = []
    for path, mod in modules.items():
        def hook(_m, _inp, path=path):
            order.setdefault(path, len(order))
        handles.append(mod.register_forward_pre_hook(hook))
    was_training = model.training
    try:
        model.eval()  # eval: a trace must not move BatchNorm's running statistics
        with torch.no_grad():
            if isinstance(example_input, tuple):
                model(*example_input)
            elif isinstance(example_input, dict):
                model(**example_input)
            else:
                model(example_input)
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    return order


def settle_kinds(keras_layers: Sequence[KerasLayer], model: nn.Module, pairs: AbcMapping[str, str] | None = None) -> list[KerasLayer]:
    """Settle layers whose kind the weights leave open by the torch modules that fit them.

    A convolution without bias read from a checkpoint may be a Conv, a ConvTranspose or a
    DepthwiseConv (``config["alternatives"]``); the kind that some module of ``model``
    accepts with exactly the shapes its rules produce wins (only the module ``pairs`` names
    for the layer, when it names one).

    Raises:
        ConversionError: the model has modules fitting more than one kind (names them).

    Example:
        >>> settle_kinds(layers, model)  # doctest: +SKIP
        [KerasLayer(name='up', class_name='Conv2DTranspose', ...)]
    """
    modules = dict(model.named_modules())
    own = {p: {k: tuple(v.shape) for k, v in m.state_dict().items()} for p, m in modules.items()}
    out: list[KerasLayer] = []
    for layer in keras_layers:
        alternatives = layer.config.get("alternatives")
        if not alternatives:
            out.append(layer)
            continue
        config = {k: v for k, v in layer.config.items() if k != "alternatives"}
        fits: dict[str, list[str]] = {}
        for kind in (layer.class_name, *alternatives):
            cand = KerasLayer(layer.name, kind, config, layer.weights, layer.input_shape, layer.output_shape)
            want = {k: s.shape for k, s in layer_rules(cand, "").plan(cand.specs()).target_specs.items()}
            paths = [p for p, m in modules.items() if own[p] == want and _accepts(cand, m)
                     and (not pairs or layer.name not in pairs or pairs[layer.name] == p)]
            if paths:
                fits[kind] = paths
        if len(fits) > 1 and len({tuple(p) for p in fits.values()}) == 1:
            # the same modules under either reading: a depthwise conv of one input channel is a
            # plain conv, with the same weight layout
            fits = dict([next(iter(fits.items()))])
        if len(fits) > 1:
            raise ConversionError(
                f"ambiguous: the weights of Keras layer {layer.name!r} fit "
                + "; ".join(f"a {k} (torch {', '.join(p)})" for k, p in fits.items())
                + "; pair it by hand (pairs= / --pair NAME=PATH) or write its rules in a mapping file (--map)"
            )
        kind = next(iter(fits), layer.class_name)
        out.append(KerasLayer(layer.name, kind, config, layer.weights, layer.input_shape, layer.output_shape))
    return out


def match_layers(
    keras_layers: Sequence[KerasLayer],
    model: nn.Module,
    example_input: Any = None,
    *,
    pairs: AbcMapping[str, str] | None = None,
    flatten_from: AbcMapping[str, Sequence[int]] | None = None,
) -> list[tuple[KerasLayer, str]]:
    """Pair every Keras layer that has weights with the path of its torch module.

    Args:
        keras_layers: the Keras model's layers, in order (see ``describe_keras_model``).
        model: the torch model.
        example_input: an input for one forward pass, to order layers that share a signature.
        pairs: ``{keras layer name: torch module path}`` fixed by hand.
        flatten_from: ``{dense name: (*spatial, C)}`` from ``find_flatten_dense``.

    Returns:
        ``[(layer, module path), ...]`` in Keras order.

    Raises:
        ConversionError: a layer fits no module, or several without ``example_input``, or one
            module would take two layers (every such problem is listed).

    Example:
        >>> match_layers(layers, model, torch.zeros(1, 8))  # doctest: +SKIP
        [(KerasLayer(name='dense', ...), 'fc')]
    """
    pairs = dict(pairs or {})
    flatten_from = dict(flatten_from or {})
    weighted = [l for l in keras_layers if l.weights]
    modules = dict(model.named_modules())
    own = {p: {k: tuple(v.shape) for k, v in m.state_dict().items()} for p, m in modules.items()}

    signature: dict[str, tuple] = {}
    for layer in weighted:
        plan = layer_rules(layer, "", flatten_from=flatten_from.get(layer.name)).plan(layer.specs())
        signature[layer.name] = (layer.class_name, tuple(sorted((k, s.shape) for k, s in plan.target_specs.items())))

    problems: list[str] = []
    result: dict[str, str] = {}
    names = {l.name for l in weighted}
    for name, path in pairs.items():
        if name not in names:
            problems.append(f"pairs: no Keras layer {name!r} (the layers: {', '.join(sorted(names))})")
        elif path not in modules:
            problems.append(f"pairs: torch model has no module {path!r} (for Keras layer {name!r})")
        else:
            layer = next(l for l in weighted if l.name == name)
            want = dict(signature[name][1])
            if not _accepts(layer, modules[path]) or own[path] != want:
                problems.append(f"pairs: Keras {layer.class_name} {name!r} [{', '.join(f'{k} {s}' for k, s in want.items())}] "
                                f"cannot become torch {type(modules[path]).__name__} {path!r} "
                                f"[{', '.join(f'{k} {s}' for k, s in own[path].items())}]")
            result[name] = path

    groups: dict[tuple, list[KerasLayer]] = defaultdict(list)
    for layer in weighted:
        if layer.name not in result:
            groups[signature[layer.name]].append(layer)
    taken = set(result.values())
    candidates: dict[tuple, list[str]] = {}
    for sig, layers in groups.items():
        want = dict(sig[1])
        candidates[sig] = [p for p, m in modules.items() if p not in taken and own[p] == want and _accepts(layers[0], m)]

    order: dict[str, int] | None = None
    if example_input is not None and any(len(c) > 1 for c in candidates.values()):
        order = _trace_order(model, example_input, {p: modules[p] for c in candidates.values() for p in c})

    for sig, layers in groups.items():
        cands = candidates[sig]
        names = ", ".join(l.name for l in layers)
        shapes = ", ".join(f"{k} {s}" for k, s in sig[1])
        if len(cands) < len(layers):
            problems.append(f"Keras {sig[0]} layer(s) {names} [{shapes}]: {len(cands)} torch module(s) of that type and shape "
                            f"({', '.join(cands) or 'none'}) for {len(layers)} layer(s)")
            continue
        if len(cands) == 1:
            result[layers[0].name] = cands[0]
            continue
        if order is None:
            problems.append(f"ambiguous: Keras {sig[0]} layer(s) {names} [{shapes}] could be torch module(s) {', '.join(cands)}; "
                            "pass example_input so the execution order decides, or pairs={keras name: torch path} (--pair NAME=PATH)")
            continue
        run = sorted((p for p in cands if p in order), key=order.__getitem__)
        if len(run) != len(layers):
            problems.append(f"Keras {sig[0]} layer(s) {names}: the forward pass ran {len(run)} of the candidate torch modules "
                            f"{', '.join(cands)}, not {len(layers)}; pass pairs= (--pair NAME=PATH) to decide")
            continue
        result.update({l.name: p for l, p in zip(layers, run)})

    seen: dict[str, str] = {}
    for name, path in result.items():
        if path in seen:
            problems.append(f"torch module {path!r} would take both Keras layers {seen[path]!r} and {name!r}")
        seen[path] = name
    if problems:
        raise ConversionError("cannot match the Keras layers to the torch model:\n  " + "\n  ".join(problems))
    return [(l, result[l.name]) for l in weighted]


def build_mapping(
    keras_layers: Sequence[KerasLayer],
    model: nn.Module,
    example_input: Any = None,
    *,
    pairs: AbcMapping[str, str] | None = None,
    flatten_shapes: AbcMapping[str, Sequence[int]] | None = None,
) -> Mapping:
    """The Keras -> torch :class:`~.rules.Mapping` for a model, checked against its state_dict.

    Detects the Flatten trap (``flatten_shapes``: ``{flatten name: (H, W, C)}`` when the layer
    descriptions carry no shapes), matches layers to modules (:func:`match_layers`), and plans
    the result strictly against ``model.state_dict()`` so every torch key is produced once.

    Raises:
        ConversionError / UnmappedKeyError: as :func:`match_layers` and :meth:`Mapping.plan`.

    Example:
        >>> m = build_mapping(describe_keras_model(kmodel), tmodel, torch.zeros(1, 8))  # doctest: +SKIP
        >>> tmodel.load_state_dict(to_torch(m.apply(keras_weights)))  # doctest: +SKIP
    """
    flatten_from = find_flatten_dense(keras_layers, dict(flatten_shapes or {}))
    matched = match_layers(keras_layers, model, example_input, pairs=pairs, flatten_from=flatten_from)
    modules = dict(model.named_modules())
    mapping = Mapping(())
    notes: list[str] = []
    for layer, path in matched:
        mapping = mapping + layer_rules(layer, path, flatten_from=flatten_from.get(layer.name))
        notes += _hyper_notes(layer, path, modules[path])
    if flatten_from:
        notes.append("the torch model must flatten NCHW feature maps channels-first (x.flatten(1)) before the Dense layers noted above")
    mapping = Mapping(mapping.rules, mapping.notes + tuple(notes))
    sources = {k: s for layer, _ in matched for k, s in layer.specs().items()}
    mapping.plan(sources, {k: tuple(v.shape) for k, v in model.state_dict().items()})
    return mapping
