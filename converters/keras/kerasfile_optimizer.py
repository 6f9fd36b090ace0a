"""A Keras 3 weights file's optimizer: its positional variables tied to the model's.

Keras 3 saves the optimizer as ``optimizer/vars/N``: 0 the iteration counter, 1 the
learning rate (absent with a schedule), then its slots, slot kind by slot kind, each in the
order of the model's trainable variables. :func:`tie_optimizer` names every slot after its
variable: the optimizer's config (or, in a bare ``.weights.h5``, the slot count) says which
slots there are; the config's layer order says which variable each belongs to, and without
one the order is solved from the slots' shapes (:func:`_solve_order`) and refused when they
do not decide. What cannot be tied is returned as a problem, never guessed.

Part of :mod:`ckptfmt.converters.keras.kerasfile`.
"""

from __future__ import annotations

__all__ = ["OptimizerVars", "tie_optimizer"]

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .kerasfile_h5 import KerasFileReader
from .kerasfile_layers import FileLayer, FileObject


@dataclass(frozen=True, slots=True)
class OptimizerVars:
    """Where a Keras 3 optimizer's variables go.

    Attributes:
        iterations_key: the iteration counter's dataset, None when ``vars/0`` is not one.
        learning_rate_key: the learning rate's dataset, None under a schedule.
        slots: ``{variable path: {slot: dataset}}``.
        order: the layer order the slots settle, None when it was known or is not settled.
        problems: why the slots could not be tied (then ``slots`` is empty).
        notes: what was assumed.
    """

    iterations_key: str | None = None
    learning_rate_key: str | None = None
    slots: dict[str, dict[str, str]] = field(default_factory=dict)
    order: list[FileLayer] | None = None
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


class _Unplaced(Exception):
    """The slots cannot be tied to the model's variables; the message says why."""


def tie_optimizer(reader: KerasFileReader, opt: FileObject, layers: list[FileLayer], cfg: dict[str, Any],
                  order_known: bool) -> OptimizerVars:
    """Tie the optimizer's positional variables to the model's trainable variables.

    Args:
        reader: the open file.
        opt: the ``optimizer`` object (its ``vars`` group).
        layers: the model's layers, in the model's order when ``order_known``.
        cfg: the optimizer's config (``{"class_name": "Adam", ...}``), empty when the file has none.
        order_known: whether ``layers`` are in the model's order.

    Example:
        >>> tie_optimizer(reader, objs["optimizer"], layers, {"class_name": "Adam"}, True).slots  # doctest: +SKIP
        {'conv/kernel': {'momentum': 'optimizer/vars/2', 'velocity': 'optimizer/vars/8'}, ...}
    """
    keys = [f"optimizer/vars/{i}" for i in range(opt.n)]
    shapes = [reader.shape(k) for k in keys]
    if not keys or shapes[0] != ():
        return OptimizerVars(problems=[f"{reader.path}: optimizer/vars/0 is not the iteration counter"])
    it_key = keys[0]
    lr_key = _learning_rate_key(keys, shapes, cfg)
    first = 2 if lr_key else 1
    rest, rest_shapes = keys[first:], shapes[first:]
    try:
        cls, groups = _slot_groups(reader, opt, layers, cfg, len(rest))
        if not groups:
            problems = [f"{reader.path}: a Keras {cls} without slots, but the optimizer holds {len(rest)} more variables"] if rest else []
            return OptimizerVars(it_key, lr_key, problems=problems)
        layout, var_shapes = _slot_layout(reader, cls, cfg, groups, rest, rest_shapes)
        order, layers, notes = _variable_order(reader, layers, var_shapes, order_known)
    except _Unplaced as e:
        return OptimizerVars(it_key, lr_key, problems=[str(e)])
    trainable = [k for l in layers for k in l.trainable]
    by_h5 = {h5: v for l in layers for v, h5 in l.weights}
    slots: dict[str, dict[str, str]] = {}
    for v, s, key in layout:
        slots.setdefault(by_h5[trainable[v]], {})[s] = key
    return OptimizerVars(it_key, lr_key, slots, order, [], notes)


