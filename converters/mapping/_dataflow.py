"""What a model actually does with its layers: which layer's output feeds which, read from a run.

Matching Keras layers to torch modules by type and shape leaves two questions that weights
cannot answer, and a wrong guess at either writes a model that loads and computes something
else:

* **Flatten**: does a ``Linear`` take a flattened spatial map (whose rows must be permuted
  from Keras's ``(H, W, C)`` order to torch's ``(C, H, W)``), or a pooled vector (no
  permutation)? :class:`TorchDataflow` reads it from the torch model's graph: the shape that
  was flattened, and whether it was flattened channels-first.
* **Same-shape layers on parallel branches** (a ResNet's shortcut and its main branch's last
  convolution): execution order says nothing about which Keras layer is which. The producers
  of each layer (the nearest weighted layers its input comes from) do, on both sides:
  :class:`TorchDataflow` from ``torch.fx`` and :func:`keras_graph` from a live Keras model.

The torch graph comes from ``torch.fx`` symbolic tracing (modules of ``torch.nn`` are leaves)
and one shape-propagating run on the example input, in eval mode under ``no_grad``; the
model's mode is restored. A model fx cannot trace gives no dataflow: callers then refuse what
only the dataflow could decide.

Example:
    >>> flow = TorchDataflow.trace(model, torch.zeros(1, 3, 32, 32))  # doctest: +SKIP
    >>> flow.linear_input("classifier")  # doctest: +SKIP
    LinearInput(flattened=None, ...)
"""

from __future__ import annotations

__all__ = ["LinearInput", "TorchDataflow", "keras_graph", "producers"]

import math
from collections.abc import Iterable
from collections.abc import Mapping as AbcMapping
from dataclasses import dataclass, field
from typing import Any

from ckptfmt.errors import ConversionError

INPUT = "<input>"

# Ops that keep each element where it is: a Linear after them sees the layout before them.
_ELEMENTWISE_FUNCS = {"relu", "relu_", "relu6", "gelu", "silu", "sigmoid", "tanh", "dropout", "hardswish", "leaky_relu",
                      "elu", "contiguous", "clone", "mul", "add", "sub", "truediv", "neg", "identity"}
_ELEMENTWISE_MODULES = {"ReLU", "ReLU6", "GELU", "SiLU", "Sigmoid", "Tanh", "Dropout", "Dropout1d", "Dropout2d",
                        "Identity", "Hardswish", "LeakyReLU", "ELU", "Softmax"}


@dataclass(frozen=True, slots=True)
class LinearInput:
    """How a ``Linear`` module's input was laid out.

    Attributes:
        flattened: ``(*spatial, C)`` when the input is a channels-first map of more than one
            position flattened to a vector (the Keras kernel's rows need the HWC -> CHW
            permutation), else None.
        how: a short description for reports (``"flatten of (64, 2, 2)"``, ``"vector"``).
        known: False when the graph shows a reshape the converter cannot interpret.
    """

    flattened: tuple[int, ...] | None
    how: str
    known: bool = True


def _name(target: Any) -> str:
    return getattr(target, "__name__", str(target)).rsplit(".", 1)[-1]


