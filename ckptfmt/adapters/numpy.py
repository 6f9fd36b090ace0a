"""The numpy adapter: numpy is the common currency every other adapter converts through.

A *state tree* is nested dicts (``str`` or ``int`` keys), lists and tuples whose leaves are
numpy arrays or plain values (int, float, bool, str, bytes, None). :func:`to_state` checks a
tree against that contract before anything is written, so errors name the offending path;
:func:`map_leaves` is the traversal the framework adapters share.

Example:
    >>> import numpy as np
    >>> from ckptfmt.adapters import numpy as npa
    >>> tree = npa.to_state({"w": np.ones(2, np.float32), "lr": np.float64(0.1)})
    >>> tree["lr"].shape, tree["lr"].dtype
    ((), dtype('float64'))
"""

from __future__ import annotations

__all__ = ["to_state", "from_state", "map_leaves", "check_leaf"]

from collections.abc import Callable
from typing import Any

import numpy as np

from ckptfmt.errors import UnsupportedDtypeError
from ckptfmt.format.dtypes import dtype_name
from ckptfmt.format.tree import PLAIN_TYPES, join_path


def map_leaves(fn: Callable[[Any, str], Any], tree: Any, path: str = "") -> Any:
    """Rebuild ``tree`` with every non-container leaf replaced by ``fn(leaf, name)``.

    ``name`` is the leaf's tensor name as the format spells it (components joined by ``/``,
    escaped with :func:`ckptfmt.format.tree.join_path`). Dicts keep their key order, tuples
    stay tuples; subclasses of dict/list/tuple (``OrderedDict``, named tuples) come back as
    the plain builtin.

    Example:
        >>> map_leaves(lambda v, p: p, {"a": [1, (2,)]})
        {'a': ['a/0', ('a/1/0',)]}
    """
    if isinstance(tree, dict):
        return {k: map_leaves(fn, v, join_path(path, _key(k, path))) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        items = [map_leaves(fn, v, join_path(path, i)) for i, v in enumerate(tree)]
        return items if isinstance(tree, list) else tuple(items)
    return fn(tree, path)


def _key(k: Any, path: str) -> str | int:
    if isinstance(k, (str, int)) and not isinstance(k, bool):
        return k
    raise UnsupportedDtypeError(
        f"dict key {k!r} at {path or '<root>'!r} is a {type(k).__name__}; only str and int keys can be saved"
    )


def check_leaf(value: Any, path: str) -> Any:
    """Return a storable leaf for ``value`` (a numpy scalar becomes a 0-d array).

    Raises:
        UnsupportedDtypeError: ``value`` cannot be stored; the message names ``path``.

    Example:
        >>> check_leaf(np.float16(1), "lr")
        array(1., dtype=float16)
    """
    if isinstance(value, np.ndarray):
        try:
            dtype_name(value.dtype)
        except UnsupportedDtypeError as e:
            raise UnsupportedDtypeError(f"array at {path or '<root>'!r}: {e}") from None
        return value
    if isinstance(value, np.generic):
        # A numpy scalar keeps its dtype as a 0-d array (np.float32(1) is not a Python float).
        return check_leaf(np.asarray(value), path)
    if isinstance(value, PLAIN_TYPES):
        return value
    raise UnsupportedDtypeError(
        f"cannot save a {type(value).__module__}.{type(value).__qualname__} at {path or '<root>'!r}: "
        "leaves must be numpy arrays or int/float/bool/str/bytes/None"
    )


def to_state(obj: Any) -> Any:
    """Validate a numpy tree and normalise it for :func:`ckptfmt.save`.

    Numpy scalars become 0-d arrays, container subclasses become plain dicts/lists/tuples.
    Arrays are passed through without copying.

    Raises:
        UnsupportedDtypeError: a leaf, key or dtype cannot be stored; the message names its path.

    Example:
        >>> import numpy as np
        >>> to_state((np.int8(3), None))
        (array(3, dtype=int8), None)
    """
    return map_leaves(check_leaf, obj)


def from_state(tree: Any) -> Any:
    """Return a loaded tree as numpy objects: it already is one, so nothing is copied.

    Present so that every adapter has the same two verbs.

    Example:
        >>> from_state({"step": 3})
        {'step': 3}
    """
    return tree
