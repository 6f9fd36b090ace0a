"""The TensorFlow adapter: ``tf.Module``, Keras models and ``tf.train.Checkpoint`` to numpy trees.

Variables are keyed by their *object-graph path*: the names of the trackable children
followed from the root, as TensorFlow's own checkpoints do. The graph is walked breadth
first, so a variable reachable along several paths is stored once, under its shortest path,
and a freshly built object of the same architecture walks to the same paths.

Layout of the tree :func:`to_state` builds::

    {
        "framework":  {"name": "tensorflow", "version": "2.21.0", "layout": 1},
        "variables":  {"_functional": {"_operations": {"1": {"_kernel": array, "bias": array}}},
                       "optimizer": {"_iterations": array, "_learning_rate": array}},
        "optimizers": {
            "optimizer": {                                  # the optimizer's path
                "trainable_variables": ["_functional/_operations/1/_kernel", ...],
                "slots": {"momentums":  {"_functional": {"_operations": {"1": {"_kernel": array}}}},
                          "velocities": {...}},
            },
        },
    }

Tensor names are therefore ``variables/<object path>`` and
``optimizers/<optimizer path>/slots/<slot name>/<owner variable path>``; paths are joined
with ``/`` and escaped as :func:`ckptfmt.format.tree.join_path` does. Keras 3 optimizers keep
their slot variables in lists parallel to the variables they were built with; the adapter
keys each slot by the path of the variable it belongs to (not by list position), and on
restore builds an unbuilt optimizer with the saved variable order so a fresh model and a
fresh optimizer resume exactly.

Example:
    >>> import tensorflow as tf
    >>> from ckptfmt.adapters import tensorflow as tfa
    >>> m = tf.Module(); m.w = tf.Variable([1.0, 2.0])
    >>> tfa.to_state(m)["variables"]
    {'w': array([1., 2.], dtype=float32)}
"""

from __future__ import annotations

__all__ = ["LAYOUT_VERSION", "to_state", "from_state", "walk_variables"]

import collections
import sys
from collections.abc import Iterator
from typing import Any

import numpy as np

from ckptfmt.errors import ConversionError, FormatError, FrameworkNotAvailableError, UnsupportedDtypeError
from ckptfmt.format.dtypes import dtype_name
from ckptfmt.format.tree import join_path

try:
    import tensorflow as tf
except ImportError:
    raise FrameworkNotAvailableError("tensorflow", "tensorflow") from None

#: Version of the tree layout above; bumped if sections move.
LAYOUT_VERSION = 1

Path = tuple  # a path is a tuple of child names (str)

# Children of a Keras optimizer that the walk does not follow: the list of all its
# variables and of the variables it updates (these are keyed elsewhere).
_OPTIMIZER_LISTS = ("_variables", "_trainable_variables")


def _keras_module() -> Any:
    # Keras is only consulted if the caller already imported it: a tf.Module user pays nothing.
    return sys.modules.get("keras")


def _is_variable(obj: Any) -> bool:
    if isinstance(obj, tf.Variable):
        return True
    keras = _keras_module()
    return keras is not None and isinstance(obj, keras.Variable)


def _is_keras_optimizer(obj: Any) -> bool:
    keras = _keras_module()
    return keras is not None and isinstance(obj, keras.optimizers.Optimizer)


def _name(path: Path) -> str:
    out = ""
    for part in path:
        out = join_path(out, part)
    return out


def _split(name: str) -> Path:
    if not name:
        return ()
    return tuple(p.replace("~1", "/").replace("~0", "~") for p in name.split("/"))


