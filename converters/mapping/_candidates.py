"""Which torch modules each Keras layer could become: signatures, candidates, kinds, pairs.

A layer's *signature* is its class and the keys and shapes its rules produce; a module is a
*candidate* when its record accepts the module (:attr:`~.registry.LayerKind.accepts`) and the
module's own ``state_dict()`` has exactly those keys and shapes. Layers are grouped by
signature; who gets which candidate is :mod:`._pairing`'s job.

Example:
    >>> few(["a", "b", "c", "d", "e"])
    'a, b, c, ... 2 more'
"""

from __future__ import annotations

__all__ = ["Candidates", "accepts", "check_pairs", "few", "key", "no_module_problem", "own_shapes", "settle_kinds", "signatures"]

from collections import defaultdict
from collections.abc import Mapping as AbcMapping
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ckptfmt.errors import ConversionError

from .registry import LAYER_KINDS, KerasLayer, layer_rules

if TYPE_CHECKING:
    from torch import nn

Signature = tuple  # (class name, ((target key, shape), ...))


def accepts(layer: KerasLayer, module: nn.Module) -> bool:
    """Whether ``module`` is of the kind ``layer`` becomes (its record says; shapes are checked separately)."""
    kind = LAYER_KINDS.get(layer.class_name)
    return kind is not None and kind.accepts is not None and bool(kind.accepts(layer, module))


def few(names: Sequence[str], n: int = 3) -> str:
    """The first ``n`` names and how many more, for one line of a report."""
    return ", ".join(names[:n]) + (f", ... {len(names) - n} more" if len(names) > n else "")


def key(prefix: str, name: str) -> str:
    """A state_dict key of the module at ``prefix`` (the root module's prefix is ``""``)."""
    return f"{prefix}.{name}" if prefix else name


def own_shapes(modules: AbcMapping[str, nn.Module]) -> dict[str, dict[str, tuple]]:
    """``{module path: {its own state_dict key: shape}}``."""
    return {p: {k: tuple(v.shape) for k, v in m.state_dict().items()} for p, m in modules.items()}


def _produced_shapes(layer: KerasLayer, flatten_from: Sequence[int] | None = None) -> dict[str, tuple]:
    plan = layer_rules(layer, "", flatten_from=flatten_from).plan(layer.specs())
    return {k: s.shape for k, s in plan.target_specs.items()}


def signatures(layers: Sequence[KerasLayer], flatten_from: AbcMapping[str, Sequence[int]]) -> dict[str, Signature]:
    """``{layer name: (class name, sorted (key, shape) pairs its rules produce)}``."""
    return {l.name: (l.class_name, tuple(sorted(_produced_shapes(l, flatten_from.get(l.name)).items()))) for l in layers}


@dataclass(slots=True)
class Candidates:
    """The layers still open, grouped by signature, and the free modules each group could become."""

    groups: dict[Signature, list[KerasLayer]]
    modules: dict[Signature, list[str]]

    @classmethod
    def collect(cls, layers: Sequence[KerasLayer], signature: AbcMapping[str, Signature], taken: set[str],
                modules: AbcMapping[str, nn.Module], own: AbcMapping[str, dict[str, tuple]]) -> Candidates:
        groups: dict[Signature, list[KerasLayer]] = defaultdict(list)
        for layer in layers:
            groups[signature[layer.name]].append(layer)
        cands = {}
        for sig, ls in groups.items():
            want = dict(sig[1])
            cands[sig] = [p for p, m in modules.items() if p not in taken and own[p] == want and accepts(ls[0], m)]
        return cls(dict(groups), cands)


