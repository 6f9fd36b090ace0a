"""Who gets which candidate: same-shape Keras layers paired with torch modules by dataflow, then order.

Steps, for the layers :mod:`._candidates` grouped by signature:

1. a group with as many layers as free candidates and one candidate is settled;
2. with both graphs (the Keras model's and the torch model's dataflow), a layer takes the one
   candidate whose producers are the modules its own producers became
   (:func:`match_by_graph`), repeated until nothing changes;
3. what is left is paired in execution order (:func:`decide_by_order`), but only when the
   candidates lie on one dataflow path; otherwise, and without an order, refused.

Example:
    >>> _fmt_shapes((("weight", (4, 3)), ("bias", (4,))))
    'weight (4, 3), bias (4,)'
"""

from __future__ import annotations

__all__ = ["GroupOutcome", "decide_by_order", "match_by_graph", "trace_order"]

from collections.abc import Mapping as AbcMapping
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ckptfmt.errors import ConversionError

from ._candidates import Signature, few
from ._dataflow import INPUT, TorchDataflow, producers
from ._record import run_eval
from .registry import KerasLayer

if TYPE_CHECKING:
    from torch import nn


def _fmt_shapes(pairs: Sequence[tuple[str, tuple]]) -> str:
    return ", ".join(f"{k} {s}" for k, s in pairs)


def trace_order(model: nn.Module, example_input: Any, modules: AbcMapping[str, nn.Module]) -> dict[str, int]:
    """``{module path: position of its first call}`` from forward pre-hooks on one eval run."""
    order: dict[str, int] = {}
    handles = []
    for path, mod in modules.items():
        def hook(_m, _inp, path=path):
            order.setdefault(path, len(order))
        handles.append(mod.register_forward_pre_hook(hook))
    try:
        run_eval(model, example_input)
    finally:
        for h in handles:
            h.remove()
    return order


def match_by_graph(groups: AbcMapping[Signature, list[KerasLayer]], candidates: AbcMapping[Signature, list[str]],
                   result: dict[str, str], keras_graph: AbcMapping[str, Any], flow: TorchDataflow, keras_participants: set[str],
                   torch_participants: set[str]) -> None:
    """Match same-shape layers to the modules whose inputs come from where the layers' inputs do.

    A layer and a module are consistent when every matched layer feeding the layer became a
    module feeding the module, and the other way round (and both or neither read the model's
    input). Layers with exactly one consistent candidate are matched; repeated until nothing
    changes, so matches spread from the layers whose shape is unique.
    """
    missing = sorted(keras_participants - set(keras_graph))
    if missing:
        raise ConversionError(f"the Keras model has no layer(s) {few(missing)} that the checkpoint has: it is not the "
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


@dataclass(frozen=True, slots=True)
class GroupOutcome:
    """How one open group ends: ``pairs`` matched (``by_order`` says if execution order decided), or a ``problem``."""

    pairs: dict[str, str]
    problem: str | None = None
    by_order: bool = False


def decide_by_order(sig: Signature, layers: Sequence[KerasLayer], cands: Sequence[str], order: AbcMapping[str, int] | None,
                    dataflow: TorchDataflow | None, order_known: bool) -> GroupOutcome:
    """Pair a group of ``len(cands) >= len(layers)`` same-shape layers by execution order, or say why not."""
    names = ", ".join(l.name for l in layers)
    what = f"Keras {sig[0]} layer(s) {names} [{_fmt_shapes(sig[1])}]"
    if len(cands) == 1:
        return GroupOutcome({layers[0].name: cands[0]})
    if not order_known:
        return GroupOutcome({}, f"ambiguous: {what} could be torch module(s) {', '.join(cands)}, "
                            "and the file does not record the order of the model's layers (a .weights.h5 lists them by "
                            "attribute name): pass pairs={keras name: torch path} (--pair NAME=PATH), or convert the model's "
                            ".keras file, whose config records the order")
    if order is None:
        return GroupOutcome({}, f"ambiguous: {what} could be torch module(s) {', '.join(cands)}; "
                            "pass example_input so the execution order decides, or pairs={keras name: torch path} (--pair NAME=PATH)")
    run = sorted((p for p in cands if p in order), key=order.__getitem__)
    if len(run) != len(layers):
        return GroupOutcome({}, f"Keras {sig[0]} layer(s) {names}: the forward pass ran {len(run)} of the candidate torch modules "
                            f"{', '.join(cands)}, not {len(layers)}; pass pairs= (--pair NAME=PATH) to decide")
    if dataflow is not None and not dataflow.chain(run):
        return GroupOutcome({}, f"ambiguous: {what} fit torch modules {', '.join(run)}, some of "
                            "which run on parallel branches (a shortcut beside a main branch): execution order cannot tell "
                            "them apart. Pass the Keras model (keras_model= / --keras-model FILE.py:factory) so its graph "
                            "decides, or pairs={keras name: torch path} (--pair NAME=PATH)")
    return GroupOutcome({l.name: p for l, p in zip(layers, run)}, by_order=True)
