"""The tree of a saved state: nested dicts, lists and tuples with tensor and plain leaves.

In the manifest a tree node is a msgpack array whose first element is a one-letter tag:

=========================  ===============================================
``["t", i]``               tensor number ``i`` of the manifest's tensor table
``["v", value]``           a plain leaf: int, float, bool, str, bytes or None
``["d", keys, values]``    a dict; keys are str or int, in insertion order
``["l", items]``           a list
``["u", items]``           a tuple
=========================  ===============================================

A tensor's *name* is the path of keys/indices from the root joined by ``/``, with ``~``
written ``~0`` and ``/`` written ``~1`` inside a key (as in JSON Pointer). A flat
``{"layer.weight": w}`` state therefore has the tensor name ``layer.weight``.

Example:
    >>> from ckptfmt.format.tree import escape_key
    >>> escape_key("a/b~c")
    'a~1b~0c'
"""

from __future__ import annotations

__all__ = ["TensorRef", "escape_key", "unescape_key", "join_path", "encode_tree", "decode_tree", "PLAIN_TYPES",
           "dense_list_indices"]

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ckptfmt.errors import FormatError, LimitExceededError, UnsupportedDtypeError
from ckptfmt.format.spec import LIMITS, Limits

PLAIN_TYPES = (bool, int, float, str, bytes, type(None))
_INT_MIN, _UINT_MAX = -(1 << 63), (1 << 64) - 1


@dataclass(frozen=True, slots=True)
class TensorRef:
    """A placeholder for a tensor leaf: its index in the tensor table and its name."""

    index: int
    name: str


def dense_list_indices(paths: Any) -> str | None:
    """Why key paths (tuples of str/int) do not nest into dense lists, or None when they do.

    An int in a path is a list index. Under each prefix, the ints used must be exactly
    ``0..n-1``: a forged index (``("opt", 10**13)``) would otherwise make the nesting build a
    list of that length. Checked in time and memory linear in the paths' total length.

    Example:
        >>> dense_list_indices([("a", 0), ("a", 1, "x")]) is None
        True
        >>> dense_list_indices([("a", 5)])
        "index 5 under ('a',) with only 1 distinct indices there"
    """
    seen: dict[tuple, set] = {}
    for path in paths:
        for j, key in enumerate(path):
            if type(key) is int:
                if key < 0:
                    return f"negative index {key} under {tuple(path[:j])!r}"
                seen.setdefault(tuple(path[:j]), set()).add(key)
    for prefix, ints in seen.items():
        top = max(ints)
        if top >= len(ints):
            return f"index {top} under {prefix!r} with only {len(ints)} distinct indices there"
    return None


def escape_key(key: str | int) -> str:
    """Escape one path component so that ``/`` only ever separates components."""
    if isinstance(key, int):
        return str(key)
    return key.replace("~", "~0").replace("/", "~1")


def unescape_key(part: str) -> str:
    """The inverse of :func:`escape_key` for one path component (``~1`` -> ``/``, ``~0`` -> ``~``).

    Example:
        >>> unescape_key(escape_key("a/b~c"))
        'a/b~c'
    """
    return part.replace("~1", "/").replace("~0", "~")


def join_path(prefix: str, key: str | int) -> str:
    """Append an escaped component to a ``/``-joined path."""
    part = escape_key(key)
    return f"{prefix}/{part}" if prefix else part


def encode_tree(
    obj: Any,
    on_tensor: Callable[[Any, str], int],
    is_tensor: Callable[[Any], bool],
    limits: Limits = LIMITS,
) -> list:
    """Encode a state tree into manifest nodes.

    Args:
        obj: the state (nested dict/list/tuple with tensor and plain leaves).
        on_tensor: called with (tensor, name) for each tensor leaf; returns its index.
        is_tensor: tells tensor leaves from everything else.
        limits: the depth limit to enforce.

    Raises:
        UnsupportedDtypeError: a leaf is neither a tensor nor a plain value.
        LimitExceededError: the tree is nested deeper than the limit.
    """

    def enc(node: Any, path: str, depth: int) -> list:
        if depth > limits.max_tree_depth:
            raise LimitExceededError(f"state is nested deeper than {limits.max_tree_depth} levels at {path!r}")
        if is_tensor(node):
            return ["t", on_tensor(node, path)]
        if isinstance(node, dict):
            keys = list(node)
            leaf_ok = depth + 1 <= limits.max_tree_depth
            for k in keys:
                if type(k) is str:
                    continue
                if isinstance(k, bool) or not isinstance(k, (str, int)):
                    raise UnsupportedDtypeError(
                        f"dict key {k!r} at {path or '<root>'!r} is a {type(k).__name__}; only str and int keys can be saved"
                    )
                if isinstance(k, int) and not _INT_MIN <= k <= _UINT_MAX:
                    raise UnsupportedDtypeError(f"dict key {k} at {path or '<root>'!r} does not fit in 64 bits")
            values = []
            for k in keys:
                v = node[k]
                part = k.replace("~", "~0").replace("/", "~1") if type(k) is str else escape_key(k)
                child = f"{path}/{part}" if path else part
                # The common child, a tensor, without a call (enc's own first step).
                values.append(["t", on_tensor(v, child)] if leaf_ok and is_tensor(v) else enc(v, child, depth + 1))
            return ["d", keys, values]
        if isinstance(node, list):
            return ["l", [enc(v, join_path(path, i), depth + 1) for i, v in enumerate(node)]]
        if isinstance(node, tuple):
            return ["u", [enc(v, join_path(path, i), depth + 1) for i, v in enumerate(node)]]
        if isinstance(node, PLAIN_TYPES):
            if isinstance(node, int) and not isinstance(node, bool) and not _INT_MIN <= node <= _UINT_MAX:
                raise UnsupportedDtypeError(f"int at {path or '<root>'!r} does not fit in 64 bits; store it as a str")
            return ["v", node]
        hint = ""
        mod = type(node).__module__.split(".")[0]
        if mod in ("torch", "tensorflow", "keras", "jax"):
            hint = f"; convert {mod} objects with ckptfmt.{'torch' if mod == 'torch' else 'tensorflow'}.save or to numpy first"
        raise UnsupportedDtypeError(
            f"cannot save a {type(node).__module__}.{type(node).__qualname__} at {path or '<root>'!r}: "
            f"leaves must be numpy arrays or int/float/bool/str/bytes/None{hint}"
        )

    return enc(obj, "", 0)