def check_pairs(pairs: AbcMapping[str, str], weighted: Sequence[KerasLayer], signature: AbcMapping[str, Signature],
                modules: AbcMapping[str, nn.Module], own: AbcMapping[str, dict[str, tuple]]) -> tuple[dict[str, str], list[str]]:
    """``({layer name: module path}, problems)`` for the pairs fixed by hand."""
    result: dict[str, str] = {}
    problems: list[str] = []
    names = {l.name for l in weighted}
    for name, path in pairs.items():
        if name not in names:
            problems.append(f"pairs: no Keras layer {name!r} (the layers: {', '.join(sorted(names))})")
            continue
        if path not in modules:
            problems.append(f"pairs: torch model has no module {path!r} (for Keras layer {name!r})")
            continue
        layer = next(l for l in weighted if l.name == name)
        want = dict(signature[name][1])
        if not accepts(layer, modules[path]) or own[path] != want:
            problems.append(f"pairs: Keras {layer.class_name} {name!r} [{', '.join(f'{k} {s}' for k, s in want.items())}] "
                            f"cannot become torch {type(modules[path]).__name__} {path!r} "
                            f"[{', '.join(f'{k} {s}' for k, s in own[path].items())}]")
        result[name] = path
    return result, problems


def no_module_problem(sig: Signature, layers: Sequence[KerasLayer], cands: Sequence[str], modules: AbcMapping[str, nn.Module],
                      own: AbcMapping[str, dict[str, tuple]]) -> str:
    """Why layers fit no module, said so a person can act: near misses are named."""
    names = ", ".join(l.name for l in layers[:6]) + (f", ... ({len(layers)} layers)" if len(layers) > 6 else "")
    want = dict(sig[1])
    shapes = ", ".join(f"{k} {s}" for k, s in want.items())
    msg = (f"Keras {sig[0]} layer(s) {names} [{shapes}]: {len(cands)} torch module(s) of that type and shape "
           f"({', '.join(cands) or 'none'}) for {len(layers)} layer(s)")
    near = [p for p, o in own.items() if o and accepts(layers[0], modules[p]) and o.get("weight") == want.get("weight")
            and set(o) != set(want)]
    if not near:
        return msg
    extra = sorted({k for p in near for k in set(want) ^ set(own[p])})
    msg += (f"; {len(near)} module(s) of that type have the same weight shape but differ in {', '.join(extra)} "
            f"(e.g. {near[0]})")
    if "bias" in want and "bias" not in own[near[0]]:
        msg += (": the Keras layer has a bias the torch module lacks; if a BatchNormalization follows it, the bias "
                "folds exactly into its running_mean (running_mean -= bias): pass --fold-conv-bias (fold_conv_bias=True)")
    return msg


def _kinds_that_fit(layer: KerasLayer, modules: AbcMapping[str, nn.Module], own: AbcMapping[str, dict[str, tuple]],
                    pairs: AbcMapping[str, str] | None) -> dict[str, list[str]]:
    """``{kind: module paths}`` for each reading of ``layer`` (its class and its alternatives) some module fits."""
    config = {k: v for k, v in layer.config.items() if k != "alternatives"}
    fits: dict[str, list[str]] = {}
    for kind in (layer.class_name, *layer.config["alternatives"]):
        cand = KerasLayer(layer.name, kind, config, layer.weights, layer.input_shape, layer.output_shape)
        want = _produced_shapes(cand)
        paths = [p for p, m in modules.items() if own[p] == want and accepts(cand, m)
                 and (not pairs or layer.name not in pairs or pairs[layer.name] == p)]
        if paths:
            fits[kind] = paths
    if len(fits) > 1 and len({tuple(p) for p in fits.values()}) == 1:
        # the same modules under either reading: a depthwise conv of one input channel is a
        # plain conv, with the same weight layout
        fits = dict([next(iter(fits.items()))])
    return fits


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
    own = own_shapes(modules)
    out: list[KerasLayer] = []
    for layer in keras_layers:
        if not layer.config.get("alternatives"):
            out.append(layer)
            continue
        fits = _kinds_that_fit(layer, modules, own, pairs)
        if len(fits) > 1:
            raise ConversionError(
                f"ambiguous: the weights of Keras layer {layer.name!r} fit "
                + "; ".join(f"a {k} (torch {', '.join(p)})" for k, p in fits.items())
                + "; pair it by hand (pairs= / --pair NAME=PATH) or write its rules in a mapping file (--map)"
            )
        config = {k: v for k, v in layer.config.items() if k != "alternatives"}
        out.append(KerasLayer(layer.name, next(iter(fits), layer.class_name), config, layer.weights, layer.input_shape,
                              layer.output_shape))
    return out