class _Graph:
    """The variables reachable from a root, by object-graph path."""

    def __init__(self, root: Any) -> None:
        if isinstance(root, tf.train.Checkpoint):
            # save_counter is created lazily on the first save; create it so that a used and
            # a fresh tf.train.Checkpoint have the same variables.
            root.save_counter  # noqa: B018
        self.variables: dict[Path, Any] = {}
        self.optimizers: dict[Path, Any] = {}
        path_of: dict[int, Path] = {}
        queue = collections.deque([(root, ())])
        path_of[id(root)] = ()
        while queue:
            obj, path = queue.popleft()
            if _is_variable(obj):
                self.variables[path] = obj
                continue
            skip: set[str] = set()
            if _is_keras_optimizer(obj):
                self.optimizers[path] = obj
                skip = {*_OPTIMIZER_LISTS, *_slot_lists(obj)}
            for name, child in tf.train.TrackableView.children(obj).items():
                if name in skip or id(child) in path_of:
                    continue
                path_of[id(child)] = path + (name,)
                queue.append((child, path + (name,)))
        self.path_of = path_of
        # slot key (optimizer path, slot name, owner path) -> slot variable
        self.slots: dict[tuple[Path, str, Path], Any] = {}
        self.owners: dict[Path, list[Path]] = {}
        for opt_path, opt in self.optimizers.items():
            owners = [self._owner_path(opt_path, i, v) for i, v in enumerate(opt._trainable_variables)]
            self.owners[opt_path] = owners
            claimed = {id(v) for v in self.variables.values()}
            for slot_name, items in _slot_lists(opt).items():
                for owner, var in zip(owners, items):
                    self.slots[(opt_path, slot_name.lstrip("_"), owner)] = var
                    claimed.add(id(var))
            # Anything else the optimizer owns (e.g. a wrapped optimizer's state) by position.
            for k, var in enumerate(opt.variables):
                if id(var) not in claimed:
                    self.variables[opt_path + ("_variables", str(k))] = var

    def _owner_path(self, opt_path: Path, i: int, var: Any) -> Path:
        path = self.path_of.get(id(var))
        if path is not None and path in self.variables:
            return path
        # The optimizer was saved without its model: name the variable by its list position.
        return opt_path + ("_trainable_variables", str(i))


def _slot_lists(opt: Any) -> dict[str, list]:
    """A Keras optimizer's per-variable state: lists parallel to its trainable variables."""
    n = len(opt._trainable_variables)
    if not n:
        return {}
    out = {}
    for name, child in tf.train.TrackableView.children(opt).items():
        if name in _OPTIMIZER_LISTS or not isinstance(child, (list, tuple)):
            continue
        items = list(child)
        if len(items) == n and all(_is_variable(v) for v in items):
            out[name] = items
    return out


def walk_variables(obj: Any) -> Iterator[tuple[str, Any]]:
    """Yield ``(tensor name, variable)`` for every variable :func:`to_state` would save.

    Names are as they appear in a checkpoint (``variables/...`` and
    ``optimizers/.../slots/...``), which makes this the dry run of a save or restore.

    Example:
        >>> import tensorflow as tf
        >>> m = tf.Module(); m.w = tf.Variable(1.0)
        >>> [name for name, _ in walk_variables(m)]
        ['variables/w']
    """
    graph = _Graph(obj)
    for path, var in graph.variables.items():
        yield _name(("variables",) + path), var
    for (opt_path, slot, owner), var in graph.slots.items():
        yield _name(("optimizers", _name(opt_path), "slots", slot) + owner), var


def _read(var: Any, name: str) -> np.ndarray:
    a = np.asarray(var.numpy())
    try:
        dtype_name(a.dtype)
    except UnsupportedDtypeError:
        raise UnsupportedDtypeError(f"variable {name!r} has dtype {a.dtype}, which ckptfmt cannot store") from None
    return a


def _nest(flat: dict[Path, Any]) -> dict[str, Any]:
    root: dict[str, Any] = {}
    for path, value in flat.items():
        node = root
        for part in path[:-1]:
            node = node.setdefault(part, {})
        node[path[-1]] = value
    return root


def _flatten(tree: Any, prefix: Path, where: str) -> dict[Path, np.ndarray]:
    out: dict[Path, np.ndarray] = {}

    def visit(node: Any, path: Path) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                visit(v, path + (str(k),))
        elif isinstance(node, np.ndarray):
            out[path] = node
        else:
            raise FormatError(f"{where}: expected an array at {_name(prefix + path)!r}, found {type(node).__name__}")

    visit(tree, ())
    return out


def to_state(obj: Any) -> dict[str, Any]:
    """Build the tree of every variable reachable from ``obj`` (see the module docstring).

    ``obj`` is a ``tf.train.Checkpoint``, a Keras model (its optimizer is a child of it
    once compiled) or any ``tf.Module`` / trackable. Values are read once from each variable.

    Raises:
        UnsupportedDtypeError: a variable's dtype cannot be stored (e.g. ``tf.string``).

    Example:
        >>> import tensorflow as tf
        >>> ck = tf.train.Checkpoint(step=tf.Variable(3, dtype=tf.int64))
        >>> sorted(to_state(ck)["variables"])
        ['save_counter', 'step']
    """
    graph = _Graph(obj)
    variables = {p: _read(v, _name(("variables",) + p)) for p, v in graph.variables.items()}
    optimizers: dict[str, Any] = {}
    for opt_path, owners in graph.owners.items():
        slots: dict[str, dict[Path, np.ndarray]] = {}
        for (o_path, slot, owner), var in graph.slots.items():
            if o_path == opt_path:
                slots.setdefault(slot, {})[owner] = _read(var, f"{_name(owner)} slot {slot}")
        optimizers[_name(opt_path)] = {
            "trainable_variables": [_name(o) for o in owners],
            "slots": {slot: _nest(flat) for slot, flat in slots.items()},
        }
    return {
        "framework": {"name": "tensorflow", "version": tf.__version__, "layout": LAYOUT_VERSION},
        "variables": _nest(variables),
        "optimizers": optimizers,
    }


