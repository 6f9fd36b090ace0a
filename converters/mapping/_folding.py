"""Folding a Keras convolution's bias into the BatchNormalization after it (``--fold-conv-bias``).

A torch model whose convolutions have no bias (torchvision's ResNets) is the Keras model with
``running_mean = moving_mean - bias`` in the BatchNorm each convolution feeds alone: exact in
eval mode. :func:`without_foldable_bias` sets such biases aside before matching;
:func:`fold_targets` finds the BatchNorm each one folds into, from the torch dataflow.
"""

from __future__ import annotations

__all__ = ["fold_targets", "without_foldable_bias"]

from collections.abc import Mapping as AbcMapping
from collections.abc import Sequence
from typing import TYPE_CHECKING

from ckptfmt.errors import ConversionError

from ._candidates import accepts, few
from ._dataflow import TorchDataflow
from .registry import KerasLayer, KerasWeight, layer_rules

if TYPE_CHECKING:
    from torch import nn


def _foldable_bias(layer: KerasLayer) -> KerasWeight | None:
    """The bias of a (non-transposed) convolution, if it has one."""
    if not layer.class_name.startswith("Conv") or "Transpose" in layer.class_name:
        return None
    try:
        roles = layer.roles()
    except ConversionError:
        return None
    return roles.get("bias")


def without_foldable_bias(layers: Sequence[KerasLayer], modules: AbcMapping[str, nn.Module]) -> tuple[list[KerasLayer], dict[str, KerasWeight]]:
    """Convolutions whose bias no module of their kind has: matched without it (the bias kept aside)."""
    out, folded = [], {}
    for layer in layers:
        bias = _foldable_bias(layer)
        if bias is None:
            out.append(layer)
            continue
        want = {k: s.shape for k, s in layer_rules(layer, "").plan(layer.specs()).target_specs.items()}
        fits = any(accepts(layer, m) and {k: tuple(v.shape) for k, v in m.state_dict().items()} == want
                   for m in modules.values())
        if fits:
            out.append(layer)
            continue
        out.append(KerasLayer(layer.name, layer.class_name, layer.config, tuple(w for w in layer.weights if w is not bias),
                              layer.input_shape, layer.output_shape))
        folded[layer.name] = bias
    return out, folded


def fold_targets(folded: AbcMapping[str, KerasWeight], matched: Sequence[tuple[KerasLayer, str]], flow: TorchDataflow | None,
                 modules: AbcMapping[str, nn.Module]) -> dict[str, KerasWeight]:
    """``{Keras BatchNorm name: conv bias}``: each folded conv's torch module must feed exactly one BatchNorm, alone."""
    from torch import nn

    if flow is None:
        raise ConversionError(f"folding the bias of {few(sorted(folded))} needs the torch model's dataflow: give the "
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
