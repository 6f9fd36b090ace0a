"""Keras layer classes, one record each: how to recognise their weights, convert them, and
which torch modules they become.

A :class:`LayerKind` holds everything ckptfmt knows about one Keras class:

* ``rules``: given a :class:`KerasLayer` description (its weights' keys and shapes, its
  config) and the path of the torch module it becomes, the :class:`~.rules.Mapping` that
  carries its weights over. The way back (torch -> Keras) is the inverse of the same plan
  (:meth:`~.rules.Plan.inverse`), so each conversion is written once;
* ``signature``: whether weights of these roles and shapes (a checkpoint stores no layer
  class) can be this kind, and the config they imply;
* ``accepts``: whether a torch module is of the kind the layer becomes (model-guided
  matching, :mod:`.match`), and ``module_notes`` on what the weights cannot carry;
* ``out_channels`` / ``keeps_channels``: the channels-last feature map it leaves behind
  (where a checkpoint's Flatten before a Dense is inferred from).

:func:`register_layer` adds a kind in one call (a user's, or a mapping file's); every part of
the converter reads the same record. Formulas and convention differences are in
``docs/conversions.md``.

The built-in kinds are :mod:`.layers`.

Example:
    >>> layer = KerasLayer("fc", "Dense", {}, (KerasWeight("fc/kernel", (3, 2)),
    ...                                        KerasWeight("fc/bias", (2,))))
    >>> plan = layer_rules(layer, "head").plan(layer.specs())
    >>> plan.target_specs["head.weight"].shape
    (2, 3)
"""

from __future__ import annotations

__all__ = [
    "KerasWeight",
    "KerasLayer",
    "LayerKind",
    "LAYER_KINDS",
    "LAYER_CONVERTERS",
    "Signature",
    "Accepts",
    "ModuleNotes",
    "register_layer",
    "unregister_layer",
    "layer_kind",
    "layer_rules",
]

from collections.abc import Callable, Iterator, Sequence
from collections.abc import Mapping as AbcMapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from ckptfmt.errors import ConversionError

from .rules import Mapping, TensorSpec

# Components of object-graph keys that are not part of a weight's role.
_NOISE = {".ATTRIBUTES", "VARIABLE_VALUE"}
# Keras 3 attribute names of MultiHeadAttention's sublayers -> their layer names.
_ALIASES = {"query_dense": "query", "key_dense": "key", "value_dense": "value", "output_dense": "attention_output"}


@dataclass(frozen=True, slots=True)
class KerasWeight:
    """One weight of a Keras layer: its key in the source tensors and its shape."""

    key: str
    shape: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class KerasLayer:
    """What a conversion needs to know about one Keras layer.

    Attributes:
        name: the layer's name (``"dense_1"``).
        class_name: its Keras class (``"Dense"``).
        config: ``layer.get_config()`` (only the keys a conversion reads are used).
        weights: its weights, in any order; their roles come from the keys' last components.
        input_shape: the layer's input shape with the batch dim (None when unknown), used to
            detect the Flatten trap.
        output_shape: likewise for its output.
    """

    name: str
    class_name: str
    config: dict[str, Any] = field(default_factory=dict, hash=False, compare=False)
    weights: tuple[KerasWeight, ...] = ()
    input_shape: tuple[int | None, ...] | None = None
    output_shape: tuple[int | None, ...] | None = None

    def specs(self) -> dict[str, TensorSpec]:
        """``{weight key: TensorSpec}``, the source side of a plan."""
        return {w.key: TensorSpec(tuple(w.shape)) for w in self.weights}

    def roles(self) -> dict[str, KerasWeight]:
        """The weights by role: ``"kernel"``, ``"query/kernel"``, ``"forward/bias"``..."""
        out: dict[str, KerasWeight] = {}
        for w in self.weights:
            comps = [c.lstrip("_") for c in w.key.split("/") if c not in _NOISE]
            comps = [_ALIASES.get(c, c) for c in comps]
            role = comps[-1]
            if self.class_name == "MultiHeadAttention" and len(comps) > 1:
                role = f"{comps[-2]}/{role}"
            elif self.class_name == "Bidirectional":
                direction = next((d for c in comps for d in ("forward", "backward") if c.startswith(d)), None)
                if direction is None:
                    raise ConversionError(f"layer {self.name!r}: cannot tell the direction of weight {w.key!r}")
                role = f"{direction}/{role}"
            if role in out:
                raise ConversionError(f"layer {self.name!r}: weights {out[role].key!r} and {w.key!r} have the same role {role!r}")
            out[role] = w
        return out

    def weight(self, role: str) -> KerasWeight:
        roles = self.roles()
        if role not in roles:
            raise ConversionError(f"{self.class_name} layer {self.name!r} has no {role!r} weight (it has: {', '.join(roles) or 'none'})")
        return roles[role]


