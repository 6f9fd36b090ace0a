"""Reading layouts from a traced or recorded torch graph: how each Linear and LayerNorm is fed.

The walks of :class:`ckptfmt.converters.mapping._dataflow.TorchDataflow` over its nodes (fx
nodes, or the recorded run's look-alikes): :func:`_linear_input` follows a ``Linear``'s input
back through ops known to keep every element in place to the flatten that made it (rows
permuted when it flattened a channels-first map of more than one position), or to positive
evidence that it holds no positions of a map (a pooled vector); anything else with a spatial
map upstream is unknown, and callers refuse it. :func:`_norm_input` and :func:`_map_layout`
tell whether a map is channels-first or channels-last.
"""

from __future__ import annotations

import math
from collections.abc import Mapping as AbcMapping
from dataclasses import dataclass
from typing import Any

from ._record import RunNode

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


def _map_upstream(x: Any, modules: AbcMapping[str, Any]) -> tuple[str, tuple[int, ...] | None] | None:
    """A spatial map (more than one position) whose values reach ``x`` not through pooling, else None:
    (its description, its shape or None when unknown)."""
    seen: set[int] = set()
    todo = [x]
    while todo:
        n = todo.pop()
        if id(n) in seen:
            continue
        seen.add(id(n))
        found, stop = _map_at(n, modules)
        if found is not None:
            return found, (_shape(n) if not n.meta.get("unseen") else None)
        if not stop:
            todo.extend(_node_args(n))
    return None


def _positions(shape: tuple[int, ...] | None) -> int:
    """How many axes after the batch axis have more than one element (0 for an unknown shape)."""
    return 0 if shape is None else sum(1 for d in shape[1:] if d > 1)


def _map_at(n: Any, modules: AbcMapping[str, Any]) -> tuple[str | None, bool]:
    """One node of :func:`_map_upstream`: (the map found there or None, whether to stop walking up from it)."""
    if n.meta.get("unseen"):
        return n.meta.get("why", "a tensor whose origin the run did not see"), True
    shape = _shape(n)
    fn, module = _what(n, modules)
    if n.op == "placeholder":
        return (f"the model's input {shape[1:]}" if _positions(shape) > 1 else None), True
    if _pooled(n, fn, module):
        return None, True
    channels_first = fn in _CF_FUNCS or (module is not None and _is_channels_first_module(module))
    if channels_first and shape is not None and len(shape) >= 3:
        # a map of more than one position, or one pooled to a single position (nothing to permute)
        return (f"the {shape[1:]} map of {_describe(n, modules)}" if math.prod(shape[2:]) > 1 else None), True
    return None, _is_reshape(n, fn, module) and _flattens_one_position(n)


def _flattens_one_position(n: Any) -> bool:
    """A reshape of a map of rank >= 3 with at most one position to ``(N, K)``."""
    before, after = _shape(n.args[0]), _shape(n)
    return before is not None and len(before) >= 3 and after is not None and len(after) == 2 and _positions(before) <= 1


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
    """The layout the walk from ``x`` back finds (memoized per start node)."""
    start = x
    if id(start) in memo:
        return memo[id(start)]
    out = LinearInput(None, "a chain of ops too long to follow", known=False)
    for _ in range(10_000):
        decided, x = _walk_step(x, modules, memo, last_axis)
        if decided is not None:
            out = decided
            break
    memo[id(start)] = out
    return out


def _vector(shape: tuple[int, ...] | None) -> LinearInput:
    return LinearInput(None, "vector" if shape is None or len(shape) == 2 else f"last axis of {shape[1:]}")


def _what(x: Any, modules: AbcMapping[str, Any]) -> tuple[str | None, Any]:
    """A node's function or method name (None for modules) and its module (None for the rest)."""
    fn = _op_name(x.target) if x.op in ("call_function", "call_method") else None
    return fn, (modules.get(x.target) if x.op == "call_module" else None)


def _is_reshape(x: Any, fn: str | None, module: Any) -> bool:
    return (fn in _RESHAPES or type(module).__name__ == "Flatten") and bool(x.args) and _is_node(x.args[0])


def _keeps(x: Any, fn: str | None, module: Any) -> bool:
    """An op known to keep every element where it is (activations, casts, in-place arithmetic, a full slice)."""
    return (type(module).__name__ in _ELEMENTWISE_MODULES or fn in _ELEMENTWISE_FUNCS
            or (fn == "getitem" and len(x.args) > 1 and _full_slice(x.args[1])))


