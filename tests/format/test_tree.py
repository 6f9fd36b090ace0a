from __future__ import annotations

import numpy as np
import pytest

from ckptfmt.errors import FormatError, LimitExceededError, UnsupportedDtypeError
from ckptfmt.format.tree import decode_tree, encode_tree, escape_key, join_path


def _enc(obj):
    tensors = []

    def on_tensor(x, name):
        tensors.append(name)
        return len(tensors) - 1

    return encode_tree(obj, on_tensor, lambda x: isinstance(x, np.ndarray)), tensors


def test_names_follow_paths_and_escape():
    _, names = _enc({"a": {"b/c": np.ones(1), 3: [np.ones(1)]}, "x~y": (np.ones(1),)})
    assert names == ["a/b~1c", "a/3/0", "x~0y/0"]
    assert join_path("", "w") == "w" and escape_key(5) == "5"


def test_round_trip_preserves_types():
    obj = {"d": {1: "one", "two": 2.5}, "l": [True, None, b"raw"], "t": (np.zeros(2), -3)}
    node, names = _enc(obj)
    out = decode_tree(node, len(names), lambda i: f"T{i}")
    assert out == {"d": {1: "one", "two": 2.5}, "l": [True, None, b"raw"], "t": ("T0", -3)}
    assert isinstance(out["t"], tuple) and isinstance(out["l"], list)


@pytest.mark.parametrize("bad", [{1.5: 1}, {(1,): 2}, {True: 1}, {"s": {1, 2}}, {"o": object()}, {"i": 1 << 70}])
def test_unsupported_values(bad):
    with pytest.raises(UnsupportedDtypeError):
        _enc(bad)


def test_framework_objects_get_a_hint():
    class Tensor:  # looks like a torch tensor by module name
        pass

    Tensor.__module__ = "torch"
    with pytest.raises(UnsupportedDtypeError, match="ckptfmt.torch.save"):
        _enc({"w": Tensor()})


def test_depth_limit():
    deep = x = []
    for _ in range(200):
        x.append([])
        x = x[0]
    with pytest.raises(LimitExceededError):
        _enc(deep)


@pytest.mark.parametrize(
    "node",
    [5, [], ["t", 7], ["t", -1], ["t", True], ["z", 1], ["d", ["a"], []], ["d", [1.5], [["v", 1]]],
     ["d", ["a", "a"], [["v", 1], ["v", 2]]], ["l", 3], ["v", [1]], ["v", {"a": 1}]],
)
def test_malformed_nodes_raise_format_error(node):
    with pytest.raises(FormatError):
        decode_tree(node, 2, lambda i: i)