Converter = Callable[..., Mapping]




# -- one record per Keras class -----------------------------------------------------------------

#: ``signature(probe, shapes)``: ``probe`` is the layer as this kind (its weights, no config),
#: ``shapes`` its weights' shapes by role. Returns the config the weights imply when they can be
#: this kind, None when they cannot; raises ConversionError when they are of this kind's
#: family but inconsistent (the message is used when no kind fits).
Signature = Callable[[KerasLayer, dict[str, tuple[int, ...]]], "dict[str, Any] | None"]
#: ``accepts(layer, module)``: whether a torch module is of the kind the layer becomes.
Accepts = Callable[[KerasLayer, Any], bool]
#: ``module_notes(layer, path, module)``: what the weights cannot carry, for the report.
ModuleNotes = Callable[[KerasLayer, str, Any], "list[tuple[str, str]]"]


@dataclass(frozen=True, slots=True)
class LayerKind:
    """Everything ckptfmt knows about one Keras layer class, in one place.

    Attributes:
        class_name: the Keras class (``"GroupNormalization"``).
        rules: ``rules(layer, prefix, **kw) -> Mapping``, its weights to the torch module at
            ``prefix`` (the way back is the plan's inverse).
        signature: recognises the kind from a checkpoint's weights (see :data:`Signature`);
            None: never inferred (only from a live Keras model or a mapping file).
        accepts: ``accepts(layer, module) -> bool``, the torch modules the layer may become
            (their state_dict shapes are checked against ``rules`` separately); None: no
            model-guided matching.
        module_notes: ``(layer, path, module) -> [(template, value)]``, conventions the weights
            cannot carry; layers sharing a template are reported in one line, the template
            formatted with ``{count}`` (layers), ``{found}`` (each value with its layers) and
            ``{layers}`` (a few names).
        out_channels: for a layer leaving a channels-last feature map, its channels from its
            weights (a Dense after it with a multiple of them as inputs follows a Flatten).
        keeps_channels: the layer passes the feature map on unchanged (BatchNormalization).
    """

    class_name: str
    rules: Converter
    signature: Signature | None = None
    accepts: Accepts | None = None
    module_notes: ModuleNotes | None = None
    out_channels: Callable[[KerasLayer], int] | None = None
    keeps_channels: bool = False


_KINDS: dict[str, LayerKind] = {}
#: Every registered kind by Keras class name, in registration order (read-only; see :func:`register_layer`).
LAYER_KINDS: AbcMapping[str, LayerKind] = MappingProxyType(_KINDS)


class _RulesView(AbcMapping):
    """``{class name: rules}`` of the registered kinds, read-only (register with :func:`register_layer`)."""

    def __getitem__(self, name: str) -> Converter:
        return _KINDS[name].rules

    def __iter__(self) -> Iterator[str]:
        return iter(_KINDS)

    def __len__(self) -> int:
        return len(_KINDS)


#: ``{Keras class name: rules}``, a read-only view of :data:`LAYER_KINDS`.
LAYER_CONVERTERS: AbcMapping[str, Converter] = _RulesView()


