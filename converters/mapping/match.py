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
from ._candidates import Candidates, check_pairs, few, key, no_module_problem, own_shapes, settle_kinds, signatures
from ._dataflow import TorchDataflow
from ._folding import fold_targets, without_foldable_bias
from ._layouts import dense_inputs, flattened_features, layernorm_layouts
from ._pairing import decide_by_order, match_by_graph, trace_order
from .describe import find_flatten_dense
from .layers import BN_UNKNOWN_NOTE, LN_UNKNOWN_NOTE
from .registry import LAYER_KINDS, KerasLayer, KerasWeight, layer_rules
from .rules import Convert, Mapping, Rename, Subtract, Transpose

torch = require("torch", "model-guided mapping")
nn = torch.nn


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
        found = "; ".join(f"{v} in {len(g)} ({few(g)})" for v, g in values.items())
        notes.append(template.format(count=len(names), found=found, layers=few(names)))
    return notes


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
    weighted = [l for l in keras_layers if l.weights]
    modules = dict(model.named_modules())
    own = own_shapes(modules)
    signature = signatures(weighted, dict(flatten_from or {}))
    result, problems = check_pairs(pairs, weighted, signature, modules, own)
    cands = Candidates.collect([l for l in weighted if l.name not in result], signature, set(result.values()) | set(exclude),
                               modules, own)
    if keras_graph is not None and dataflow is not None:
        match_by_graph(cands.groups, cands.modules, result, keras_graph, dataflow, {l.name for l in weighted},
                       {p for c in cands.modules.values() for p in c} | set(result.values()))
    open_groups = {sig: [l for l in ls if l.name not in result] for sig, ls in cands.groups.items()}
    order = _order_if_needed(model, example_input, dataflow, open_groups, cands, modules)
    problems += _pair_open_groups(open_groups, cands, result, order, dataflow, order_known, modules, own, decided_by_order)
    problems += _taken_twice(result)
    if problems:
        raise ConversionError("cannot match the Keras layers to the torch model:\n  " + "\n  ".join(problems))
    return [(l, result[l.name]) for l in weighted]


def _order_if_needed(model: nn.Module, example_input: Any, dataflow: TorchDataflow | None,
                     open_groups: AbcMapping[tuple, list[KerasLayer]], cands: Candidates, modules: AbcMapping[str, nn.Module]) -> dict[str, int] | None:
    """The execution order, when an example input is given and some open group has several candidates."""
    if example_input is None or not any(len(c) > 1 and open_groups[sig] for sig, c in cands.modules.items()):
        return None
    if dataflow is not None:
        return dataflow.order
    return trace_order(model, example_input, {p: modules[p] for c in cands.modules.values() for p in c})


def _pair_open_groups(open_groups: AbcMapping[tuple, list[KerasLayer]], cands: Candidates, result: dict[str, str],
                      order: AbcMapping[str, int] | None, dataflow: TorchDataflow | None, order_known: bool,
                      modules: AbcMapping[str, nn.Module], own: AbcMapping[str, dict[str, tuple]],
                      decided_by_order: list[str] | None) -> list[str]:
    """Settle the groups the graph left open (into ``result``); returns the problems."""
    problems = []
    for sig, layers in open_groups.items():
        free = [p for p in cands.modules[sig] if p not in result.values()]
        if not layers:
            continue
        if len(free) < len(layers):
            problems.append(no_module_problem(sig, layers, free, modules, own))
            continue
        outcome = decide_by_order(sig, layers, free, order, dataflow, order_known)
        if outcome.problem:
            problems.append(outcome.problem)
            continue
        if outcome.by_order and decided_by_order is not None:
            decided_by_order.append(", ".join(f"{n}->{p}" for n, p in outcome.pairs.items()))
        result.update(outcome.pairs)
    return problems