def _walk_step(x: Any, modules: AbcMapping[str, Any], memo: dict[int, LinearInput], last_axis: bool) -> tuple[LinearInput | None, Any]:
    """One node of the walk back from a Linear: (the layout decided here, None) or (None, the node to look at next)."""
    if x.meta.get("unseen"):
        return LinearInput(None, x.meta.get("why", str(x.target)), known=False), None
    fn, module = _what(x, modules)
    shape = _shape(x)
    if _is_reshape(x, fn, module):
        return _through_reshape(x, fn or type(module).__name__, modules, last_axis)
    if _pooled(x, fn, module):
        return _vector(shape), None
    if fn == "getitem" and x.args and _is_node(x.args[0]) and _shape(x.args[0]) is None:
        return None, x.args[0]  # one tensor of a module's tuple output (an LSTM's)
    same = [a for a in _node_args(x) if _shape(a) == shape] if shape is not None else []
    if same and _keeps(x, fn, module):
        if fn in _ARITHMETIC and len(same) > 1 and not last_axis:
            return _sum_layout(fn, same, modules, memo, last_axis), None
        return None, same[0]
    return _unfollowed(x, shape, modules, last_axis), None


def _unfollowed(x: Any, shape: tuple[int, ...] | None, modules: AbcMapping[str, Any], last_axis: bool) -> LinearInput:
    """An op the walk cannot follow: harmless with no map upstream, or over the last axis when that
    axis cannot hold a whole flattened map; else unknown."""
    found = _map_upstream(x, modules)
    if found is None:
        return _vector(shape) if last_axis else LinearInput(None, "vector")
    what, map_shape = found
    if last_axis and shape is not None and map_shape is not None and shape[-1] != math.prod(map_shape[1:]):
        return _vector(shape)  # a Linear over the last axis of a map: its channels, no flatten to permute
    return LinearInput(None, f"{_describe(x, modules)} (an op the converter cannot follow) applied after {what}", known=False)


def _feature_input(node: Any, modules: AbcMapping[str, Any]) -> LinearInput | None:
    """How a weighted module other than a Linear is fed when it takes a feature vector (``(N, F)``
    or ``(N, F, 1, ...)``: a BatchNorm1d, a LayerNorm, a 1x1 conv on a vector), else None. Its
    per-feature weights need the same permutation as a Dense's rows if F is a flattened map."""
    x = node.args[0] if node.args else None
    shape = _shape(x) if _is_node(x) else None
    if shape is None or len(shape) < 2 or any(d != 1 for d in shape[2:]):
        return None
    return _fed_from(x, modules, {}, False)


def _through_reshape(x: Any, name: str, modules: AbcMapping[str, Any], last_axis: bool) -> tuple[LinearInput | None, Any]:
    """A flatten/view/reshape/squeeze on the walk: the flatten that decides, a reshape refused, or one that keeps the shape."""
    fed = _flatten_input(x, modules)
    if fed is not None:
        return fed, None
    if _shape(x.args[0]) != _shape(x) and not last_axis:
        return LinearInput(None, f"a {name} {_shape(x.args[0])} -> {_shape(x)}", known=False), None
    return None, x.args[0]


def _sum_layout(fn: str, same: list[Any], modules: AbcMapping[str, Any], memo: dict[int, LinearInput], last_axis: bool) -> LinearInput:
    """``x = a + b``: both must be laid out alike (a flattened map plus a vector is not)."""
    fed = [_fed_from(a, modules, memo, last_axis) for a in same]
    unknown = [f for f in fed if not f.known]
    if unknown:
        return unknown[0]
    if len({(f.flattened, f.channels_last) for f in fed}) == 1:
        return fed[0]
    return LinearInput(None, f"{fn} of tensors laid out differently ({' and '.join(f.how for f in fed)})", known=False)


def _norm_input(node: Any, modules: AbcMapping[str, Any]) -> str:
    """The layout (``"first"``, ``"last"``, ``"unknown: ..."``) of a LayerNorm's input map."""
    x = node.args[0] if node.args else None
    shape = _shape(x) if x is not None else None
    if shape is None:
        return "unknown: an input of unknown shape"
    if len(shape) < 3:
        return "vector"
    return _map_layout(x, modules)[0]