def decode_tree(
    node: Any,
    n_tensors: int,
    make_leaf: Callable[[int], Any],
    limits: Limits = LIMITS,
    where: str = "manifest",
    *,
    n_shards: int = 0,
    make_shard: Callable[[int], Any] | None = None,
    make_opaque: Callable[[int, str], Any] | None = None,
) -> Any:
    """Rebuild a state tree from manifest nodes, validating every node.

    Sharded checkpoints (1.3) add ``["s", j]``, sharded tensor ``j``, and ``["o", i]``, an
    object serialized by its framework into tensor ``i`` (bytes only it can restore).

    Args:
        node: the encoded root.
        n_tensors: size of the tensor table (every ``["t", i]`` must index it).
        make_leaf: builds the value of tensor leaf ``i``.
        n_shards: size of the sharded-tensor table (every ``["s", j]`` must index it).
        make_shard: builds sharded tensor ``j``.
        make_opaque: builds (or refuses) the object stored in tensor ``i`` at ``path``.
        limits: the depth and node-count limits to enforce.
        where: names the file in error messages.

    Raises:
        FormatError: a node is malformed, or the tree is too deep or too large.
    """
    count = 0
    max_depth, max_nodes = limits.max_tree_depth, limits.max_tree_nodes

    # A node's path is kept as a linked pair (parent_path, key) and rendered only for an
    # error message: joining strings at every node costs more than the rest of decoding.
    def render(path: Any) -> str:
        keys = []
        while path is not None:
            path, k = path
            keys.append(escape_key(k))
        return "/".join(reversed(keys))

    def bad(msg: str, path: Any) -> FormatError:
        return FormatError(f"{where}: invalid tree node at {render(path) or '<root>'!r}: {msg}")

    def too_big() -> LimitExceededError:
        return LimitExceededError(f"{where}: tree exceeds depth {max_depth} or {max_nodes} nodes")

    def dec(n: Any, path: Any, depth: int) -> Any:
        nonlocal count
        count += 1
        if depth > max_depth or count > max_nodes:
            raise too_big()
        if not isinstance(n, (list, tuple)) or not n or not isinstance(n[0], str):
            raise bad("expected [tag, ...]", path)
        tag = n[0]
        if tag == "t":
            if len(n) != 2 or type(n[1]) is not int or not 0 <= n[1] < n_tensors:
                raise bad(f"tensor index out of range 0..{n_tensors - 1}", path)
            return make_leaf(n[1])
        if tag == "s":
            if len(n) != 2 or type(n[1]) is not int or not 0 <= n[1] < n_shards or make_shard is None:
                raise bad(f"sharded tensor index out of range 0..{n_shards - 1}", path)
            return make_shard(n[1])
        if tag == "o":
            if len(n) != 2 or type(n[1]) is not int or not 0 <= n[1] < n_tensors or make_opaque is None:
                raise bad(f"opaque object index out of range 0..{n_tensors - 1}", path)
            return make_opaque(n[1], path)
        if tag == "v":
            if len(n) != 2 or not isinstance(n[1], PLAIN_TYPES):
                raise bad("plain leaf must be int, float, bool, str, bytes or None", path)
            return n[1]
        if tag == "d":
            if len(n) != 3 or not isinstance(n[1], (list, tuple)) or not isinstance(n[2], (list, tuple)) or len(n[1]) != len(n[2]):
                raise bad("dict node must be ['d', keys, values] of equal length", path)
            out = {}
            leaf_ok = depth + 1 <= max_depth
            for k, v in zip(n[1], n[2]):
                tk = type(k)
                if tk is not str and (tk is bool or not isinstance(k, (str, int))):
                    raise bad(f"dict key {k!r} is not str or int", path)
                if k in out:
                    raise bad(f"duplicate dict key {k!r}", path)
                # The common child, a valid tensor leaf, without a call (same checks as dec).
                if leaf_ok and type(v) is list and len(v) == 2 and v[0] == "t" and type(v[1]) is int and 0 <= v[1] < n_tensors:
                    count += 1
                    if count > max_nodes:
                        raise too_big()
                    out[k] = make_leaf(v[1])
                else:
                    out[k] = dec(v, (path, k), depth + 1)
            return out
        if tag in ("l", "u"):
            if len(n) != 2 or not isinstance(n[1], (list, tuple)):
                raise bad("list/tuple node must be [tag, items]", path)
            items = [dec(v, (path, i), depth + 1) for i, v in enumerate(n[1])]
            return items if tag == "l" else tuple(items)
        raise bad(f"unknown tag {tag!r}", path)

    return dec(node, None, 0)