def _learning_rate_key(keys: list[str], shapes: list[tuple[int, ...]], cfg: dict[str, Any]) -> str | None:
    """``vars/1`` when it is the learning rate: a scalar, and the config states no schedule."""
    lr_is_var = not isinstance(cfg.get("learning_rate"), dict) if cfg else (len(shapes) > 1 and shapes[1] == ())
    return keys[1] if lr_is_var and len(keys) > 1 and shapes[1] == () else None


def _slot_groups(reader: KerasFileReader, opt: FileObject, layers: list[FileLayer], cfg: dict[str, Any],
                 n_slots: int) -> tuple[str, list[list[str]]]:
    """The optimizer's class and its slots per variable, grouped as Keras saves them.

    From the config when there is one; from a ``.weights.h5``'s slot count otherwise, which
    decides only when every layer is trainable and one set of options fits it.
    """
    cls = _opt_class(cfg, opt.name)
    if cls is None:
        raise _Unplaced(f"cannot tell the Keras optimizer class of {reader.path} (named {opt.name!r}); "
                        "convert the model's .keras file, or pass --no-optimizer")
    if cfg.get("use_ema") or cfg.get("gradient_accumulation_steps"):
        raise _Unplaced("optimizer use_ema / gradient_accumulation_steps have no torch slot")
    if cfg:
        return cls, _SLOT_GROUPS[cls](cfg)
    n_train = sum(len(l.trainable) for l in layers)
    fits = [g for g in _SLOT_VARIANTS[cls] if n_train and sum(map(len, g)) * n_train == n_slots]
    if len(fits) != 1:
        raise _Unplaced(
            f"{reader.path}: a Keras {cls} with {n_slots} slots for {n_train} trainable variables: "
            + ("the file does not say which options made them" if fits else "frozen layers, or options the file does not record")
            + "; convert the model's .keras file instead, or pass --no-optimizer")
    return cls, fits[0]


def _slot_layout(reader: KerasFileReader, cls: str, cfg: dict[str, Any], groups: list[list[str]], rest: list[str],
                 rest_shapes: list[tuple[int, ...]]) -> tuple[list[tuple[int, str, str]], list[tuple[int, ...]]]:
    """``(variable index, slot, key)`` of every slot, and the variables' shapes, each slot checked against its variable's."""
    per_var = sum(len(g) for g in groups)
    if len(rest) % per_var:
        raise _Unplaced(f"{reader.path}: {len(rest)} optimizer slots are not {per_var} per variable "
                        f"(Keras {cls} with {cfg or 'its defaults'})")
    n = len(rest) // per_var
    first = groups[0]
    var_shapes = [rest_shapes[i * len(first)] for i in range(n)]
    pos = 0
    layout: list[tuple[int, str, str]] = []
    for g in groups:
        for v in range(n):
            for s in g:
                if rest_shapes[pos] != var_shapes[v]:
                    raise _Unplaced(f"{reader.path}: optimizer slot {rest[pos]} has shape {rest_shapes[pos]}, "
                                    f"its variable {var_shapes[v]}")
                layout.append((v, s, rest[pos]))
                pos += 1
    return layout, var_shapes


def _variable_order(reader: KerasFileReader, layers: list[FileLayer], var_shapes: list[tuple[int, ...]], order_known: bool
                    ) -> tuple[list[FileLayer] | None, list[FileLayer], list[str]]:
    """The layers in the order of the optimizer's variables: the solved order (or None when it was
    known), the layers in that order, and notes. The known order must match the slots' shapes."""
    if order_known:
        trainable = [k for l in layers for k in l.trainable]
        if [reader.shape(k) for k in trainable] != var_shapes:
            raise _Unplaced(f"{reader.path}: the optimizer holds slots for {len(var_shapes)} variables whose shapes do not "
                            f"follow the model's {len(trainable)} trainable variables")
        return None, layers, []
    solved = _solve_order(reader, layers, var_shapes)
    if solved is None:
        raise _Unplaced(f"{reader.path}: the optimizer slots' shapes do not tell which layer each "
                        "belongs to (layers of the same shapes, or frozen layers); convert the "
                        "model's .keras file instead, or pass --no-optimizer")
    return solved, solved, ["layer order solved from the optimizer slots' shapes (a .weights.h5 records none)"]


