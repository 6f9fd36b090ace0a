"""Tensor specs and tensor operations as data: what a :class:`~.rules.Convert` rule runs.

Each op knows its shape effect (:meth:`Op.infer`, the dry run), how to run on numpy arrays
(:meth:`Op.apply`), its inverse (for the way back) and the op optimizer slots go through
instead (:meth:`Op.for_slots`). Ops that work on one tensor apply to every tensor in flight.

Example:
    >>> Transpose((1, 0)).infer((TensorSpec((3, 2), "float32"),))
    (TensorSpec(shape=(2, 3), dtype='float32'),)
    >>> Reshape((6,)).inverse((TensorSpec((2, 3)),))
    Reshape(shape=(2, 3))
"""

from __future__ import annotations

__all__ = ["TensorSpec", "spec_of", "Op", "Transpose", "Reshape", "Split", "Concat", "GateReorder", "Cast", "Sum",
           "AppendZeros", "Repeat", "Mean", "Fill", "Discard", "AppendFill", "DropLast", "Subtract", "OP_TYPES"]

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from ckptfmt.errors import ConversionError

Shape = tuple[int, ...]

# --------------------------------------------------------------------------------------------
# Tensor specs


@dataclass(frozen=True, slots=True)
class TensorSpec:
    """Shape and dtype of a tensor, without its data (``dtype`` None when unknown)."""

    shape: Shape
    dtype: str | None = None

    def __str__(self) -> str:
        return _fmt_shape(self.shape)


def spec_of(value: Any) -> TensorSpec:
    """A :class:`TensorSpec` from an array, a spec, or a bare shape tuple.

    Example:
        >>> spec_of(np.zeros((2, 3), np.float32))
        TensorSpec(shape=(2, 3), dtype='float32')
        >>> spec_of((4,)).shape
        (4,)
    """
    if isinstance(value, TensorSpec):
        return value
    if hasattr(value, "shape") and hasattr(value, "dtype"):
        dtype = value.dtype
        return TensorSpec(tuple(int(d) for d in value.shape), str(np.dtype(dtype)) if _is_np_dtype(dtype) else str(dtype))
    if isinstance(value, (tuple, list)):
        return TensorSpec(tuple(int(d) for d in value))
    raise TypeError(f"cannot take the shape of {type(value).__name__}; give an array, a TensorSpec or a shape tuple")


def _is_np_dtype(dtype: Any) -> bool:
    try:
        np.dtype(dtype)
    except TypeError:
        return False
    return True


def _fmt_shape(shape: Shape) -> str:
    return "(" + ", ".join(str(d) for d in shape) + ("," if len(shape) == 1 else "") + ")"


# --------------------------------------------------------------------------------------------
# Ops


class Op:
    """A tensor operation on the tuple of tensors in flight through a :class:`Convert` rule.

    Subclasses are frozen, slotted dataclasses; their fields are all that is serialised.
    ``infer`` is the dry run of ``apply``; ``inverse`` (given the specs the op received) is the
    op that undoes it; ``for_slots`` is the op optimizer slots go through instead (layout ops
    are their own; ops that invent or merge parameters are not, see :class:`AppendZeros`).
    """

    __slots__ = ()
    n_in: ClassVar[int | None] = None  # None: any count

    def infer(self, specs: tuple[TensorSpec, ...]) -> tuple[TensorSpec, ...]:
        raise NotImplementedError

    def apply(self, arrays: tuple[np.ndarray, ...]) -> tuple[np.ndarray, ...]:
        raise NotImplementedError

    def inverse(self, specs: tuple[TensorSpec, ...]) -> Op:
        raise NotImplementedError

    def for_slots(self) -> Op:
        return self

    def describe(self) -> str:
        args = ", ".join(_fmt_value(getattr(self, f.name)) for f in dataclasses.fields(self))
        return f"{type(self).__name__}({args})"

    def _check_count(self, specs: tuple[TensorSpec, ...]) -> None:
        if self.n_in is not None and len(specs) != self.n_in:
            raise ConversionError(f"{self.describe()} takes {self.n_in} tensor(s), got {len(specs)}")


