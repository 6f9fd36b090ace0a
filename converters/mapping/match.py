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

import math
from collections import defaultdict
from collections.abc import Mapping as AbcMapping
from collections.abc import Sequence
from typing import Any

from ckptfmt.errors import ConversionError

from ..optional import require
from ._dataflow import INPUT, TorchDataflow, producers
from .describe import find_flatten_dense
from .layers import BN_UNKNOWN_NOTE, LN_UNKNOWN_NOTE
from .registry import LAYER_KINDS, KerasLayer, KerasWeight, layer_rules
from .rules import Convert, Mapping, Rename, Subtract, Transpose

torch = require("torch", "model-guided mapping")
nn = torch.nn


def _accepts(layer: KerasLayer, module: nn.Module) -> bool:
    """Whether ``module`` is of the kind ``layer`` becomes (its record says; shapes are checked separately)."""
    kind = LAYER_KINDS.get(layer.class_name)
    return kind is not None and kind.accepts is not None and bool(kind.accepts(layer, module))


def _hyper_notes(matched: Sequence[tuple[KerasLayer, str]], modules: AbcMapping[str, nn.Module]) -> list[str]:
    """Conventions the weights cannot carry, grouped: one line per convention, with a count.

    Each layer's record says what its torch module cannot take from the weights
    (``module_notes`` -> ``(template, value)`` pairs, see :data:`.registry.ModuleNotes`); layers
    sharing a template make one line, ``{count}`` layers, ``{found}`` the values per layer
    group, ``{layers}`` a few of their names.
    """
    groups: dict[str, dict[str, list[str]]] = defaultdict(lambda: defaultdict(list))
    for layer, path in matched:
        kind = LAYER_KINDS.get(layer.class_name)
        if kind is None or kind.module_notes is None:
            continue
        for template, value in kind.module_notes(layer, path, modules[path]):
            groups[template][value].append(layer.name)
    notes = []
    for template, values in groups.items():
        names = [n for group in values.values() for n in group]
        found = "; ".join(f"{v} in {len(g)} ({_few(g)})" for v, g in values.items())
        notes.append(template.format(count=len(names), found=found, layers=_few(names)))
    return notes


def _few(names: Sequence[str], n: int = 3) -> str:
    return ", ".join(names[:n]) + (f", ... {len(names) - n} more" if len(names) > n else "")


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


def _no_module_problem(sig: tuple, layers: Sequence[KerasLayer], cands: Sequence[str], modules: AbcMapping[str, nn.Module],
                       own: AbcMapping[str, dict[str, tuple]]) -> str:
    """Why layers fit no module, said so a person can act: near misses are named."""
    names = ", ".join(l.name for l in layers[:6]) + (f", ... ({len(layers)} layers)" if len(layers) > 6 else "")
    want = dict(sig[1])
    shapes = ", ".join(f"{k} {s}" for k, s in want.items())
    msg = (f"Keras {sig[0]} layer(s) {names} [{shapes}]: {len(cands)} torch module(s) of that type and shape "
           f"({', '.join(cands) or 'none'}) for {len(layers)} layer(s)")
    near = [p for p, o in own.items() if o and _accepts(layers[0], modules[p]) and o.get("weight") == want.get("weight")
            and set(o) != set(want)]
    if near:
        extra = sorted({k for p in near for k in set(want) ^ set(own[p])})
        msg += (f"; {len(near)} module(s) of that type have the same weight shape but differ in {', '.join(extra)} "
                f"(e.g. {near[0]})")
        if "bias" in want and "bias" not in own[near[0]]:
            msg += (": the Keras layer has a bias the torch module lacks; if a BatchNormalization follows it, the bias "
                    "folds exactly into its running_mean (running_mean -= bias): pass --fold-conv-bias (fold_conv_bias=True)")
    return msg