def _taken_twice(result: AbcMapping[str, str]) -> list[str]:
    seen: dict[str, str] = {}
    problems = []
    for name, path in result.items():
        if path in seen:
            problems.append(f"torch module {path!r} would take both Keras layers {seen[path]!r} and {name!r}")
        seen[path] = name
    return problems


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

    With ``example_input`` the torch model is traced (:class:`~._dataflow.TorchDataflow`; a
    model torch.fx cannot trace is recorded from one run of the input instead, and noted) and
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
    covered, produced = _extra_coverage(extra, keras_layers, state)
    layers = _left_to_match(keras_layers, covered)
    exclude = [p for p, m in modules.items() if p and m.state_dict() and all(key(p, k) in produced for k in m.state_dict())]
    flow, notes = _dataflow(model, example_input)
    keras_flatten, guessed = _flatten_evidence(layers, dict(flatten_shapes or {}))
    folded: dict[str, KerasWeight] = {}
    if fold_conv_bias:
        layers, folded = without_foldable_bias(layers, modules)
    order_notes: list[str] = []
    matched = match_layers(layers, model, example_input, pairs=pairs, flatten_from=keras_flatten, dataflow=flow,
                           keras_graph=keras_graph, exclude=exclude, decided_by_order=order_notes, order_known=order_known)
    flatten_from = dense_inputs(matched, flow, keras_flatten, guessed, order_known)
    flattened_features(matched, flow)
    fold_into = fold_targets(folded, matched, flow, modules) if folded else {}
    mapping = _assemble(extra, matched, flatten_from, layernorm_layouts(matched, flow), fold_into)
    notes += _hyper_notes(matched, modules)
    notes += _report_notes(matched, flow, flatten_from, fold_into, order_notes)
    # the grouped UNKNOWN notes say what the per-kind checkpoint notes say, with the torch values
    mapping = Mapping(mapping.rules, tuple(n for n in mapping.notes if n not in (BN_UNKNOWN_NOTE, LN_UNKNOWN_NOTE)) + tuple(notes))
    mapping.plan(_planned_sources(keras_layers, matched, covered, fold_into), state)
    return mapping


def _flatten_evidence(layers: Sequence[KerasLayer], flatten_shapes: dict[str, Sequence[int]]) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(keras_flatten, guessed)``: Dense layers after the Keras model's own Flatten layers, and
    those after a Flatten only inferred from a checkpoint's shapes (a guess, never applied)."""
    keras_flatten = find_flatten_dense([l for l in layers if l.weights or l.class_name != "Flatten" or not l.config.get("inferred")],
                                       flatten_shapes)
    guessed = {k: v for k, v in find_flatten_dense(layers, flatten_shapes).items() if k not in keras_flatten}
    return keras_flatten, guessed


def _planned_sources(keras_layers: Sequence[KerasLayer], matched: Sequence[tuple[KerasLayer, str]], covered: set[str],
                     fold_into: AbcMapping[str, KerasWeight]) -> dict[str, Any]:
    """The source specs the final mapping is checked with: matched layers, mapping-file keys, folded biases."""
    sources = {k: s for l, _ in matched for k, s in l.specs().items()}
    folded = {b.key for b in fold_into.values()}
    sources.update({k: s for layer in keras_layers for k, s in layer.specs().items() if k in covered or k in folded})
    return sources


def _extra_coverage(extra: Mapping | None, keras_layers: Sequence[KerasLayer], state: AbcMapping[str, tuple]) -> tuple[set[str], set[str]]:
    """``(source keys, target keys)`` a mapping file's rules cover and produce."""
    if extra is None or not extra.rules:
        return set(), set()
    all_sources = {k: s for layer in keras_layers for k, s in layer.specs().items()}
    extra_plan = extra.plan(all_sources, None, strict=False)
    covered = {s for e in extra_plan.entries for s in e.sources} | set(extra_plan.dropped)
    produced = {t for e in extra_plan.entries for t in e.targets}
    stray = sorted(produced - set(state))
    if stray:
        raise ConversionError(f"the mapping file produces {len(stray)} key(s) the torch model does not have: {few(stray, 10)}")
    return covered, produced


