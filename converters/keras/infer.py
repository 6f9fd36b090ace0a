"""A Keras layer's kind from its weights: names and shapes, and the Flattens a checkpoint does not store.

A checkpoint stores variables, not layer classes. The weights' roles and shapes tell most
kinds apart; where they do not (a convolution without a bias fits Conv, ConvTranspose and
DepthwiseConv), the kinds left open are kept as ``config["alternatives"]`` for the torch
model (or the layer's name) to settle.

Example:
    >>> from ckptfmt.converters.mapping import KerasWeight
    >>> infer_kind("fc", (KerasWeight("fc/kernel", (4, 3)), KerasWeight("fc/bias", (3,))))
    ('Dense', {})
"""

from __future__ import annotations

__all__ = ["infer_kind", "insert_flattens", "refit_flattens", "settle_by_name", "unknown_layers_error"]

import json
from collections.abc import Mapping as AbcMapping
from collections.abc import Sequence
from typing import Any

import numpy as np

from ckptfmt.errors import ConversionError

from ..mapping.registry import LAYER_KINDS, KerasLayer, KerasWeight

# Layer-name words that settle a convolution the weights leave open (no bias).
_CONV_HINTS = (("transpose", "Transpose"), ("deconv", "Transpose"), ("depthwise", "Depthwise"), ("dwconv", "Depthwise"))


def infer_kind(name: str, weights: Sequence[KerasWeight]) -> tuple[str, dict[str, Any]]:
    """Keras class and config of a layer from its weights' roles and shapes.

    Every registered kind's signature is asked (:data:`ckptfmt.converters.mapping.LAYER_KINDS`,
    in registration order); the first kind that fits is the answer and the other fitting
    kinds are kept as ``config["alternatives"]``.

    Raises:
        ConversionError: no kind fits (a kind whose family the weights resemble says why).
    """
    fits: list[tuple[str, dict[str, Any]]] = []
    near: list[ConversionError] = []
    for kind in LAYER_KINDS.values():
        if kind.signature is None:
            continue
        probe = KerasLayer(name, kind.class_name, {}, tuple(weights))
        try:
            shapes = {r: tuple(w.shape) for r, w in probe.roles().items()}
        except ConversionError:  # the weights' names do not follow this kind's layout
            continue
        try:
            config = kind.signature(probe, shapes)
        except ConversionError as e:
            near.append(e)
            continue
        if config is not None:
            fits.append((kind.class_name, config))
    if fits:
        (cls, config), rest = fits[0], fits[1:]
        return cls, ({**config, "alternatives": [c for c, _ in rest]} if rest else config)
    if near:
        raise near[0]
    listing = ", ".join(f"{w.key} {tuple(w.shape)}" for w in weights)
    raise ConversionError(
        f"layer {name!r} has weights the converter does not know ({listing}); "
        f"known layers: {', '.join(sorted(LAYER_KINDS))}. Add a rule for it in a mapping file "
        "(ckptfmt.converters.mapping.Mapping JSON, see docs/conversions.md) and pass it with --map, "
        "or register the layer class (ckptfmt.converters.mapping.register_layer)"
    )


def unknown_layers_error(layers: Sequence[KerasLayer], targets: AbcMapping[str, tuple[int, ...]] | None = None) -> ConversionError:
    """One error for every layer of unknown kind: their weights and a rule file ready to edit.

    With ``targets`` (the torch model's tensors no rule produces), each weight's rule proposes
    the torch tensor of the same size (reshaped where the shape differs) when there is one.

    Example:
        >>> e = unknown_layers_error([KerasLayer("ls", "Unknown", {}, (KerasWeight("ls/variable", (4,)),))])
        >>> "'ls': ls/variable (4,)" in str(e)
        True
    """
    rules = []
    for layer in layers:
        for w in layer.weights:
            fits = [k for k, s in (targets or {}).items() if int(np.prod(s)) == int(np.prod(w.shape))]
            target = fits[0] if len(fits) == 1 else "TODO.torch.key"
            reshape = target in (targets or {}) and tuple(targets[target]) != tuple(w.shape)
            ops = [{"op": "Reshape", "shape": list(targets[target])}] if reshape else []
            rules.append({"rule": "Convert", "sources": [w.key], "targets": [target], "ops": ops})
    text = ('{"format": "ckptfmt-mapping", "version": 1, "source_format": "keras", "target_format": "torch",\n "rules": [\n  '
            + ",\n  ".join(json.dumps(r) for r in rules) + "\n]}")
    listing = "\n  ".join(f"layer {l.name!r}: " + ", ".join(f"{w.key} {tuple(w.shape)}" for w in l.weights) for l in layers)
    return ConversionError(
        f"{len(layers)} layer(s) with weights the converter does not know (known layers: {', '.join(sorted(LAYER_KINDS))}):\n  "
        f"{listing}\nWrite their rules in a mapping file and pass it with --map (with --model, the file's rules map these "
        "layers and the model-guided matching does the rest; a regex rule, \"re:...\", can cover many layers: "
        "docs/conversions.md). A file to start from (replace each TODO):\n" + text
    )


def insert_flattens(layers: list[KerasLayer]) -> list[KerasLayer]:
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
                # a guess: a BatchNormalization after a concatenation, then global pooling, gives
                # the same shapes; with a torch model its dataflow decides (build_mapping)
                out.append(KerasLayer(f"{layer.name}/flatten", "Flatten", {"inferred": True}, (),
                                      input_shape=(None, rows // channels, channels)))
        out.append(layer)
        kind = LAYER_KINDS.get(layer.class_name)
        if kind is not None and kind.out_channels is not None:  # a feature map, channels last
            channels = kind.out_channels(layer)
            open_kind = bool(layer.config.get("alternatives"))
        elif kind is None or not kind.keeps_channels:
            channels = None
    return out


def refit_flattens(before: Sequence[KerasLayer], after: list[KerasLayer]) -> list[KerasLayer]:
    """Re-place the inferred Flattens once the convolutions' kinds are settled."""
    if not any(l.config.get("alternatives") for l in before):
        return after
    return insert_flattens([l for l in after if l.class_name != "Flatten"])


def settle_by_name(layer: KerasLayer) -> tuple[KerasLayer, str | None]:
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