def _match_by_graph(groups: AbcMapping[tuple, list[KerasLayer]], candidates: AbcMapping[tuple, list[str]], result: dict[str, str],
                    keras_graph: AbcMapping[str, Any], flow: TorchDataflow, keras_participants: set[str],
                    torch_participants: set[str]) -> None:
    """Match same-shape layers to the modules whose inputs come from where the layers' inputs do.

    A layer and a module are consistent when every matched layer feeding the layer became a
    module feeding the module, and the other way round (and both or neither read the model's
    input). Layers with exactly one consistent candidate are matched; repeated until nothing
    changes, so matches spread from the layers whose shape is unique.
    """
    missing = sorted(keras_participants - set(keras_graph))
    if missing:
        raise ConversionError(f"the Keras model has no layer(s) {_few(missing)} that the checkpoint has: it is not the "
                              "checkpoint's model (layer names must match)")
    kp = {n: producers(keras_graph, n, keras_participants) for n in keras_participants}
    tp = {p: flow.producers(p, torch_participants) for p in torch_participants}

    def consistent(name: str, path: str) -> bool:
        back = {v: k for k, v in result.items()}
        k_in, t_in = kp[name], tp.get(path, frozenset())
        if (INPUT in k_in) != (INPUT in t_in):
            return False
        if any(p in result and result[p] not in t_in for p in k_in if p != INPUT):
            return False
        return not any(q in back and back[q] not in k_in for q in t_in if q != INPUT)

    progress = True
    while progress:
        progress = False
        for sig, layers in groups.items():
            for layer in layers:
                if layer.name in result:
                    continue
                taken = set(result.values())
                fits = [p for p in candidates[sig] if p not in taken and consistent(layer.name, p)]
                if len(fits) == 1:
                    result[layer.name] = fits[0]
                    progress = True


