"""The dataflow of one real run, for torch models ``torch.fx`` cannot trace.

``torch.fx`` traces with proxies, so a forward that branches on data (``if x.sum() > 0``),
asserts on shapes or calls code fx cannot see through stops it. This records the same graph
from one eval run of the example input instead:

* forward pre-hooks and hooks on the *leaf* modules (those fx would keep as leaves: the
  modules of ``torch.nn`` and every weighted layer) record, per call, the identity of each
  input tensor (which call's output it is) and of each output tensor;
* a :class:`~torch.overrides.TorchFunctionMode` records every torch function and tensor
  method called *between* modules (``flatten``, ``permute``, ``add``, ``cat``...), with the
  identities of its tensor arguments, so a Linear fed by a flatten of a conv map is seen with
  the order of that flatten.

The result is a list of :class:`RunNode` with the fields :mod:`._dataflow` reads from fx
nodes (``op``, ``target``, ``args``, ``kwargs``, ``meta["tensor_meta"].shape``), so both
paths are read by the same code. Tensors are told apart by object identity; every tensor the
run makes stays referenced until it ends, so no identity is reused. A tensor whose origin the
run did not see (made outside torch's functions, e.g. through numpy, or by a scripted
submodule) becomes a ``get_attr`` node marked ``meta["unseen"]``, and so does a tensor a torch
function makes from no tensor (``torch.as_tensor(array)``: what was done to the array is not
seen); the model's parameters and buffers are ``get_attr`` nodes named by their path, as in
fx. Whatever depends on its layout or producer is then
unknown, and callers refuse what only that could decide. Only the branches the example input
takes are seen.

Example:
    >>> nodes, modules = record_run(model, torch.zeros(1, 3, 8, 8))  # doctest: +SKIP
    >>> [n.op for n in nodes][:2]  # doctest: +SKIP
    ['placeholder', 'call_module']
"""

from __future__ import annotations

__all__ = ["RunNode", "record_run", "run_eval"]

import contextlib
import operator
from dataclasses import dataclass, field
from typing import Any

from ckptfmt.errors import ConversionError


@dataclass(frozen=True, slots=True)
class _Meta:
    shape: tuple[int, ...]


@dataclass(slots=True, eq=False)
class RunNode:
    """One recorded call (or input, or constant), shaped like a ``torch.fx.Node``."""

    name: str
    op: str  # "placeholder" | "call_module" | "call_function" | "get_attr"
    target: Any  # a module path, a function, operator.getitem, or a description
    args: tuple[Any, ...] = ()
    kwargs: dict[str, Any] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)

    def __repr__(self) -> str:
        return f"RunNode({self.name}: {self.op} {getattr(self.target, '__name__', self.target)})"


def _is_leaf(module: Any, weighted: tuple[type, ...]) -> bool:
    """The modules fx keeps as leaves: weighted layers anywhere, else torch.nn's own (not containers)."""
    import torch

    if isinstance(module, weighted):
        return True
    if isinstance(module, (torch.nn.Sequential, torch.nn.ModuleList, torch.nn.ModuleDict)):
        return False
    return type(module).__module__.startswith(("torch.nn", "torch.ao.nn"))


class _Recorder:
    """Turns tensors into nodes while the model runs."""

    def __init__(self, torch: Any) -> None:
        self.torch = torch
        self.nodes: list[RunNode] = []
        self.by_id: dict[int, RunNode] = {}
        self.keep: list[Any] = []  # every tensor seen stays alive: ids are never reused during the run
        self.depth = 0  # > 0 inside a leaf module: its own functional calls are its business

    def _new(self, op: str, target: Any, args: tuple = (), kwargs: dict | None = None, tensor: Any = None) -> RunNode:
        node = RunNode(f"n{len(self.nodes)}", op, target, args, dict(kwargs or {}))
        if tensor is not None:
            node.meta["tensor_meta"] = _Meta(tuple(int(d) for d in tensor.shape))
            self.bind(tensor, node)
        self.nodes.append(node)
        return node

    def bind(self, tensor: Any, node: RunNode) -> None:
        self.keep.append(tensor)
        self.by_id[id(tensor)] = node

    def ref(self, value: Any) -> Any:
        """``value`` with every tensor in it replaced by its node (a new constant node if unseen)."""
        if isinstance(value, self.torch.Tensor):
            node = self.by_id.get(id(value))
            if node is None:
                node = self._new("get_attr", "a tensor made where the recorded run does not see", tensor=value)
                node.meta["unseen"] = True
                node.meta["why"] = "a tensor made where the recorded run does not see (numpy, a scripted module)"
            return node
        if isinstance(value, (list, tuple)):
            return type(value)(self.ref(v) for v in value) if not hasattr(value, "_fields") else value
        if isinstance(value, dict):
            return {k: self.ref(v) for k, v in value.items()}
        return value

    def outputs(self, node: RunNode, out: Any) -> None:
        """Bind the tensors of ``out`` to ``node`` (one getitem node per element of a tuple or list)."""
        if isinstance(out, self.torch.Tensor):
            node.meta["tensor_meta"] = _Meta(tuple(int(d) for d in out.shape))
            self.bind(out, node)
        elif isinstance(out, (list, tuple)):
            for i, o in enumerate(out):
                if isinstance(o, self.torch.Tensor):
                    self._new("call_function", operator.getitem, (node, i), tensor=o)

    def state(self, model: Any) -> None:
        """The model's parameters and buffers: constants of known origin (``get_attr`` by path, as in fx)."""
        for name, t in [*model.named_parameters(), *model.named_buffers()]:
            if id(t) not in self.by_id:
                self._new("get_attr", name, tensor=t)

    def inputs(self, example_input: Any) -> None:
        values = example_input.values() if isinstance(example_input, dict) else (
            example_input if isinstance(example_input, tuple) else (example_input,))
        for v in values:
            if isinstance(v, self.torch.Tensor):
                self._new("placeholder", f"input{len(self.nodes)}", tensor=v)