@dataclass(frozen=True, slots=True)
class TorchDataflow:
    """The module-level dataflow of one traced forward pass of a torch model.

    Attributes:
        calls: ``{call: (module path or "<input>", the calls whose outputs reach its
            input)}``, through functions and methods (``cat``, ``add``, ``flatten``...) but
            not through other modules; one call per leaf module call (a ReLU module used three
            times is three calls).
        order: ``{module path: position of its first call}``.
        linear_inputs: ``{Linear path: LinearInput}``.
    """

    calls: dict[str, tuple[str, frozenset[str]]]
    order: dict[str, int]
    linear_inputs: dict[str, LinearInput] = field(default_factory=dict)

    @classmethod
    def trace(cls, model: Any, example_input: Any) -> TorchDataflow:
        """Trace ``model`` on ``example_input`` (a tensor, a tuple of tensors or a dict).

        Raises:
            ConversionError: torch.fx cannot trace the model (the message says why).
        """
        import torch
        from torch import fx
        from torch.fx.passes.shape_prop import ShapeProp

        class _Tracer(fx.Tracer):
            # subclasses of weighted torch.nn layers (a conv that pads first, a LayerNorm2d)
            # stay leaves: their weights are one module's, wherever the class is defined
            def is_leaf_module(self, m: Any, qualname: str) -> bool:
                return isinstance(m, _WEIGHTED) or super().is_leaf_module(m, qualname)

        _WEIGHTED = (torch.nn.modules.conv._ConvNd, torch.nn.Linear, torch.nn.modules.batchnorm._NormBase, torch.nn.LayerNorm,
                     torch.nn.GroupNorm, torch.nn.Embedding, torch.nn.RNNBase, torch.nn.MultiheadAttention)
        try:
            gm = fx.GraphModule(model, _Tracer().trace(model))
        except Exception as e:  # fx raises many kinds (TraceError, TypeError...) for dynamic control flow
            raise ConversionError(f"torch.fx cannot trace the torch model ({type(e).__name__}: {e}); "
                                  "its dataflow is unknown") from None
        args = example_input if isinstance(example_input, tuple) else (example_input,)
        was_training = model.training
        try:
            gm.eval()
            with torch.no_grad():
                if isinstance(example_input, dict):
                    placeholders = [n.target for n in gm.graph.nodes if n.op == "placeholder"]
                    args = tuple(example_input[p] for p in placeholders if p in example_input)
                ShapeProp(gm).propagate(*args)
        except Exception as e:
            raise ConversionError(f"the traced torch model does not run on the example input ({type(e).__name__}: {e})") from None
        finally:
            model.train(was_training)
        modules = dict(gm.named_modules())
        calls: dict[str, tuple[str, frozenset[str]]] = {}
        order: dict[str, int] = {}
        node_parents: dict[Any, frozenset[str]] = {}
        for node in gm.graph.nodes:
            if node.op == "placeholder":
                calls[node.name] = (INPUT, frozenset())
                node_parents[node] = frozenset({node.name})
                continue
            found: set[str] = set()
            for arg in _node_args(node):
                found |= node_parents.get(arg, frozenset())
            if node.op == "call_module":
                calls[node.name] = (str(node.target), frozenset(found))
                order.setdefault(str(node.target), len(order))
                node_parents[node] = frozenset({node.name})
            else:
                node_parents[node] = frozenset(found)
        linear = {}
        for node in gm.graph.nodes:
            if node.op == "call_module" and isinstance(modules.get(node.target), torch.nn.Linear):
                linear[str(node.target)] = _linear_input(node, modules)
        return cls(calls, order, linear)

    def linear_input(self, path: str) -> LinearInput | None:
        """How the Linear at ``path`` was fed, or None if the pass did not call it."""
        return self.linear_inputs.get(path)

    def producers(self, path: str, participants: set[str]) -> frozenset[str]:
        """The nearest ``participants`` (or ``"<input>"``) upstream of the module at ``path``."""
        out: set[str] = set()
        seen: set[str] = set()
        todo = [p for c, (m, ps) in self.calls.items() if m == path for p in ps]
        while todo:
            c = todo.pop()
            if c in seen:
                continue
            seen.add(c)
            module, ps = self.calls[c]
            if module in participants or module == INPUT:
                out.add(module)
            else:
                todo.extend(ps)
        return frozenset(out)

    def ancestors(self, path: str) -> set[str]:
        """Every module whose output reaches ``path``'s input."""
        seen: set[str] = set()
        todo = [p for c, (m, ps) in self.calls.items() if m == path for p in ps]
        while todo:
            c = todo.pop()
            if c not in seen:
                seen.add(c)
                todo.extend(self.calls[c][1])
        return {self.calls[c][0] for c in seen}

    def chain(self, paths: Iterable[str]) -> bool:
        """Whether ``paths`` lie on one path of the dataflow (each feeds, maybe indirectly, the next).

        Only then does execution order equal dataflow order for them: modules on parallel
        branches run in whatever order the forward method happens to call them.
        """
        ps = sorted(paths, key=lambda p: self.order.get(p, -1))
        return all(a in self.ancestors(b) for a, b in zip(ps, ps[1:]))


def _node_args(node: Any) -> list[Any]:
    from torch import fx

    out: list[Any] = []

    def visit(a: Any) -> None:
        if isinstance(a, fx.Node):
            out.append(a)
        elif isinstance(a, (list, tuple)):
            for x in a:
                visit(x)
        elif isinstance(a, dict):
            for x in a.values():
                visit(x)

    visit(node.args)
    visit(node.kwargs)
    return out


