"""Optimizer slots converted without copies: strided views and tensors written when read.

:func:`entry_views` runs a plan entry's reshapes and transposes as one strided view of its
source, so a transposed kernel (and each of its optimizer slots) is never copied whole; the
writers (:mod:`ckptfmt.converters.keras.outputs`, :mod:`ckptfmt.converters.keras.torchfile`)
copy such a view block by block. :class:`StreamedTensor` declares a tensor whose value is
produced only when it is written.
"""

from __future__ import annotations

__all__ = ["StreamedTensor", "DeferredEntry", "entry_views"]

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ckptfmt._writer import DeferredTensor
from ckptfmt.converters.mapping.rules import Entry
from ckptfmt.errors import ConversionError


@dataclass(frozen=True, slots=True)
class StreamedTensor(DeferredTensor):
    """A :class:`DeferredTensor` whose ``load()`` may return the tensor not yet reshaped.

    ``load()`` returns an array of the declared dtype and size whose elements in C order are
    the tensor's (what :func:`entry_views` gives: a transposed kernel whose final reshape
    would copy it). Writers stream an array's bytes in C order, which a reshape does not
    change, so they write it as it is; a contiguous one is reshaped here (free).

    Example:
        >>> t = StreamedTensor((2, 3), np.dtype(np.float32), lambda: np.zeros((3, 2), np.float32).T)
        >>> t.materialize("w").shape
        (2, 3)
    """

    def materialize(self, name: str) -> np.ndarray:
        arr = np.asarray(self.load())
        if arr.size != math.prod(self.shape) or arr.dtype != np.dtype(self.dtype):
            raise ConversionError(f"tensor {name!r}: the converted value is {arr.dtype}{list(arr.shape)} but was declared "
                                  f"{np.dtype(self.dtype)}{list(self.shape)}")
        return arr.reshape(self.shape) if arr.flags.c_contiguous or arr.ndim == len(self.shape) == 0 else arr


def entry_views(entry: Entry, arrays: tuple[np.ndarray, ...], *, slots: bool = False) -> tuple[np.ndarray, ...]:
    """``entry.run(arrays)`` without copies: a transposed target stays a strided view.

    A final reshape that would copy (merging transposed axes, e.g. a flattened kernel's rows
    permuted to channels-first) is left out: each result holds its target's elements in C
    order, maybe in another shape (a :class:`StreamedTensor`'s value). A writer copies such a
    view block by block, so a big kernel never exists twice in full.

    Example:
        >>> from ckptfmt.converters.mapping import Mapping, Convert, Transpose
        >>> e = Mapping((Convert(("k",), ("w",), (Transpose((1, 0)),)),)).plan({"k": (2, 3)}).entries[0]
        >>> entry_views(e, (np.zeros((2, 3)),))[0].flags.c_contiguous
        False
    """
    ops = [op.for_slots() if slots else op for op in entry.ops]
    if len(arrays) == 1 and ops and all(type(op).__name__ in ("Reshape", "Transpose") for op in ops):
        return (_layout_view(np.asarray(arrays[0]), ops),)
    for op in ops:
        arrays = op.apply(arrays)
    return tuple(np.asarray(a) for a in arrays)


def _merge_runs(logical: Sequence[int], target: Sequence[int]) -> list[list[int]] | None:
    """The runs of consecutive ``logical`` axes whose products are ``target``'s dims, or None."""
    if any(d <= 0 for d in (*logical, *target)):
        return None
    runs: list[list[int]] = []
    i = 0
    for want in target:
        run, n = [], 1
        while n < want and i < len(logical):
            run.append(i)
            n *= logical[i]
            i += 1
        if n != want:
            return None
        runs.append(run)
    rest = list(range(i, len(logical)))
    if any(logical[j] != 1 for j in rest) or (rest and not runs):
        return None
    if rest:
        runs[-1] += rest
    return runs


def _layout_view(a: np.ndarray, ops: Sequence[Any]) -> np.ndarray:
    """Reshapes and transposes of ``a`` as one strided view whose elements in C order are the result's.

    Each axis of the result is a run of consecutive axes of the view, so a transpose moves
    runs and a reshape that merges (or splits at) run boundaries only regroups them; a
    reshape that does not fit the runs is done by numpy (copying where it must).
    """
    fine, groups = a, [[i] for i in range(a.ndim)]
    for op in ops:
        if type(op).__name__ == "Transpose":
            fine = fine.transpose([f for ax in op.axes for f in groups[ax]])
            sizes = [len(groups[ax]) for ax in op.axes]
            starts = np.cumsum([0, *sizes])
            groups = [list(range(int(starts[k]), int(starts[k] + n))) for k, n in enumerate(sizes)]
            continue
        logical = [math.prod(fine.shape[f] for f in g) for g in groups]
        runs = _merge_runs(logical, tuple(op.shape))
        if runs is None:
            fine = np.reshape(fine.reshape(logical) if fine.ndim != len(logical) else fine, op.shape)
            groups = [[i] for i in range(fine.ndim)]
        else:
            groups = [[f for ax in run for f in groups[ax]] for run in runs]
    return fine


class DeferredEntry:
    """One plan entry run on one slot's deferred values when the first of its targets is loaded;
    the entry's other targets wait here until they are loaded (in entry order, at once)."""

    def __init__(self, entry: Entry, values: tuple[Any, ...]) -> None:
        self._entry, self._values = entry, values
        self._ready: dict[int, np.ndarray] = {}

    def load(self, i: int) -> np.ndarray:
        if i not in self._ready:
            arrays = tuple(v.materialize("optimizer slot") if isinstance(v, DeferredTensor) else np.asarray(v)
                           for v in self._values)
            self._ready = dict(enumerate(entry_views(self._entry, arrays, slots=True)))
        return self._ready.pop(i)