def _function_mode(rec: _Recorder) -> Any:
    from torch.overrides import TorchFunctionMode

    class _Mode(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            out = func(*args, **kwargs)
            if rec.depth == 0 and _has_tensor(out, rec.torch):
                node = rec._new("call_function", func, rec.ref(tuple(args)), rec.ref(kwargs))
                if not _has_node((node.args, node.kwargs)):
                    # made from Python or numpy values (torch.as_tensor(array)): what was done to
                    # them before is not seen, so neither its layout nor its producer is known
                    node.meta["unseen"] = True
                    node.meta["why"] = f"a tensor {getattr(func, '__name__', func)} made from numpy or Python values"
                rec.outputs(node, out)
            return out

    return _Mode()


def _has_node(value: Any) -> bool:
    if isinstance(value, RunNode):
        return True
    if isinstance(value, (list, tuple)):
        return any(_has_node(v) for v in value)
    return isinstance(value, dict) and any(_has_node(v) for v in value.values())


def _has_tensor(out: Any, torch: Any) -> bool:
    if isinstance(out, torch.Tensor):
        return True
    return isinstance(out, (list, tuple)) and any(isinstance(o, torch.Tensor) for o in out)


def _hook_leaves(model: Any, rec: _Recorder, weighted: tuple[type, ...]) -> list[Any]:
    """Pre-hooks and hooks on the outermost leaf module calls; returns the handles."""
    handles = []
    pending: list[RunNode | None] = []
    for path, module in model.named_modules():
        if not _is_leaf(module, weighted):
            continue

        def pre(_m, args, kwargs, path=path):
            node = None
            if rec.depth == 0:
                node = rec._new("call_module", path, rec.ref(tuple(args)), rec.ref(dict(kwargs)))
            pending.append(node)
            rec.depth += 1

        def post(_m, _args, _kwargs, out):
            rec.depth -= 1
            node = pending.pop()
            if node is not None:
                rec.outputs(node, out)

        handles.append(module.register_forward_pre_hook(pre, with_kwargs=True))
        handles.append(module.register_forward_hook(post, with_kwargs=True))
    return handles


def run_eval(model: Any, example_input: Any, *contexts: Any) -> Any:
    """Run ``model`` once on ``example_input`` (a tensor, a tuple, or a dict of keyword arguments)
    in eval mode under ``no_grad`` and ``contexts``; its mode is restored. Eval: a run must not
    move BatchNorm's running statistics."""
    import torch

    was_training = model.training
    try:
        model.eval()
        with torch.no_grad(), contextlib.ExitStack() as stack:
            for c in contexts:
                stack.enter_context(c)
            if isinstance(example_input, tuple):
                return model(*example_input)
            if isinstance(example_input, dict):
                return model(**example_input)
            return model(example_input)
    finally:
        model.train(was_training)


def record_run(model: Any, example_input: Any, weighted: tuple[type, ...] = ()) -> tuple[list[RunNode], dict[str, Any]]:
    """Run ``model`` once on ``example_input`` (eval, no_grad, its mode restored) and record its dataflow.

    Returns:
        ``(nodes in execution order, {module path: module})``.

    Raises:
        ConversionError: the model does not run on the example input.
    """
    import torch

    rec = _Recorder(torch)
    rec.inputs(example_input)
    rec.state(model)
    handles = _hook_leaves(model, rec, weighted)
    try:
        run_eval(model, example_input, _function_mode(rec))
    except Exception as e:  # the model's own errors, whatever their class
        raise ConversionError(f"the torch model does not run on the example input ({type(e).__name__}: {e})") from None
    finally:
        for h in handles:
            h.remove()
    return rec.nodes, dict(model.named_modules())