def _shape(node: Any) -> tuple[int, ...] | None:
    meta = node.meta.get("tensor_meta") if hasattr(node, "meta") else None
    shape = getattr(meta, "shape", None)
    return tuple(int(s) for s in shape) if shape is not None else None


def _linear_input(node: Any, modules: AbcMapping[str, Any]) -> LinearInput:
    """Walk back from a Linear's input through order-keeping ops to the flatten that made it."""
    x = node.args[0] if node.args else None
    while x is not None:
        kind = x.op
        fn = _name(x.target) if kind in ("call_function", "call_method") else None
        mod = type(modules[x.target]).__name__ if kind == "call_module" else None
        if fn in ("flatten", "view", "reshape") or mod == "Flatten":
            src = x.args[0]
            before, after = _shape(src), _shape(x)
            if before is None or after is None:
                return LinearInput(None, "a reshape of unknown shape", known=False)
            if len(after) == len(before):
                x = src
                continue
            if len(before) < 3 or len(after) != 2 or after[0] != before[0]:
                return LinearInput(None, f"a reshape {before} -> {after}", known=False)
            # a permute to channels-last right before the flatten: Keras's own (H, W, C) order
            prev = src
            while prev.op in ("call_method", "call_function") and _name(prev.target) == "contiguous":
                prev = prev.args[0]
            if prev.op in ("call_method", "call_function") and _name(prev.target) in ("permute", "transpose", "movedim"):
                dims = tuple(a for a in prev.args[1:] if isinstance(a, int))
                if _name(prev.target) == "permute" and dims == (0, *range(2, len(before)), 1):
                    return LinearInput(None, f"flatten of a channels-last map {before}")
                return LinearInput(None, f"flatten after {_name(prev.target)}{dims}", known=False)
            c, spatial = before[1], before[2:]
            if math.prod(spatial) == 1:
                return LinearInput(None, f"flatten of {before[1:]} (one position)")
            return LinearInput((*spatial, c), f"flatten of a channels-first map {before[1:]}")
        if fn in _ELEMENTWISE_FUNCS or mod in _ELEMENTWISE_MODULES:
            nodes = [a for a in _node_args(x) if _shape(a) == _shape(x)]
            if not nodes:
                break
            x = nodes[0]
            continue
        break
    shape = _shape(x) if x is not None else None
    return LinearInput(None, "vector" if shape is None or len(shape) == 2 else f"last axis of {shape[1:]}")



def keras_graph(model: Any) -> dict[str, frozenset[str]]:
    """``{layer name: names of the layers (or "<input>") whose outputs it takes}`` of a Keras model.

    Duck-typed over Keras 3 functional and sequential models (``layer._inbound_nodes`` and
    each node's ``parent_nodes``); keras is not imported.

    Raises:
        ConversionError: a model whose graph cannot be read (a subclassed model).

    Example:
        >>> keras_graph(model)["dense"]  # doctest: +SKIP
        frozenset({'flatten'})
    """
    graph: dict[str, set[str]] = {}
    layers = list(getattr(model, "layers", ()))
    names = {id(l): l.name for l in layers}
    for layer in layers:
        if type(layer).__name__ == "InputLayer":
            continue
        parents: set[str] = set()
        nodes = getattr(layer, "_inbound_nodes", None)
        if nodes is None:
            raise ConversionError(f"cannot read the Keras model's graph (layer {layer.name!r} records no inbound nodes)")
        for node in nodes:
            for parent in getattr(node, "parent_nodes", ()):
                op = parent.operation
                parents.add(INPUT if type(op).__name__ == "InputLayer" or id(op) not in names else names[id(op)])
            if not getattr(node, "parent_nodes", ()):
                parents.add(INPUT)
        graph[layer.name] = parents
    if not graph or all(not p for p in graph.values()):
        raise ConversionError("cannot read the Keras model's graph (a subclassed model records none)")
    return {k: frozenset(v) for k, v in graph.items()}


def producers(graph: AbcMapping[str, Iterable[str]], node: str, participants: set[str]) -> frozenset[str]:
    """The nearest ``participants`` (or ``"<input>"``) upstream of ``node``, walking through the rest."""
    out: set[str] = set()
    seen: set[str] = set()
    todo = list(graph.get(node, ()))
    while todo:
        p = todo.pop()
        if p in seen:
            continue
        seen.add(p)
        if p in participants or p == INPUT:
            out.add(p)
        else:
            todo.extend(graph.get(p, ()))
    return frozenset(out)