def match_layers(
    keras_layers: Sequence[KerasLayer],
    model: nn.Module,
    example_input: Any = None,
    *,
    pairs: AbcMapping[str, str] | None = None,
    flatten_from: AbcMapping[str, Sequence[int]] | None = None,
    dataflow: TorchDataflow | None = None,
    keras_graph: AbcMapping[str, Any] | None = None,
    exclude: Sequence[str] = (),
    decided_by_order: list[str] | None = None,
    order_known: bool = True,
) -> list[tuple[KerasLayer, str]]:
    """Pair every Keras layer that has weights with the path of its torch module.

    Args:
        keras_layers: the Keras model's layers, in order (see ``describe_keras_model``).
        model: the torch model.
        example_input: an input for one forward pass, to order layers that share a signature.
        pairs: ``{keras layer name: torch module path}`` fixed by hand.
        flatten_from: ``{dense name: (*spatial, C)}`` from ``find_flatten_dense``.
        dataflow: the torch model's traced dataflow (:class:`TorchDataflow`): same-shape
            candidates on parallel branches are never told apart by execution order.
        keras_graph: ``{layer name: input layer names}`` of the Keras model
            (:func:`~._dataflow.keras_graph`): same-shape layers are matched to the modules
            whose inputs come from the modules their inputs' layers matched.
        exclude: torch module paths not to match (their tensors come from other rules).
        decided_by_order: a list that receives one line per group matched by execution
            order alone (layers on one dataflow path), for the report.
        order_known: False when ``keras_layers`` are not in the model's order (a
            ``.weights.h5`` lists them by attribute name): same-shape groups are then refused,
            never matched by execution order.

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
    taken = set(result.values()) | set(exclude)
    candidates: dict[tuple, list[str]] = {}
    for sig, layers in groups.items():
        want = dict(sig[1])
        candidates[sig] = [p for p, m in modules.items() if p not in taken and own[p] == want and _accepts(layers[0], m)]

    if keras_graph is not None and dataflow is not None:
        _match_by_graph(groups, candidates, result, keras_graph, dataflow, {l.name for l in weighted},
                        {p for c in candidates.values() for p in c} | set(result.values()))

    order: dict[str, int] | None = None
    open_groups = {sig: [l for l in ls if l.name not in result] for sig, ls in groups.items()}
    if example_input is not None and any(len(c) > 1 and open_groups[sig] for sig, c in candidates.items()):
        order = dataflow.order if dataflow is not None else _trace_order(
            model, example_input, {p: modules[p] for c in candidates.values() for p in c})

    for sig, layers in groups.items():
        cands = [p for p in candidates[sig] if p not in result.values()]
        layers = open_groups[sig]
        if not layers:
            continue
        names = ", ".join(l.name for l in layers)
        shapes = ", ".join(f"{k} {s}" for k, s in sig[1])
        if len(cands) < len(layers):
            problems.append(_no_module_problem(sig, layers, cands, modules, own))
            continue
        if len(cands) == 1:
            result[layers[0].name] = cands[0]
            continue
        if not order_known:
            problems.append(f"ambiguous: Keras {sig[0]} layer(s) {names} [{shapes}] could be torch module(s) {', '.join(cands)}, "
                            "and the file does not record the order of the model's layers (a .weights.h5 lists them by "
                            "attribute name): pass pairs={keras name: torch path} (--pair NAME=PATH), or convert the model's "
                            ".keras file, whose config records the order")
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
        if dataflow is not None and not dataflow.chain(run):
            problems.append(f"ambiguous: Keras {sig[0]} layer(s) {names} [{shapes}] fit torch modules {', '.join(run)}, some of "
                            "which run on parallel branches (a shortcut beside a main branch): execution order cannot tell "
                            "them apart. Pass the Keras model (keras_model= / --keras-model FILE.py:factory) so its graph "
                            "decides, or pairs={keras name: torch path} (--pair NAME=PATH)")
            continue
        if decided_by_order is not None:
            decided_by_order.append(f"{', '.join(f'{l.name}->{p}' for l, p in zip(layers, run))}")
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
    keras_graph: AbcMapping[str, Any] | None = None,
    extra: Mapping | None = None,
    fold_conv_bias: bool = False,
    order_known: bool = True,
) -> Mapping:
    """The Keras -> torch :class:`~.rules.Mapping` for a model, checked against its state_dict.

    With ``example_input`` the torch model is traced (:class:`~._dataflow.TorchDataflow`) and
    its dataflow decides what shapes cannot: whether each ``Linear`` takes a flattened spatial
    map (its Keras rows are then permuted from ``(H, W, C)`` to ``(C, H, W)``) and which of
    several same-shape modules on parallel branches a layer is (with ``keras_graph``; without
    it such ties are refused). Without a trace, the Keras layers' own Flatten layers
    (``flatten_shapes``: ``{flatten name: (H, W, C)}`` when the descriptions carry no shapes)
    decide, and a Flatten inferred from a checkpoint's shapes is refused as a guess.

    ``extra`` rules (a mapping file) come first: layers whose weights they cover and modules
    whose tensors they produce are left out of the matching, which does the rest.

    ``fold_conv_bias``: a Keras convolution with a bias whose torch module has none (and the
    same weight) is matched without it, and its bias is folded into the BatchNormalization
    its torch module feeds alone (``running_mean = moving_mean - bias``, exact in eval and
    reported); without such a BatchNorm it is refused. Needs the example input (dataflow).

    ``order_known=False`` (layers read from a file that does not record their order): layers
    sharing a signature are refused unless ``pairs`` or the Keras graph settle them.

    A LayerNormalization over several axes gets its gamma/beta transposed from Keras's
    ``(..., C)`` to ``(C, ...)`` when the dataflow shows the torch LayerNorm normalising a
    channels-first map; without the Keras config's ``axis`` or the dataflow it is refused.

    Raises:
        ConversionError / UnmappedKeyError: as :func:`match_layers` and :meth:`Mapping.plan`;
            also a Dense whose Keras and torch inputs disagree (flattened map vs vector).

    Example:
        >>> m = build_mapping(describe_keras_model(kmodel), tmodel, torch.zeros(1, 8))  # doctest: +SKIP
        >>> tmodel.load_state_dict(to_torch(m.apply(keras_weights)))  # doctest: +SKIP
    """
    state = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    modules = dict(model.named_modules())
    covered: set[str] = set()
    produced: set[str] = set()
    if extra is not None and extra.rules:
        all_sources = {k: s for layer in keras_layers for k, s in layer.specs().items()}
        extra_plan = extra.plan(all_sources, None, strict=False)
        covered = {s for e in extra_plan.entries for s in e.sources} | set(extra_plan.dropped)
        produced = {t for e in extra_plan.entries for t in e.targets}
        stray = sorted(produced - set(state))
        if stray:
            raise ConversionError(f"the mapping file produces {len(stray)} key(s) the torch model does not have: {_few(stray, 10)}")
    layers = [l for l in keras_layers if not (l.weights and all(w.key in covered for w in l.weights))]
    partly = [l.name for l in layers if any(w.key in covered for w in l.weights)]
    if partly:
        raise ConversionError(f"the mapping file covers some but not all weights of layer(s) {_few(partly)}: cover all of a "
                              "layer's weights (or none, so the layer is matched)")
    exclude = [p for p, m in modules.items() if p and m.state_dict() and all(_key(p, k) in produced for k in m.state_dict())]

    flow: TorchDataflow | None = None
    notes: list[str] = []
    if example_input is not None:
        try:
            flow = TorchDataflow.trace(model, example_input)
        except ConversionError as e:
            notes.append(f"no dataflow: {e}; same-shape layers are matched by execution order")
    keras_flatten = find_flatten_dense([l for l in layers if l.weights or l.class_name != "Flatten" or not l.config.get("inferred")],
                                       dict(flatten_shapes or {}))
    guessed = find_flatten_dense(layers, dict(flatten_shapes or {}))
    guessed = {k: v for k, v in guessed.items() if k not in keras_flatten}
    folded: dict[str, KerasWeight] = {}
    if fold_conv_bias:
        layers, folded = _without_foldable_bias(layers, modules)
    order_notes: list[str] = []
    matched = match_layers(layers, model, example_input, pairs=pairs, flatten_from=keras_flatten, dataflow=flow,
                           keras_graph=keras_graph, exclude=exclude, decided_by_order=order_notes, order_known=order_known)
    flatten_from = dict(keras_flatten)
    problems = []
    for layer, path in matched:
        if layer.class_name != "Dense":
            continue
        fed = flow.linear_input(path) if flow is not None else None
        if fed is None and not order_known and any(l.class_name.startswith(("Conv", "Depthwise", "Separable"))
                                                   for l, _ in matched):
            problems.append(f"Dense {layer.name!r} -> {path}: the file does not record the layer order, so only the torch "
                            "model's dataflow can tell a flattened map from a pooled vector, and the torch model did not "
                            "run it (pass an example input; a model torch.fx cannot trace needs a mapping file, --map)")
            continue
        if fed is None:
            if layer.name in guessed:
                problems.append(f"Dense {layer.name!r} -> {path}: its {layer.weight('kernel').shape[0]} input rows may be a "
                                f"flattened {guessed[layer.name]} map or a pooled vector (a checkpoint has no Flatten layers); "
                                "pass an example input (the factory's (model, example_input)) so the torch model's dataflow decides")
            continue
        if not fed.known:
            problems.append(f"Dense {layer.name!r} -> Linear {path}: the torch model feeds it {fed.how}, whose feature order "
                            "the converter cannot relate to Keras's; write its rules in a mapping file (--map)")
            continue
        if fed.flattened is not None and math.prod(fed.flattened) != layer.weight("kernel").shape[0]:
            problems.append(f"Dense {layer.name!r} -> Linear {path}: torch flattens a {fed.flattened} map, not the Dense's "
                            f"{layer.weight('kernel').shape[0]} rows")
            continue
        if fed.channels_last is not None:
            if layer.name in keras_flatten and tuple(keras_flatten[layer.name]) != fed.channels_last:
                problems.append(f"Dense {layer.name!r} -> Linear {path}: the Keras model flattens {keras_flatten[layer.name]} "
                                f"(H, W, C), the torch model a channels-last {fed.channels_last}: not the same model")
            elif math.prod(fed.channels_last) != layer.weight("kernel").shape[0]:
                problems.append(f"Dense {layer.name!r} -> Linear {path}: torch flattens a {fed.channels_last} map, not the "
                                f"Dense's {layer.weight('kernel').shape[0]} rows")
            flatten_from.pop(layer.name, None)
            continue
        if layer.name in keras_flatten and fed.flattened is None:
            problems.append(f"Dense {layer.name!r} -> Linear {path}: the Keras model flattens a {keras_flatten[layer.name]} "
                            f"map, the torch model feeds a {fed.how}: not the same model")
            continue
        if layer.name in keras_flatten and tuple(keras_flatten[layer.name]) != fed.flattened:
            problems.append(f"Dense {layer.name!r} -> Linear {path}: the Keras model flattens {keras_flatten[layer.name]} "
                            f"(H, W, C), the torch model {fed.flattened} in (H, W, C) terms: not the same model")
            continue
        if fed.flattened is not None:
            flatten_from[layer.name] = fed.flattened
        else:
            flatten_from.pop(layer.name, None)
    if problems:
        raise ConversionError("cannot tell how the Dense layers are fed:\n  " + "\n  ".join(problems))
    ln_axes = _layernorm_layouts(matched, flow, modules)
    fold_into = _fold_targets(folded, matched, flow, modules) if folded else {}
    mapping = extra if extra is not None else Mapping(())
    for layer, path in matched:
        rules = layer_rules(layer, path, flatten_from=flatten_from.get(layer.name))
        if layer.name in ln_axes:
            rules = Mapping(tuple(Convert((r.src_pattern,), (r.dst_pattern,), (Transpose(ln_axes[layer.name]),))
                                  if isinstance(r, Rename) else r for r in rules.rules), rules.notes)
        if layer.name in fold_into:
            bias = fold_into[layer.name]
            mean = layer.weight("moving_mean").key
            rules = Mapping(tuple(r for r in rules.rules if mean not in r.sources)
                            + (Convert((mean, bias.key), (_key(path, "running_mean"),), (Subtract(),)),), rules.notes)
        mapping = mapping + rules
    notes += _hyper_notes(matched, modules)
    frozen = [(layer.name, path) for layer, path in matched if layer.config.get("trainable") is False]
    if frozen:
        notes.append(f"FROZEN: {len(frozen)} Keras layer(s) are not trainable ({_few([n for n, _ in frozen])}); a plain torch "
                     "resume would train them: freeze their modules ("
                     + ", ".join(f"model.{p}.requires_grad_(False)" if p else "model.requires_grad_(False)" for _, p in frozen[:3])
                     + (", ..." if len(frozen) > 3 else "") + ") and leave their parameters out of the optimizer")
    if fold_into:
        notes.append(f"FOLDED: the bias of {len(fold_into)} Keras convolution(s) is subtracted from the running_mean of the "
                     f"BatchNorm its torch module feeds ({_few([b.key for b in fold_into.values()])}); exact in eval mode, "
                     "and the way back gives a zero bias")
    if flatten_from:
        how = "from the torch model's dataflow" if flow is not None else "from the Keras model's Flatten layers"
        notes.append(f"Flatten: the rows of {len(flatten_from)} Dense kernel(s) ({_few(sorted(flatten_from))}) are permuted from "
                     f"Keras's (H, W, C) order to torch's (C, H, W), {how}")
    if order_notes:
        where = ("on one dataflow path" if flow is not None else
                 "(UNVERIFIED: the torch model could not be traced, so parallel branches are not ruled out; check the "
                 "result with --check)")
        notes.append(f"ORDER: {len(order_notes)} group(s) of same-shape layers {where} were matched by execution "
                     f"order: {'; '.join(order_notes[:3])}" + (f"; ... {len(order_notes) - 3} more" if len(order_notes) > 3 else ""))
    # the grouped UNKNOWN notes say what the per-kind checkpoint notes say, with the torch values
    mapping = Mapping(mapping.rules, tuple(n for n in mapping.notes if n not in (BN_UNKNOWN_NOTE, LN_UNKNOWN_NOTE)) + tuple(notes))
    sources = {k: s for l, _ in matched for k, s in l.specs().items()}
    sources.update({k: s for layer in keras_layers for k, s in layer.specs().items()
                    if k in covered or any(k == b.key for b in fold_into.values())})
    mapping.plan(sources, state)
    return mapping


def _without_foldable_bias(layers: Sequence[KerasLayer], modules: AbcMapping[str, nn.Module]) -> tuple[list[KerasLayer], dict[str, KerasWeight]]:
    """Convolutions whose bias no module of their kind has: matched without it (the bias kept aside)."""
    out, folded = [], {}
    for layer in layers:
        if not layer.class_name.startswith("Conv") or "Transpose" in layer.class_name:
            out.append(layer)
            continue
        try:
            roles = layer.roles()
        except ConversionError:
            out.append(layer)
            continue
        if "bias" not in roles:
            out.append(layer)
            continue
        want = {k: s.shape for k, s in layer_rules(layer, "").plan(layer.specs()).target_specs.items()}
        fits = any(_accepts(layer, m) and {k: tuple(v.shape) for k, v in m.state_dict().items()} == want
                   for m in modules.values())
        bare = KerasLayer(layer.name, layer.class_name, layer.config, tuple(w for w in layer.weights if w is not roles["bias"]),
                          layer.input_shape, layer.output_shape)
        if fits:
            out.append(layer)
        else:
            out.append(bare)
            folded[layer.name] = roles["bias"]
    return out, folded


def _fold_targets(folded: AbcMapping[str, KerasWeight], matched: Sequence[tuple[KerasLayer, str]], flow: TorchDataflow | None,
                  modules: AbcMapping[str, nn.Module]) -> dict[str, KerasWeight]:
    """``{Keras BatchNorm name: conv bias}``: each folded conv's torch module must feed exactly one BatchNorm, alone."""
    if flow is None:
        raise ConversionError(f"folding the bias of {_few(sorted(folded))} needs the torch model's dataflow: give the "
                              "factory's (model, example_input)")
    by_path = {p: l for l, p in matched}
    where = {l.name: p for l, p in matched}
    out, problems = {}, []
    for conv, bias in folded.items():
        path = where.get(conv)
        consumers = [c for c, (m, ps) in flow.calls.items() if any(flow.calls[q][0] == path for q in ps)]
        mods = [flow.calls[c][0] for c in consumers]
        bn = mods[0] if len(mods) == 1 else None
        if bn is None or not isinstance(modules.get(bn), nn.modules.batchnorm._BatchNorm) or flow.producers(bn, {path}) != {path} \
                or bn not in by_path or by_path[bn].class_name != "BatchNormalization":
            problems.append(f"{conv} -> {path}: its output goes to {', '.join(mods) or 'nothing'}, not to one BatchNorm alone")
            continue
        out[by_path[bn].name] = bias
    if problems:
        raise ConversionError("cannot fold these convolutions' biases (the torch modules have none):\n  " + "\n  ".join(problems))
    return out


