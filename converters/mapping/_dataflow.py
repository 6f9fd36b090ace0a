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

import math
from collections.abc import Iterable
from collections.abc import Mapping as AbcMapping
from dataclasses import dataclass, field
from typing import Any

from ckptfmt.errors import ConversionError

from ._record import RunNode, record_run

INPUT = "<input>"

# Ops that keep each element where it is: a Linear after them sees the layout before them. Names
# are compared after _op_name (``__iadd__``, ``iadd``, ``add_`` and ``__radd__`` are ``add``).
_ELEMENTWISE_FUNCS = {"relu", "relu6", "gelu", "silu", "sigmoid", "tanh", "dropout", "hardswish", "leaky_relu",
                      "elu", "contiguous", "clone", "mul", "add", "sub", "truediv", "div", "neg", "identity",
                      "float", "to", "type", "detach", "cpu"}
_ARITHMETIC = {"add", "sub", "mul", "truediv", "div", "floordiv", "pow", "and", "or", "xor"}
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
        channels_last: ``(*spatial, C)`` when the input is a channels-last map flattened (Keras's
            own order: no permutation), else None.
    """

    flattened: tuple[int, ...] | None
    how: str
    known: bool = True
    channels_last: tuple[int, ...] | None = None


def _name(target: Any) -> str:
    return getattr(target, "__name__", str(target)).rsplit(".", 1)[-1]


def _op_name(target: Any) -> str:
    """The name of a function or method with its in-place and reflected spellings folded:
    ``__iadd__`` (a recorded ``f += y``), ``iadd`` (fx's), ``add_`` and ``__radd__`` are ``add``."""
    n = _name(target).strip("_")
    if n[:1] in ("i", "r") and n[1:] in _ARITHMETIC:
        n = n[1:]
    return n


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
        linear, norms = {}, {}
        for node in nodes:
            if node.op != "call_module":
                continue
            module = modules.get(node.target)
            if isinstance(module, torch.nn.Linear):
                linear[str(node.target)] = _linear_input(node, modules)
            elif isinstance(module, torch.nn.LayerNorm):
                seen = norms.get(str(node.target))
                layout = _norm_input(node, modules)
                norms[str(node.target)] = layout if seen in (None, layout) else "unknown: called on maps of two layouts"
        return cls(calls, order, linear, norms, recorded)

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


def _node_args(node: Any) -> list[Any]:
    from torch import fx

    out: list[Any] = []

    def visit(a: Any) -> None:
        if isinstance(a, (fx.Node, RunNode)):
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


# Modules and functions whose output torch lays out channels-first (N, C, *spatial).
_CF_MODULE_BASES = ("_ConvNd", "_NormBase", "GroupNorm", "_MaxPoolNd", "_AvgPoolNd", "_AdaptiveAvgPoolNd",
                    "_AdaptiveMaxPoolNd", "Upsample", "_ConstantPadNd", "_ReflectionPadNd", "_ReplicationPadNd",
                    "ZeroPad2d", "PixelShuffle")
_CF_FUNCS = {"conv1d", "conv2d", "conv3d", "conv_transpose1d", "conv_transpose2d", "conv_transpose3d", "max_pool1d",
             "max_pool2d", "max_pool3d", "avg_pool1d", "avg_pool2d", "avg_pool3d", "adaptive_avg_pool1d",
             "adaptive_avg_pool2d", "adaptive_avg_pool3d", "adaptive_max_pool1d", "adaptive_max_pool2d",
             "adaptive_max_pool3d", "batch_norm", "group_norm", "interpolate", "pad"}
# Modules that keep every element where it is (a LayerNorm normalises in place).
_KEEPING_MODULES = _ELEMENTWISE_MODULES | {"LayerNorm", "Dropout3d", "AlphaDropout"}


def _is_channels_first_module(module: Any) -> bool:
    return any(c.__name__ in _CF_MODULE_BASES for c in type(module).__mro__)


def _dims(args: tuple[Any, ...]) -> tuple[Any, ...]:
    if len(args) == 1 and isinstance(args[0], (list, tuple)):
        return tuple(args[0])
    return tuple(args)


_MOVES = ("permute", "transpose", "movedim", "swapaxes", "swapdims")


def _moved(x: Any, perm: tuple[int, ...]) -> tuple[int, ...]:
    """The axes order ``perm`` seen before the permute/transpose/movedim node ``x``.

    Raises:
        ValueError, TypeError: arguments the converter cannot read.
    """
    fn = _name(x.target)
    r = len(perm)
    if fn == "permute":
        d = tuple(int(a) % r for a in _dims(x.args[1:]))
        if sorted(d) != list(range(r)):
            raise ValueError
    else:
        a, b = (int(v) % r for v in x.args[1:3])
        order = list(range(r))
        if fn == "movedim":
            order.insert(b, order.pop(a))
        else:
            order[a], order[b] = order[b], order[a]
        d = tuple(order)
    return tuple(d[p] for p in perm)


def _module_layout(x: Any, modules: AbcMapping[str, Any]) -> tuple[bool, Any, str]:
    """For a module call: ``(True, None, how)`` when it lays out channels-first, ``(False, its input, "")``
    when it keeps every element where it is, else ``(False, None, why unknown)``."""
    module = modules.get(x.target)
    if _is_channels_first_module(module):
        return True, None, f"{type(module).__name__} {x.target}"
    if type(module).__name__ in _KEEPING_MODULES and x.args:
        return False, x.args[0], ""
    return False, None, f"the output of {type(module).__name__} {x.target!s}, whose layout is unknown"


def _layout_step(x: Any, perm: tuple[int, ...], shape: tuple[int, ...], modules: AbcMapping[str, Any]) -> tuple[Any, tuple[int, ...] | None, str]:
    """One step back from ``x``: ``(next node, perm, "")`` to go on, or ``(None, perm or None, how)`` to stop."""
    if x.op == "call_module":
        found, src, how = _module_layout(x, modules)
        return (None, perm, how) if found else (src, perm, "") if src is not None else (None, None, how)
    if x.op == "placeholder" and perm == tuple(range(len(perm))) and len(shape) > 2 and shape[1] == 1:
        # one channel first or a channels-last input: Keras's order either way
        return None, perm, "the model's input"
    if x.op not in ("call_function", "call_method"):
        return None, None, "the model's input, whose layout is the caller's" if x.op == "placeholder" else f"{x.op} {x.target}"
    fn = _op_name(x.target)
    if fn in _CF_FUNCS:
        return None, perm, fn
    if fn in _MOVES:
        try:
            return x.args[0], _moved(x, perm), ""
        except (ValueError, TypeError):
            return None, None, f"a {fn}{tuple(x.args[1:])!r} the converter cannot read"
    if fn in _ELEMENTWISE_FUNCS:
        nodes = [a for a in _node_args(x) if _shape(a) == _shape(x)]
        return (nodes[0], perm, "") if nodes else (None, None, f"{fn} of tensors of other shapes")
    return None, None, f"{fn}, whose effect on the layout is unknown"


def _layout(node: Any, modules: AbcMapping[str, Any]) -> tuple[tuple[int, ...] | None, str]:
    """The axes order of ``node``'s tensor relative to the channels-first map it comes from.

    Walks back through ops that move no element (activations, dropout, LayerNorm, additions)
    and through permutes/transposes, to a module torch lays out channels-first (a conv, a
    BatchNorm, a pooling). Returns ``(perm, how)`` with ``node == origin.permute(perm)``, or
    ``(None, what stands in the way)`` when any op between has an unknown effect on the layout.
    """
    shape = _shape(node)
    if shape is None:
        return None, "a tensor of unknown shape"
    perm: tuple[int, ...] | None = tuple(range(len(shape)))
    x = node
    for _ in range(10_000):
        x, perm, how = _layout_step(x, perm, shape, modules)
        if x is None:
            return perm, how
    return None, "a chain of ops too long to follow"


def _map_layout(node: Any, modules: AbcMapping[str, Any]) -> tuple[str, tuple[int, ...]]:
    """``("first" | "last", (*spatial, C))`` of a map, or ``("unknown: why", ())``."""
    shape = _shape(node)
    perm, how = _layout(node, modules)
    if perm is None or shape is None:
        return f"unknown: {how}", ()
    r = len(perm)
    if perm == tuple(range(r)):
        return "first", (*shape[2:], shape[1])
    if perm == (0, *range(2, r), 1):
        return "last", tuple(shape[1:])
    return f"unknown: axes {perm} of a channels-first map from {how}", ()


def _flatten_input(x: Any, modules: AbcMapping[str, Any]) -> LinearInput | None:
    """How the flatten/view/reshape node ``x`` lays out a Linear's input (None: it keeps the rank, look further)."""
    src = x.args[0]
    before, after = _shape(src), _shape(x)
    if before is None or after is None:
        return LinearInput(None, "a reshape of unknown shape", known=False)
    if len(after) == len(before):
        return None
    if len(before) < 3 or len(after) != 2 or after[0] != before[0]:
        return LinearInput(None, f"a reshape {before} -> {after}", known=False)
    if sum(1 for d in before[1:] if d > 1) <= 1:
        return LinearInput(None, f"flatten of {before[1:]} (one position)")
    layout, hwc = _map_layout(src, modules)
    if layout == "first":
        return LinearInput(hwc, f"flatten of a channels-first map {before[1:]}")
    if layout == "last":
        return LinearInput(None, f"flatten of a channels-last map {before[1:]}", channels_last=hwc)
    return LinearInput(None, f"flatten of {before[1:]} after {layout[len('unknown: '):]}", known=False)


_RESHAPES = ("flatten", "view", "reshape", "squeeze")
# Reductions: one to ``(N, K)`` of a map of rank >= 3 keeps a single axis of it, nothing to permute.
_REDUCTIONS = {"mean", "sum", "amax", "amin", "std", "var", "logsumexp", "nanmean", "nansum"}


def _feature_module(module: Any) -> bool:
    """Modules whose output's last axis is features, no positions of a map (evidence for "vector")."""
    import torch

    return isinstance(module, (torch.nn.Linear, torch.nn.Bilinear, torch.nn.Embedding, torch.nn.EmbeddingBag,
                               torch.nn.RNNBase, torch.nn.MultiheadAttention))


def _full_slice(index: Any) -> bool:
    index = index if isinstance(index, tuple) else (index,)
    return all(i is Ellipsis or (isinstance(i, slice) and i == slice(None)) for i in index)


def _is_node(x: Any) -> bool:
    return hasattr(x, "op") and hasattr(x, "meta")


def _describe(x: Any, modules: AbcMapping[str, Any]) -> str:
    if x.op == "call_module":
        return f"{type(modules.get(x.target)).__name__} {x.target}"
    return _op_name(x.target) if x.op in ("call_function", "call_method") else f"{x.op} {x.target}"


def _pooled(x: Any, fn: str | None, module: Any) -> bool:
    """Whether ``x`` is positive evidence that its tensor holds no positions of a map left to permute:
    the model's input, a parameter, a Linear/Embedding/RNN output, or a reduction or selection of a
    map of rank >= 3 down to ``(N, K)`` (a mean over the spatial axes, ``x[:, 0]`` of a sequence)."""
    if x.op in ("placeholder", "get_attr"):
        return True
    if x.op == "call_module":
        return _feature_module(module)
    src = x.args[0] if x.args and _is_node(x.args[0]) else None
    before, after = (_shape(src) if src is not None else None), _shape(x)
    if before is None or after is None or len(before) < 3 or len(after) != 2:
        return False
    return fn in _REDUCTIONS or (fn == "getitem" and not _full_slice(x.args[1] if len(x.args) > 1 else None))


def _map_upstream(x: Any, modules: AbcMapping[str, Any]) -> str | None:
    """A spatial map (more than one position) whose values reach ``x`` not through pooling, else None."""
    seen: set[int] = set()
    todo = [x]
    while todo:
        n = todo.pop()
        if id(n) in seen:
            continue
        seen.add(id(n))
        if n.meta.get("unseen"):
            return n.meta.get("why", "a tensor whose origin the run did not see")
        shape = _shape(n)
        fn = _op_name(n.target) if n.op in ("call_function", "call_method") else None
        module = modules.get(n.target) if n.op == "call_module" else None
        if n.op == "placeholder":
            if shape is not None and sum(1 for d in shape[1:] if d > 1) > 1:
                return f"the model's input {shape[1:]}"
            continue
        if _pooled(n, fn, module):
            continue
        if (fn in _CF_FUNCS or (module is not None and _is_channels_first_module(module))) and shape is not None and len(shape) >= 3:
            if math.prod(shape[2:]) > 1:
                return f"the {shape[1:]} map of {_describe(n, modules)}"
            continue  # pooled to one position
        if (fn in _RESHAPES or type(module).__name__ == "Flatten") and _is_node(n.args[0] if n.args else None):
            before = _shape(n.args[0])
            if before is not None and len(before) >= 3 and shape is not None and len(shape) == 2 and sum(1 for d in before[1:] if d > 1) <= 1:
                continue  # a flatten of one position
        todo.extend(_node_args(n))
    return None


def _linear_input(node: Any, modules: AbcMapping[str, Any]) -> LinearInput:
    """How a Linear's input is laid out: walk back from it through ops known to keep every element in
    place to the flatten that made it, or to evidence that it holds no positions of a map.

    An op the walk does not know, with a spatial map upstream of it, makes the layout unknown
    (refused by callers): it may have moved the map's positions (a ``cat`` of two flattened maps,
    a BatchNorm1d or LayerNorm over a flattened map, whose own weights are in its order).
    """
    x = node.args[0] if node.args else None
    if not _is_node(x):
        return LinearInput(None, "vector")
    top = _shape(x)
    return _fed_from(x, modules, {}, top is not None and len(top) != 2)


def _fed_from(x: Any, modules: AbcMapping[str, Any], memo: dict[int, LinearInput], last_axis: bool) -> LinearInput:
    start = x
    if id(start) in memo:
        return memo[id(start)]
    for _ in range(10_000):
        if x.meta.get("unseen"):
            out = LinearInput(None, x.meta.get("why", str(x.target)), known=False)
            break
        fn = _op_name(x.target) if x.op in ("call_function", "call_method") else None
        module = modules.get(x.target) if x.op == "call_module" else None
        mname = type(module).__name__ if module is not None else None
        shape = _shape(x)
        if (fn in _RESHAPES or mname == "Flatten") and x.args and _is_node(x.args[0]):
            fed = _flatten_input(x, modules)
            if fed is not None:
                out = fed
                break
            if _shape(x.args[0]) != shape and not last_axis:
                out = LinearInput(None, f"a {fn or mname} {_shape(x.args[0])} -> {shape}", known=False)
                break
            x = x.args[0]
            continue
        if _pooled(x, fn, module):
            out = LinearInput(None, "vector" if shape is None or len(shape) == 2 else f"last axis of {shape[1:]}")
            break
        same = [a for a in _node_args(x) if _shape(a) == shape] if shape is not None else []
        if fn == "getitem" and x.args and _is_node(x.args[0]) and _shape(x.args[0]) is None:
            x = x.args[0]  # one tensor of a module's tuple output (an LSTM's)
            continue
        keeps = (mname in _ELEMENTWISE_MODULES or fn in _ELEMENTWISE_FUNCS
                 or (fn == "getitem" and len(x.args) > 1 and _full_slice(x.args[1])))
        if keeps and same:
            if fn in _ARITHMETIC and len(same) > 1 and not last_axis:
                # x = a + b: both must be laid out alike (a flattened map plus a vector is not)
                fed = [_fed_from(a, modules, memo, last_axis) for a in same]
                unknown = [f for f in fed if not f.known]
                if unknown:
                    out = unknown[0]
                elif len({(f.flattened, f.channels_last) for f in fed}) == 1:
                    out = fed[0]
                else:
                    out = LinearInput(None, f"{fn} of tensors laid out differently ({' and '.join(f.how for f in fed)})", known=False)
                break
            x = same[0]
            continue
        if last_axis:  # a Linear over the last axis of a map: no flatten to permute
            out = LinearInput(None, "vector" if shape is None or len(shape) == 2 else f"last axis of {shape[1:]}")
            break
        found = _map_upstream(x, modules)
        out = LinearInput(None, "vector") if found is None else LinearInput(
            None, f"{_describe(x, modules)} (an op the converter cannot follow) applied after {found}", known=False)
        break
    else:
        out = LinearInput(None, "a chain of ops too long to follow", known=False)
    memo[id(start)] = out
    return out


def _norm_input(node: Any, modules: AbcMapping[str, Any]) -> str:
    """The layout (``"first"``, ``"last"``, ``"unknown: ..."``) of a LayerNorm's input map."""
    x = node.args[0] if node.args else None
    shape = _shape(x) if x is not None else None
    if shape is None:
        return "unknown: an input of unknown shape"
    if len(shape) < 3:
        return "vector"
    return _map_layout(x, modules)[0]


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
