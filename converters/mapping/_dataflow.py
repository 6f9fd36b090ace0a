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
model's mode is restored (:meth:`TorchDataflow.trace`). A model fx cannot trace (a forward
that branches on data, asserts on shapes) is recorded from one real run instead
(:meth:`TorchDataflow.record`, :mod:`._record`: hooks on the leaf modules and a torch function
mode between them); :meth:`TorchDataflow.of` tries fx first. What neither can tell (a tensor
whose origin the run did not see, a reshape the converter cannot read) is reported unknown,
and callers refuse what only the dataflow could decide.

Example:
    >>> flow = TorchDataflow.trace(model, torch.zeros(1, 3, 32, 32))  # doctest: +SKIP
    >>> flow.linear_input("classifier")  # doctest: +SKIP
    LinearInput(flattened=None, ...)
"""

from __future__ import annotations

__all__ = ["LinearInput", "TorchDataflow", "keras_graph", "producers"]

from collections.abc import Iterable
from collections.abc import Mapping as AbcMapping
from dataclasses import dataclass, field
from typing import Any

from ckptfmt.errors import ConversionError

from ._record import record_run
from ._walk import LinearInput, _feature_input, _linear_input, _name, _node_args, _norm_input, _op_name, _shape  # noqa: F401

INPUT = "<input>"

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
        norm_inputs: ``{LayerNorm path: "first" | "last" | "vector" | "unknown: why"}``, the
            layout of the map each LayerNorm normalises.
        recorded: None for an fx trace; for a record of one run (:meth:`record`), why it was
            recorded (only the branches the example input takes are seen).
    """

    calls: dict[str, tuple[str, frozenset[str]]]
    order: dict[str, int]
    linear_inputs: dict[str, LinearInput] = field(default_factory=dict)
    norm_inputs: dict[str, str] = field(default_factory=dict)
    recorded: str | None = None
    #: ``{path: LinearInput}`` of the other weighted modules that take a feature vector
    #: (:func:`._walk._feature_input`): a BatchNorm1d or LayerNorm after a flatten, say.
    feature_inputs: dict[str, LinearInput] = field(default_factory=dict)

    @classmethod
    def trace(cls, model: Any, example_input: Any) -> TorchDataflow:
        """Trace ``model`` with torch.fx on ``example_input`` (a tensor, a tuple of tensors or a dict).

        Raises:
            ConversionError: torch.fx cannot trace the model (the message says why).
        """
        gm = _fx_module(model, example_input)
        return cls._from_nodes(list(gm.graph.nodes), dict(gm.named_modules()))

    @classmethod
    def record(cls, model: Any, example_input: Any, why: str = "asked for") -> TorchDataflow:
        """Record the dataflow of one real run of ``model`` on ``example_input`` (:mod:`._record`).

        ``why`` (e.g. why fx could not trace) is kept in :attr:`recorded` for the report.

        Raises:
            ConversionError: the model does not run on the example input.
        """
        nodes, modules = record_run(model, example_input, _weighted_types())
        return cls._from_nodes(nodes, modules, recorded=why)

    @classmethod
    def of(cls, model: Any, example_input: Any) -> TorchDataflow:
        """The fx trace of ``model``, or where fx cannot trace it, the record of one run.

        Raises:
            ConversionError: fx cannot trace the model and it does not run on the example input.
        """
        try:
            return cls.trace(model, example_input)
        except ConversionError as e:
            return cls.record(model, example_input, str(e).replace("; its dataflow is unknown", ""))

    @classmethod
    def _from_nodes(cls, nodes: list[Any], modules: AbcMapping[str, Any], recorded: str | None = None) -> TorchDataflow:
        import torch

        calls, order = _calls(nodes)
        linear, norms, features = {}, {}, {}
        for node in nodes:
            if node.op != "call_module":
                continue
            module = modules.get(node.target)
            if isinstance(module, torch.nn.Linear):
                linear[str(node.target)] = _linear_input(node, modules)
                continue
            if isinstance(module, torch.nn.LayerNorm):
                seen = norms.get(str(node.target))
                layout = _norm_input(node, modules)
                norms[str(node.target)] = layout if seen in (None, layout) else "unknown: called on maps of two layouts"
            if module is not None and any(True for _ in module.parameters(recurse=False)) or any(True for _ in module.buffers(recurse=False)):
                fed = _feature_input(node, modules)
                if fed is not None and (fed.flattened is not None or not fed.known):
                    features[str(node.target)] = fed
        return cls(calls, order, linear, norms, recorded, features)

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


def _weighted_types() -> tuple[type, ...]:
    import torch

    return (torch.nn.modules.conv._ConvNd, torch.nn.Linear, torch.nn.modules.batchnorm._NormBase, torch.nn.LayerNorm,
            torch.nn.GroupNorm, torch.nn.Embedding, torch.nn.RNNBase, torch.nn.MultiheadAttention)


def _fx_module(model: Any, example_input: Any) -> Any:
    """``model`` traced by torch.fx, its nodes' shapes propagated on ``example_input``."""
    import torch
    from torch import fx
    from torch.fx.passes.shape_prop import ShapeProp

    weighted = _weighted_types()
    if "forward" in vars(model):
        # fx traces type(root).forward: a forward set on the model instance (a monkeypatch, accelerate's
        # hooks) is not what runs, so only a recorded run sees the real dataflow (a submodule's is honoured)
        raise ConversionError("torch.fx cannot trace the torch model (it has a forward set on the instance, and fx "
                              "would trace its class's forward instead); its dataflow is unknown")

    class _Tracer(fx.Tracer):
        # subclasses of weighted torch.nn layers (a conv that pads first, a LayerNorm2d)
        # stay leaves: their weights are one module's, wherever the class is defined
        def is_leaf_module(self, m: Any, qualname: str) -> bool:
            return isinstance(m, weighted) or super().is_leaf_module(m, qualname)

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
    return gm


def _calls(nodes: list[Any]) -> tuple[dict[str, tuple[str, frozenset[str]]], dict[str, int]]:
    """``(calls, order)`` of :class:`TorchDataflow` from graph nodes in execution order."""
    calls: dict[str, tuple[str, frozenset[str]]] = {}
    order: dict[str, int] = {}
    node_parents: dict[Any, frozenset[str]] = {}
    for node in nodes:
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
    return calls, order


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