def _key(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _layernorm_layouts(matched: Sequence[tuple[KerasLayer, str]], flow: TorchDataflow | None,
                       modules: AbcMapping[str, Any]) -> dict[str, tuple[int, ...]]:
    """``{layer name: transpose axes}`` for LayerNormalizations over several axes.

    Keras normalises a channels-last map over its ``axis`` list, so its gamma is laid out in
    ``(..., C)`` order; a torch ``LayerNorm`` normalises its input's trailing dims, which on a
    channels-first map are ``(C, ...)``. Square maps make the shapes agree either way, so the
    Keras config (which axes) and the torch dataflow (which layout) decide, or the conversion
    is refused.
    """
    out: dict[str, tuple[int, ...]] = {}
    problems: list[str] = []
    for layer, path in matched:
        if layer.class_name != "LayerNormalization" or not layer.weights:
            continue
        k = len(layer.weights[0].shape)
        if k <= 1:
            continue
        axis = layer.config.get("axis")
        axes = list(axis) if isinstance(axis, (list, tuple)) else [axis] if isinstance(axis, int) else None
        rank = len(layer.input_shape) if layer.input_shape else None
        if axes is None:
            problems.append(f"LayerNormalization {layer.name!r} -> {path}: its gamma {layer.weights[0].shape} normalises "
                            f"{k} axes, and a TF checkpoint does not say which; convert the model's .keras file, or "
                            "write its rules in a mapping file (--map)")
            continue
        if rank is not None:
            axes = sorted(a % rank for a in axes)
            trailing = axes == list(range(rank - k, rank))
        else:
            trailing = sorted(axes) == list(range(-k, 0))
        layout = flow.norm_inputs.get(path) if flow is not None else None
        if not trailing:
            problems.append(f"LayerNormalization {layer.name!r} -> {path}: Keras normalises axes {axis}, not the trailing "
                            "ones a torch LayerNorm normalises; write its rules in a mapping file (--map)")
        elif layout == "last" or (layout == "first" and rank is not None and k == 1):
            continue
        elif layout == "first" and (rank is None or k == rank - 1):
            out[layer.name] = (k - 1, *range(k - 1))
        elif layout == "first":
            problems.append(f"LayerNormalization {layer.name!r} -> {path}: Keras normalises the trailing {k} axes of a "
                            f"channels-last map, torch the trailing {k} of a channels-first one: not the same normalisation")
        else:
            why = "no dataflow (pass an example input)" if layout is None else layout
            problems.append(f"LayerNormalization {layer.name!r} -> {path}: gamma {layer.weights[0].shape} covers {k} axes "
                            f"and the layout of the torch LayerNorm's input is unknown ({why}); write its rules in a "
                            "mapping file (--map)")
    if problems:
        raise ConversionError("cannot convert a LayerNormalization over several axes:\n  " + "\n  ".join(problems))
    return out