def _opt_class(cfg: dict[str, Any], name: str) -> str | None:
    cls = cfg.get("class_name")
    if cls:
        return str(cls) if cls in _SLOT_GROUPS else None
    base = re.sub(r"_\d+$", "", name.lower())
    return {"adam": "Adam", "adam_w": "AdamW", "adamw": "AdamW", "sgd": "SGD", "rm_sprop": "RMSprop", "rmsprop": "RMSprop"}.get(base)


_SLOT_GROUPS: dict[str, Callable[[dict[str, Any]], list[list[str]]]] = {
    "Adam": lambda c: [["momentum", "velocity"]] + ([["velocity_hat"]] if c.get("amsgrad") else []),
    "AdamW": lambda c: [["momentum", "velocity"]] + ([["velocity_hat"]] if c.get("amsgrad") else []),
    "SGD": lambda c: [["momentum"]] if c.get("momentum", 0) else ([] if c else [["momentum"]]),
    "RMSprop": lambda c: [["velocity"]] + ([["momentum"]] if c.get("momentum", 0) else [])
    + ([["average_gradient"]] if c.get("centered") else []),
}


_SLOT_VARIANTS: dict[str, list[list[list[str]]]] = {
    "Adam": [[["momentum", "velocity"]], [["momentum", "velocity"], ["velocity_hat"]]],
    "AdamW": [[["momentum", "velocity"]], [["momentum", "velocity"], ["velocity_hat"]]],
    "SGD": [[], [["momentum"]]],
    "RMSprop": [[["velocity"]], [["velocity"], ["momentum"]], [["velocity"], ["average_gradient"]],
                [["velocity"], ["momentum"], ["average_gradient"]]],
}


def _solve_order(reader: KerasFileReader, layers: list[FileLayer], var_shapes: list[tuple[int, ...]]) -> list[FileLayer] | None:
    """The one order of the layers (keeping each chain's order) whose trainable shapes are ``var_shapes``."""
    chains: dict[str, list[FileLayer]] = {}
    for l in layers:
        chains.setdefault(l.chain, []).append(l)
    names = list(chains)
    for c in names:
        chains[c].sort(key=lambda l: l.ordinal)
    blocks = {id(l): [reader.shape(k) for k in l.trainable] for l in layers}
    memo: dict[tuple[int, ...], int] = {}

    def offset(state: tuple[int, ...]) -> int:
        return sum(len(blocks[id(chains[c][i])]) for c, k in zip(names, state) for i in range(k))

    def count(state: tuple[int, ...]) -> int:
        if state in memo:
            return memo[state]
        if all(k == len(chains[c]) for c, k in zip(names, state)):
            memo[state] = 1 if offset(state) == len(var_shapes) else 0
            return memo[state]
        total, off = 0, offset(state)
        for j, (c, k) in enumerate(zip(names, state)):
            if k < len(chains[c]):
                b = blocks[id(chains[c][k])]
                if var_shapes[off:off + len(b)] == b:
                    total += count(state[:j] + (k + 1,) + state[j + 1:])
                    if total > 1:
                        break
        memo[state] = min(total, 2)
        return memo[state]

    start = tuple(0 for _ in names)
    if len(names) > 64 or count(start) != 1:
        return None
    # the unique path; weightless-in-optimizer layers (frozen) make it not unique, refused above
    order: list[FileLayer] = []
    state = start
    while not all(k == len(chains[c]) for c, k in zip(names, state)):
        off = offset(state)
        for j, (c, k) in enumerate(zip(names, state)):
            if k < len(chains[c]):
                b = blocks[id(chains[c][k])]
                nxt = state[:j] + (k + 1,) + state[j + 1:]
                if var_shapes[off:off + len(b)] == b and count(nxt) == 1:
                    order.append(chains[c][k])
                    state = nxt
                    break
    return order