def _left_to_match(keras_layers: Sequence[KerasLayer], covered: set[str]) -> list[KerasLayer]:
    """The layers a mapping file does not cover; refused when it covers a layer only partly."""
    layers = [l for l in keras_layers if not (l.weights and all(w.key in covered for w in l.weights))]
    partly = [l.name for l in layers if any(w.key in covered for w in l.weights)]
    if partly:
        raise ConversionError(f"the mapping file covers some but not all weights of layer(s) {few(partly)}: cover all of a "
                              "layer's weights (or none, so the layer is matched)")
    return layers


def _dataflow(model: nn.Module, example_input: Any) -> tuple[TorchDataflow | None, list[str]]:
    """The torch model's dataflow (None without an example input or when it cannot be had), and notes.

    torch.fx first; a model fx cannot trace is recorded from one run of the example input
    (:meth:`~._dataflow.TorchDataflow.of`), which the notes say.
    """
    if example_input is None:
        return None, []
    try:
        flow = TorchDataflow.of(model, example_input)
    except ConversionError as e:
        return None, [f"no dataflow: {e}; same-shape layers are matched by execution order"]
    if flow.recorded is None:
        return flow, []
    return flow, [f"DATAFLOW recorded from one run of the example input ({flow.recorded}): hooks on the modules and the "
                  "torch functions between them show which module feeds which; only the branches that input takes are seen"]


def _assemble(extra: Mapping | None, matched: Sequence[tuple[KerasLayer, str]], flatten_from: AbcMapping[str, Sequence[int]],
              ln_axes: AbcMapping[str, tuple[int, ...]], fold_into: AbcMapping[str, KerasWeight]) -> Mapping:
    """The mapping file's rules, then each matched layer's rules with its layout decisions applied."""
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
                            + (Convert((mean, bias.key), (key(path, "running_mean"),), (Subtract(),)),), rules.notes)
        mapping = mapping + rules
    return mapping


def _report_notes(matched: Sequence[tuple[KerasLayer, str]], flow: TorchDataflow | None, flatten_from: AbcMapping[str, Any],
                  fold_into: AbcMapping[str, KerasWeight], order_notes: Sequence[str]) -> list[str]:
    """The notes a person must read: frozen layers, folded biases, permuted Dense rows, groups matched by order."""
    notes = []
    frozen = [(layer.name, path) for layer, path in matched if layer.config.get("trainable") is False]
    if frozen:
        notes.append(f"FROZEN: {len(frozen)} Keras layer(s) are not trainable ({few([n for n, _ in frozen])}); a plain torch "
                     "resume would train them: freeze their modules ("
                     + ", ".join(f"model.{p}.requires_grad_(False)" if p else "model.requires_grad_(False)" for _, p in frozen[:3])
                     + (", ..." if len(frozen) > 3 else "") + ") and leave their parameters out of the optimizer")
    if fold_into:
        notes.append(f"FOLDED: the bias of {len(fold_into)} Keras convolution(s) is subtracted from the running_mean of the "
                     f"BatchNorm its torch module feeds ({few([b.key for b in fold_into.values()])}); exact in eval mode, "
                     "and the way back gives a zero bias")
    if flatten_from:
        how = "from the torch model's dataflow" if flow is not None else "from the Keras model's Flatten layers"
        notes.append(f"Flatten: the rows of {len(flatten_from)} Dense kernel(s) ({few(sorted(flatten_from))}) are permuted from "
                     f"Keras's (H, W, C) order to torch's (C, H, W), {how}")
    if order_notes:
        where = ("on one dataflow path" if flow is not None else
                 "(UNVERIFIED: the torch model could not be traced, so parallel branches are not ruled out; check the "
                 "result with --check)")
        notes.append(f"ORDER: {len(order_notes)} group(s) of same-shape layers {where} were matched by execution "
                     f"order: {'; '.join(order_notes[:3])}" + (f"; ... {len(order_notes) - 3} more" if len(order_notes) > 3 else ""))
    return notes