def _fmt_value(v: Any) -> str:
    if isinstance(v, tuple):
        return _fmt_shape(v) if all(isinstance(x, int) for x in v) else "(" + ", ".join(map(str, v)) + ")"
    return repr(v)


class _EachOp(Op):
    """An op applied to every tensor in flight independently."""

    __slots__ = ()

    def infer(self, specs):
        return tuple(self._spec(s) for s in specs)

    def apply(self, arrays):
        return tuple(self._one(a) for a in arrays)

    def _spec(self, spec: TensorSpec) -> TensorSpec:
        raise NotImplementedError

    def _one(self, a: np.ndarray) -> np.ndarray:
        raise NotImplementedError


@dataclass(frozen=True, slots=True)
class Transpose(_EachOp):
    """Permute axes: ``out = np.transpose(x, axes)``."""

    axes: tuple[int, ...]

    def _spec(self, spec):
        if sorted(self.axes) != list(range(len(spec.shape))):
            raise ConversionError(f"{self.describe()} does not fit a tensor of shape {_fmt_shape(spec.shape)}")
        return TensorSpec(tuple(spec.shape[a] for a in self.axes), spec.dtype)

    def _one(self, a):
        return np.transpose(a, self.axes)

    def inverse(self, specs):
        return Transpose(tuple(int(i) for i in np.argsort(self.axes)))


