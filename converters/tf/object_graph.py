"""Make sense of the ``_CHECKPOINTABLE_OBJECT_GRAPH`` of a TF2 object-based checkpoint.

TensorFlow stores, next to the tensors, a serialized ``TrackableObjectGraph``: node 0 is
the object passed to ``tf.train.Checkpoint``; each node lists named children, the
tensors it saved (``attributes``: name, full_name, checkpoint_key) and, for optimizers,
``slot_variables`` (which slot node belongs to which variable node).

:class:`CheckpointObjectGraph` turns that into, for every checkpoint key, the object
path(s) from the root (several when objects are shared, e.g. Keras 3 saves a kernel
both as ``model/_operations/1/_kernel`` and ``optimizer/_trainable_variables/0``), the
attribute name, and for optimizer slots the variable and slot name. Three slot styles
resolve:

* TF1/tf.keras 2 optimizers: explicit ``slot_variables`` (keys with ``.OPTIMIZER_SLOT``).
* Keras 3 optimizers: per-slot lists such as ``_momentums``/``_velocities``
  (``momentums`` for SGD) whose *i*-th element is the slot of
  ``_trainable_variables/i``; the slot name is the singular of the list name.

Example:
    >>> from ckptfmt.converters.tf import TFCheckpointReader, read_object_graph
    >>> graph = read_object_graph(TFCheckpointReader("fixtures/tf/tf_module"))  # doctest: +SKIP
    >>> graph.info("model/scale/.OPTIMIZER_SLOT/optimizer/m/.ATTRIBUTES/VARIABLE_VALUE").slot.slot_name  # doctest: +SKIP
    'm'
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

from ckptfmt.errors import ConversionError, FormatError, LimitExceededError, TensorNotFoundError

from ._index import OBJECT_GRAPH_KEY
from ._proto import (
    ObjectReference,
    SerializedTensor,
    SlotVariableReference,
    TrackableObject,
    TrackableObjectGraph,
)

__all__ = [
    "CheckpointObjectGraph",
    "RootObject",
    "root_objects",
    "choose_roots",
    "KeyInfo",
    "SlotInfo",
    "build_object_graph",
    "read_object_graph",
    "escape_local_name",
    "split_object_path",
]

_MAX_NODES = 10_000_000
_OPTIMIZER_SEGMENTS = {".OPTIMIZER_SLOT", "_trainable_variables", "_variables", "optimizer"}
_MAX_PATHS_PER_NODE = 32
# Keras 3 optimizer children that are not per-variable slot lists.
_KERAS3_NON_SLOT = {"_variables", "_trainable_variables", "_trainable_variables_indices",
                    "_iterations", "_learning_rate", "_tracked"}


def escape_local_name(name: str) -> str:
    """Escape a child name as TensorFlow does inside keys: ``.`` -> ``..``, ``/`` -> ``./``."""
    return name.replace(".", "..").replace("/", "./")


def split_object_path(path: str) -> list[str]:
    """Split an escaped key/path on unescaped ``/``; special segments keep their leading dot.

    Example:
        >>> split_object_path("model/a..b/.ATTRIBUTES/VARIABLE_VALUE")
        ['model', 'a.b', '.ATTRIBUTES', 'VARIABLE_VALUE']
    """
    parts: list[str] = []
    cur: list[str] = []
    i = 0
    while i < len(path):
        c = path[i]
        if c == "." and i + 1 < len(path) and path[i + 1] in "./":
            cur.append(path[i + 1])
            i += 2
            continue
        if c == "/":
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(c)
        i += 1
    parts.append("".join(cur))
    return parts


@dataclass(frozen=True, slots=True)
class SlotInfo:
    """An optimizer slot: which variable it belongs to and its slot name.

    Attributes:
        variable_key: Checkpoint key of the variable the slot tracks.
        variable_path: Object path of that variable (the first path under ``model`` when
            there is one, else its shortest path).
        slot_name: ``m``, ``v``, ``momentum``, ``velocity``...
        optimizer_path: Object path of the optimizer holding the slot.
    """

    variable_key: str
    variable_path: str
    slot_name: str
    optimizer_path: str


@dataclass(frozen=True, slots=True)
class KeyInfo:
    """What a checkpoint key is, according to the object graph.

    Attributes:
        key: The checkpoint key.
        node_id: Node in the object graph.
        path: Preferred object path (under ``model`` when reachable there, otherwise the
            shortest); segments are escaped local names joined by ``/``.
        aliases: Every path reaching the node, shortest first (includes ``path``).
        attribute: Saved attribute name, usually ``VARIABLE_VALUE``.
        full_name: The variable name TensorFlow recorded (e.g. ``conv/kernel``).
        slot: For an optimizer slot variable, what it belongs to; else None.
    """

    key: str
    node_id: int
    path: str
    aliases: tuple[str, ...]
    attribute: str
    full_name: str
    slot: SlotInfo | None = None


def _singular(list_name: str) -> str:
    name = list_name.lstrip("_")
    if name.endswith("ies"):
        return name[:-3] + "y"
    if name.endswith("s"):
        return name[:-1]
    return name


class CheckpointObjectGraph:
    """Resolved view of a ``TrackableObjectGraph``.

    Args:
        graph: The decoded graph.
        where: Used in error messages (file name).

    Example:
        >>> g = CheckpointObjectGraph.from_bytes(serialized)  # doctest: +SKIP
        >>> g.info("model/w/.ATTRIBUTES/VARIABLE_VALUE").path  # doctest: +SKIP
        'model/w'
    """

    def __init__(self, graph: TrackableObjectGraph, where: str = "object graph",
                 preferred_root: str = "model") -> None:
        self.graph = graph
        self.where = where
        n = len(graph.nodes)
        if n > _MAX_NODES:
            raise LimitExceededError(f"{where}: {n} nodes exceed the limit of {_MAX_NODES}")
        for i, node in enumerate(graph.nodes):
            for c in node.children:
                if not 0 <= c.node_id < n:
                    raise FormatError(
                        f"{where}: node {i} child {c.local_name!r} points to node {c.node_id} "
                        f"outside 0..{n - 1}; the checkpoint's object graph is corrupt"
                    )
            for s in node.slot_variables:
                if not (0 <= s.original_variable_node_id < n and 0 <= s.slot_variable_node_id < n):
                    raise FormatError(
                        f"{where}: node {i} slot {s.slot_name!r} references nodes "
                        f"{s.original_variable_node_id}/{s.slot_variable_node_id} outside 0..{n - 1}"
                    )
        self._paths = self._all_paths()
        self._preferred_root = preferred_root
        self._slots = self._find_slots()
        self._infos = self._build_infos()

    @classmethod
    def from_bytes(cls, data: bytes, where: str = "object graph") -> CheckpointObjectGraph:
        """Decode a serialized ``TrackableObjectGraph``."""
        return cls(TrackableObjectGraph.decode(data, where), where)

    def to_bytes(self) -> bytes:
        """Serialize the graph again (unknown fields preserved)."""
        return self.graph.encode()

    # -- paths -----------------------------------------------------------------------

    def _all_paths(self) -> list[list[str]]:
        """Breadth-first paths to every node, a bounded number per node, shortest first."""
        nodes = self.graph.nodes
        paths: list[list[str]] = [[] for _ in nodes]
        if not nodes:
            return paths
        paths[0].append("")
        queue: deque[tuple[int, str, int]] = deque([(0, "", 0)])
        budget = 64 * len(nodes) + 1024
        while queue and budget > 0:
            node_id, path, depth = queue.popleft()
            if depth > len(nodes):
                continue
            for c in nodes[node_id].children:
                budget -= 1
                child_path = f"{path}/{escape_local_name(c.local_name)}" if path else escape_local_name(c.local_name)
                plist = paths[c.node_id]
                if len(plist) >= _MAX_PATHS_PER_NODE or child_path in plist:
                    continue
                # Every new path is expanded so shared subtrees get all their aliases; the
                # per-node cap and the budget bound the work even for cyclic graphs.
                plist.append(child_path)
                queue.append((c.node_id, child_path, depth + 1))
        return paths

    def paths(self, node_id: int) -> tuple[str, ...]:
        """Every path from the root to ``node_id`` (bounded), shortest first."""
        return tuple(self._paths[node_id])

    def _preferred(self, node_id: int) -> str:
        """The path a user would name: under the model, not through an optimizer's lists.

        Keras 3 models also track their compiled optimizer, so ``model/optimizer/...``
        paths exist too; paths through optimizer bookkeeping are the last resort.
        """
        plist = self._paths[node_id]
        root = self._preferred_root + "/"

        def via_optimizer(p: str) -> bool:
            segs = p.split("/")
            return bool(_OPTIMIZER_SEGMENTS.intersection(segs))

        for p in plist:
            if p.startswith(root) and not via_optimizer(p):
                return p
        for p in plist:
            if not via_optimizer(p):
                return p
        return plist[0] if plist else ""

    # -- slots -----------------------------------------------------------------------

    def _variable_key(self, node_id: int) -> str:
        attrs = self.graph.nodes[node_id].attributes
        for a in attrs:
            if a.name == "VARIABLE_VALUE":
                return a.checkpoint_key
        return attrs[0].checkpoint_key if attrs else ""

    def _find_slots(self) -> dict[int, tuple[int, str, int]]:
        """Map slot node id -> (variable node id, slot name, optimizer node id)."""
        nodes = self.graph.nodes
        slots: dict[int, tuple[int, str, int]] = {}
        for opt_id, node in enumerate(nodes):
            for s in node.slot_variables:
                slots[s.slot_variable_node_id] = (s.original_variable_node_id, s.slot_name, opt_id)
            children = {c.local_name: c.node_id for c in node.children}
            if "_trainable_variables" not in children or "_variables" not in children:
                continue
            trainable = {c.local_name: c.node_id for c in nodes[children["_trainable_variables"]].children}
            for list_name, list_id in children.items():
                if list_name in _KERAS3_NON_SLOT:
                    continue
                elems = nodes[list_id].children
                if not elems or not all(c.local_name.isdigit() and c.local_name in trainable for c in elems):
                    continue
                if not all(nodes[c.node_id].attributes for c in elems):
                    continue
                for c in elems:
                    slots.setdefault(c.node_id, (trainable[c.local_name], _singular(list_name), opt_id))
        return slots

    def _build_infos(self) -> dict[str, KeyInfo]:
        infos: dict[str, KeyInfo] = {}
        for node_id, node in enumerate(self.graph.nodes):
            slot = None
            if node_id in self._slots:
                var_id, slot_name, opt_id = self._slots[node_id]
                slot = SlotInfo(self._variable_key(var_id), self._preferred(var_id), slot_name,
                                self._preferred(opt_id))
            plist = list(self._paths[node_id])
            if not plist and slot is not None:
                # Legacy slot nodes hang off no parent; TF names them after variable and optimizer.
                plist = [f"{slot.variable_path}/.OPTIMIZER_SLOT/{slot.optimizer_path}/{escape_local_name(slot.slot_name)}"]
            for a in node.attributes:
                infos[a.checkpoint_key] = KeyInfo(
                    key=a.checkpoint_key,
                    node_id=node_id,
                    path=self._preferred(node_id) or (plist[0] if plist else ""),
                    aliases=tuple(plist),
                    attribute=a.name,
                    full_name=a.full_name,
                    slot=slot,
                )
        return infos

    # -- queries ---------------------------------------------------------------------

    def keys(self) -> list[str]:
        """Every checkpoint key the graph describes."""
        return list(self._infos)

    def info(self, key: str) -> KeyInfo:
        """Resolve one checkpoint key.

        Raises:
            TensorNotFoundError: The graph does not mention ``key``.
        """
        try:
            return self._infos[key]
        except KeyError:
            raise TensorNotFoundError(
                f"{self.where}: checkpoint key {key!r} is not described by the object graph; "
                "list described keys with .keys()"
            ) from None

    def resolve(self) -> dict[str, KeyInfo]:
        """``{checkpoint key: KeyInfo}`` for every key."""
        return dict(self._infos)

    def slots_of(self, variable_key: str) -> dict[str, str]:
        """``{slot name: slot checkpoint key}`` for the variable stored under ``variable_key``."""
        return {i.slot.slot_name: k for k, i in self._infos.items()
                if i.slot is not None and i.slot.variable_key == variable_key}


def read_object_graph(reader: object) -> CheckpointObjectGraph:
    """Decode the object graph of an open :class:`TFCheckpointReader`.

    Raises:
        TensorNotFoundError: The checkpoint has no object graph (e.g. a TF1 Saver checkpoint).
        FormatError: The stored graph does not decode.
    """
    if OBJECT_GRAPH_KEY not in reader:  # type: ignore[operator]
        raise TensorNotFoundError(
            f"{getattr(reader, 'index_path', reader)}: no {OBJECT_GRAPH_KEY} tensor; this is a "
            "name-based (TF1 Saver) checkpoint, whose keys are already variable names"
        )
    value = reader.get(OBJECT_GRAPH_KEY)  # type: ignore[attr-defined]
    if not isinstance(value, np.ndarray) or value.dtype != object or value.shape != ():
        raise FormatError(f"{getattr(reader, 'index_path', reader)}: {OBJECT_GRAPH_KEY} is not a string scalar")
    return CheckpointObjectGraph.from_bytes(value.item(), f"{getattr(reader, 'index_path', reader)} {OBJECT_GRAPH_KEY}")


def build_object_graph(keys: Iterable[str]) -> bytes:
    """Build a serialized ``TrackableObjectGraph`` from object-based checkpoint keys.

    Keys look like ``model/dense/kernel/.ATTRIBUTES/VARIABLE_VALUE``; optimizer slots like
    ``model/dense/kernel/.OPTIMIZER_SLOT/optimizer/m/.ATTRIBUTES/VARIABLE_VALUE``. Keys
    without ``/.ATTRIBUTES/`` are ignored. To copy a real graph (with aliases) from a
    template checkpoint, use ``read_object_graph(template).to_bytes()`` instead.

    Example:
        >>> data = build_object_graph(["model/w/.ATTRIBUTES/VARIABLE_VALUE"])
        >>> CheckpointObjectGraph.from_bytes(data).info("model/w/.ATTRIBUTES/VARIABLE_VALUE").path
        'model/w'
    """
    children: list[dict[str, int]] = [{}]
    attrs: list[list[SerializedTensor]] = [[]]
    slots: dict[int, list[SlotVariableReference]] = {}

    def node_for(segments: list[str]) -> int:
        cur = 0
        for seg in segments:
            nxt = children[cur].get(seg)
            if nxt is None:
                nxt = len(children)
                children.append({})
                attrs.append([])
                children[cur][seg] = nxt
            cur = nxt
        return cur

    pending_slots = []
    for key in keys:
        parts = split_object_path(key)
        if ".ATTRIBUTES" not in parts[:-1]:
            continue
        cut = parts.index(".ATTRIBUTES")
        attr_name = "/".join(parts[cut + 1 :])
        obj = parts[:cut]
        if ".OPTIMIZER_SLOT" in obj:
            s = obj.index(".OPTIMIZER_SLOT")
            pending_slots.append((obj[:s], obj[s + 1 : -1], obj[-1], attr_name, key))
            continue
        nid = node_for(obj)
        attrs[nid].append(SerializedTensor(attr_name, "/".join(obj), key))
    for var_segs, opt_segs, slot_name, attr_name, key in pending_slots:
        var_id, opt_id = node_for(var_segs), node_for(opt_segs)
        slot_id = len(children)
        children.append({})
        attrs.append([SerializedTensor(attr_name, f"{'/'.join(var_segs)}/{slot_name}", key)])
        slots.setdefault(opt_id, []).append(SlotVariableReference(var_id, slot_name, slot_id))
    nodes = tuple(
        TrackableObject(
            children=tuple(ObjectReference(i, name) for name, i in children[n].items()),
            attributes=tuple(attrs[n]),
            slot_variables=tuple(slots.get(n, ())),
        )
        for n in range(len(children))
    )
    return TrackableObjectGraph(nodes).encode()


# ------------------------------------------------------------------ what the root holds

#: Children an optimizer object has in every TF/Keras version: its step counter.
_OPTIMIZER_COUNTERS = {"iter", "iterations", "_iterations"}


@dataclass(frozen=True, slots=True)
class RootObject:
    """One attribute of the saved ``tf.train.Checkpoint(...)``, and what it is.

    Attributes:
        name: the attribute name (``model``, ``net``, ``optimizer``, ``save_counter``...).
        kind: ``"model"`` (a subtree holding variables), ``"optimizer"`` (slot variables
            or a step counter), ``"variable"`` (a single variable such as ``save_counter``)
            or ``"empty"`` (no variables).
        variables: how many variables (not optimizer slots) lie under it.
    """

    name: str
    kind: str
    variables: int


def _is_optimizer(graph: TrackableObjectGraph, node_id: int) -> bool:
    node = graph.nodes[node_id]
    names = {c.local_name for c in node.children}
    if node.slot_variables or names & _OPTIMIZER_COUNTERS:
        return True
    return "_trainable_variables" in names and "_variables" in names  # Keras 3


def root_objects(g: CheckpointObjectGraph) -> list[RootObject]:
    """What each attribute of the checkpoint's root object is, found from the graph alone.

    The attribute names are whatever the user wrote (``tf.train.Checkpoint(net=model,
    optimizer=opt)``, ``tf.train.Checkpoint(bag=module)``): models are told from optimizers
    by structure (optimizers own slot variables or a step counter), never by name.

    Example:
        >>> graph = read_object_graph(TFCheckpointReader("fixtures/tf/tf_module"))  # doctest: +SKIP
        >>> [(r.name, r.kind) for r in root_objects(graph)]  # doctest: +SKIP
        [('model', 'model'), ('optimizer', 'optimizer'), ('save_counter', 'variable')]
    """
    graph = g.graph
    if not graph.nodes:
        return []
    slot_nodes = set(g._slots)
    out = []
    for child in graph.nodes[0].children:
        cid = child.node_id
        if _is_optimizer(graph, cid):
            out.append(RootObject(child.local_name, "optimizer", 0))
            continue
        seen, stack, count = {cid}, [cid], 0
        while stack:  # the subtree, not through nested optimizers (a compiled model's)
            n = stack.pop()
            node = graph.nodes[n]
            if n not in slot_nodes and any(a.name == "VARIABLE_VALUE" for a in node.attributes):
                count += 1
            for c in node.children:
                if c.node_id not in seen and not _is_optimizer(graph, c.node_id):
                    seen.add(c.node_id)
                    stack.append(c.node_id)
        node = graph.nodes[cid]
        if count == 1 and not node.children and node.attributes:
            out.append(RootObject(child.local_name, "variable", 1))
        else:
            out.append(RootObject(child.local_name, "model" if count else "empty", count))
    return out


def choose_roots(g: CheckpointObjectGraph, root: str | None = None, *, where: str = "the checkpoint") -> tuple[str, str | None]:
    """``(model attribute, optimizer attribute or None)`` of a checkpoint's root object.

    Args:
        g: the object graph.
        root: the model's attribute when the caller knows it (``--root NAME``).
        where: names the checkpoint in errors.

    Raises:
        ConversionError: ``root`` is not an attribute holding variables; no attribute holds
            model variables; or several do and ``root`` does not say which (all listed).

    Example:
        >>> choose_roots(graph)  # doctest: +SKIP
        ('net', 'optimizer')
    """
    objs = root_objects(g)
    listing = ", ".join(f"{o.name} ({o.kind}{f', {o.variables} variables' if o.kind == 'model' else ''})" for o in objs) or "nothing"
    models = [o.name for o in objs if o.kind == "model"]
    optimizers = [o.name for o in objs if o.kind == "optimizer"]
    if root is not None:
        if root not in {o.name for o in objs if o.kind in ("model", "variable")}:
            raise ConversionError(f"{where}: the checkpoint's root has no model attribute {root!r}; it holds: {listing}")
        chosen = root
    elif len(models) == 1:
        chosen = models[0]
    elif not models:
        raise ConversionError(f"{where}: no model variables found; the checkpoint's root holds: {listing}")
    else:
        raise ConversionError(
            f"{where}: the checkpoint holds several models: {', '.join(models)}; choose one with --root NAME "
            f"(root=NAME in the library). The root holds: {listing}"
        )
    optimizer = optimizers[0] if len(optimizers) == 1 else ("optimizer" if "optimizer" in optimizers else None)
    return chosen, optimizer