def register_layer(
    class_name: str,
    rules: Converter,
    *,
    signature: Signature | None = None,
    accepts: Accepts | None = None,
    module_notes: ModuleNotes | None = None,
    out_channels: Callable[[KerasLayer], int] | None = None,
    keeps_channels: bool = False,
    replace: bool = False,
) -> LayerKind:
    """Teach the converter a Keras layer class, in one call.

    The record is read by every step: kind inference from a checkpoint's weights
    (``signature``), the conversion (``rules``), and matching with a torch model
    (``accepts``). Weights that fit several kinds (LayerNormalization and
    GroupNormalization both store ``gamma``/``beta``) keep the later ones as alternatives,
    which the torch model settles.

    Args:
        class_name: the Keras class name.
        rules / signature / accepts / module_notes / out_channels / keeps_channels: see
            :class:`LayerKind`.
        replace: replace an existing record of that name (else an error).

    Raises:
        ValueError: ``class_name`` is registered already (without ``replace``).

    Example:
        >>> from ckptfmt.converters.mapping import Mapping, Rename
        >>> kind = register_layer(
        ...     "Scale", lambda layer, p, **_: Mapping((Rename(layer.weight("scale").key, f"{p}.weight"),)),
        ...     signature=lambda probe, shapes: {} if set(shapes) == {"scale"} else None)
        >>> scale = KerasLayer("s", "Scale", {}, (KerasWeight("s/scale", (3,)),))
        >>> list(layer_rules(scale, "m").plan(scale.specs()).target_specs)
        ['m.weight']
        >>> unregister_layer("Scale").class_name
        'Scale'
    """
    if class_name in _KINDS and not replace:
        raise ValueError(f"Keras layer {class_name!r} is registered already; pass replace=True to replace it")
    kind = LayerKind(class_name, rules, signature, accepts, module_notes, out_channels, keeps_channels)
    _KINDS[class_name] = kind
    return kind


def unregister_layer(class_name: str) -> LayerKind:
    """Remove a registered kind and return its record.

    Raises:
        KeyError: no kind of that name.

    Example:
        >>> register_layer("Nothing", lambda layer, p, **_: Mapping(())).class_name
        'Nothing'
        >>> unregister_layer("Nothing").class_name
        'Nothing'
    """
    return _KINDS.pop(class_name)


def layer_kind(class_name: str, layer_name: str | None = None) -> LayerKind:
    """The record of a Keras class.

    Raises:
        ConversionError: no record (names the supported classes and what to do).

    Example:
        >>> layer_kind("Dense").class_name
        'Dense'
    """
    kind = _KINDS.get(class_name)
    if kind is None:
        what = f"layer {layer_name!r} is a {class_name}" if layer_name else f"{class_name}"
        raise ConversionError(
            f"{what}, which has no conversion (supported: {', '.join(sorted(_KINDS))}); write its rules as a Mapping, "
            "or register the class with ckptfmt.converters.mapping.register_layer"
        )
    return kind


def layer_rules(layer: KerasLayer, prefix: str, *, flatten_from: Sequence[int] | None = None) -> Mapping:
    """The rules converting ``layer``'s weights to the torch module at ``prefix``.

    Args:
        layer: the Keras layer description.
        prefix: the torch module's path in the model (``"features.0"``; ``""`` for the root).
        flatten_from: for a Dense after a channels-last Flatten, the Flatten's input shape
            without the batch dim (``(H, W, C)``); see :func:`find_flatten_dense`.

    Raises:
        ConversionError: the class has no torch equivalent, or its config rules one out.

    Example:
        >>> bn = KerasLayer("bn", "BatchNormalization", {"epsilon": 1e-3},
        ...                 tuple(KerasWeight(f"bn/{n}", (4,)) for n in ("gamma", "beta", "moving_mean", "moving_variance")))
        >>> sorted(layer_rules(bn, "b").plan(bn.specs()).target_specs)
        ['b.bias', 'b.num_batches_tracked', 'b.running_mean', 'b.running_var', 'b.weight']
    """
    fn = layer_kind(layer.class_name, layer.name).rules
    if flatten_from is not None and layer.class_name != "Dense":
        raise ConversionError(f"flatten_from applies to Dense layers only, not {layer.class_name} {layer.name!r}")
    return fn(layer, prefix, flatten_from=flatten_from) if flatten_from is not None else fn(layer, prefix)