def from_state(tree: dict[str, Any], obj: Any, *, strict: bool = True) -> None:
    """Assign the values of a tree built by :func:`to_state` to the variables of ``obj``.

    ``obj`` must be built (its variables exist); an unbuilt Keras optimizer is built with
    the variables it had when saved. Everything is checked before the first assignment, so
    a failed restore changes nothing.

    Args:
        tree: the loaded checkpoint tree.
        obj: the object to restore into, of the same architecture as the saved one.
        strict: every variable of ``obj`` must be in the checkpoint and every checkpoint
            entry must have a variable; without it, unmatched entries are skipped.

    Raises:
        ConversionError: missing or unexpected entries (all of them are listed), or shapes
            that differ (named with both shapes).
        FormatError: the tree is not a TensorFlow checkpoint written by ckptfmt.

    Example:
        >>> import tensorflow as tf
        >>> a = tf.Module(); a.w = tf.Variable([1.0])
        >>> b = tf.Module(); b.w = tf.Variable([0.0])
        >>> from_state(to_state(a), b); b.w.numpy()
        array([1.], dtype=float32)
    """
    framework = tree.get("framework") if isinstance(tree, dict) else None
    if not isinstance(framework, dict) or framework.get("name") != "tensorflow":
        raise FormatError(f"not a checkpoint written by ckptfmt.tensorflow (framework entry: {framework!r})")
    saved = {("variables",) + p: a for p, a in _flatten(tree.get("variables", {}), ("variables",), "checkpoint").items()}
    saved_opts = tree.get("optimizers") or {}

    graph = _Graph(obj)
    built_any = False
    for opt_name, entry in saved_opts.items():
        opt = graph.optimizers.get(_split(opt_name))
        owner_names = entry.get("trainable_variables") or []
        if opt is None or opt.built or not owner_names:
            continue
        owners = [graph.variables.get(_split(n)) for n in owner_names]
        if missing := [n for n, v in zip(owner_names, owners) if v is None]:
            raise ConversionError(
                f"cannot build optimizer {opt_name!r}: the variables it updates are missing: {', '.join(missing)}"
            )
        opt.build(owners)
        built_any = True
    if built_any:
        graph = _Graph(obj)

    for opt_name, entry in saved_opts.items():
        for slot, nested in (entry.get("slots") or {}).items():
            prefix = ("optimizers", opt_name, "slots", slot)
            for owner, a in _flatten(nested, prefix, "checkpoint").items():
                saved[("optimizers", opt_name, "slots", slot) + owner] = a
    targets = {("variables",) + p: v for p, v in graph.variables.items()}
    for (opt_path, slot, owner), var in graph.slots.items():
        targets[("optimizers", _name(opt_path), "slots", slot) + owner] = var

    problems = []
    if strict:
        if missing := [_name(k) for k in targets if k not in saved]:
            problems.append(f"missing from checkpoint: {', '.join(missing)}")
        if unexpected := [_name(k) for k in saved if k not in targets]:
            problems.append(f"not in {type(obj).__name__}: {', '.join(unexpected)}")
    assignments = []
    for key, var in targets.items():
        if key not in saved:
            continue
        a = saved[key]
        shape = tuple(var.shape)
        if len(shape) != a.ndim or any(d is not None and d != s for d, s in zip(shape, a.shape)):
            problems.append(f"shape mismatch at {_name(key)}: checkpoint {a.shape} vs variable {shape}")
            continue
        assignments.append((var, a.astype(tf.as_dtype(var.dtype).as_numpy_dtype, copy=False)))
    if problems:
        raise ConversionError(
            f"checkpoint does not fit {type(obj).__name__}: " + " | ".join(problems)
            + "; restore into an object of the saved architecture whose variables exist"
            " (call a Keras model once to build it), or pass strict=False to skip unmatched entries"
        )
    for var, a in assignments:
        var.assign(a)