@dataclass(frozen=True, slots=True)
class Reshape(_EachOp):
    """Reshape (C order); one dimension may be -1."""

    shape: tuple[int, ...]

    def _spec(self, spec):
        size = math.prod(spec.shape)
        known = math.prod(d for d in self.shape if d != -1)
        out = self.shape
        if self.shape.count(-1) > 1 or (-1 in self.shape and (known == 0 or size % known)):
            raise ConversionError(f"{self.describe()} does not fit a tensor of shape {_fmt_shape(spec.shape)}")
        if -1 in self.shape:
            out = tuple(size // known if d == -1 else d for d in self.shape)
        if math.prod(out) != size:
            raise ConversionError(f"{self.describe()} does not fit a tensor of shape {_fmt_shape(spec.shape)}")
        return TensorSpec(out, spec.dtype)

    def _one(self, a):
        return a.reshape(self.shape)

    def inverse(self, specs):
        shapes = {s.shape for s in specs}
        if len(shapes) != 1:
            raise ConversionError(f"cannot invert {self.describe()} applied to tensors of different shapes")
        return Reshape(shapes.pop())


@dataclass(frozen=True, slots=True)
class Split(Op):
    """One tensor into ``len(sizes)`` tensors along ``dim``."""

    dim: int
    sizes: tuple[int, ...]
    n_in: ClassVar[int | None] = 1

    def infer(self, specs):
        self._check_count(specs)
        (s,) = specs
        dim = self.dim % len(s.shape)
        if sum(self.sizes) != s.shape[dim]:
            raise ConversionError(f"{self.describe()} does not fit a tensor of shape {_fmt_shape(s.shape)}")
        return tuple(TensorSpec(s.shape[:dim] + (n,) + s.shape[dim + 1 :], s.dtype) for n in self.sizes)

    def apply(self, arrays):
        return tuple(np.split(arrays[0], np.cumsum(self.sizes)[:-1].tolist(), axis=self.dim))

    def inverse(self, specs):
        return Concat(self.dim)


@dataclass(frozen=True, slots=True)
class Concat(Op):
    """All tensors in flight into one, along ``dim``."""

    dim: int

    def infer(self, specs):
        if not specs:
            raise ConversionError("Concat needs at least one tensor")
        rank = len(specs[0].shape)
        dim = self.dim % rank
        rest = {s.shape[:dim] + s.shape[dim + 1 :] for s in specs}
        if len(rest) != 1 or any(len(s.shape) != rank for s in specs):
            raise ConversionError(f"{self.describe()}: shapes {[s.shape for s in specs]} differ off dim {self.dim}")
        return (TensorSpec(specs[0].shape[:dim] + (sum(s.shape[dim] for s in specs),) + specs[0].shape[dim + 1 :], specs[0].dtype),)

    def apply(self, arrays):
        return (np.concatenate(arrays, axis=self.dim),)

    def inverse(self, specs):
        return Split(self.dim, tuple(s.shape[self.dim % len(s.shape)] for s in specs))


@dataclass(frozen=True, slots=True)
class GateReorder(_EachOp):
    """Reorder equal-sized gate blocks along ``dim``.

    ``dim`` is cut into ``len(gates_src)`` equal blocks named by ``gates_src``; the output puts
    them in the order ``gates_dst`` (the same names, permuted).
    """

    gates_src: tuple[str, ...]
    gates_dst: tuple[str, ...]
    dim: int

    def _perm(self) -> list[int]:
        if sorted(self.gates_src) != sorted(self.gates_dst) or len(set(self.gates_src)) != len(self.gates_src):
            raise ConversionError(f"{self.describe()}: gates_dst must be a permutation of gates_src")
        return [self.gates_src.index(g) for g in self.gates_dst]

    def _spec(self, spec):
        self._perm()
        if spec.shape[self.dim % len(spec.shape)] % len(self.gates_src):
            raise ConversionError(f"{self.describe()}: dim {self.dim} of {_fmt_shape(spec.shape)} is not {len(self.gates_src)} equal gates")
        return spec

    def _one(self, a):
        blocks = np.split(a, len(self.gates_src), axis=self.dim)
        return np.concatenate([blocks[i] for i in self._perm()], axis=self.dim)

    def inverse(self, specs):
        return GateReorder(self.gates_dst, self.gates_src, self.dim)


@dataclass(frozen=True, slots=True)
class Cast(_EachOp):
    """Change dtype (numpy dtype name, e.g. ``"float32"``)."""

    dtype: str

    def _spec(self, spec):
        return TensorSpec(spec.shape, str(np.dtype(self.dtype)))

    def _one(self, a):
        return a.astype(self.dtype, copy=False)

    def inverse(self, specs):
        dtypes = {s.dtype for s in specs}
        if len(dtypes) != 1 or None in dtypes:
            raise ConversionError(f"cannot invert {self.describe()}: the source dtype is unknown")
        return Cast(dtypes.pop())


@dataclass(frozen=True, slots=True)
class Sum(Op):
    """All tensors in flight (same shape) into their sum; inverse :class:`AppendZeros`."""

    def infer(self, specs):
        if not specs or len({s.shape for s in specs}) != 1:
            raise ConversionError(f"Sum needs tensors of one shape, got {[s.shape for s in specs]}")
        return (specs[0],)

    def apply(self, arrays):
        out = arrays[0].copy()
        for a in arrays[1:]:
            out += a
        return (out,)

    def inverse(self, specs):
        return AppendZeros(len(specs) - 1)

    def for_slots(self):
        # Merged parameters received identical gradients; their slot statistics agree.
        return Mean()


@dataclass(frozen=True, slots=True)
class AppendZeros(Op):
    """One tensor into itself followed by ``count`` zero tensors of its shape.

    Used where one framework has a single parameter and the other a sum of several (LSTM
    biases). Optimizer slots are statistics of gradients, which the summed parameters share,
    so slots are repeated instead (:class:`Repeat`).
    """

    count: int = 1
    n_in: ClassVar[int | None] = 1

    def infer(self, specs):
        self._check_count(specs)
        return specs * (self.count + 1)

    def apply(self, arrays):
        return (arrays[0],) + tuple(np.zeros_like(arrays[0]) for _ in range(self.count))

    def inverse(self, specs):
        return Sum()

    def for_slots(self):
        return Repeat(self.count + 1)


@dataclass(frozen=True, slots=True)
class Repeat(Op):
    """One tensor into ``count`` copies; inverse :class:`Mean`."""

    count: int
    n_in: ClassVar[int | None] = 1

    def infer(self, specs):
        self._check_count(specs)
        return specs * self.count

    def apply(self, arrays):
        return tuple(arrays[0].copy() for _ in range(self.count))

    def inverse(self, specs):
        return Mean()


@dataclass(frozen=True, slots=True)
class Mean(Op):
    """All tensors in flight (same shape) into their mean; inverse :class:`Repeat`."""

    def infer(self, specs):
        return Sum().infer(specs)

    def apply(self, arrays):
        return (np.mean(np.stack(arrays), axis=0).astype(arrays[0].dtype),)

    def inverse(self, specs):
        return Repeat(len(specs))


@dataclass(frozen=True, slots=True)
class Fill(Op):
    """No tensor into a constant one (a target that has no source, e.g. ``num_batches_tracked``)."""

    shape: tuple[int, ...]
    dtype: str
    value: float = 0
    n_in: ClassVar[int | None] = 0

    def infer(self, specs):
        self._check_count(specs)
        return (TensorSpec(self.shape, str(np.dtype(self.dtype))),)

    def apply(self, arrays):
        return (np.full(self.shape, self.value, dtype=self.dtype),)

    def inverse(self, specs):
        return Discard()


@dataclass(frozen=True, slots=True)
class Discard(Op):
    """All tensors in flight into none (the way back of :class:`Fill`)."""

    def infer(self, specs):
        return ()

    def apply(self, arrays):
        return ()

    def inverse(self, specs):
        if len(specs) != 1 or specs[0].dtype is None:
            raise ConversionError("cannot invert Discard without one source of known dtype")
        return Fill(specs[0].shape, specs[0].dtype, 0)


@dataclass(frozen=True, slots=True)
class AppendFill(Op):
    """One tensor into itself followed by a constant one; inverse :class:`DropLast`.

    Lets one pattern rule fill a tensor per match, e.g. every BatchNorm's
    ``num_batches_tracked`` beside its ``running_mean``:
    ``Convert(("re:(.*)/moving_mean",), (r"\1.running_mean", r"\1.num_batches_tracked"),
    (AppendFill((), "int64"),))``.

    Example:
        >>> [a.dtype.name for a in AppendFill((), "int64").apply((np.zeros(3, np.float32),))]
        ['float32', 'int64']
    """

    shape: tuple[int, ...]
    dtype: str
    value: float = 0
    n_in: ClassVar[int | None] = 1

    def infer(self, specs):
        self._check_count(specs)
        return specs + (TensorSpec(tuple(self.shape), str(np.dtype(self.dtype))),)

    def apply(self, arrays):
        return arrays + (np.full(tuple(self.shape), self.value, dtype=self.dtype),)

    def inverse(self, specs):
        return DropLast()


@dataclass(frozen=True, slots=True)
class DropLast(Op):
    """All tensors in flight but the last (the way back of :class:`AppendFill`)."""

    def infer(self, specs):
        if not specs:
            raise ConversionError("DropLast needs at least one tensor")
        return specs[:-1]

    def apply(self, arrays):
        return arrays[:-1]

    def inverse(self, specs):
        if specs[-1].dtype is None:
            raise ConversionError("cannot invert DropLast without the dropped tensor's dtype")
        return AppendFill(specs[-1].shape, specs[-1].dtype, 0)


@dataclass(frozen=True, slots=True)
class Subtract(Op):
    """Two tensors of one shape into their difference ``a - b``; inverse :class:`AppendZeros`.

    Folds a convolution's bias into the BatchNormalization after it, for a torch model whose
    convolution has no bias: ``BN(Wx + b)`` with ``moving_mean`` equals ``BN(Wx)`` with
    ``running_mean = moving_mean - b``. The way back gives the mean and a zero bias, which
    computes the same. The bias's optimizer state has no torch parameter, so a conversion
    with the optimizer refuses it (convert the weights only).

    Example:
        >>> Subtract().apply((np.array([3.0]), np.array([1.0])))
        (array([2.]),)
    """

    n_in: ClassVar[int | None] = 2

    def infer(self, specs):
        self._check_count(specs)
        if specs[0].shape != specs[1].shape:
            raise ConversionError(f"Subtract needs tensors of one shape, got {specs[0].shape} and {specs[1].shape}")
        return (specs[0],)

    def apply(self, arrays):
        return (arrays[0] - arrays[1],)

    def inverse(self, specs):
        return AppendZeros(1)


OP_TYPES: dict[str, type[Op]] = {
    c.__name__: c
    for c in (Transpose, Reshape, Split, Concat, GateReorder, Cast, Sum, AppendZeros, Repeat, Mean, Fill, Discard,
              AppendFill, DropLast, Subtract)
}

